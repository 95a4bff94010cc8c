"""The command line of ``train_net.py``: argument parser, config setup and ``main``.

Kept in the package so that ``train_net.py`` stays a thin entry point and so that tests
and other scripts can call :func:`main` directly.
"""
import json
import logging
import os

import torch
from detectron2.config import CfgNode, LazyConfig, get_cfg
from detectron2.engine import default_argument_parser, default_setup, hooks
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager

from ..config import add_harnet_config
from ..data import check_datasets_from_cfg, register_shapes_from_cfg
from .faults import AtomicDetectionCheckpointer
from .lazy_trainer import LazyConfigTrainer
from .trainer import HARNetTrainer
from .two_step import train_two_step

__all__ = ["argument_parser", "build_config", "setup", "main", "register_datasets_from_args", "is_lazy_config"]

logger = logging.getLogger("harnet.engine")


def argument_parser(epilog=None):
    """Detectron2's ``default_argument_parser`` plus HARNet's options.

    Extra options:
        --two-step: the two-step schedule (``cfg.SOLVER.TWO_STEP``), yacs configs only.
        --cpu-procs N: N CPU worker processes per machine (gloo backend) instead of GPUs.
        --register-coco NAME JSON IMAGE_ROOT: register a COCO-format dataset under NAME
            (repeatable), usable in DATASETS.TRAIN/TEST or a LazyConfig's dataset names.
    """
    parser = default_argument_parser(epilog)
    parser.add_argument(
        "--two-step", action="store_true",
        help="two-step schedule: step 1 without spatial/channel attention, step 2 with them "
        "(cfg.SOLVER.TWO_STEP; outputs in OUTPUT_DIR/step1 and OUTPUT_DIR/step2)",
    )
    parser.add_argument(
        "--cpu-procs", "--num-cpu-workers", dest="cpu_procs", type=int, default=0,
        metavar="N",
        help="train with N CPU processes per machine (gloo backend); with --num-machines "
        "and --dist-url also across machines",
    )
    parser.add_argument(
        "--register-coco", nargs=3, action="append", default=[],
        metavar=("NAME", "JSON", "IMAGE_ROOT"),
        help="register a COCO-format dataset (instances JSON + image folder) under NAME; "
        "repeatable",
    )
    return parser


def is_lazy_config(path):
    return path.endswith(".py")


def register_datasets_from_args(args):
    """Register the ``--register-coco`` datasets (in every worker process)."""
    from detectron2.data import DatasetCatalog

    from ..data import register_coco_format

    for name, json_file, image_root in getattr(args, "register_coco", None) or []:
        if name in DatasetCatalog.list():
            continue  # already registered in this process (e.g. main() called twice)
        register_coco_format(name, json_file, image_root)


def _cpu_fallback(device, what):
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        logger.warning(f"{what}={device} but CUDA is not available; using the CPU")
        return "cpu"
    return device


def build_config(args):
    """The config of ``args`` (yacs ``.yaml`` or LazyConfig ``.py``), with the command-line
    overrides applied and the datasets it needs registered; no logging setup.

    Returns:
        CfgNode (frozen) or omegaconf.DictConfig
    """
    if not args.config_file:
        raise ValueError("--config-file is required")
    if not os.path.isfile(args.config_file):
        raise FileNotFoundError(f"--config-file {args.config_file!r} does not exist")
    register_datasets_from_args(args)
    if is_lazy_config(args.config_file):
        if getattr(args, "two_step", False):
            raise ValueError("--two-step needs a yacs (.yaml) config: it toggles cfg.MODEL.HARNET.*")
        cfg = LazyConfig.load(args.config_file)
        cfg = LazyConfig.apply_overrides(cfg, args.opts or [])
        if "train" in cfg:
            cfg.train.device = _cpu_fallback(cfg.train.get("device", "cpu"), "train.device")
        return cfg
    cfg = get_cfg()
    add_harnet_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts or [])
    cfg.MODEL.DEVICE = _cpu_fallback(cfg.MODEL.DEVICE, "MODEL.DEVICE")
    if getattr(args, "two_step", False):
        cfg.SOLVER.TWO_STEP.ENABLED = True
    cfg.freeze()
    # The built-in shapes datasets with this config's DATASETS.SHAPES settings; then fail
    # early, naming the path, when a dataset's files are missing (e.g. COCO not under
    # $DETECTRON2_DATASETS).
    register_shapes_from_cfg(cfg)
    check_datasets_from_cfg(cfg)
    return cfg


def setup(args):
    """:func:`build_config` plus Detectron2's ``default_setup`` (logging, config dump into
    the output folder, seeds)."""
    cfg = build_config(args)
    default_setup(cfg, args)
    return cfg


def _eval_only(cfg, args, trainer_cls):
    model = trainer_cls.build_model(cfg)
    resume = args.resume
    if isinstance(cfg, CfgNode):
        weights, out = cfg.MODEL.WEIGHTS, cfg.OUTPUT_DIR
        if cfg.SOLVER.TWO_STEP.ENABLED:
            # --two-step --eval-only: step 2's last checkpoint, else MODEL.WEIGHTS.
            out, resume = os.path.join(cfg.OUTPUT_DIR, "step2"), True
    else:
        weights, out = cfg.train.init_checkpoint, cfg.train.output_dir
    # Detectron2's semantics: with --resume the output folder's last checkpoint, else (or
    # when there is none) MODEL.WEIGHTS; "" leaves the freshly initialised model.
    AtomicDetectionCheckpointer(model, save_dir=out).resume_or_load(weights, resume=resume)
    res = trainer_cls.evaluate(cfg, model)
    if comm.is_main_process():
        if isinstance(cfg, CfgNode):
            verify_results(cfg, res)
        write_eval_results(res, out)
    return res


EVAL_RESULTS_FILE = "eval_results.json"


def write_eval_results(results, output_dir):
    """Write ``--eval-only`` results as JSON (``OUTPUT_DIR/eval_results.json``: dataset ->
    task -> metric -> value, NaN where an area range has no ground truth) for scripts;
    the log's "copypaste" lines hold the same numbers for people."""
    PathManager.mkdirs(output_dir)
    path = os.path.join(output_dir, EVAL_RESULTS_FILE)
    with PathManager.open(path, "w") as f:
        json.dump(results, f, indent=1)
    logger.info(f"Evaluation results written to {path}")


def main(args):
    """Train (or with ``--eval-only`` evaluate) as ``args`` says; runs in every worker.

    Returns:
        the evaluation results (dict) on the main process.
    """
    cfg = setup(args)
    trainer_cls = LazyConfigTrainer if not isinstance(cfg, CfgNode) else HARNetTrainer
    if args.eval_only:
        return _eval_only(cfg, args, trainer_cls)

    def add_tta_hook(_step, trainer):
        if isinstance(cfg, CfgNode) and trainer.cfg.TEST.AUG.ENABLED:
            trainer.register_hooks(
                [hooks.EvalHook(0, lambda: trainer.test_with_TTA(trainer.cfg, trainer.model))]
            )

    if isinstance(cfg, CfgNode) and cfg.SOLVER.TWO_STEP.ENABLED:
        return train_two_step(cfg, trainer_cls, resume=args.resume, before_train=add_tta_hook)
    trainer = trainer_cls(cfg)
    trainer.resume_or_load(resume=args.resume)
    add_tta_hook(None, trainer)
    return trainer.train()
