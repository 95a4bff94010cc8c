"""The command line of ``train_net.py``: argument parser, config setup and ``main``.

Kept in the package so that ``train_net.py`` stays a thin entry point and so that tests
and other scripts can call :func:`main` directly.
"""

from typing import List, Tuple
import ast
import difflib
import json
import logging
import os

import torch
from detectron2.config import CfgNode, LazyConfig, get_cfg
from detectron2.engine import default_argument_parser, default_setup, hooks
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import setup_logger

from ..config import add_harnet_config
from ..config_checks import check_solver_config, check_test_aug_config
from ..data import check_dataset_files, register_shapes_from_cfg
from .faults import AtomicDetectionCheckpointer
from .lazy_trainer import (
    LazyConfigTrainer,
    add_harnet_lazy_keys,
    check_lazy_tta,
    lazy_tta_enabled,
)
from .lock import OutputDirInUseError, OutputDirLock
from .trainer import HARNetTrainer
from .two_step import train_two_step

__all__ = [
    "argument_parser",
    "build_config",
    "setup",
    "main",
    "register_datasets_from_args",
    "is_lazy_config",
    "apply_checked_overrides",
    "lock_output_dir",
    "setup_harnet_logger",
]

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
        "--two-step",
        action="store_true",
        help="two-step schedule: step 1 without spatial/channel attention, step 2 with them "
        "(cfg.SOLVER.TWO_STEP; outputs in OUTPUT_DIR/step1 and OUTPUT_DIR/step2)",
    )
    parser.add_argument(
        "--cpu-procs",
        "--num-cpu-workers",
        dest="cpu_procs",
        type=int,
        default=0,
        metavar="N",
        help="train with N CPU processes per machine (gloo backend); with --num-machines "
        "and --dist-url also across machines",
    )
    parser.add_argument(
        "--register-coco",
        nargs=3,
        action="append",
        default=[],
        metavar=("NAME", "JSON", "IMAGE_ROOT"),
        help="register a COCO-format dataset (instances JSON + image folder) under NAME; "
        "repeatable",
    )
    return parser


def is_lazy_config(path):
    return path.endswith(".py")


# name -> (json, image root) of the datasets registered by --register-coco in this process.
_REGISTERED_FROM_ARGS = {}


def register_datasets_from_args(args):
    """Register the ``--register-coco`` datasets (in every worker process).

    Raises:
        ValueError: naming a NAME that is given twice, or that is already registered
            (a built-in dataset such as ``harnet_shapes_val`` or ``coco_2017_val``, or an
            earlier ``--register-coco`` in this process with other files).
    """
    from detectron2.data import DatasetCatalog

    from ..data import register_coco_format

    triples = getattr(args, "register_coco", None) or []
    names = [name for name, _, _ in triples]
    for name in names:
        if names.count(name) > 1:
            raise ValueError(f"--register-coco {name}: the name is given {names.count(name)} times")
    for name, json_file, image_root in triples:
        files = (os.path.abspath(json_file), os.path.abspath(image_root))
        if _REGISTERED_FROM_ARGS.get(name) == files:
            continue  # the same registration again in this process (main() called twice)
        if name in DatasetCatalog.list():
            what = (
                "registered by an earlier --register-coco with other files"
                if name in _REGISTERED_FROM_ARGS
                else "a built-in dataset name"
            )
            raise ValueError(
                f"--register-coco {name} {json_file} {image_root}: a dataset named {name!r} "
                f"is already registered ({what}); choose another NAME and use it in "
                "DATASETS.TRAIN/TEST"
            )
        register_coco_format(name, json_file, image_root)
        _REGISTERED_FROM_ARGS[name] = files


def _cpu_fallback(device, what):
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        logger.warning(f"{what}={device} but CUDA is not available; using the CPU")
        return "cpu"
    return device


_PURPOSES = {"train": ("TRAIN", "TEST"), "eval": ("TEST",), "draw": ()}


