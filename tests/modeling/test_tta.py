"""HARRetinaNetWithTTA on a tiny HARRetinaNet (ResNet-18, 32-channel FPN, random weights with
a zero score threshold so that there are detections)."""

import copy

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from detectron2.evaluation import DatasetEvaluator, inference_on_dataset
from detectron2.modeling import DatasetMapperTTA, build_model
from detectron2.structures import Boxes, Instances

from harnet import HARRetinaNetWithTTA
from harnet_model_utils import har_cfg, perturb_, single_thread

_single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


def _cfg(min_sizes=(64,), flip=False):
    cfg = har_cfg()
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 64, 128
    cfg.TEST.AUG.MIN_SIZES, cfg.TEST.AUG.MAX_SIZE, cfg.TEST.AUG.FLIP = min_sizes, 128, flip
    return cfg


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = perturb_(build_model(_cfg()), scale=0.2).eval()
    return m


def _input(h=64, w=96, height=None, width=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = (torch.rand(3, h, w, generator=g) * 255).to(torch.uint8)
    return {"image": image, "height": height or h, "width": width or w}


def _assert_same(a, b, exact=False):
    assert a.image_size == b.image_size and len(a) == len(b) > 0
    assert torch.equal(a.pred_classes, b.pred_classes)
    if exact:
        assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
        assert torch.equal(a.scores, b.scores)
    else:
        torch.testing.assert_close(a.pred_boxes.tensor, b.pred_boxes.tensor, atol=1e-3, rtol=1e-5)
        torch.testing.assert_close(a.scores, b.scores)


@pytest.mark.parametrize("post", ["hard", "gaussian+caffe voting"])
def test_one_scale_without_flip_equals_the_model(model, post):
    params = dict(model.postprocess_params)
    if post != "hard":
        model.postprocess_params.update(nms_type="gaussian", voting=True, voting_scoring="caffe")
    try:
        tta = HARRetinaNetWithTTA(_cfg(), model)
        with torch.no_grad():
            for inp in (_input(), _input(height=128, width=192, seed=1)):  # also a 2x output
                expected = model([copy.deepcopy(inp)])[0]["instances"]
                got = tta([copy.deepcopy(inp)])[0]["instances"]
                _assert_same(got, expected, exact=inp["height"] == 64)
    finally:
        model.postprocess_params = params


def _only_flipped(cfg):
    mapper = DatasetMapperTTA(cfg)
    return lambda d: [v for v in mapper(d) if "HFlip" in str(v["transforms"])]


def test_flipped_view_maps_back_onto_the_original_boxes(model):
    inp = _input(seed=2)
    tta = HARRetinaNetWithTTA(_cfg(flip=True), model, tta_mapper=_only_flipped(_cfg(flip=True)))
    got = tta([copy.deepcopy(inp)])[0]["instances"]
    # The model on the mirrored image, its boxes mirrored back by hand.
    mirrored = dict(inp, image=inp["image"].flip(-1))
    with torch.no_grad():
        expected = model([mirrored])[0]["instances"]
    b = expected.pred_boxes.tensor
    expected.pred_boxes = Boxes(torch.stack([96 - b[:, 2], b[:, 1], 96 - b[:, 0], b[:, 3]], dim=1))
    _assert_same(got, expected)
    # ... and they differ from the unflipped image's detections (the check is not vacuous).
    with torch.no_grad():
        plain = model([copy.deepcopy(inp)])[0]["instances"]
    assert len(plain) != len(got) or not torch.allclose(
        plain.pred_boxes.tensor, got.pred_boxes.tensor
    )


def _by_hand_to_original(boxes, view_hw, flipped, orig_hw=(64, 96)):
    (vh, vw), (h, w) = view_hw, orig_hw
    if flipped:
        boxes = torch.stack([vw - boxes[:, 2], boxes[:, 1], vw - boxes[:, 0], boxes[:, 3]], 1)
    return boxes * torch.tensor([w / vw, h / vh] * 2)


def test_views_are_batched_and_merged_before_one_suppression(model):
    # Two scales x flip = 4 views, batched by size: the result is one suppression of all
    # the views' candidates mapped back (checked with NMS that suppresses nothing).
    cfg = _cfg(min_sizes=(48, 80), flip=True)
    params = dict(model.postprocess_params)
    model.postprocess_params.update(iou_threshold=1.0, max_detections=100000)
    try:
        inp = _input(seed=3)
        got = HARRetinaNetWithTTA(cfg, model, batch_size=3)([copy.deepcopy(inp)])[0]["instances"]
        views = DatasetMapperTTA(cfg)(copy.deepcopy(inp))
        flipped = ["HFlip" in str(v.pop("transforms")) for v in views]
        with torch.no_grad():  # batched by size: views 0 and 1 (48 px), 2 and 3 (80 px)
            cands = model.forward_candidates(views[:2], False) + model.forward_candidates(
                views[2:], False
            )

        boxes, scores = [], []
        for cand, flip in zip(cands, flipped):
            boxes.append(_by_hand_to_original(cand.pred_boxes.tensor, cand.image_size, flip))
            scores.append(cand.scores)
    finally:
        model.postprocess_params = params
    boxes, scores = Boxes(torch.cat(boxes)), torch.cat(scores)
    boxes.clip((64, 96))
    keep = boxes.nonempty()
    order = scores[keep].sort(descending=True, stable=True)[1]
    assert len(got) == len(order) > 400
    torch.testing.assert_close(got.scores, scores[keep][order])
    # Equal scores make the order of their boxes arbitrary: compare them as sets.
    got_sorted = sorted(
        map(tuple, torch.cat([got.scores[:, None], got.pred_boxes.tensor], 1).tolist())
    )
    exp = torch.cat([scores[keep][:, None], boxes.tensor[keep]], 1)
    exp_sorted = sorted(map(tuple, exp.tolist()))
    torch.testing.assert_close(
        torch.tensor(got_sorted), torch.tensor(exp_sorted), atol=1e-3, rtol=1e-5
    )


def test_size_selection_keeps_large_boxes_of_downscaled_views_and_small_of_upscaled(model):
    cfg = _cfg(min_sizes=(40, 64, 96), flip=False)
    small, large = 24.0**2, 48.0**2
    cfg.TEST.AUG.SIZE_SELECT.ENABLED = True
    cfg.TEST.AUG.SIZE_SELECT.SMALL_AREA, cfg.TEST.AUG.SIZE_SELECT.LARGE_AREA = small, large
    params = dict(model.postprocess_params)
    model.postprocess_params.update(iou_threshold=1.0, max_detections=100000)
    try:
        inp = _input(seed=4)
        got = HARRetinaNetWithTTA(cfg, model)([copy.deepcopy(inp)])[0]["instances"]
        expected, dropped = [], 0
        views = DatasetMapperTTA(cfg)(copy.deepcopy(inp))
        for view in views:
            view.pop("transforms")
        with torch.no_grad():  # three sizes: one view per batch
            cands = [model.forward_candidates([v], do_postprocess=False)[0] for v in views]
        for view, cand in zip(views, cands):
            short = min(view["image"].shape[1:])
            # Back to the 64 x 96 original by hand (no flip here), then the area rule.
            s = torch.tensor([96 / view["image"].shape[2], 64 / view["image"].shape[1]] * 2)
            boxes = cand.pred_boxes.tensor * s
            area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
            # Views: short side 40 (down-scaled), 64 (the test scale), 85 (up-scaled; the
            # long side is capped at 128).
            if short < 64:
                keep = area >= small
            elif short > 64:
                keep = area <= large
            else:
                keep = torch.ones_like(area, dtype=torch.bool)
            dropped += int((~keep).sum())
            boxes = Boxes(boxes[keep])
            boxes.clip((64, 96))
            expected.append(cand.scores[keep][boxes.nonempty()])
    finally:
        model.postprocess_params = params
    assert dropped > 0
    torch.testing.assert_close(got.scores, torch.cat(expected).sort(descending=True)[0])


class _Collect(DatasetEvaluator):
    def reset(self):
        self.outputs = []

    def process(self, inputs, outputs):
        self.outputs.extend(o["instances"] for o in outputs)

    def evaluate(self):
        return {"num_detections": sum(len(o) for o in self.outputs)}


def test_inside_inference_on_dataset_and_with_ddp(model, tmp_path):
    cfg = _cfg(min_sizes=(48, 64), flip=True)
    loader = [[_input(seed=5)], [_input(h=80, w=60, seed=6)]]  # a plain list loader
    evaluator = _Collect()
    model.train()  # inference_context switches to eval and back
    try:
        results = inference_on_dataset(HARRetinaNetWithTTA(cfg, model), loader, evaluator)
        assert model.training
    finally:
        model.eval()
    assert results["num_detections"] > 0
    direct = HARRetinaNetWithTTA(cfg, model)([copy.deepcopy(b[0]) for b in loader])
    for a, b in zip(evaluator.outputs, direct):
        _assert_same(a, b["instances"], exact=True)

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        wrapped = HARRetinaNetWithTTA(cfg, DistributedDataParallel(model))
        assert wrapped.model is model
        out = wrapped([copy.deepcopy(loader[0][0])])[0]["instances"]
        _assert_same(out, direct[0]["instances"], exact=True)
    finally:
        dist.destroy_process_group()


def test_bad_model_and_config_raise(model):
    with pytest.raises(TypeError, match="forward_candidates"):
        HARRetinaNetWithTTA(_cfg(), torch.nn.Linear(2, 2))
    cfg = _cfg()
    cfg.TEST.AUG.SIZE_SELECT.ENABLED = True
    cfg.TEST.AUG.SIZE_SELECT.SMALL_AREA = 200.0**2  # above LARGE_AREA (180**2)
    with pytest.raises(ValueError, match="SIZE_SELECT.SMALL_AREA"):
        HARRetinaNetWithTTA(cfg, model)


def test_views_are_batched_by_size():
    from harnet.tta import _size_batches

    views = [{"image": torch.zeros(3, h, w)} for h, w in [(8, 9), (8, 9), (5, 9), (8, 9), (5, 9)]]
    assert _size_batches(views, 2) == [[0, 1], [3], [2, 4]]


# ---- TEST.AUG.MERGE = "wbf": each view as the model's inference, then weighted boxes fusion.


def _wbf_cfg(min_sizes=(48, 80), flip=True, detections=1000):
    cfg = _cfg(min_sizes=min_sizes, flip=flip)
    cfg.TEST.AUG.MERGE = "wbf"
    cfg.TEST.DETECTIONS_PER_IMAGE = detections
    return cfg


def _as_rows(inst):
    """Detections as (score, class, box) rows in a canonical order (equal scores of
    different boxes may come in either order)."""
    rows = torch.cat(
        [inst.scores[:, None].double(), inst.pred_classes[:, None].double(),
         inst.pred_boxes.tensor.double()], 1)  # fmt: skip
    return torch.tensor(sorted(rows.tolist()), dtype=torch.float64).reshape(-1, 6)


def _assert_same_sets(a, b, atol=1e-3):
    ra, rb = _as_rows(a), _as_rows(b)
    assert ra.shape == rb.shape and len(ra) > 0
    torch.testing.assert_close(ra[:, 0], rb[:, 0], rtol=1e-5, atol=1e-6)
    assert torch.equal(ra[:, 1], rb[:, 1])
    torch.testing.assert_close(ra[:, 2:], rb[:, 2:], rtol=0, atol=atol)


def test_wbf_merge_equals_ensemble_boxes_on_the_models_views(model):
    # Reference: the model's own inference on each view (output at the original size,
    # flipped views mirrored back by hand), fused by the ensemble-boxes package on
    # coordinates normalised to [0, 1].
    ensemble_boxes = pytest.importorskip("ensemble_boxes")
    cfg = _wbf_cfg()
    inp = _input(seed=7)
    got = HARRetinaNetWithTTA(cfg, model)([copy.deepcopy(inp)])[0]["instances"]
    views = DatasetMapperTTA(cfg)(copy.deepcopy(inp))
    scale = torch.tensor([96.0, 64.0] * 2)
    per_view = []
    for view in views:
        flipped = "HFlip" in str(view.pop("transforms"))
        with torch.no_grad():
            det = model([dict(view, height=64, width=96)])[0]["instances"]
        b = det.pred_boxes.tensor
        if flipped:
            b = torch.stack([96 - b[:, 2], b[:, 1], 96 - b[:, 0], b[:, 3]], dim=1)
        per_view.append((b / scale, det.scores, det.pred_classes))
    assert len(per_view) == 4 and all(len(v[0]) > 5 for v in per_view)
    boxes, scores, labels = ensemble_boxes.weighted_boxes_fusion(
        *([t.double().numpy() for t in ts] for ts in zip(*per_view)), iou_thr=0.55
    )
    expected = Instances(
        (64, 96),
        pred_boxes=Boxes(torch.as_tensor(boxes) * scale),
        scores=torch.as_tensor(scores),
        pred_classes=torch.as_tensor(labels).long(),
    )
    num_in = sum(len(v[0]) for v in per_view)
    assert max(len(v[0]) for v in per_view) < len(expected) < num_in  # some views fused
    _assert_same_sets(got, expected)
    # TEST.DETECTIONS_PER_IMAGE keeps the best fused detections.
    best = HARRetinaNetWithTTA(_wbf_cfg(detections=10), model)([copy.deepcopy(inp)])[0]
    assert torch.equal(best["instances"].scores, got.scores[:10])
    assert torch.equal(best["instances"].pred_boxes.tensor, got.pred_boxes.tensor[:10])


def test_wbf_merge_view_order_and_empty_views(model):
    inp = _input(seed=8)
    cfg = _wbf_cfg()
    got = HARRetinaNetWithTTA(cfg, model)([copy.deepcopy(inp)])[0]["instances"]
    mapper = DatasetMapperTTA(cfg)
    reverse = HARRetinaNetWithTTA(cfg, model, tta_mapper=lambda d: mapper(d)[::-1])
    _assert_same_sets(reverse([copy.deepcopy(inp)])[0]["instances"], got, atol=1e-4)

    # One view only: the model's detections. (Boxes the model kept apart can overlap more
    # once clipped to the image, and fuse: IOU_THRESH 1 fuses nothing.)
    cfg = _wbf_cfg(min_sizes=(64,), flip=False)
    cfg.TEST.AUG.WBF.IOU_THRESH = 1.0
    one = HARRetinaNetWithTTA(cfg, model)
    with torch.no_grad():
        plain = model([copy.deepcopy(inp)])[0]["instances"]
    _assert_same(one([copy.deepcopy(inp)])[0]["instances"], plain, exact=True)
    # Plus a view emptied by size selection (down-scaled, nothing counts as large): the
    # same boxes, each scored by the paper's rule min(2 views, 1 box) / 2.
    cfg = _wbf_cfg(min_sizes=(40, 64), flip=False)
    cfg.TEST.AUG.WBF.IOU_THRESH = 1.0
    cfg.TEST.AUG.SIZE_SELECT.ENABLED = True
    cfg.TEST.AUG.SIZE_SELECT.SMALL_AREA = cfg.TEST.AUG.SIZE_SELECT.LARGE_AREA = 1e9
    two = HARRetinaNetWithTTA(cfg, model)([copy.deepcopy(inp)])[0]["instances"]
    halved = Instances(plain.image_size, pred_boxes=plain.pred_boxes, scores=plain.scores / 2,
                       pred_classes=plain.pred_classes)  # fmt: skip
    _assert_same(two, halved, exact=True)


def test_merge_config_errors_name_the_key(model):
    assert _cfg().TEST.AUG.MERGE == "suppress"  # today's behaviour stays the default
    for key, value in (
        ("MERGE", "nms"),
        ("WBF.CONF_TYPE", "mean"),
        ("WBF.IOU_THRESH", 1.5),
        ("WBF.SKIP_THRESH", float("nan")),
    ):
        cfg = _wbf_cfg()
        node, leaf = cfg.TEST.AUG, key
        if "." in key:
            node, leaf = cfg.TEST.AUG.WBF, key.split(".")[1]
        setattr(node, leaf, value)
        with pytest.raises(ValueError, match=f"cfg.TEST.AUG.{key}"):
            HARRetinaNetWithTTA(cfg, model)


def test_view_boxes_map_back_on_their_device_as_detectron2_maps_them():
    # Resize + flip views are per-axis affine maps: applied on the boxes' device, equal to
    # Detectron2's apply_box on the host; a "meta" tensor (no data to copy) proves there is
    # no host round trip. A rotation (not per-axis) takes Detectron2's path.
    import numpy as np
    from detectron2.data import transforms as T

    g = torch.Generator().manual_seed(0)
    xy = torch.rand(50, 2, generator=g) * 300
    boxes = torch.cat([xy, xy + 1 + torch.rand(50, 2, generator=g) * 80], 1)
    views = [
        T.TransformList([T.ResizeTransform(480, 640, 600, 800)]),
        T.TransformList([T.ResizeTransform(480, 640, 333, 444), T.HFlipTransform(444)]),
        T.TransformList([T.HFlipTransform(640), T.VFlipTransform(480)]),
        T.TransformList([T.NoOpTransform()]),
    ]
    for tfm in views:
        expected = tfm.inverse().apply_box(boxes.numpy().copy())
        got = HARRetinaNetWithTTA._to_original(boxes, tfm)
        torch.testing.assert_close(got, torch.as_tensor(expected), rtol=1e-6, atol=1e-4)
        assert HARRetinaNetWithTTA._to_original(boxes.to("meta"), tfm).device.type == "meta"
    rotation = T.RotationTransform(480, 640, angle=30, expand=True)
    expected = rotation.inverse().apply_box(boxes.numpy().copy())
    got = HARRetinaNetWithTTA._to_original(boxes, rotation)
    assert np.allclose(got.numpy(), expected, atol=1e-3)
