"""The switches of the authors' released recipe (the authors' released recipe, py-HAR), each against an independent
computation written from its definition in the authors' files (yali996/py-HAR): per-level
normalised focal / box losses, the FPN wiring, the anchors, the clip + size filter of the
candidates, the parameter groups and the initialisation; and the authors configs."""

import copy
import math
import os

import pytest
import torch
from torch.nn import functional as F

from detectron2.config import LazyConfig, instantiate
from detectron2.modeling import build_model
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.backbone.fpn import FPN
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.structures import Boxes
from detectron2.utils.events import EventStorage

from harnet.modeling import AuthorsFPN, RoundedAnchorGenerator, per_level_normalized_losses
from harnet.modeling.candidates import authors_level_candidates
from harnet.solver import build_optimizer
from harnet_model_utils import CONFIG_DIR, har_cfg, losses_of, make_inputs, perturb_, single_thread

_single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


def _authors_tiny(config_file="har_R_50_FPN_authors.yaml"):
    cfg = har_cfg(config_file)
    # The tiny models' random scores are ~0.01: keep every candidate and detection.
    cfg.MODEL.HARNET.POSTPROCESS.MIN_SCORE = 0.0
    # Suppression is another module's (tests/test_box_voting.py): plain soft-NMS here.
    cfg.MODEL.HARNET.POSTPROCESS.VOTING.ENABLED = False
    cfg.MODEL.HARNET.POSTPROCESS.VOTING.SCORING = "max"
    return cfg


# ------------------------------------------------------------- 1. per-level normaliser
def _focal_from_definition(logit, target, alpha=0.25, gamma=2.0):
    """Focal loss of one (anchor, class) entry, Lin et al.: -a_t (1 - p_t)^g log(p_t)."""
    p = 1.0 / (1.0 + math.exp(-logit))
    if target == 1:
        return -alpha * (1 - p) ** gamma * math.log(p)
    return -(1 - alpha) * p**gamma * math.log(1 - p)


def _smooth_l1(x, beta):
    return 0.5 * x * x / beta if abs(x) < beta else abs(x) - 0.5 * beta


def _reference_losses(anchors, logits, labels, deltas, boxes, num_classes, beta, minimum):
    """Slow loops: per level, sum over non-ignored anchors and classes / max(P_l, min, 1)."""
    loss_cls = loss_box = 0.0
    start = 0
    for level, a in enumerate(anchors):
        n = a.shape[0]
        pos = sum(
            1 for img in range(len(labels)) for r in range(n) if 0 <= labels[img][start + r] < num_classes
        )
        norm = max(pos, minimum, 1)
        cls_sum = box_sum = 0.0
        for img in range(len(labels)):
            for r in range(n):
                lab = int(labels[img][start + r])
                if lab < 0:
                    continue
                for k in range(num_classes):
                    cls_sum += _focal_from_definition(float(logits[level][img, r, k]), int(lab == k))
                if lab == num_classes:
                    continue
                ax1, ay1, ax2, ay2 = a[r].tolist()
                gx1, gy1, gx2, gy2 = boxes[img][start + r].tolist()
                aw, ah, gw, gh = ax2 - ax1, ay2 - ay1, gx2 - gx1, gy2 - gy1
                target = [
                    ((gx1 + gx2) / 2 - (ax1 + ax2) / 2) / aw,
                    ((gy1 + gy2) / 2 - (ay1 + ay2) / 2) / ah,
                    math.log(gw / aw),
                    math.log(gh / ah),
                ]
                for c in range(4):
                    box_sum += _smooth_l1(float(deltas[level][img, r, c]) - target[c], beta)
        loss_cls += cls_sum / norm
        loss_box += box_sum / norm
        start += n
    return loss_cls, loss_box


def _hand_built_batch(num_classes=3):
    """Two images, two levels (6 and 3 anchors): positives at level 0 only, ignored anchors."""
    g = torch.Generator().manual_seed(3)
    anchors = [
        torch.tensor([[0, 0, 8, 8], [8, 0, 16, 8], [0, 8, 8, 16], [8, 8, 16, 16], [4, 4, 12, 12],
                      [2, 2, 10, 14]], dtype=torch.float32),
        torch.tensor([[0, 0, 16, 16], [16, 0, 32, 16], [0, 16, 16, 32]], dtype=torch.float32),
    ]
    labels = [torch.tensor([0, 3, -1, 2, 3, 1, 3, 3, -1]), torch.tensor([3, 1, 3, 3, -1, 3, 3, 3, 3])]
    boxes = [a.clone() for a in (torch.cat(anchors), torch.cat(anchors))]
    for b in boxes:
        b += torch.rand(b.shape, generator=g) * 2 - 1
    logits = [torch.randn(2, len(a), num_classes, generator=g) * 2 for a in anchors]
    deltas = [torch.randn(2, len(a), 4, generator=g) * 0.3 for a in anchors]
    return anchors, logits, labels, deltas, boxes


