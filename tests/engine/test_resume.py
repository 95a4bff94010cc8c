"""Exact resume: a run interrupted after a checkpoint and resumed ends with the weights of an
uninterrupted run (data order, augmentations, optimizer, scheduler, loss normaliser).

The dataset is large enough that the order matters (40 images of mixed aspect ratios, one
epoch = 10 iterations), with multi-scale resizing and flips, so a loader that restarts at
its first batch (Detectron2's) or reseeds its augmentations gives other weights.
"""
from harnet_model_utils import REPO
import os

import numpy as np
import pytest
import torch

import harnet  # noqa: F401
from detectron2.data.samplers import TrainingSampler
from detectron2.engine import HookBase
from detectron2.utils.env import seed_all_rng

from harnet.data.loaders import build_harnet_train_loader
from harnet.data.samplers import ResumableTrainLoader, item_seed
from harnet.engine import HARNetTrainer, argument_parser
from harnet.engine.defaults import build_config

ROOT = REPO
DEMO_YAML = os.path.join(ROOT, "configs", "HARNet", "demo", "har_R18_shapes_demo.yaml")


# --- the loader alone ------------------------------------------------------------------
def _fake_dataset(n=30):
    rng = np.random.default_rng(0)
    # Mixed aspect ratios: aspect-ratio grouping keeps partial buckets across batches.
    return [
        {"file_name": f"{i}.jpg", "width": int(w), "height": int(h)}
        for i, (w, h) in enumerate(rng.integers(10, 20, size=(n, 2)))
    ]


def _record_mapper(d):
    # What an augmentation would draw: the three global generators.
    return {"file_name": d["file_name"], "width": d["width"], "height": d["height"],
            "draw": (np.random.rand(), float(torch.rand(())), __import__("random").random())}


def _batches(loader, n):
    it = iter(loader)
    return [[(d["file_name"], d["draw"]) for d in next(it)] for _ in range(n)]


@pytest.mark.parametrize("grouping", [True, False])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_starts_at_any_iteration(grouping, num_workers):
    data = _fake_dataset()

    def make(start):
        loader = ResumableTrainLoader(
            data, _record_mapper, lambda seed: TrainingSampler(len(data), seed=seed), 3, 7,
            aspect_ratio_grouping=grouping, num_workers=num_workers,
        )
        loader.start_iter = start
        return loader

    ref = _batches(make(0), 25)  # 75 items: 2.5 epochs
    names = [name for batch in ref for name, _ in batch]
    assert len(set(names[:30])) > 20  # shuffled epochs
    for start in (1, 7, 13):
        assert _batches(make(start), 25 - start) == ref[start:], start
    # Augmentation draws are per item position, not per file: the same image gets other
    # draws in another epoch.
    draws = {}
    for batch in ref:
        for name, draw in batch:
            draws.setdefault(name, set()).add(draw)
    assert max(len(v) for v in draws.values()) > 1
    # ... and another seed gives another stream.
    other = ResumableTrainLoader(data, _record_mapper, lambda seed: TrainingSampler(30, seed=seed), 3, 8,
                                 aspect_ratio_grouping=grouping)
    assert _batches(other, 5) != ref[:5]


def test_item_seed_differs_by_position_and_seed():
    seeds = {item_seed(s, p) for s in range(3) for p in range(100)}
    assert len(seeds) == 300


def test_loader_leaves_global_random_state_alone():
    data = _fake_dataset(6)
    loader = ResumableTrainLoader(data, _record_mapper, lambda seed: TrainingSampler(6, seed=seed), 2, 0)
    np.random.seed(5)
    expected = np.random.rand()
    np.random.seed(5)
    next(iter(loader))
    assert np.random.rand() == expected


# --- a real training run, interrupted and resumed ---------------------------------------
def _opts(root, out, max_iter):
    return [
        "OUTPUT_DIR", out,
        "DATASETS.SHAPES.ROOT", root,
        "DATASETS.SHAPES.NUM_TRAIN", "40",
        "DATASETS.SHAPES.NUM_VAL", "1",
        "DATASETS.SHAPES.IMAGE_SIZE", "(32, 48)",
        "DATASETS.SHAPES.OBJECT_SIZE", "(8.0, 24.0)",
        "DATASETS.SHAPES.OBJECTS_PER_IMAGE", "(1, 3)",
        "INPUT.MIN_SIZE_TRAIN", "(32, 40)",
        "INPUT.MAX_SIZE_TRAIN", "56",
        "INPUT.MIN_SIZE_TEST", "32",
        "INPUT.MAX_SIZE_TEST", "48",
        "MODEL.RESNETS.NORM", "GN",
        "MODEL.FPN.OUT_CHANNELS", "16",
        "MODEL.BACKBONE.FREEZE_AT", "5",  # CPU time: the FPN and the head train
        "SOLVER.IMS_PER_BATCH", "4",
        "SOLVER.MAX_ITER", str(max_iter),
        "SOLVER.STEPS", "(7,)",
        "SOLVER.WARMUP_ITERS", "3",
        "SOLVER.CHECKPOINT_PERIOD", "5",
        "DATALOADER.NUM_WORKERS", "0",
        "TEST.EVAL_PERIOD", "0",
        "SEED", "3",
    ]


