"""``LazyConfigTrainer``: the HARNet trainer driven by a LazyConfig (``.py``) config.

Detectron2 0.6's ``DefaultTrainer`` reads yacs keys (``cfg.SOLVER.*``, ``cfg.TEST.*``...).
This subclass builds the same objects from a LazyConfig with the layout of Detectron2's
model-zoo ``.py`` configs, via :func:`detectron2.config.instantiate`:

- ``model``, ``optimizer`` (its ``params.model`` is filled with the model),
  ``lr_multiplier`` (a ``ParamScheduler``), ``dataloader.train``, ``dataloader.test``,
  ``dataloader.evaluator``;
- ``train``: ``output_dir``, ``init_checkpoint``, ``max_iter``, ``device``, ``amp.enabled``,
  ``ddp`` (DDP kwargs), ``checkpointer.period`` / ``max_to_keep``, ``eval_period``,
  ``log_period`` (see ``detectron2/model_zoo/configs/common/train.py``).

and keeps ``DefaultTrainer``'s hooks, checkpointing, resume, evaluation and metric
printing unchanged. :func:`add_harnet_lazy_keys` gives a LazyConfig HAR-Net's own keys:
``harnet.tta`` (every config) and ``harnet.postprocess`` (Detectron2's detectors).
"""

import copy
import functools
import logging
import os
from collections import OrderedDict

from detectron2.config import CfgNode, get_cfg, instantiate
from detectron2.data import build_detection_train_loader
from detectron2.data.samplers import TrainingSampler
from detectron2.engine import default_writers, hooks
from detectron2.evaluation import COCOEvaluator, inference_on_dataset, print_csv_format
from detectron2.engine.train_loop import TrainerBase
from detectron2.solver import LRMultiplier
from detectron2.utils import comm
from detectron2.utils.registry import locate
from omegaconf import OmegaConf

from ..config import add_harnet_config
from ..data.samplers import ResumableTrainLoader
from ..modeling.any_detector import harnet_postprocess_from_params
from .trainer import HARNetTrainer, fast_coco_eval_available

__all__ = ["LazyConfigTrainer", "add_harnet_lazy_keys", "check_lazy_tta", "lazy_tta_enabled"]


def _select(cfg, key, default):
    value = OmegaConf.select(cfg, key, default=default)
    return default if value is None else value


def add_harnet_lazy_keys(cfg):
    """Give a loaded LazyConfig (in place) the nodes that the command line can set:

    - ``harnet.tta``: ``TEST.AUG`` of the yacs configs in lower case (``enabled``,
      ``min_sizes``, ``max_size``, ``flip``, ``merge``, ``size_select.*``, ``wbf.*``), same
      defaults; ``harnet.tta.enabled=True`` also evaluates with test-time augmentation.
    - ``harnet.postprocess`` when the model is a Detectron2 detector (a model-zoo ``.py``
      config, say): the keywords of :func:`harnet.modeling.apply_harnet_postprocess` at
      their defaults (``harnet.postprocess.nms_type=gaussian``). HARRetinaNet's configs set
      the same keywords in ``model.postprocess_params``.

    Nodes the config already has are kept.
    """
    from ..modeling import HARRetinaNet
    from ..modeling.any_detector import postprocess_defaults

    harnet = cfg.get("harnet", None)
    if harnet is None:
        cfg.harnet = {}
        harnet = cfg.harnet
    if "tta" not in harnet:
        harnet.tta = _lower_keys(_yacs_defaults().TEST.AUG)
    target = cfg.model.get("_target_", None) if "model" in cfg else None
    if isinstance(target, str):
        target = locate(target)
    is_harnet = isinstance(target, type) and issubclass(target, HARRetinaNet)
    if target is not None and not is_harnet and "postprocess" not in harnet:
        harnet.postprocess = postprocess_defaults()


