"""``HARNetTrainer``: Detectron2's ``DefaultTrainer`` for HAR-Net yacs configs.

Differences from ``DefaultTrainer`` (everything else, hooks included, is inherited):

- ``build_evaluator``: COCO box AP; pycocotools' own evaluation when Detectron2 was
  installed without its compiled ops (the fast evaluator lives in ``detectron2._C``).
- ``build_optimizer``: :func:`harnet.solver.build_optimizer`, which honours the per-module
  ``lr_factor`` attributes of the attention modules (SGD, Detectron2's optimizer), or
  AdamW on the same parameter groups (``SOLVER.OPTIMIZER``).
- ``build_train_loader`` / ``build_test_loader``: :mod:`harnet.data.loaders` (Detectron2's
  datasets and samplers with HARNet's checked mapper; images without a valid box dropped
  up front). The training batches are a function of (seed, iteration)
  (:class:`harnet.data.samplers.ResumableTrainLoader`): ``resume_or_load`` starts them at
  the resumed iteration and the checkpoints keep the data seed, so ``--resume`` continues
  with the very batches (images and augmentations) of an uninterrupted run.
- ``test_with_TTA``: evaluation through :func:`harnet.tta.build_tta_model` (HARRetinaNet,
  Detectron2's RetinaNet / FCOS / Faster / Mask R-CNN).
- checkpoints also hold the optimizer state (``_trainer``), so ``--resume`` restores SGD's
  momentum; Detectron2 0.6's ``DefaultTrainer`` saves only the iteration and scheduler.
- faults (:mod:`harnet.engine.faults`): atomic checkpoint writes that refuse non-finite
  weights, ``weights_only`` loading, non-finite loss terms named with the iteration, and
  RetinaNet's running loss normaliser kept in the checkpoint.
- DistributedDataParallel also on the CPU (gloo, see :mod:`harnet.engine.launch`):
  Detectron2 0.6 always passes ``device_ids=[local_rank]``, which DDP rejects for CPU
  modules.
"""

import logging
import os
import weakref
from collections import OrderedDict

from detectron2.engine import DefaultTrainer, create_ddp_model
from detectron2.engine.train_loop import TrainerBase
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..d2_compat.info import install_mode
from ..data.loaders import build_harnet_test_loader, build_harnet_train_loader
from ..data.samplers import ResumableTrainLoader
from ..modeling.any_detector import harnet_postprocess_from_cfg
from ..solver import build_optimizer
from .faults import (
    AtomicDetectionCheckpointer,
    GuardedAMPTrainer,
    GuardedSimpleTrainer,
    LossNormalizerStateMixin,
)

__all__ = ["HARNetTrainer", "fast_coco_eval_available", "ddp_kwargs_for"]


def fast_coco_eval_available():
    """Whether Detectron2's compiled fast COCO evaluation exists: only when Detectron2 is
    installed with its compiled ops (:func:`harnet.d2_compat.info.install_mode`; the
    fallback's pure-Python ``detectron2._C`` raises on COCOeval ops).

    Returns:
        bool
    """
    return install_mode() == "compiled"


def ddp_kwargs_for(model, **kwargs):
    """Keyword arguments for :func:`detectron2.engine.create_ddp_model` that also work on CPU.

    DDP only accepts ``device_ids`` for single-device GPU modules; for CPU modules (gloo
    backend) it must be None.
    """
    if next(model.parameters()).device.type != "cuda":
        kwargs["device_ids"] = None
    return kwargs


