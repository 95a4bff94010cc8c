"""Checkpoints across model variants (two-step training, Detectron2 RetinaNet weights) and the
optimizer's learning-rate factors."""

import contextlib
import copy
import logging
import os

import pytest
import torch
from torch import nn

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from harnet.solver import build_optimizer, get_optimizer_params, lr_factors
from harnet_model_utils import har_cfg, make_inputs, perturb_, retinanet_cfg, single_thread

_single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)

ATTENTION_MARKERS = (
    "spatial_attention",
    "channel_attention",
    "channel_cls_score",
    "channel_bbox_pred",
)


@contextlib.contextmanager
def checkpoint_log():
    """Records of the checkpointer's logger (attached to it directly: a Detectron2
    setup_logger elsewhere may stop propagation to the root logger)."""
    records = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    logger = logging.getLogger("fvcore.common.checkpoint")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def _save(model, directory, name="model_final"):
    DetectionCheckpointer(model, save_dir=str(directory)).save(name)
    return str(directory / f"{name}.pth")


def _load(model, path):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with checkpoint_log() as records:
        # What DefaultTrainer.resume_or_load(resume=False) does with MODEL.WEIGHTS.
        DetectionCheckpointer(model).resume_or_load(path, resume=False)
    text = "\n".join(r.getMessage() for r in records)
    return before, text


def test_step2_starts_from_step1_checkpoint(tmp_path):
    step1 = perturb_(build_model(har_cfg("har_R_50_FPN_1x_step1.yaml")))
    path = _save(step1, tmp_path)

    cfg2 = har_cfg("har_R_50_FPN_1x_step2.yaml")
    cfg2.MODEL.WEIGHTS = path
    step2 = build_model(cfg2)
    before, log = _load(step2, cfg2.MODEL.WEIGHTS)

    sd1, sd2 = step1.state_dict(), step2.state_dict()
    missing = sorted(set(sd2) - set(sd1))
    assert set(sd1) <= set(sd2)
    assert missing and all(any(m in k for m in ATTENTION_MARKERS) for k in missing)
    assert {m for m in ATTENTION_MARKERS if any(m in k for k in missing)} == set(ATTENTION_MARKERS)
    for k in sd1:  # step 1's weights are loaded, aligned attention and CLGN included
        assert torch.equal(sd2[k], sd1[k]), k
    for k in missing:  # the new modules keep their initialisation
        assert torch.equal(sd2[k], before[k]), k
    # ...and are listed in the log as missing.
    assert "not found in the checkpoint" in log
    for prefix in (
        "head.spatial_attention.0",
        "head.cls_channel_attention",
        "head.channel_cls_score",
    ):
        assert prefix in log
    assert "unexpected" not in log.lower()

    # Step 2 trains from there.
    step2.train()
    with EventStorage():
        losses = step2(make_inputs())
    assert all(torch.isfinite(v) for v in losses.values()) and len(losses) == 4


def test_detectron2_retinanet_checkpoint_loads_into_harretinanet(tmp_path):
    d2 = perturb_(build_model(retinanet_cfg()))
    path = _save(d2, tmp_path)
    full = build_model(har_cfg())
    before, log = _load(full, path)

    sd_d2, sd = d2.state_dict(), full.state_dict()
    # Backbone (ResNet + FPN + P6/P7), tower convs and predictor A all load by name.
    assert set(sd_d2) <= set(sd)
    for k in sd_d2:
        assert torch.equal(sd[k], sd_d2[k]), k
    assert any(k.startswith("head.cls_subnet.6") for k in sd_d2)
    missing = set(sd) - set(sd_d2)
    for k in missing:
        assert torch.equal(sd[k], before[k]), k
    for prefix in (
        "backbone.bottom_up.aligned_attention.res4",
        "backbone.bottom_up.aligned_attention.res5",
        "head.cls_subnet_norm",
        "head.spatial_attention",
        "head.bbox_channel_attention",
        "head.channel_bbox_pred",
    ):
        assert any(k.startswith(prefix) for k in missing), prefix
        assert prefix in log, prefix


