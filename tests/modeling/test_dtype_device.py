"""Every HARNet module and op keeps the dtype and device of its inputs (or changes them the
documented way), also under autocast and with non-contiguous inputs.

On the CPU: float64 and bfloat16 tensors, CPU autocast (bfloat16), strided / channels-last
inputs. The tests marked for CUDA run on a GPU (dev/gpu_check.py runs them there): CUDA
tensors and CUDA autocast (float16).

What autocast does to each attention module's output follows from its last op
(PyTorch's autocast op lists): a convolution or linear layer computes in the autocast
dtype, group norm in float32, and an elementwise op returns the wider of its inputs:

- SpatialAttention: sigmoid(conv) -> the autocast dtype;
- CrossLevelGroupNorm: group_norm -> float32;
- CrossLevelSE: relu(conv) * sigmoid(linear) -> the autocast dtype;
- AlignedAttention: x + relu(group_norm(...)) -> float32 for a float32 input (its deformable
  conv runs in float32 for reduced-precision inputs, as torchvision's CUDA autocast does).
"""

import pytest
import torch

from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from harnet.layers import (
    SOFT_NMS_METHODS,
    VOTING_SCORINGS,
    batched_box_voting,
    batched_soft_nms,
    box_voting,
    soft_nms,
    suppress_detections,
)
from harnet.modeling import AlignedAttention, CrossLevelGroupNorm, CrossLevelSE, SpatialAttention
from harnet_model_utils import har_cfg, retinanet_cfg

needs_cuda = pytest.mark.cuda

C = 16
LEVELS = [(8, 12), (4, 6), (2, 3), (1, 2), (1, 1)]


def _modules():
    """name -> (module, inputs, output dtype under autocast of a float32 module and input)"""
    torch.manual_seed(0)
    aligned = AlignedAttention(32, 16, deform_groups=4, norm_groups=8)
    torch.nn.init.normal_(aligned.conv2_offset.weight, std=0.05)  # fractional offsets
    levels = [torch.randn(2, C, h, w) for h, w in LEVELS]
    return {
        "SpatialAttention": (
            SpatialAttention(C, 8, (1, 2), 4),
            [torch.randn(2, C, 8, 12)],
            "autocast",
        ),
        "CrossLevelGroupNorm": (CrossLevelGroupNorm(4, C), [levels], torch.float32),
        "CrossLevelSE": (CrossLevelSE(C, len(LEVELS), 8), [levels], "autocast"),
        "AlignedAttention": (aligned, [torch.randn(2, 32, 6, 8)], torch.float32),
    }


def _flat(out):
    return list(out) if isinstance(out, (list, tuple)) else [out]


def _cast(inputs, **kw):
    return [[t.to(**kw) for t in x] if isinstance(x, list) else x.to(**kw) for x in inputs]


def _rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


MODULES = list(_modules())