class HARNetTrainer(LossNormalizerStateMixin, DefaultTrainer):
    """``DefaultTrainer`` with HAR-Net's evaluator, optimizer and test-time augmentation.

    Used exactly like ``DefaultTrainer``::

        trainer = HARNetTrainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        trainer.train()
    """

    def __init__(self, cfg):
        # DefaultTrainer.__init__'s construction order, which it does not let a subclass
        # reuse: its DDP wrapping assumes CUDA device ids (ddp_kwargs_for is device-agnostic)
        # and its step runners cannot be chosen (Guarded*Trainer check losses first).
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = self._prepare_config(cfg)
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)

        run = self._run_settings(cfg)
        model = create_ddp_model(model, **ddp_kwargs_for(model, **run["ddp"]))
        self._trainer = (GuardedAMPTrainer if run["amp"] else GuardedSimpleTrainer)(
            model, data_loader, optimizer
        )
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = AtomicDetectionCheckpointer(
            model, run["output_dir"], trainer=weakref.proxy(self)
        )
        self.start_iter = 0
        self.max_iter = run["max_iter"]
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def _prepare_config(self, cfg):
        """The config the trainer runs (yacs: workers scaled to the number of processes)."""
        return self.auto_scale_workers(cfg, comm.get_world_size())

    @staticmethod
    def _run_settings(cfg) -> dict:
        """DDP keyword arguments, AMP on/off, MAX_ITER and the output folder of ``cfg``."""
        return dict(
            ddp=dict(broadcast_buffers=False),
            amp=cfg.SOLVER.AMP.ENABLED,
            max_iter=cfg.SOLVER.MAX_ITER,
            output_dir=cfg.OUTPUT_DIR,
        )

    def state_dict(self):
        # Detectron2 0.6's DefaultTrainer checkpoints only the iteration and the hooks'
        # state (lr scheduler): without the optimizer's state (SGD momentum) a resumed run
        # would not continue the interrupted one. Later Detectron2 versions save it so.
        ret = super().state_dict()
        ret["_trainer"] = self._trainer.state_dict()
        loader = self._resumable_loader()
        if loader is not None:
            ret["data_seed"] = loader.seed
        return ret

    def _resumable_loader(self):
        loader = self._trainer.data_loader
        return loader if isinstance(loader, ResumableTrainLoader) else None

    def resume_or_load(self, resume=True):
        """``DefaultTrainer.resume_or_load``, then the training data start at
        ``start_iter`` (the iteration after the checkpoint's when resuming)."""
        super().resume_or_load(resume=resume)
        self._start_data_at(self.start_iter)

    def _start_data_at(self, start_iter):
        loader = self._resumable_loader()
        if loader is not None:
            loader.start_iter = start_iter
        elif start_iter > 0:
            logging.getLogger(__name__).warning(
                f"Resuming at iteration {start_iter} with a training loader that restarts "
                "its data at the first batch: the run will not repeat an uninterrupted one"
            )

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        loader = self._resumable_loader()
        if loader is not None and "data_seed" in state_dict:
            loader.seed = int(state_dict["data_seed"])
        if "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])
        else:
            logging.getLogger(__name__).warning(
                "The checkpoint has no optimizer state (written by Detectron2's own "
                "DefaultTrainer?): resuming with a fresh optimizer state"
            )

    def train(self):
        """Run training; returns the last evaluation's results (None without evaluation).

        ``DefaultTrainer.train`` returns them only when ``TEST.EXPECTED_RESULTS`` is set.
        """
        super().train()
        return getattr(self, "_last_eval_results", None)

    @classmethod
    def build_model(cls, cfg):
        """Detectron2's model; a Detectron2 detector (RetinaNet, FCOS, Faster / Mask R-CNN)
        gets HAR-Net's post-processing when ``MODEL.HARNET.POSTPROCESS`` asks for it."""
        model = super().build_model(cfg)
        return harnet_postprocess_from_cfg(model, cfg)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        """COCO box evaluation of ``dataset_name``; results also written to ``output_folder``
        (default ``OUTPUT_DIR/inference``)."""
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
        return COCOEvaluator(
            dataset_name,
            tasks=("bbox",),
            distributed=True,
            output_dir=output_folder,
            use_fast_impl=fast_coco_eval_available(),
        )

    @classmethod
    def build_optimizer(cls, cfg, model):
        """:func:`harnet.solver.build_optimizer` (``SOLVER.OPTIMIZER``: SGD or AdamW)."""
        return build_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg):
        return build_harnet_train_loader(cfg)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_harnet_test_loader(cfg, dataset_name)

    @classmethod
    def test_with_TTA(cls, cfg, model):
        """Evaluate ``model`` with test-time augmentation (``cfg.TEST.AUG``).

        Returns:
            OrderedDict: the results of :meth:`test`, keys suffixed with ``_TTA``.
        """
        from harnet.tta import build_tta_model

        logger = logging.getLogger("detectron2.trainer")
        logger.info("Running inference with test-time augmentation ...")
        model = build_tta_model(cfg, model)
        evaluators = [
            cls.build_evaluator(
                cfg, name, output_folder=os.path.join(cfg.OUTPUT_DIR, "inference_TTA")
            )
            for name in cfg.DATASETS.TEST
        ]
        res = cls.test(cfg, model, evaluators)
        if len(cfg.DATASETS.TEST) == 1:
            # DefaultTrainer.test un-nests a single dataset's results.
            res = {cfg.DATASETS.TEST[0]: res}
        return OrderedDict((k + "_TTA", v) for k, v in res.items())

    @classmethod
    def evaluate(cls, cfg, model):
        """``test`` plus ``test_with_TTA`` when ``cfg.TEST.AUG.ENABLED``; both keyed by
        dataset name (always nested, unlike ``test``)."""
        res = cls.test(cfg, model)
        if len(cfg.DATASETS.TEST) == 1:
            res = OrderedDict([(cfg.DATASETS.TEST[0], res)])
        if cfg.TEST.AUG.ENABLED:
            res.update(cls.test_with_TTA(cfg, model))
        return res
