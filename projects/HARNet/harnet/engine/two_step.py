"""The two-step schedule (paper, Sec. 4; py-HAR's training scripts): step 1 trains the main network with the
spatial and channel attention switched off; step 2 switches them on and continues from
step 1's final weights. Keys: ``cfg.SOLVER.TWO_STEP.*`` (see ``harnet/config.py``).

Each step is a normal Detectron2 training run in its own folder (``OUTPUT_DIR/step1``,
``OUTPUT_DIR/step2``), so each is resumable on its own. With ``resume=True`` a finished
step (its ``model_final.pth`` exists) is skipped and an unfinished one is resumed from its
last checkpoint.
"""
import logging
import os

from detectron2.utils import comm
from detectron2.utils.file_io import PathManager

__all__ = ["two_step_configs", "train_two_step", "FINAL_CHECKPOINT"]

FINAL_CHECKPOINT = "model_final.pth"
logger = logging.getLogger(__name__)


def two_step_configs(cfg):
    """The configs of the two steps.

    Args:
        cfg (CfgNode): a HARNet config (``add_harnet_config`` applied).

    Returns:
        list[tuple[str, CfgNode]]: ``[("step1", cfg1), ("step2", cfg2)]``, frozen. Step 1:
        ``MODEL.HARNET.<name>.ENABLED = False`` for every name in
        ``SOLVER.TWO_STEP.STEP1_DISABLE``, ``SOLVER.TWO_STEP.STEP1_*`` schedule, no
        evaluation unless ``STEP1_EVAL``. Step 2: the config's own switches and ``SOLVER``
        schedule, ``MODEL.WEIGHTS`` = step 1's final checkpoint.
    """
    ts = cfg.SOLVER.TWO_STEP
    for name in ts.STEP1_DISABLE:
        node = cfg.MODEL.HARNET.get(name)
        if node is None or "ENABLED" not in node:
            raise KeyError(
                f"SOLVER.TWO_STEP.STEP1_DISABLE names {name!r}, but cfg.MODEL.HARNET.{name}"
                ".ENABLED does not exist"
            )
    if ts.STEP1_MAX_ITER <= 0:
        raise ValueError(f"SOLVER.TWO_STEP.STEP1_MAX_ITER must be > 0, got {ts.STEP1_MAX_ITER}")
    root = cfg.OUTPUT_DIR

    step1 = cfg.clone()
    step1.defrost()
    for name in ts.STEP1_DISABLE:
        step1.MODEL.HARNET[name].ENABLED = False
    step1.SOLVER.MAX_ITER = ts.STEP1_MAX_ITER
    step1.SOLVER.STEPS = tuple(ts.STEP1_STEPS)
    if ts.STEP1_BASE_LR > 0:
        step1.SOLVER.BASE_LR = ts.STEP1_BASE_LR
    if not ts.STEP1_EVAL:
        step1.DATASETS.TEST = ()
        step1.TEST.AUG.ENABLED = False
    step1.OUTPUT_DIR = os.path.join(root, "step1")
    step1.freeze()

    step2 = cfg.clone()
    step2.defrost()
    step2.MODEL.WEIGHTS = os.path.join(step1.OUTPUT_DIR, FINAL_CHECKPOINT)
    step2.OUTPUT_DIR = os.path.join(root, "step2")
    step2.freeze()
    return [("step1", step1), ("step2", step2)]


def train_two_step(cfg, trainer_cls, resume=False, before_train=None):
    """Train both steps, one after the other, in this process (and its DDP peers).

    Args:
        cfg (CfgNode): the full config (step 2's settings, see :func:`two_step_configs`).
        trainer_cls (type): a ``DefaultTrainer`` subclass, e.g. ``HARNetTrainer``.
        resume (bool): skip finished steps and resume the unfinished one.
        before_train (callable or None): ``before_train(step_name, trainer)`` called
            before each step trains (e.g. to register extra hooks).

    Returns:
        the evaluation results of step 2 (``trainer.train()``'s return value).
    """
    results = None
    for name, step_cfg in two_step_configs(cfg):
        final = os.path.join(step_cfg.OUTPUT_DIR, FINAL_CHECKPOINT)
        if resume and PathManager.exists(final):
            logger.info(f"Two-step schedule: {name} is finished ({final} exists); skipping it")
            continue
        logger.info(
            f"Two-step schedule: {name} ({step_cfg.SOLVER.MAX_ITER} iterations) into "
            f"{step_cfg.OUTPUT_DIR}; attention switches: "
            + ", ".join(
                f"{k}={step_cfg.MODEL.HARNET[k].ENABLED}"
                for k in ("ALIGN", "CLGN", "SPATIAL", "CHANNEL")
                if k in step_cfg.MODEL.HARNET
            )
        )
        if comm.is_main_process():
            PathManager.mkdirs(step_cfg.OUTPUT_DIR)
            with PathManager.open(os.path.join(step_cfg.OUTPUT_DIR, "config.yaml"), "w") as f:
                f.write(step_cfg.dump())
        trainer = trainer_cls(step_cfg)
        # Step 2 without its own checkpoint loads step 1's final weights; the attention
        # parameters missing from it keep their initialisation and are listed in the log
        # by the checkpointer ("Some model parameters or buffers are not found ...").
        trainer.resume_or_load(resume=resume)
        if before_train is not None:
            before_train(name, trainer)
        results = trainer.train()
        comm.synchronize()
    return results