# ------------------------------------------------------------------- attention modules
@pytest.mark.parametrize("name", MODULES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_module_keeps_dtype(name, dtype):
    module, inputs, _ = _modules()[name]
    ref = _flat(module(*inputs))
    out = _flat(module.to(dtype)(*_cast(inputs, dtype=dtype)))
    assert [o.dtype for o in out] == [dtype] * len(ref)
    tol = 1e-6 if dtype == torch.float64 else 5e-2
    for o, r in zip(out, ref):
        assert _rel(o, r) < tol


@pytest.mark.parametrize("name", MODULES)
def test_module_under_cpu_autocast_bf16(name):
    module, inputs, expected = _modules()[name]
    expected = torch.bfloat16 if expected == "autocast" else expected
    ref = _flat(module(*inputs))
    inputs = [
        [t.requires_grad_() for t in x] if isinstance(x, list) else x.requires_grad_()
        for x in inputs
    ]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _flat(module(*inputs))
    assert [o.dtype for o in out] == [expected] * len(ref)
    for o, r in zip(out, ref):
        assert _rel(o, r) < 5e-2
    sum(o.float().sum() for o in out).backward()
    for p in module.parameters():
        # Autocast casts copies: the parameters and their gradients stay float32.
        assert p.dtype == p.grad.dtype == torch.float32 and bool(torch.isfinite(p.grad).all())


def test_aligned_attention_deform_conv_in_float32_for_bf16():
    # torchvision has no bfloat16 CPU kernel for deform_conv2d; the block computes it in
    # float32: a bf16 block equals the float32 block run on the bf16-rounded values and
    # weights, up to the bf16 rounding of the other layers.
    module, (x,), _ = _modules()["AlignedAttention"]
    x = x.bfloat16()
    out = module.to(torch.bfloat16)(x)
    ref = module.float()(x.float())
    assert out.dtype == torch.bfloat16 and _rel(out, ref) < 5e-2


@pytest.mark.parametrize("name", MODULES)
def test_module_non_contiguous_inputs(name):
    module, inputs, _ = _modules()[name]
    ref = _flat(module(*inputs))

    def strided(t):  # same values, every other element of a wider tensor
        return torch.stack([t, torch.zeros_like(t)], dim=-1)[..., 0]

    for layout in (strided, lambda t: t.contiguous(memory_format=torch.channels_last)):
        moved = [[layout(t) for t in x] if isinstance(x, list) else layout(x) for x in inputs]
        if name != "CrossLevelGroupNorm":  # channels_last of a (N, C, 1, 1) level is contiguous
            assert not all(t.is_contiguous() for t in _flat(moved[0]))
        out = _flat(module(*moved))
        for o, r in zip(out, ref):
            torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------- post-processing
def _candidates(n=200, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 300
    boxes = torch.cat([xy, xy + 20 + torch.rand(n, 2, generator=g) * 80], 1)
    # Coordinates and scores exactly representable in bfloat16 (so that its runs see the
    # same values as the float32 reference): multiples of 1/2 below 256, 2 above.
    boxes = boxes.bfloat16().float()
    scores = torch.rand(n, generator=g).bfloat16().float()
    return boxes, scores, torch.randint(classes, (n,), generator=g)


@pytest.mark.parametrize("method", SOFT_NMS_METHODS)
def test_soft_nms_float64_and_non_contiguous(method):
    b, s, c = _candidates()
    keep, ns = batched_soft_nms(b, s, c, method)
    keep64, ns64 = batched_soft_nms(b.double(), s.double(), c, method)
    assert keep64.dtype == torch.int64 and ns64.dtype == torch.float64
    assert keep64.tolist() == keep.tolist()
    torch.testing.assert_close(ns64.float(), ns)
    strided = [torch.stack([t, t], dim=-1)[..., 1] for t in (b, s, c)]
    assert not any(t.is_contiguous() for t in strided)
    k2, n2 = batched_soft_nms(*strided, method)
    assert torch.equal(k2, keep) and torch.equal(n2, ns)
    k1, n1 = soft_nms(b.t().contiguous().t(), s, method)  # column-major boxes
    assert torch.equal(k1, soft_nms(b, s, method)[0])


@pytest.mark.parametrize("method", ["gaussian", "linear"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_soft_nms_half_scores_computed_in_float32(method, dtype):
    # Documented: half-precision inputs are decayed in float32 (too coarse otherwise), the
    # decayed scores returned in the input dtype.
    b, s, c = _candidates()
    keep, ns = batched_soft_nms(b.to(dtype), s.to(dtype), c, method)
    ref_keep, ref_scores = batched_soft_nms(b, s, c, method)
    assert keep.dtype == torch.int64 and ns.dtype == dtype
    # The float32 result, scores rounded to the input dtype, in decreasing order of the
    # rounded scores (ties by lower index).
    ref = sorted(zip(ref_keep.tolist(), ref_scores.to(dtype).tolist()), key=lambda t: (-t[1], t[0]))
    assert list(zip(keep.tolist(), ns.tolist())) == ref


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_hard_nms_half_inputs_on_cpu(dtype):
    # torchvision's CPU nms has no half-precision kernel and wants one dtype for boxes and
    # scores: hard NMS runs it in float32 (values exact in half here), scores keep dtype.
    b, s, c = _candidates()
    keep, ns = batched_soft_nms(b.to(dtype), s.to(dtype), c, "hard")
    assert keep.tolist() == batched_soft_nms(b, s, c, "hard")[0].tolist()
    assert ns.dtype == dtype
    # Detectron2's decoding under autocast: float32 boxes, half scores, int32 classes.
    out = suppress_detections(b, s.to(dtype), c.int(), nms_type="hard")
    ref = suppress_detections(b, s, c, nms_type="hard")
    assert [t.dtype for t in out] == [torch.float32, dtype, torch.int64]
    torch.testing.assert_close(out[0], ref[0])
    assert torch.equal(out[2], ref[2])


@pytest.mark.parametrize("scoring", VOTING_SCORINGS)
def test_box_voting_keeps_dtype_and_layout(scoring):
    b, s, c = _candidates()
    k, ks = batched_soft_nms(b, s, c, "gaussian")
    ref = batched_box_voting(b[k], ks, c[k], b, s, c, 0.6, scoring)
    # float64: same dtype out, same values up to float32 rounding.
    out64 = batched_box_voting(
        b[k].double(), ks.double(), c[k], b.double(), s.double(), c, 0.6, scoring
    )
    assert [t.dtype for t in out64] == [torch.float64, torch.float64]
    torch.testing.assert_close(out64[0].float(), ref[0], rtol=0, atol=1e-3)
    torch.testing.assert_close(out64[1].float(), ref[1], rtol=0, atol=1e-5)
    # bfloat16 (values exact in bf16): computed in float32, returned in bf16.
    bf = torch.bfloat16
    out16 = batched_box_voting(b[k].to(bf), ks.to(bf), c[k], b.to(bf), s.to(bf), c, 0.6, scoring)
    ks16 = ks.to(bf).float()  # the kept scores as the bf16 call sees them
    ref16 = batched_box_voting(b[k], ks16, c[k], b, s, c, 0.6, scoring)
    assert [t.dtype for t in out16] == [bf, bf]
    assert torch.equal(out16[0], ref16[0].to(bf)) and torch.equal(out16[1], ref16[1].to(bf))
    # Non-contiguous inputs: identical results.
    nc = box_voting(b[k].t().contiguous().t(), ks, b.t().contiguous().t(), s, 0.6, scoring)
    torch.testing.assert_close(nc, box_voting(b[k], ks, b, s, 0.6, scoring), rtol=0, atol=0)


SUPPRESS = {
    "hard": dict(nms_type="hard"),
    "authors": dict(
        nms_type="gaussian", voting=True, voting_scoring="caffe", max_detections=50, min_score=0.05
    ),
    "linear_avg": dict(nms_type="linear", voting=True, voting_scoring="avg"),
}


@pytest.mark.parametrize("setting", list(SUPPRESS))
def test_suppress_detections_dtype_and_layout(setting):
    b, s, c = _candidates()
    params = SUPPRESS[setting]
    ref = suppress_detections(b, s, c, **params)
    assert [t.dtype for t in ref] == [torch.float32, torch.float32, torch.int64]
    out64 = suppress_detections(b.double(), s.double(), c, **params)
    assert [t.dtype for t in out64] == [torch.float64, torch.float64, torch.int64]
    assert torch.equal(out64[2], ref[2])
    torch.testing.assert_close(out64[0].float(), ref[0], rtol=0, atol=1e-3)
    strided = [torch.stack([t, t], dim=-1)[..., 0] for t in (b, s, c)]
    out = suppress_detections(*strided, **params)
    for o, r in zip(out, ref):
        assert torch.equal(o, r)


@pytest.mark.parametrize("setting", list(SUPPRESS))
def test_suppress_detections_under_cpu_autocast(setting):
    # Under autocast (a model's inference in bf16) Detectron2's decoding gives float32
    # boxes and bfloat16 scores; the suppression must accept that mix.
    b, s, c = _candidates()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        boxes, scores, classes = suppress_detections(b, s.bfloat16(), c, **SUPPRESS[setting])
    ref = suppress_detections(b, s, c, **SUPPRESS[setting])
    assert boxes.dtype == torch.float32 and classes.dtype == torch.int64
    assert scores.dtype in (torch.bfloat16, torch.float32)
    assert len(scores) > 0
    if setting == "hard":  # nms under autocast computes in float32 on the same values
        assert torch.equal(boxes, ref[0]) and torch.equal(classes, ref[2])


# ------------------------------------------------------------------- the whole detector
def _batch(with_instances=True):
    from detectron2.structures import Boxes, Instances

    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(2):
        d = {
            "image": (torch.rand(3, 64, 96, generator=g) * 255).to(torch.uint8),
            "height": 64,
            "width": 96,
        }
        if with_instances:
            d["instances"] = Instances(
                (64, 96),
                gt_boxes=Boxes(torch.tensor([[8.0, 6.0, 50.0, 40.0], [40.0, 20.0, 90.0, 60.0]])),
                gt_classes=torch.tensor([0, 2]),
            )
        out.append(d)
    return out


def _model(cfg):
    torch.manual_seed(0)
    return build_model(cfg)


def test_harretinanet_training_under_cpu_autocast_bf16():
    model = _model(har_cfg()).train()
    with EventStorage(0):
        ref = model(_batch())
        del model.loss_normalizer  # RetinaNet's running normaliser: start both calls alike
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses = model(_batch())
        sum(losses.values()).backward()
    assert (
        set(losses)
        == set(ref)
        == {"loss_cls", "loss_box_reg", "loss_cls_channel", "loss_box_reg_channel"}
    )
    for k, v in losses.items():
        # Detectron2's focal loss (binary_cross_entropy_with_logits) runs in float32.
        assert v.dtype == torch.float32 and bool(torch.isfinite(v))
        assert abs(float(v) - float(ref[k])) <= 0.05 * abs(float(ref[k])) + 1e-4, k
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(
        g is not None and g.dtype == torch.float32 and bool(torch.isfinite(g).all()) for g in grads
    )


@pytest.mark.parametrize("post", ["detectron2", "authors"])
def test_harretinanet_inference_under_cpu_autocast_bf16_matches_retinanet_dtypes(post):
    cfg = har_cfg()
    if post == "authors":
        cfg.MODEL.HARNET.POSTPROCESS.NMS_TYPE = "gaussian"
        cfg.MODEL.HARNET.POSTPROCESS.VOTING.ENABLED = True
        cfg.MODEL.HARNET.POSTPROCESS.VOTING.SCORING = "caffe"
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        har = _model(cfg).eval()(_batch(False))
        retina = _model(retinanet_cfg()).eval()(_batch(False))
    for h, r in zip(har, retina):
        h, r = h["instances"], r["instances"]
        assert len(h) > 0 and len(r) > 0
        # As Detectron2's RetinaNet: boxes decoded in float32, classes int64, scores in the
        # dtype its decoding gives them (the sigmoid of autocast logits).
        assert h.pred_boxes.tensor.dtype == r.pred_boxes.tensor.dtype == torch.float32
        assert h.pred_classes.dtype == r.pred_classes.dtype == torch.int64
        assert h.scores.dtype == r.scores.dtype
        assert bool(
            torch.isfinite(h.pred_boxes.tensor).all() and torch.isfinite(h.scores.float()).all()
        )


def test_harretinanet_bf16_weights_train_like_retinanet():
    # A bfloat16 model (no autocast): the forward runs in bf16, Detectron2's losses are
    # computed in float32 (box decoding upcasts), gradients are bf16 like the weights.
    for cfg in (har_cfg(), retinanet_cfg()):
        model = _model(cfg).to(torch.bfloat16).train()
        with EventStorage(0):
            losses = model(_batch())
            sum(losses.values()).backward()
        assert all(v.dtype == torch.float32 and bool(torch.isfinite(v)) for v in losses.values())
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(g.dtype == torch.bfloat16 and bool(torch.isfinite(g).all()) for g in grads)


def test_harretinanet_head_and_backbone_bf16_outputs():
    model = _model(har_cfg()).to(torch.bfloat16).eval()
    images = torch.randn(2, 3, 64, 96, dtype=torch.bfloat16)
    with torch.no_grad():
        feats = model.backbone(images)
        logits, deltas = model.head([feats[f] for f in model.head_in_features])
    assert all(
        t.dtype == torch.bfloat16 and bool(torch.isfinite(t).all())
        for t in [*feats.values(), *logits, *deltas]
    )


# ------------------------------------------------------------------- CUDA (run by gpu_check)
@needs_cuda
@pytest.mark.parametrize("name", MODULES)
def test_module_cuda_autocast_fp16(name):
    module, inputs, expected = _modules()[name]
    expected = torch.float16 if expected == "autocast" else expected
    module = module.cuda()
    inputs = _cast(inputs, device="cuda")
    ref = _flat(module(*inputs))
    with torch.autocast("cuda", dtype=torch.float16):
        out = _flat(module(*inputs))
    assert [o.dtype for o in out] == [expected] * len(ref)
    assert all(o.is_cuda for o in out)
    for o, r in zip(out, ref):
        assert _rel(o, r) < 1e-2
    sum(o.float().sum() for o in out).backward()
    assert all(p.grad.is_cuda and bool(torch.isfinite(p.grad).all()) for p in module.parameters())


@needs_cuda
@pytest.mark.parametrize("setting", list(SUPPRESS))
def test_postprocess_cuda_outputs_stay_on_device(setting):
    b, s, c = (t.cuda() for t in _candidates())
    out = suppress_detections(b, s, c, **SUPPRESS[setting])
    assert all(t.is_cuda for t in out)
    ref = suppress_detections(b.cpu(), s.cpu(), c.cpu(), **SUPPRESS[setting])
    assert torch.equal(out[2].cpu(), ref[2])
    torch.testing.assert_close(out[0].cpu(), ref[0], rtol=0, atol=1e-3)
    for method in SOFT_NMS_METHODS:
        keep, ns = batched_soft_nms(b, s, c, method)
        assert keep.is_cuda and ns.is_cuda and keep.dtype == torch.int64


@needs_cuda
def test_harretinanet_cuda_autocast_fp16_train_and_infer():
    cfg = har_cfg()
    cfg.MODEL.DEVICE = "cuda"
    model = _model(cfg).train()
    with EventStorage(0), torch.autocast("cuda", dtype=torch.float16):
        losses = model(_batch())
    assert all(
        v.is_cuda and v.dtype == torch.float32 and bool(torch.isfinite(v)) for v in losses.values()
    )
    sum(losses.values()).backward()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        out = model.eval()(_batch(False))
    inst = out[0]["instances"]
    assert len(inst) > 0 and inst.pred_boxes.tensor.is_cuda
    assert inst.pred_boxes.tensor.dtype == torch.float32