def build_config(args, purpose="train"):
    """The config of ``args`` (yacs ``.yaml`` or LazyConfig ``.py``), with the command-line
    overrides applied (LazyConfig overrides checked: :func:`apply_checked_overrides`) and
    the datasets it needs registered; no logging setup. Everything that can be checked
    before any work is checked here, naming the key or path.

    Args:
        purpose (str): what the command does, hence what must be valid now:
            "train": ``DATASETS.TRAIN`` and ``DATASETS.TEST`` files, the schedule
            (:func:`check_solver_config`), ``TEST.AUG``; "eval" (``--eval-only``): the
            ``DATASETS.TEST`` files and ``TEST.AUG``; "draw" (images given on the command
            line): no dataset.

    Returns:
        CfgNode (frozen) or omegaconf.DictConfig
    """
    if purpose not in _PURPOSES:
        raise ValueError(f"build_config: purpose={purpose!r}, expected one of {tuple(_PURPOSES)}")
    if not args.config_file:
        raise ValueError("--config-file is required")
    if not os.path.isfile(args.config_file):
        args.config_file = _model_zoo_config(args.config_file)
    register_datasets_from_args(args)
    if is_lazy_config(args.config_file):
        if getattr(args, "two_step", False):
            raise ValueError(
                "--two-step needs a yacs (.yaml) config: it toggles cfg.MODEL.HARNET.*"
            )
        cfg = LazyConfig.load(args.config_file)
        add_harnet_lazy_keys(cfg)
        cfg = apply_checked_overrides(cfg, args.opts or [])
        if purpose != "draw":
            check_lazy_tta(cfg)
        if "train" in cfg:
            cfg.train.device = _cpu_fallback(cfg.train.get("device", "cpu"), "train.device")
            max_iter = cfg.train.get("max_iter", None)
            is_int = isinstance(max_iter, int) and not isinstance(max_iter, bool)
            if purpose == "train" and not (is_int and max_iter > 0):
                raise ValueError(f"train.max_iter must be a positive int, got {max_iter!r}")
        return cfg
    cfg = get_cfg()
    add_harnet_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts or [])
    cfg.MODEL.DEVICE = _cpu_fallback(cfg.MODEL.DEVICE, "MODEL.DEVICE")
    if getattr(args, "two_step", False):
        cfg.SOLVER.TWO_STEP.ENABLED = True
    cfg.freeze()
    if purpose == "train":
        check_solver_config(cfg)
    if purpose != "draw":
        check_test_aug_config(cfg)
    # The built-in shapes datasets with this config's DATASETS.SHAPES settings; then fail
    # early, naming the path, when a dataset the command uses has missing files (e.g. COCO
    # not under $DETECTRON2_DATASETS).
    register_shapes_from_cfg(cfg)
    check_dataset_files([name for key in _PURPOSES[purpose] for name in cfg.DATASETS[key]])
    return cfg


def _model_zoo_config(name):
    """The path of Detectron2's model-zoo config ``name`` (e.g.
    ``COCO-Detection/retinanet_R_50_FPN_1x.yaml``); FileNotFoundError if it is neither a
    file nor such a name."""
    from detectron2 import model_zoo

    try:
        return model_zoo.get_config_file(name)
    except RuntimeError:
        raise FileNotFoundError(
            f"--config-file {name!r} does not exist (neither a file nor a Detectron2 "
            "model-zoo config name such as COCO-Detection/retinanet_R_50_FPN_1x.yaml)"
        ) from None


def apply_checked_overrides(cfg, overrides):
    """``LazyConfig.apply_overrides`` that rejects, naming the key, an override of a key
    the config does not have (``train.max_iters=10``) or of a different type than the
    config's value (``train.max_iter=abc``; an int is accepted for a float, anything for
    a None value).

    Args:
        cfg (omegaconf.DictConfig): a loaded LazyConfig.
        overrides (list[str]): ``key=value`` strings.
    """
    from omegaconf import DictConfig, ListConfig, OmegaConf

    missing = object()
    for o in overrides:
        key, sep, text = o.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"LazyConfig override {o!r} is not of the form key=value")
        old = OmegaConf.select(cfg, key, default=missing, throw_on_missing=False)
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent, default=None) if parent else cfg
        if old is missing and _is_call_argument(node, leaf):
            continue  # an argument of a LazyCall's target left at its default
        if old is missing:
            keys = list(node.keys()) if isinstance(node, DictConfig) else []
            close = difflib.get_close_matches(leaf, [str(k) for k in keys], n=3)
            close = [f"{parent}.{c}" if parent else c for c in close]
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise KeyError(f"LazyConfig override {o!r}: the config has no key {key!r}{hint}")
        try:
            new = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            new = text  # Detectron2 keeps unparsable values as strings
        if not _override_type_ok(old, new, (DictConfig, ListConfig)):
            raise ValueError(
                f"LazyConfig override {o!r}: {key} is {type(old).__name__} ({old!r}) in the "
                f"config, got {type(new).__name__} {new!r}"
            )
    return LazyConfig.apply_overrides(cfg, overrides)


def _is_call_argument(node, name):
    """Whether ``name`` is a parameter of the target of the LazyCall config ``node``."""
    import inspect

    from detectron2.utils.registry import locate

    target = node.get("_target_") if hasattr(node, "get") else None
    if target is None:
        return False
    try:
        target = locate(target) if isinstance(target, str) else target
        # A class whose __init__ passes **kwargs on: its bases' parameters count too.
        chain = [c.__init__ for c in target.__mro__[:-1]] if inspect.isclass(target) else [target]
        for fn in chain:
            params = inspect.signature(fn).parameters
            if name in params:
                return True
            if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
                return False
    except (ImportError, TypeError, ValueError):
        return True  # cannot tell: leave it to the call
    return True  # **kwargs all the way up