def lazy_tta_enabled(cfg) -> bool:
    return bool(_select(cfg, "harnet.tta.enabled", False))


def check_lazy_tta(cfg):
    """``check_test_aug_config`` on ``harnet.tta`` (before any work): a bad value raises
    ``ValueError`` naming the key."""
    from ..config_checks import check_test_aug_config

    if "tta" not in cfg.get("harnet", {}):
        return
    yacs = tta_yacs_config(cfg, None)  # its own errors name harnet.tta already
    try:
        check_test_aug_config(yacs)
    except ValueError as e:
        raise ValueError(f"harnet.tta (TEST.AUG in lower case): {e}") from None


def _yacs_defaults():
    cfg = get_cfg()
    add_harnet_config(cfg)
    return cfg


def _lower_keys(node):
    out = {}
    for k, v in node.items():
        if isinstance(v, CfgNode):
            v = _lower_keys(v)
        out[k.lower()] = list(v) if isinstance(v, tuple) else v
    return out


def _flat_upper(tree, prefix):
    """``{"a": {"b": 1}}`` -> ``[prefix + "A.B", 1]`` (a yacs override list)."""
    out = []
    for k, v in tree.items():
        key = f"{prefix}{k.upper()}"
        out += _flat_upper(v, key + ".") if isinstance(v, dict) else [key, v]
    return out


def tta_yacs_config(cfg, model) -> CfgNode:
    """The yacs config that :func:`harnet.tta.build_tta_model` reads, from a LazyConfig:
    ``TEST.AUG`` from ``harnet.tta``, the plain test scale and image format from
    ``dataloader.test.mapper`` (its ResizeShortestEdge), the detection count and mask
    head from the model. Bad ``harnet.tta`` values raise naming the key."""
    yacs = _yacs_defaults()
    tta = OmegaConf.to_container(cfg.harnet.tta, resolve=True)
    opts = _flat_upper(tta, "TEST.AUG.")
    try:
        yacs.merge_from_list(opts)
    except (KeyError, ValueError, AssertionError) as e:
        raise ValueError(f"harnet.tta (TEST.AUG in lower case): {e}") from None
    mapper = _select(cfg, "dataloader.test.mapper", {})
    yacs.INPUT.FORMAT = mapper.get("image_format", yacs.INPUT.FORMAT)
    for aug in mapper.get("augmentations", None) or []:
        target = aug.get("_target_", None) if hasattr(aug, "get") else None
        target = locate(target) if isinstance(target, str) else target
        if getattr(target, "__name__", None) == "ResizeShortestEdge":
            short = aug.get("short_edge_length")
            yacs.INPUT.MIN_SIZE_TEST = int(short if isinstance(short, int) else short[0])
            yacs.INPUT.MAX_SIZE_TEST = int(aug.get("max_size", yacs.INPUT.MAX_SIZE_TEST))
    target = getattr(model, "module", model)
    detections = getattr(target, "max_detections_per_image", None)
    if detections is None:  # HARRetinaNet
        detections = getattr(target, "postprocess_params", {}).get("max_detections", None)
    yacs.TEST.DETECTIONS_PER_IMAGE = int(detections or yacs.TEST.DETECTIONS_PER_IMAGE)
    roi_heads = getattr(target, "roi_heads", None)
    yacs.MODEL.MASK_ON = bool(getattr(roi_heads, "mask_on", False))
    yacs.MODEL.KEYPOINT_ON = bool(getattr(roi_heads, "keypoint_on", False))
    yacs.freeze()
    return yacs