def test_checkpoint_with_other_anchor_count_skips_predictor_with_warning(tmp_path):
    """A 9-anchor RetinaNet checkpoint into the authors' 6-anchor setting: the predictors'
    shapes differ; they are skipped with a warning, the rest loads."""
    d2 = perturb_(build_model(retinanet_cfg()))
    path = _save(d2, tmp_path)
    cfg = har_cfg("har_R_50_FPN_authors.yaml")
    model = build_model(cfg)
    before, log = _load(model, path)
    sd = model.state_dict()
    assert "Skip loading parameter 'head.cls_score.weight'" in log
    assert torch.equal(sd["head.cls_score.weight"], before["head.cls_score.weight"])
    assert torch.equal(sd["head.cls_subnet.0.weight"], d2.state_dict()["head.cls_subnet.0.weight"])


# ------------------------------------------------------------- optimizer lr factors
def _group_of(optimizer):
    return {id(p): g for g in optimizer.param_groups for p in g["params"]}


def test_build_optimizer_applies_offset_lr_factor_and_norm_weight_decay():
    cfg = har_cfg()
    cfg.MODEL.HARNET.ALIGN.OFFSET_LR_FACTOR = 0.25
    cfg.SOLVER.BASE_LR = 0.02
    cfg.SOLVER.BIAS_LR_FACTOR = 2.0
    cfg.SOLVER.WEIGHT_DECAY = 1e-4
    cfg.SOLVER.WEIGHT_DECAY_NORM = 0.0
    model = build_model(cfg)
    opt = build_optimizer(cfg, model)
    group = _group_of(opt)

    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sorted(map(id, trainable)) == sorted(group)  # each trainable param once, frozen out
    assert sum(len(g["params"]) for g in opt.param_groups) == len(trainable)
    for name in ("res4", "res5"):
        block = model.backbone.bottom_up.aligned_attention[name]
        assert group[id(block.conv2_offset.weight)]["lr"] == pytest.approx(0.02 * 0.25)
        assert group[id(block.conv2_offset.bias)]["lr"] == pytest.approx(0.02 * 2.0 * 0.25)
        assert group[id(block.conv2.weight)]["lr"] == pytest.approx(0.02)
        assert group[id(block.norm1.weight)]["weight_decay"] == 0.0
    head = model.head
    assert group[id(head.cls_subnet[0].weight)]["lr"] == pytest.approx(0.02)
    assert group[id(head.cls_subnet[0].weight)]["weight_decay"] == 1e-4
    assert group[id(head.cls_subnet[0].bias)]["lr"] == pytest.approx(0.04)
    # CLGN is a norm layer for WEIGHT_DECAY_NORM, as nn.GroupNorm is in Detectron2.
    assert group[id(head.cls_subnet_norm[0].weight)]["weight_decay"] == 0.0
    assert group[id(head.bbox_subnet_norm[3].bias)]["weight_decay"] == 0.0

    # One SGD step moves the offset conv by its own lr (first momentum step = the gradient).
    model.train()
    with EventStorage():
        losses = model(make_inputs())
    sum(losses.values()).backward()
    w = model.backbone.bottom_up.aligned_attention["res5"].conv2_offset.weight
    expected = w.detach() - 0.02 * 0.25 * (w.grad + 1e-4 * w.detach())
    assert w.grad.abs().sum() > 0
    opt.step()
    torch.testing.assert_close(w.detach(), expected)


def test_lr_factors_multiply_when_nested_and_need_base_lr():
    inner = nn.Linear(2, 2)
    inner.lr_factor = 0.5
    outer = nn.Sequential(nn.Linear(2, 2), inner)
    outer.lr_factor = 0.1
    model = nn.Sequential(outer, nn.Linear(2, 2))
    factors = lr_factors(model)
    assert factors[inner.weight] == pytest.approx(0.05)
    assert factors[outer[0].weight] == pytest.approx(0.1)
    assert model[1].weight not in factors
    groups = get_optimizer_params(model, base_lr=1.0)
    lr = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert lr[id(inner.bias)] == pytest.approx(0.05) and lr[id(model[1].bias)] == 1.0
    with pytest.raises(ValueError, match="base_lr"):
        get_optimizer_params(model)
    bad = copy.deepcopy(model)
    bad[0].lr_factor = -1.0
    with pytest.raises(ValueError, match="lr_factor"):
        lr_factors(bad)