@pytest.mark.parametrize("minimum", [100.0, 2.0, 0.0])
def test_per_level_losses_match_the_definition(minimum):
    anchors, logits, labels, deltas, boxes = _hand_built_batch()
    beta = 0.01
    got = per_level_normalized_losses(
        [Boxes(a) for a in anchors],
        logits,
        labels,
        deltas,
        boxes,
        num_classes=3,
        focal_loss_alpha=0.25,
        focal_loss_gamma=2.0,
        box2box_transform=Box2BoxTransform(weights=(1.0, 1.0, 1.0, 1.0)),
        box_reg_loss_type="smooth_l1",
        smooth_l1_beta=beta,
        min_normalizer=minimum,
    )
    ref_cls, ref_box = _reference_losses(anchors, logits, labels, deltas, boxes, 3, beta, minimum)
    assert got["loss_cls"].item() == pytest.approx(ref_cls, rel=1e-5)
    assert got["loss_box_reg"].item() == pytest.approx(ref_box, rel=1e-5)


def test_level_without_positives_is_finite_and_normalised_by_the_minimum():
    anchors, logits, labels, deltas, boxes = _hand_built_batch()
    # Level 1 (anchors 6..8) has no positives in either image; min 0 -> normaliser 1.
    for minimum in (100.0, 0.0):
        kwargs = dict(
            num_classes=3, focal_loss_alpha=0.25, focal_loss_gamma=2.0,
            box2box_transform=Box2BoxTransform(weights=(1.0,) * 4), box_reg_loss_type="smooth_l1",
            smooth_l1_beta=0.01, min_normalizer=minimum,
        )
        lvl1 = per_level_normalized_losses(
            [Boxes(anchors[1])], [logits[1]], [x[6:] for x in labels], [deltas[1]],
            [b[6:] for b in boxes], **kwargs
        )
        assert torch.isfinite(lvl1["loss_cls"]) and lvl1["loss_box_reg"].item() == 0.0
        bg = sum(
            _focal_from_definition(float(logits[1][i, r, k]), 0)
            for i in range(2) for r in range(3) for k in range(3) if labels[i][6 + r] >= 0
        )
        assert lvl1["loss_cls"].item() == pytest.approx(bg / max(minimum, 1.0), rel=1e-5)
    logits[1].requires_grad_(True)
    out = per_level_normalized_losses(
        [Boxes(a) for a in anchors], logits, labels, deltas, boxes, **kwargs
    )
    out["loss_cls"].backward()
    assert torch.isfinite(logits[1].grad).all()


@pytest.mark.parametrize("loss_type", ["smooth_l1", "giou", "diou", "ciou"])
def test_per_level_box_losses_match_detectron2_per_level(loss_type):
    # Reference: Detectron2's own _dense_box_regression_loss on each level's positives,
    # divided by that level's normaliser. Background anchors' gt boxes are zeros (as
    # Detectron2 labels an image without objects): losses and gradients stay finite.
    from detectron2.modeling.box_regression import _dense_box_regression_loss

    anchors, logits, labels, deltas, boxes = _hand_built_batch()
    boxes[1][torch.as_tensor(labels[1]) == 3] = 0.0
    deltas = [d.requires_grad_(True) for d in deltas]
    transform = Box2BoxTransform(weights=(1.0,) * 4)
    got = per_level_normalized_losses(
        [Boxes(a) for a in anchors], logits, labels, deltas, boxes, num_classes=3,
        focal_loss_alpha=0.25, focal_loss_gamma=2.0, box2box_transform=transform,
        box_reg_loss_type=loss_type, smooth_l1_beta=0.01, min_normalizer=2.0,
    )  # fmt: skip
    got["loss_box_reg"].backward()
    assert all(torch.isfinite(d.grad).all() for d in deltas)
    expected, start = 0.0, 0
    for a, d in zip(anchors, deltas):
        n = len(a)
        lab = torch.stack(labels)[:, start : start + n]
        pos = (lab >= 0) & (lab != 3)
        gt = [b[start : start + n] for b in boxes]
        expected += _dense_box_regression_loss(
            [Boxes(a)], transform, [d.detach()], gt, pos, loss_type, smooth_l1_beta=0.01
        ) / max(float(pos.sum()), 2.0)
        start += n
    assert got["loss_box_reg"].item() == pytest.approx(float(expected), rel=1e-5)