def _override_type_ok(old, new, containers):
    if old is None or new is None:
        return True
    if isinstance(old, bool) or isinstance(new, bool):
        return isinstance(old, bool) and isinstance(new, bool)
    if isinstance(old, float):
        return isinstance(new, (int, float))
    if isinstance(old, int):
        return isinstance(new, int)
    if isinstance(old, str):
        return isinstance(new, str)
    if isinstance(old, (list, tuple)) or type(old).__name__ == "ListConfig":
        return isinstance(new, (list, tuple))
    if isinstance(old, containers):  # a sub-config (e.g. a LazyCall): only a dict replaces it
        return isinstance(new, dict)
    return True  # other objects (classes, functions): Detectron2's own rules apply


def setup(args, purpose="train"):
    """:func:`build_config` plus Detectron2's ``default_setup`` (logging, config dump into
    the output folder, seeds) and HARNet's loggers (:func:`setup_harnet_logger`)."""
    cfg = build_config(args, purpose)
    default_setup(cfg, args)
    setup_harnet_logger(cfg)
    return cfg


def output_dir_of(cfg):
    return cfg.OUTPUT_DIR if isinstance(cfg, CfgNode) else cfg.train.output_dir


def setup_harnet_logger(cfg):
    """Route the ``harnet.*`` loggers like Detectron2's: console on the main process,
    ``OUTPUT_DIR/log.txt`` (``log.txt.rank<N>`` on other ranks), timestamps, on every rank
    (``default_setup`` only sets up the ``detectron2`` and ``fvcore`` loggers)."""
    setup_logger(
        output_dir_of(cfg), distributed_rank=comm.get_rank(), name="harnet", abbrev_name="harnet"
    )


def lock_output_dir(cfg):
    """Take :class:`OutputDirLock` of the run's output folder on the main process; every
    process raises :class:`OutputDirInUseError` when it is held by another live run.

    Returns:
        OutputDirLock or None (other processes).
    """
    lock, error = None, None
    if comm.is_main_process():
        try:
            lock = OutputDirLock(output_dir_of(cfg)).acquire()
        except OutputDirInUseError as e:
            error = str(e)
    if comm.get_world_size() > 1:
        error = comm.all_gather(error)[0]
    if error is not None:
        raise OutputDirInUseError(error)
    return lock


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

    Training locks ``OUTPUT_DIR`` (:func:`lock_output_dir`) before writing anything there.

    Returns:
        the evaluation results (dict) on the main process.
    """
    purpose = "eval" if args.eval_only else "train"
    cfg = build_config(args, purpose)
    trainer_cls = LazyConfigTrainer if not isinstance(cfg, CfgNode) else HARNetTrainer
    if args.eval_only:
        default_setup(cfg, args)
        setup_harnet_logger(cfg)
        return _eval_only(cfg, args, trainer_cls)
    lock = lock_output_dir(cfg)
    try:
        default_setup(cfg, args)
        setup_harnet_logger(cfg)
        return _train(cfg, args, trainer_cls)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg, args, trainer_cls):
    def add_tta_hook(_step, trainer):
        yacs = isinstance(cfg, CfgNode)
        if (yacs and trainer.cfg.TEST.AUG.ENABLED) or (not yacs and lazy_tta_enabled(cfg)):
            trainer.register_hooks(
                [hooks.EvalHook(0, lambda: trainer.test_with_TTA(trainer.cfg, trainer.model))]
            )

    if isinstance(cfg, CfgNode) and cfg.SOLVER.TWO_STEP.ENABLED:
        return train_two_step(cfg, trainer_cls, resume=args.resume, before_train=add_tta_hook)
    trainer = trainer_cls(cfg)
    trainer.resume_or_load(resume=args.resume)
    add_tta_hook(None, trainer)
    return trainer.train()


def parse_variant(entry: str) -> Tuple[str, List[str]]:
    """``LABEL[@KEY=VALUE]...`` -> (label, [KEY, VALUE, ...]) (yacs override list)."""
    label, *overrides = entry.split("@")
    if not label.strip():
        raise ValueError(f"variant {entry!r}: empty label (use LABEL[@KEY=VALUE]...)")
    opts = []
    for o in overrides:
        key, sep, value = o.partition("=")
        if not sep or not key:
            raise ValueError(f"variant {entry!r}: override {o!r} is not KEY=VALUE")
        opts += [key, value]
    return label.strip(), opts