class _Interrupt(HookBase):
    """Stops the run (as a kill would) at ``iteration``, after the checkpoint before it."""

    def __init__(self, iteration):
        self.iteration = iteration

    def before_step(self):
        if self.trainer.iter == self.iteration:
            raise KeyboardInterrupt("interrupted by the test")


def _trainer(root, out, max_iter, resume, interrupt_at=None, extra=()):
    args = argument_parser().parse_args(
        ["--config-file", DEMO_YAML] + _opts(root, out, max_iter) + list(extra))
    cfg = build_config(args)
    seed_all_rng(cfg.SEED)  # the same initial weights in every run (as default_setup does)
    trainer = HARNetTrainer(cfg)
    trainer.resume_or_load(resume=resume)
    if interrupt_at is not None:
        trainer.register_hooks([_Interrupt(interrupt_at)])
    return trainer


def test_harnet_train_loader_resumes_its_batches(tmp_path):
    # The real dataset dicts, sampler and HARNetDatasetMapper (resize + flip), no training.
    root = str(tmp_path / "shapes")
    args = argument_parser().parse_args(
        ["--config-file", DEMO_YAML] + _opts(root, str(tmp_path / "out"), 10))
    cfg = build_config(args)

    def batches(start, n):
        loader = build_harnet_train_loader(cfg)
        assert loader.seed == cfg.SEED
        loader.start_iter = start
        it = iter(loader)
        return [[(os.path.basename(d["file_name"]), d["image"].shape, int(d["image"].sum()))
                 for d in next(it)] for _ in range(n)]

    ref = batches(0, 14)
    assert len({name for b in ref[:10] for name, _, _ in b}) > 25
    assert batches(6, 8) == ref[6:]


@pytest.mark.slow
@pytest.mark.parametrize("normalizer", ["running", "per_level"])
def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path, normalizer):
    # Both loss normalisers: the running one is state (checkpointed), the authors' per-level
    # one is a function of the batch; either way the resumed run is the uninterrupted one,
    # with TorchScript's default (profiling) executor: the training path calls no
    # TorchScript'ed function (the focal loss is fvcore's eager one).
    root = str(tmp_path / "shapes")
    straight, broken = str(tmp_path / "straight"), str(tmp_path / "broken")
    extra = ["MODEL.HARNET.LOSS.NORMALIZER", normalizer]
    _trainer(root, straight, 10, resume=False, extra=extra).train()

    with pytest.raises(KeyboardInterrupt):
        _trainer(root, broken, 10, resume=False, interrupt_at=6, extra=extra).train()
    assert os.path.exists(os.path.join(broken, "model_0000004.pth"))
    assert not os.path.exists(os.path.join(broken, "model_final.pth"))
    resumed = _trainer(root, broken, 10, resume=True, extra=extra)
    assert resumed.start_iter == 5
    resumed.train()

    a = torch.load(os.path.join(straight, "model_final.pth"), map_location="cpu", weights_only=True)
    b = torch.load(os.path.join(broken, "model_final.pth"), map_location="cpu", weights_only=True)
    assert a["iteration"] == b["iteration"] == 9
    diff = max(float((a["model"][k].double() - b["model"][k].double()).abs().max())
               for k in a["model"])
    assert diff == 0.0, f"max weight difference {diff}"


def test_lazy_config_train_loader_is_resumable():
    from detectron2.config import LazyConfig
    from detectron2.data import DatasetCatalog

    from harnet.engine import LazyConfigTrainer

    name = "issue17_lazy_resume"
    data = [dict(d, image_id=i, annotations=[]) for i, d in enumerate(_fake_dataset(12))]
    DatasetCatalog.register(name, lambda: data)
    try:
        cfg = LazyConfig.load(os.path.join(ROOT, "configs", "HARNet", "demo", "har_R18_shapes_demo.py"))
        cfg = LazyConfig.apply_overrides(cfg, [f"dataloader.train.dataset.names={name}",
                                               "dataloader.train.dataset.filter_empty=False",
                                               "train.seed=5"])
        loader = LazyConfigTrainer.build_train_loader(cfg)
        assert isinstance(loader, ResumableTrainLoader)
        assert (loader.seed, loader.batch_size, len(loader.dataset)) == (5, 4, 12)
    finally:
        DatasetCatalog.remove(name)