def test_per_level_losses_make_at_most_one_host_sync():
    # Every .item() / boolean index / nonzero waits for the GPU: the authors' normaliser
    # runs with one (Detectron2's get_deltas checks its anchors once), not one per level.
    from torch.utils._python_dispatch import TorchDispatchMode

    syncing = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero"}

    class CountSyncs(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.split(".")[0] in syncing or (
                func.__name__.startswith("index") and any(
                    isinstance(i, torch.Tensor) and i.dtype == torch.bool
                    for i in (args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else [])
                )
            ):
                CountSyncs.count += 1
            return func(*args, **(kwargs or {}))

    anchors, logits, labels, deltas, boxes = _hand_built_batch()
    with CountSyncs():
        per_level_normalized_losses(
            [Boxes(a) for a in anchors], logits, labels, deltas, boxes, num_classes=3,
            focal_loss_alpha=0.25, focal_loss_gamma=2.0,
            box2box_transform=Box2BoxTransform(weights=(1.0,) * 4),
            box_reg_loss_type="smooth_l1", smooth_l1_beta=0.01, min_normalizer=100.0,
        )  # fmt: skip
    assert CountSyncs.count <= 1


@pytest.fixture(scope="module")
def authors_model():
    torch.manual_seed(0)
    return perturb_(build_model(_authors_tiny()), scale=0.02)


def test_model_losses_per_predictor_are_half_of_the_per_level_losses(authors_model):
    model = authors_model
    inputs = make_inputs()
    model.train()
    with EventStorage():
        losses = model(copy.deepcopy(inputs))
        again = model(copy.deepcopy(inputs))
        images, features = model._features(inputs)
        preds = model.head.forward_predictors(features)["predictions"]
        anchors = model.anchor_generator(features)
        gt_labels, gt_boxes = model.label_anchors(anchors, [x["instances"] for x in inputs])
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_cls_channel", "loss_box_reg_channel"}
    for suffix, pred in zip(("", "_channel"), preds):
        logits, deltas = model._transpose_dense_predictions(pred, [model.num_classes, 4])
        ref = per_level_normalized_losses(
            anchors, logits, gt_labels, deltas, gt_boxes, num_classes=model.num_classes,
            focal_loss_alpha=0.25, focal_loss_gamma=2.0, box2box_transform=model.box2box_transform,
            box_reg_loss_type="smooth_l1", smooth_l1_beta=0.01, min_normalizer=100.0,
        )
        for k in ("loss_cls", "loss_box_reg"):
            torch.testing.assert_close(losses[k + suffix], 0.5 * ref[k], rtol=1e-6, atol=0)
    # Stateless: no running normaliser is kept, so the same weights and batch give the same
    # losses on every call (and after any resume).
    assert "loss_normalizer" not in model.__dict__
    for k in losses:
        assert torch.equal(losses[k], again[k]), k


# ------------------------------------------------------------- 2. FPN layout
def _conv(x, conv, stride=1):
    return F.conv2d(x, conv.weight, conv.bias, stride=stride, padding=conv.weight.shape[-1] // 2)


def _up2_crop(x, like):
    # Caffe "Upsample" scale 2 (each pixel copied to a 2x2 block) then "Crop" offset 0.
    up = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    return up[:, :, : like.shape[2], : like.shape[3]]


def test_authors_fpn_wiring_against_hand_built_convs(authors_model):
    fpn = authors_model.backbone
    assert isinstance(fpn, AuthorsFPN)
    names = [n for n, _ in fpn.named_parameters()]
    assert not any(n.startswith("fpn_output5") for n in names)
    assert any(n.startswith("fpn_output4") for n in names) and "fpn_lateral5.weight" in names
    x = torch.randn(1, 3, 70, 90, generator=torch.Generator().manual_seed(0))  # odd sizes: crops
    with torch.no_grad():
        out = fpn(x)
        c = fpn.bottom_up(x)  # refined C3..C5 (aligned attention included)
        p5 = _conv(c["res5"], fpn.fpn_lateral5)
        p4 = _conv(_conv(c["res4"], fpn.fpn_lateral4) + _up2_crop(p5, c["res4"]), fpn.fpn_output4)
        p3 = _conv(_conv(c["res3"], fpn.fpn_lateral3) + _up2_crop(p4, c["res3"]), fpn.fpn_output3)
        p6 = _conv(c["res5"], fpn.top_block.p6, stride=2)
        p7 = _conv(F.relu(p6), fpn.top_block.p7, stride=2)
    for name, ref in zip(("p3", "p4", "p5", "p6", "p7"), (p3, p4, p5, p6, p7)):
        torch.testing.assert_close(out[name], ref, rtol=1e-5, atol=1e-5)


def test_authors_fpn_init_is_gaussian_001_and_default_fpn_unchanged():
    torch.manual_seed(0)
    fpn = build_model(_authors_tiny()).backbone
    convs = [fpn.fpn_lateral3, fpn.fpn_lateral4, fpn.fpn_lateral5, fpn.fpn_output3, fpn.fpn_output4,
             fpn.top_block.p6, fpn.top_block.p7]
    w = torch.cat([c.weight.flatten() for c in convs])
    assert w.std().item() == pytest.approx(0.01, rel=0.02)
    assert abs(w.mean().item()) < 4 * 0.01 / math.sqrt(w.numel())
    assert all(torch.count_nonzero(c.bias) == 0 for c in convs)
    default = build_model(har_cfg("har_R_50_FPN_1x.yaml")).backbone
    assert type(default) is FPN and hasattr(default, "fpn_output5")


# ------------------------------------------------------------- 3. anchors
def _authors_cell_anchors(stride, scales, ratios=(0.5, 1.0, 2.0)):
    """caffe-123/src/caffe/util/rpn.cpp, inclusive pixel coordinates: _ratio_enum then
    _scale_enum of the base box (0, 0, s-1, s-1). Returned in the authors' order."""
    def whctrs(a):
        w, h = a[2] - a[0] + 1, a[3] - a[1] + 1
        return w, h, a[0] + (w - 1) / 2, a[1] + (h - 1) / 2

    def mk(w, h, cx, cy):
        return [cx - (w - 1) / 2, cy - (h - 1) / 2, cx + (w - 1) / 2, cy + (h - 1) / 2]

    def cround(v):  # C++ std::round: halves away from zero
        return math.floor(v + 0.5)

    out = []
    base = [0, 0, stride - 1, stride - 1]
    for r in ratios:
        w, h, cx, cy = whctrs(base)
        wr = cround(math.sqrt(w * h / r))
        ratio_anchor = mk(wr, cround(r * wr), cx, cy)
        for s in scales:
            w, h, cx, cy = whctrs(ratio_anchor)
            out.append(mk(w * s, h * s, cx, cy))
    return out


def test_anchor_boxes_and_centres_are_the_authors():
    strides = [8, 16, 32, 64, 128]
    gen = RoundedAnchorGenerator(
        sizes=[[s * 4, s * 4 * 2**0.5] for s in strides], aspect_ratios=[0.5, 1.0, 2.0],
        strides=strides, offset=0.5,
    )
    grid = [(3, 4), (2, 3), (2, 2), (1, 2), (1, 1)]
    feats = [torch.zeros(1, 1, h, w) for h, w in grid]
    for level, (anchors, stride, (h, w)) in enumerate(zip(gen(feats), strides, grid)):
        cell = _authors_cell_anchors(stride, [4.0, 2**2.5])
        got = anchors.tensor.view(h, w, -1, 4)
        for j in range(h):
            for i in range(w):
                ref = []
                for x1, y1, x2, y2 in cell:  # rpn_enumerate_all_anchors shift, then
                    # inclusive -> continuous: the last pixel's far edge is x2 + 1.
                    ref.append([x1 + i * stride, y1 + j * stride, x2 + 1 + i * stride,
                                y2 + 1 + j * stride])
                ref = torch.tensor(ref)
                # Same set of boxes (Detectron2's size-major order vs the authors' ratio-major).
                key = lambda t: sorted(map(tuple, t.tolist()))  # noqa: E731
                for a, b in zip(key(got[j, i]), key(ref)):
                    assert a == pytest.approx(b, abs=1e-4), (level, j, i)
                # Centres: i*s + s/2 (the authors' coder: x1 + 0.5 * (x2 - x1 + 1)).
                centres = (got[j, i, :, :2] + got[j, i, :, 2:]) / 2
                torch.testing.assert_close(
                    centres, torch.tensor([[i * stride + stride / 2, j * stride + stride / 2]] * 6)
                )


def test_default_anchors_are_detectron2s():
    model = build_model(har_cfg("har_R_50_FPN_1x.yaml"))
    assert type(model.anchor_generator) is DefaultAnchorGenerator
    assert model.anchor_generator.offset == 0.0


# ------------------------------------------------------------- 4. candidates
def _reference_candidates(boxes, scores, image_size, min_size, thresh, topk):
    """proposal_layer.cpp from its definition: clip, keep w/h >= min, sort the kept anchors'
    pairs, the first min(topk, #kept anchors), stop below thresh except the first."""
    h, w = image_size
    kept = []
    for r, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
        x1, x2 = min(max(x1, 0), w), min(max(x2, 0), w)
        y1, y2 = min(max(y1, 0), h), min(max(y2, 0), h)
        if x2 - x1 >= min_size[0] and y2 - y1 >= min_size[1]:
            kept.append((r, [x1, y1, x2, y2]))
    pairs = sorted(
        ((float(scores[r, k]), r, k, b) for r, b in kept for k in range(scores.shape[1])),
        key=lambda t: -t[0],
    )
    out = []
    for j, (s, r, k, b) in enumerate(pairs[: min(topk, len(kept))]):
        if s < thresh and j > 0:
            break
        out.append((b, s, k))
    return out


def test_clip_and_size_filter_on_crafted_candidates():
    anchors = torch.tensor(
        [[10.0, 10, 30, 30],   # kept
         [-40, 5, -2, 25],     # entirely left of the image: clipped to zero width, dropped
         [90, 40, 130, 60],    # partly outside: clipped to 90..100 (10 px), kept
         [50, 50, 55, 70],     # 5 px wide: dropped
         [20, 60, 40, 68],     # 8 px high: kept (>= 8)
         [0, 0, 100, 80]]      # whole image: kept
    )
    scores = torch.tensor(
        [[0.30, 0.01], [0.99, 0.98], [0.02, 0.20], [0.97, 0.96], [0.04, 0.03], [0.06, 0.01]]
    )
    deltas = torch.zeros(6, 4)
    b2b = Box2BoxTransform(weights=(1.0,) * 4)
    for thresh, topk in ((0.05, 1000), (0.05, 2), (0.5, 1000), (0.999, 1000)):
        got = authors_level_candidates(anchors, scores, deltas, b2b, (80, 100), (8.0, 8.0), thresh, topk)
        ref = _reference_candidates(anchors, scores, (80, 100), (8.0, 8.0), thresh, topk)
        assert len(got[0]) == len(ref) >= 1
        for (b, s, k), gb, gs, gk in zip(ref, *got):
            assert gb.tolist() == pytest.approx(b) and gs.item() == pytest.approx(s)
            assert gk.item() == k
    # At most min(topk, kept anchors = 4) pairs, even though 8 pairs pass 0.0.
    assert len(authors_level_candidates(anchors, scores, deltas, b2b, (80, 100), (8.0, 8.0),
                                        0.0, 1000)[0]) == 4
    # Nothing kept: no candidates (and no error).
    none = authors_level_candidates(anchors, scores, deltas, b2b, (80, 100), (200.0, 8.0), 0.0, 10)
    assert len(none[0]) == 0


def test_model_candidates_min_size_is_in_original_pixels(authors_model):
    model = authors_model
    model.eval()
    model.test_score_thresh, model.test_topk_candidates = 0.0, 1000
    # Network input 64x80 shown for a 128x160 original: 8 original px = 4 input px.
    inputs = make_inputs(with_instances=False, sizes=((64, 80),), output_sizes=((128, 160),))
    with torch.no_grad():
        cands = model.forward_candidates(inputs, do_postprocess=False)[0]
        out = model(copy.deepcopy(inputs))[0]["instances"]
    b = cands.pred_boxes.tensor
    assert len(b) > 0 and (b[:, 2] - b[:, 0] >= 4 - 1e-4).all() and (b[:, 3] - b[:, 1] >= 4 - 1e-4).all()
    assert (b[:, 0] >= 0).all() and (b[:, 2] <= 80).all() and (b[:, 1] >= 0).all() and (b[:, 3] <= 64).all()
    assert out.image_size == (128, 160) and len(out) > 0
    model.candidate_min_size = 1000.0  # nothing survives the size filter
    with torch.no_grad():
        assert len(model.forward_candidates(inputs, do_postprocess=False)[0]) == 0
    model.candidate_min_size = 8.0


# ------------------------------------------------------------- 6. solver
def _expected_hyper(name, module, base_lr, wd, authors):
    """The authors' prototxt rules (param { lr_mult decay_mult } of train_hyr_att.prototxt,
    by the layer each parameter stands for) / Detectron2's defaults."""
    is_bias = name.endswith("bias")
    is_norm = isinstance(module, (torch.nn.GroupNorm,)) or type(module).__name__ == "CrossLevelGroupNorm"
    lr_mult = 0.1 if "conv2_offset" in name else 1.0
    if authors:
        if ".spatial_attention." in name:  # spatt_*: no param {} -> lr 1, decay 1
            return base_lr, wd
        # fpn_pool*/fpn_conv* (lateral, output, P6/P7), SE FCs, offset convs: the bias has
        # lr_mult 2 (0.2) and no decay_mult (1); everything else: lr_mult 2, decay_mult 0.
        bias_decays = any(k in name for k in ("fpn_lateral", "fpn_output", "top_block", "conv2_offset",
                                                "channel_attention.fc"))
        lr = base_lr * lr_mult * (2.0 if is_bias else 1.0)
        decay = wd if (not is_bias or bias_decays) else 0.0
    else:
        lr = base_lr * lr_mult
        decay = 0.0 if is_norm else wd
    return lr, decay


@pytest.mark.parametrize("authors", [True, False])
def test_parameter_groups_lr_and_decay(authors):
    cfg = _authors_tiny() if authors else har_cfg("har_R_50_FPN_1x.yaml")
    model = build_model(cfg)
    opt = build_optimizer(cfg, model)
    hyper = {id(p): (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    modules = dict(model.named_modules())
    checked = 0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        module = modules[name.rsplit(".", 1)[0]]
        lr, decay = _expected_hyper(name, module, cfg.SOLVER.BASE_LR, cfg.SOLVER.WEIGHT_DECAY, authors)
        assert hyper[id(p)][0] == pytest.approx(lr), name
        assert hyper[id(p)][1] == pytest.approx(decay), name
        checked += 1
    assert checked > 50
    assert cfg.SOLVER.WARMUP_ITERS == (0 if authors else 1000)


# ------------------------------------------------------------- 5. init
def _std_ok(w, std):
    w = w.detach().flatten()
    return abs(w.std().item() / std - 1) < 0.04 and abs(w.mean().item()) < 4 * std / math.sqrt(w.numel())


def test_authors_init_distributions():
    torch.manual_seed(0)
    head = build_model(_authors_tiny()).head
    torch.manual_seed(0)
    d2_head = build_model(har_cfg("har_R_50_FPN_1x.yaml")).head
    c = 32  # tiny FPN channels: fan_in of every 3x3 head conv is 32 * 9
    msra = math.sqrt(2.0 / (c * 9))
    towers = [m.weight for m in list(head.cls_subnet) + list(head.bbox_subnet)
              if isinstance(m, torch.nn.Conv2d)]
    assert _std_ok(torch.cat([w.flatten() for w in towers]), msra)
    for conv in (head.cls_score, head.bbox_pred, head.channel_cls_score, head.channel_bbox_pred,
                 head.cls_channel_attention.conv, head.bbox_channel_attention.conv):
        assert _std_ok(conv.weight, msra), conv
    prior = -math.log((1 - 0.01) / 0.01)
    torch.testing.assert_close(head.channel_cls_score.bias, torch.full_like(head.channel_cls_score.bias, prior))
    d2_towers = [m.weight for m in d2_head.cls_subnet if isinstance(m, torch.nn.Conv2d)]
    assert _std_ok(torch.cat([w.flatten() for w in d2_towers]), 0.01)
    torch.manual_seed(0)
    blocks = build_model(_authors_tiny()).backbone.bottom_up.aligned_attention.values()
    ws = torch.cat([w.flatten() for b in blocks for w in (b.conv1.weight, b.conv2.weight, b.conv3.weight)])
    assert _std_ok(ws, 0.01)
    assert all(torch.count_nonzero(b.conv2_offset.weight) == 0 for b in blocks)


# ------------------------------------------------------------- configs
def _full(config_file):
    cfg = har_cfg(config_file, tiny=False)
    cfg.MODEL.DEVICE = "cpu"
    return cfg


@pytest.mark.parametrize("config_file", ["har_R_50_FPN_authors.yaml", "har_R_101_FPN_authors.yaml"])
def test_authors_configs_turn_on_every_switch(config_file):
    cfg = _full(config_file)
    har = cfg.MODEL.HARNET
    assert cfg.MODEL.BACKBONE.NAME == "build_harnet_resnet_authors_fpn_backbone"
    assert cfg.MODEL.ANCHOR_GENERATOR.NAME == "RoundedAnchorGenerator"
    assert cfg.MODEL.ANCHOR_GENERATOR.OFFSET == 0.5
    assert har.INIT == "authors" and har.LOSS.NORMALIZER == "per_level" and har.LOSS.PER_LEVEL_MIN == 100
    assert har.CANDIDATES.MODE == "authors" and har.CANDIDATES.MIN_SIZE == 8
    assert har.SPATIAL.NORM_GROUPS == 0 and [list(r) for r in har.SPATIAL.DILATIONS] == [[1, 2, 5, 2]]
    assert (cfg.SOLVER.BIAS_LR_FACTOR, cfg.SOLVER.WEIGHT_DECAY_BIAS) == (2.0, 0.0)
    assert cfg.SOLVER.BIAS_EXCEPTIONS == "authors"
    assert cfg.SOLVER.WEIGHT_DECAY_NORM == cfg.SOLVER.WEIGHT_DECAY == 1e-4
    assert cfg.SOLVER.WARMUP_ITERS == 0 and cfg.SOLVER.MAX_ITER == 90000
    r101 = "101" in config_file
    assert cfg.MODEL.RESNETS.DEPTH == (101 if r101 else 50)
    assert har.SPATIAL.MODE == ("residual" if r101 else "mul")
    assert har.ALIGN.LAST_NORM_INIT == (0.0 if r101 else 0.1)
    assert cfg.SOLVER.BASE_LR == (0.01 if r101 else 0.005)
    assert tuple(cfg.SOLVER.STEPS) == ((60000, 80000) if r101 else (60000,))


def test_detectron2_recipe_stays_the_default():
    cfg = _full("har_R_50_FPN_1x.yaml")
    har = cfg.MODEL.HARNET
    assert cfg.MODEL.BACKBONE.NAME == "build_harnet_resnet_fpn_backbone"
    assert cfg.MODEL.ANCHOR_GENERATOR.NAME == "DefaultAnchorGenerator"
    assert (har.INIT, har.LOSS.NORMALIZER, har.CANDIDATES.MODE) == ("detectron2", "running", "detectron2")
    assert (cfg.SOLVER.BIAS_LR_FACTOR, cfg.SOLVER.WEIGHT_DECAY_NORM) == (1.0, 0.0)


@pytest.fixture(scope="module")
def authors_yaml_and_lazy():
    torch.manual_seed(0)
    cfg = _full("har_R_50_FPN_authors.yaml")
    from_yaml = perturb_(build_model(cfg), scale=0.02)
    lazy_cfg = LazyConfig.load(os.path.join(CONFIG_DIR, "har_R_50_FPN_authors.py"))
    from_lazy = instantiate(lazy_cfg.model)
    return cfg, from_yaml, from_lazy, lazy_cfg


def test_authors_lazy_twin_matches_the_yaml(authors_yaml_and_lazy):
    cfg, from_yaml, from_lazy, lazy_cfg = authors_yaml_and_lazy
    a, b = from_yaml.state_dict(), from_lazy.state_dict()
    assert list(a) == list(b) and all(a[k].shape == b[k].shape for k in a)
    for attr in ("loss_normalizer_mode", "loss_min_normalizer", "candidate_mode", "candidate_min_size",
                 "smooth_l1_beta", "box_reg_loss_type", "test_score_thresh", "test_topk_candidates",
                 "max_detections_per_image", "predictor_loss_weights"):
        assert getattr(from_lazy, attr) == getattr(from_yaml, attr), attr
    assert from_lazy.anchor_generator.offset == 0.5
    for x, y in zip(from_lazy.anchor_generator.cell_anchors, from_yaml.anchor_generator.cell_anchors):
        assert torch.equal(x, y)
    assert from_lazy.postprocess_params == from_yaml.postprocess_params
    # Same weights -> same losses.
    from_lazy.load_state_dict(from_yaml.state_dict(), strict=True)
    inputs = make_inputs(sizes=((64, 80), (48, 64)))
    losses = losses_of((from_yaml, from_lazy), inputs)
    for k in losses[0]:
        assert torch.equal(losses[0][k], losses[1][k]), k
    # Same optimizer groups (lr, decay per parameter) and schedule.
    opt_cfg = copy.deepcopy(lazy_cfg.optimizer)
    opt_cfg.params.model = from_lazy
    lazy_opt = instantiate(opt_cfg)
    yaml_opt = build_optimizer(cfg, from_yaml)
    names = {id(p): n for n, p in from_lazy.named_parameters()}
    names_y = {id(p): n for n, p in from_yaml.named_parameters()}
    hl = {names[id(p)]: (g["lr"], g["weight_decay"]) for g in lazy_opt.param_groups for p in g["params"]}
    hy = {names_y[id(p)]: (g["lr"], g["weight_decay"]) for g in yaml_opt.param_groups for p in g["params"]}
    assert set(hl) == set(hy)
    for name in hl:
        assert hl[name] == pytest.approx(hy[name]), name
    sched = instantiate(lazy_cfg.lr_multiplier)
    assert [sched(x / 90000) for x in (0, 59999, 60000, 89999)] == pytest.approx([1, 1, 0.1, 0.1])
    aug = lazy_cfg.dataloader.train.mapper.augmentations[0]
    assert tuple(aug.short_edge_length) == tuple(cfg.INPUT.MIN_SIZE_TRAIN) and aug.max_size == 1500


@pytest.mark.parametrize(
    "key, value",
    [
        ("MODEL.HARNET.INIT", "msra"),
        ("MODEL.HARNET.LOSS.NORMALIZER", "per_image"),
        ("MODEL.HARNET.LOSS.PER_LEVEL_MIN", -1.0),
        ("MODEL.HARNET.CANDIDATES.MODE", "caffe"),
        ("MODEL.HARNET.CANDIDATES.MIN_SIZE", -8.0),
        ("SOLVER.BIAS_EXCEPTIONS", "caffe"),
    ],
)
def test_bad_recipe_values_name_the_key(key, value):
    cfg = _authors_tiny()
    cfg.merge_from_list([key, value])
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        build_optimizer(cfg, build_model(cfg))


def test_adamw_gets_the_same_parameter_groups_as_sgd(authors_model):
    # One home for the parameter groups: SOLVER.OPTIMIZER only changes the update rule,
    # never the per-parameter lr / weight decay (the authors' bias exceptions included).
    cfg = _authors_tiny()
    sgd = build_optimizer(cfg, authors_model)
    cfg = cfg.clone()
    cfg.SOLVER.OPTIMIZER = "AdamW"
    adamw = build_optimizer(cfg, authors_model)
    assert type(adamw).__name__.endswith("AdamW") and type(sgd).__name__.endswith("SGD")

    def groups(opt):
        return sorted(
            (id(p), g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]
        )

    assert groups(adamw) == groups(sgd)
    assert len({lr for _, lr, _ in groups(sgd)}) > 1  # the groups do differ
    with pytest.raises(ValueError, match=r"SOLVER\.OPTIMIZER"):
        cfg.SOLVER.OPTIMIZER = "Adam"
        build_optimizer(cfg, authors_model)


def test_adamw_is_fused_and_updates_like_torchs_reference_loop(authors_model):
    # The demo trains with AdamW; build_optimizer takes PyTorch's fused kernel (3x faster per
    # step on CPU). What users rely on is the update itself: the same parameters after a few
    # steps as torch's plain per-tensor AdamW on the same parameter groups, within rounding.
    cfg = _authors_tiny()
    cfg.SOLVER.OPTIMIZER = "AdamW"
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = False
    model = copy.deepcopy(authors_model)
    reference = copy.deepcopy(authors_model)
    fused = build_optimizer(cfg, model)
    assert all(g["fused"] for g in fused.param_groups)
    groups = [{**g, "params": [dict(reference.named_parameters())[n] for n in names]}
              for g, names in zip(fused.param_groups, _group_names(fused, model))]
    plain = torch.optim.AdamW(
        [{k: v for k, v in g.items() if k not in ("fused", "foreach")} for g in groups],
        lr=cfg.SOLVER.BASE_LR, foreach=False,
    )
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        for p, q in zip(model.parameters(), reference.parameters()):
            g = torch.randn(p.shape, generator=gen)
            p.grad, q.grad = g, g.clone()
        fused.step()
        plain.step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    assert any(not torch.equal(p, q) for p, q in
               zip(model.parameters(), authors_model.parameters()))  # the steps did move them


def _group_names(optimizer, model):
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