def test_get_optimizer_params_without_factors_equals_detectron2():
    from detectron2.solver.build import get_default_optimizer_params

    model = build_model(har_cfg(ALIGN=False, CLGN=False))
    ours = get_optimizer_params(model, weight_decay_norm=0.0)
    theirs = get_default_optimizer_params(model, weight_decay_norm=0.0)
    as_sets = lambda groups: sorted(  # noqa: E731
        (tuple(sorted((k, v) for k, v in g.items() if k != "params")), sorted(map(id, g["params"])))
        for g in groups
    )
    assert as_sets(ours) == as_sets(theirs)


# --- unreadable checkpoints named, stale partial writes removed --------------
def _bad_checkpoints(folder):
    """name -> (bytes, words the error must hold)."""
    import io
    import zipfile

    good = io.BytesIO()
    torch.save({"model": {"w": torch.zeros(3)}}, good)
    good = good.getvalue()
    assert zipfile.is_zipfile(io.BytesIO(good))
    rng = torch.Generator().manual_seed(0)
    random_bytes = bytes(torch.randint(0, 256, (2000,), generator=rng, dtype=torch.uint8).tolist())
    return {
        "text.pth": (b"model weights are elsewhere\n" * 10, ["not a PyTorch checkpoint"]),
        "random.pth": (b"\x13" + random_bytes, ["not a PyTorch checkpoint"]),
        "random_pickle_head.pth": (b"\x80\x02" + random_bytes, ["corrupt"]),
        "empty.pth": (b"", ["empty"]),
        "truncated.pth": (good[: len(good) // 2], ["truncated or corrupt"]),
    }


@pytest.mark.parametrize("name", ["text.pth", "random.pth", "random_pickle_head.pth",
                                  "empty.pth", "truncated.pth"])
def test_unreadable_checkpoint_error_names_file_and_problem(tmp_path, name):
    # Before: a text file gave "IndexError: pop from empty list" (no file name), random
    # bytes "holds Python objects other than tensors".
    from harnet.engine.faults import AtomicDetectionCheckpointer, CorruptCheckpointError

    data, words = _bad_checkpoints(tmp_path)[name]
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(CorruptCheckpointError) as e:
        AtomicDetectionCheckpointer(nn.Linear(3, 1)).load(str(path))
    msg = str(e.value)
    assert str(path) in msg
    for w in words:
        assert w in msg, msg
    assert "Python objects other than tensors" not in msg


def test_checkpoint_with_code_objects_is_named_as_such(tmp_path):
    from harnet.engine.faults import AtomicDetectionCheckpointer, CorruptCheckpointError

    path = tmp_path / "unsafe.pth"
    torch.save({"model": {"w": torch.zeros(3)}, "obj": contextlib.ExitStack()}, path)
    with pytest.raises(CorruptCheckpointError, match="Python objects other than tensors"):
        AtomicDetectionCheckpointer(nn.Linear(3, 1)).load(str(path))


def test_stale_partial_checkpoint_writes_are_removed(tmp_path):
    # Before: a kill during a save left .model_*.pth.tmp-<pid> (up to the checkpoint's size)
    # that nothing removed.
    import subprocess
    import sys

    from harnet.engine.faults import AtomicDetectionCheckpointer

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".model_0000009.pth.tmp-{dead_pid}"
    stale.write_bytes(b"\0" * 1000)
    live = tmp_path / f".model_0000019.pth.tmp-{os.getppid()}"  # a live process's save
    live.write_bytes(b"\0")
    other = tmp_path / ".notes.tmp"  # not ours
    other.write_bytes(b"\0")
    records = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    logging.getLogger("harnet.engine.faults").addHandler(handler)
    try:
        ckpt = AtomicDetectionCheckpointer(nn.Linear(3, 1), save_dir=str(tmp_path))
    finally:
        logging.getLogger("harnet.engine.faults").removeHandler(handler)
    assert not stale.exists()
    assert live.exists() and other.exists()
    logs = [r.getMessage() for r in records]
    assert any(str(stale) in m and "1000 bytes" in m for m in logs), logs
    # A reader (no saving) removes nothing.
    stale.write_bytes(b"\0")
    AtomicDetectionCheckpointer(nn.Linear(3, 1), save_dir=str(tmp_path), save_to_disk=False)
    assert stale.exists()
    ckpt.save("model_0000001")
    assert (tmp_path / "model_0000001.pth").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".model_0000001")] == []