class LazyConfigTrainer(HARNetTrainer):
    """:class:`HARNetTrainer` for LazyConfig configs (``omegaconf.DictConfig``).

    Example::

        cfg = LazyConfig.load("configs/HARNet/demo/har_R18_shapes_demo.py")
        cfg = LazyConfig.apply_overrides(cfg, ["train.max_iter=100"])
        trainer = LazyConfigTrainer(cfg)
        trainer.resume_or_load(resume=False)
        trainer.train()
    """

    def _prepare_config(self, cfg):
        for key in ("model", "optimizer", "lr_multiplier", "dataloader", "train"):
            if key not in cfg:
                raise KeyError(f"LazyConfig is missing the top-level key {key!r}")
        return cfg

    @staticmethod
    def _run_settings(cfg) -> dict:
        return dict(
            ddp=dict(_select(cfg, "train.ddp", {})),
            amp=_select(cfg, "train.amp.enabled", False),
            max_iter=cfg.train.max_iter,
            output_dir=cfg.train.output_dir,
        )

    # --- builders --------------------------------------------------------------------
    @classmethod
    def build_model(cls, cfg):
        """``cfg.model`` on ``train.device``; a Detectron2 detector gets HAR-Net's
        post-processing when ``harnet.postprocess`` (see
        :func:`add_harnet_lazy_keys`) asks for it."""
        model = instantiate(cfg.model)
        params = _select(cfg, "harnet.postprocess", None)
        if params is not None:
            model = harnet_postprocess_from_params(
                model, OmegaConf.to_container(params), "harnet.postprocess"
            )
        model.to(_select(cfg, "train.device", "cpu"))
        logging.getLogger(__name__).info("Model:\n{}".format(model))
        return model

    @classmethod
    def build_optimizer(cls, cfg, model):
        cfg.optimizer.params.model = model
        return instantiate(cfg.optimizer)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        return LRMultiplier(optimizer, instantiate(cfg.lr_multiplier), cfg.train.max_iter)

    @classmethod
    def build_train_loader(cls, cfg):
        """``cfg.dataloader.train``; when it is Detectron2's ``build_detection_train_loader``
        with only the usual arguments (``dataset``, ``mapper``, ``total_batch_size``,
        ``aspect_ratio_grouping``, ``num_workers``), the same data and batching as
        :class:`harnet.data.samplers.ResumableTrainLoader` (``TrainingSampler`` seeded with
        ``train.seed``), which ``--resume`` starts at the resumed iteration."""
        loader_cfg = cfg.dataloader.train
        plain = loader_cfg.get("_target_") in (
            build_detection_train_loader,
            _qualname(build_detection_train_loader),
        )
        usual = {
            "_target_",
            "dataset",
            "mapper",
            "total_batch_size",
            "aspect_ratio_grouping",
            "num_workers",
        }
        if not plain or not set(loader_cfg.keys()) <= usual:
            return instantiate(loader_cfg)
        dataset = instantiate(loader_cfg.dataset)
        if not isinstance(dataset, list):
            return instantiate(loader_cfg)
        seed = _select(cfg, "train.seed", -1)
        seed = seed if seed >= 0 else comm.shared_random_seed()
        return ResumableTrainLoader(
            dataset,
            instantiate(loader_cfg.mapper),
            functools.partial(TrainingSampler, len(dataset)),
            loader_cfg.total_batch_size,
            seed,
            aspect_ratio_grouping=loader_cfg.get("aspect_ratio_grouping", True),
            num_workers=loader_cfg.get("num_workers", 0),
        )

    @classmethod
    def build_test_loader(cls, cfg, dataset_name=None):
        return instantiate(cfg.dataloader.test)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name=None, output_folder=None):
        evaluator_cfg = cfg.dataloader.evaluator
        if evaluator_cfg.get("_target_") in (COCOEvaluator, _qualname(COCOEvaluator)):
            # Same defaults as the yacs path: pycocotools' evaluation when the compiled
            # fast evaluator is missing, and results saved next to the checkpoints.
            evaluator_cfg = copy.deepcopy(evaluator_cfg)  # cfg itself stays as given
            if "use_fast_impl" not in evaluator_cfg:
                evaluator_cfg.use_fast_impl = fast_coco_eval_available()
            if output_folder is not None:
                evaluator_cfg.output_dir = output_folder
        return instantiate(evaluator_cfg)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """Evaluate ``model`` on ``cfg.dataloader.test`` with ``cfg.dataloader.evaluator``.

        Returns:
            dict: the evaluator's results, e.g. ``{"bbox": {"AP": ..., ...}}``.
        """
        if evaluators is not None and not isinstance(evaluators, (list, tuple)):
            evaluators = [evaluators]
        # The loader first, as DefaultTrainer.test does: loading a dataset may create its
        # files (the built-in shapes are generated on first use), which the evaluator reads.
        data_loader = cls.build_test_loader(cfg)
        evaluator = evaluators[0] if evaluators else cls.build_evaluator(cfg)
        results = inference_on_dataset(model, data_loader, evaluator)
        if comm.is_main_process():
            logging.getLogger(__name__).info("Evaluation results in csv format:")
            print_csv_format(results)
        return results

    @classmethod
    def test_with_TTA(cls, cfg, model):
        """Evaluate ``model`` with test-time augmentation (``harnet.tta``); results
        written to ``train.output_dir/inference_TTA``.

        Returns:
            OrderedDict: {"<dataset>_TTA": results of :meth:`test`}.
        """
        from harnet.tta import build_tta_model

        logging.getLogger("detectron2.trainer").info(
            "Running inference with test-time augmentation ..."
        )
        tta = build_tta_model(tta_yacs_config(cfg, model), model)
        out = os.path.join(cfg.train.output_dir, "inference_TTA")
        evaluator = cls.build_evaluator(cfg, output_folder=out)
        return OrderedDict([(f"{_test_name(cfg)}_TTA", cls.test(cfg, tta, [evaluator]))])

    @classmethod
    def evaluate(cls, cfg, model):
        """``test`` plus ``test_with_TTA`` when ``harnet.tta.enabled``."""
        res = OrderedDict([(_test_name(cfg), cls.test(cfg, model))])
        if lazy_tta_enabled(cfg):
            res.update(cls.test_with_TTA(cfg, model))
        return res

    # --- DefaultTrainer methods that read yacs keys -------------------------------------
    def build_hooks(self):
        cfg = self.cfg
        ret = [hooks.IterationTimer(), hooks.LRScheduler()]
        if comm.is_main_process():
            ret.append(
                hooks.PeriodicCheckpointer(
                    self.checkpointer,
                    _select(cfg, "train.checkpointer.period", 5000),
                    max_to_keep=_select(cfg, "train.checkpointer.max_to_keep", None),
                )
            )

        def test_and_save_results():
            self._last_eval_results = self.test(self.cfg, self.model)
            return self._last_eval_results

        ret.append(hooks.EvalHook(_select(cfg, "train.eval_period", 0), test_and_save_results))
        if comm.is_main_process():
            ret.append(
                hooks.PeriodicWriter(
                    self.build_writers(), period=_select(cfg, "train.log_period", 20)
                )
            )
        return ret

    def build_writers(self):
        return default_writers(self.cfg.train.output_dir, self.max_iter)

    def resume_or_load(self, resume=True):
        """Resume from ``train.output_dir``'s last checkpoint when ``resume`` and one exists,
        else load ``train.init_checkpoint`` (weights only) and start at iteration 0."""
        self.checkpointer.resume_or_load(
            _select(self.cfg, "train.init_checkpoint", ""), resume=resume
        )
        if resume and self.checkpointer.has_checkpoint():
            self.start_iter = self.iter + 1
        self._start_data_at(self.start_iter)

    def train(self):
        TrainerBase.train(self, self.start_iter, self.max_iter)
        return getattr(self, "_last_eval_results", None)


def _test_name(cfg):
    return str(_select(cfg, "dataloader.test.dataset.names", "test"))


def _qualname(obj):
    return f"{obj.__module__}.{obj.__qualname__}"
