"""HARRetinaNet against Detectron2's RetinaNet and against the reference's definitions
(dual predictor losses, averaged inference, candidates + suppression, attention maps)."""

import copy
import math

import pytest
import torch

from detectron2.modeling import RetinaNet, build_model
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.utils.events import EventStorage

from harnet.modeling import HARRetinaNet, HARRetinaNetHead
from harnet_model_utils import (
    all_off,
    har_cfg,
    instances_equal,
    make_inputs,
    perturb_,
    retinanet_cfg,
    single_thread,
)

_single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


def _losses(model, inputs):
    model.train()
    with EventStorage():
        return model(copy.deepcopy(inputs))


# ------------------------------------------------------------- all off == RetinaNet
@pytest.fixture(scope="module")
def d2_and_baseline():
    torch.manual_seed(0)
    d2 = perturb_(build_model(retinanet_cfg()))
    har = build_model(all_off(har_cfg()))
    return d2, har


def test_all_off_state_dicts_load_strictly_both_ways(d2_and_baseline):
    d2, har = d2_and_baseline
    assert type(d2) is RetinaNet and type(har) is HARRetinaNet
    sd_d2, sd_har = d2.state_dict(), har.state_dict()
    assert list(sd_d2) == list(sd_har)
    assert all(sd_d2[k].shape == sd_har[k].shape for k in sd_d2)
    har.load_state_dict(sd_d2, strict=True)
    fresh = build_model(retinanet_cfg())
    fresh.load_state_dict(har.state_dict(), strict=True)


def test_all_off_identical_losses_and_detections(d2_and_baseline):
    d2, har = d2_and_baseline
    har.load_state_dict(d2.state_dict(), strict=True)
    for m in (d2, har):
        m.__dict__.pop("loss_normalizer", None)
    inputs = make_inputs()
    for _ in range(2):  # the second iteration also compares the loss normaliser EMA
        l_d2, l_har = _losses(d2, inputs), _losses(har, inputs)
        assert set(l_d2) == set(l_har) == {"loss_cls", "loss_box_reg"}
        for k in l_d2:
            assert torch.equal(l_d2[k], l_har[k]), k
    assert d2.loss_normalizer == har.loss_normalizer

    d2.eval(), har.eval()
    with torch.no_grad():
        out_d2 = d2(make_inputs(with_instances=False, output_sizes=[(192, 256), (40, 52)]))
        out_har = har(make_inputs(with_instances=False, output_sizes=[(192, 256), (40, 52)]))
    assert all(len(o["instances"]) > 0 for o in out_d2)
    for a, b in zip(out_d2, out_har):
        assert instances_equal(a["instances"], b["instances"])


# ------------------------------------------------------------- every variant trains
VARIANTS = {
    "baseline": dict(ALIGN=False, CLGN=False, SPATIAL=False, CHANNEL=False),
    "aligned_only": dict(ALIGN=True, CLGN=False, SPATIAL=False, CHANNEL=False),
    "clgn_only": dict(ALIGN=False, CLGN=True, SPATIAL=False, CHANNEL=False),
    "spatial_only": dict(ALIGN=False, CLGN=False, SPATIAL=True, CHANNEL=False),
    "channel_only": dict(ALIGN=False, CLGN=False, SPATIAL=False, CHANNEL=True),
    "full": {},
    "shared_spatial": {"SPATIAL.SHARED": True, "SPATIAL.DILATIONS": [[1, 2, 5, 2]]},
    "residual_mode": {"SPATIAL.MODE": "residual"},
    "no_extra_conv": {"CHANNEL.EXTRA_CONV": False},
    "single_predictor": {"CHANNEL.DUAL_PREDICTOR": False},
}


def _variant_cfg(name):
    spec = dict(VARIANTS[name])
    switches = {k: spec.pop(k) for k in list(spec) if "." not in k}
    cfg = har_cfg(**switches)
    for key, value in spec.items():
        section, leaf = key.split(".")
        cfg.MODEL.HARNET[section][leaf] = value
    return cfg


NEW_MODULE_MARKERS = (
    "aligned_attention",
    "subnet_norm",
    "spatial_attention",
    "channel_attention",
    "channel_cls_score",
    "channel_bbox_pred",
)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_forward_backward_reaches_every_parameter(name):
    cfg = _variant_cfg(name)
    model = build_model(cfg)
    losses = _losses(model, make_inputs())
    dual = cfg.MODEL.HARNET.CHANNEL.ENABLED and cfg.MODEL.HARNET.CHANNEL.DUAL_PREDICTOR
    expected = {"loss_cls", "loss_box_reg"} | (
        {"loss_cls_channel", "loss_box_reg_channel"} if dual else set()
    )
    assert set(losses) == expected
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    no_grad = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and (p.grad is None or not torch.any(p.grad != 0))
    ]
    assert not no_grad, f"parameters without gradient: {no_grad}"
    new = [n for n, _ in model.named_parameters() if any(m in n for m in NEW_MODULE_MARKERS)]
    if name == "baseline":
        assert not new
    else:
        assert new
    # Which modules exist follows the switches.
    har = cfg.MODEL.HARNET
    names = " ".join(n for n, _ in model.named_parameters())
    assert ("aligned_attention" in names) == har.ALIGN.ENABLED
    assert ("subnet_norm" in names) == har.CLGN.ENABLED
    assert ("spatial_attention" in names) == har.SPATIAL.ENABLED
    assert ("channel_attention" in names) == har.CHANNEL.ENABLED
    if har.SPATIAL.ENABLED:
        assert len(model.head.spatial_attention) == (1 if har.SPATIAL.SHARED else 5)
    # Inference on the same batch (P7 is 1x1 after padding to 128).
    model.eval()
    with torch.no_grad():
        out = model(make_inputs(with_instances=False))
    assert [o["instances"].image_size for o in out] == [(96, 128), (40, 52)]


# ------------------------------------------------------------- head definitions
@pytest.fixture(scope="module")
def full_model():
    torch.manual_seed(0)
    return perturb_(build_model(har_cfg()), scale=0.02)


def test_dual_predictor_losses_are_half_of_each_predictors_retinanet_losses(full_model):
    model = full_model
    inputs = make_inputs()
    model.__dict__.pop("loss_normalizer", None)
    losses = _losses(model, inputs)
    normaliser_after_one_iteration = model.loss_normalizer

    # Reference: Detectron2's RetinaNet.forward_training on each predictor's own outputs,
    # each from a fresh normaliser, times 0.5.
    with EventStorage():
        images, features = model._features(inputs)
        out = model.head.forward_predictors(features)
        gt = [x["instances"] for x in inputs]
        ref = []
        for logits, deltas in out["predictions"]:
            model.__dict__.pop("loss_normalizer", None)
            ref.append(RetinaNet.forward_training(model, images, features, [logits, deltas], gt))
    assert len(ref) == 2
    assert normaliser_after_one_iteration == model.loss_normalizer
    for suffix, r in zip(("", "_channel"), ref):
        for k in ("loss_cls", "loss_box_reg"):
            torch.testing.assert_close(losses[k + suffix], 0.5 * r[k], rtol=1e-6, atol=0)
    # Predictor B really reads the channel-attended features: its outputs differ from A's.
    assert not torch.allclose(out["predictions"][0][0][0], out["predictions"][1][0][0])


def test_head_definition_from_its_parts(full_model):
    """Recompute the head from the definition with the head's own sub-modules."""
    head = full_model.head
    g = torch.Generator().manual_seed(3)
    sizes = [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    feats = [torch.randn(2, 32, h, w, generator=g) for h, w in sizes]

    def tower(subnet, norms):
        xs = feats
        convs = [m for m in subnet if isinstance(m, torch.nn.Conv2d)]
        for conv, norm in zip(convs, norms):
            ys = [conv(x) for x in xs]
            # CLGN from its definition: group norm over the concatenated levels.
            cat = torch.cat([y.flatten(2) for y in ys], dim=2)
            cat = torch.nn.functional.group_norm(cat, norm.num_groups, norm.weight, norm.bias, 1e-5)
            parts = cat.split([y.shape[2] * y.shape[3] for y in ys], dim=2)
            xs = [torch.relu(p.reshape(y.shape)) for p, y in zip(parts, ys)]
        return xs

    with torch.no_grad():
        masks = [branch(x) for branch, x in zip(head.spatial_attention, feats)]
        cls_f = [x * m for x, m in zip(tower(head.cls_subnet, head.cls_subnet_norm), masks)]
        box_f = [x * m for x, m in zip(tower(head.bbox_subnet, head.bbox_subnet_norm), masks)]
        a_logits = [head.cls_score(x) for x in cls_f]
        a_deltas = [head.bbox_pred(x) for x in box_f]
        b_logits = [head.channel_cls_score(x) for x in head.cls_channel_attention(cls_f)]
        b_deltas = [head.channel_bbox_pred(x) for x in head.bbox_channel_attention(box_f)]
        logits, deltas = head(feats)
        out = head.forward_predictors(feats)
    for l, (a, b) in enumerate(zip(a_logits, b_logits)):
        torch.testing.assert_close(logits[l], 0.5 * (a + b), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out["predictions"][0][0][l], a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out["masks"][l], masks[l])
    for l, (a, b) in enumerate(zip(a_deltas, b_deltas)):
        torch.testing.assert_close(deltas[l], 0.5 * (a + b), rtol=1e-5, atol=1e-6)
    # The 4th-conv CLGN of a fresh head starts at 0.1, the others at 1.
    fresh = HARRetinaNetHead(
        har_cfg(), [full_model.backbone.output_shape()[f] for f in ("p3", "p4", "p5", "p6", "p7")]
    )
    assert torch.all(fresh.cls_subnet_norm[3].weight == 0.1)
    assert torch.all(fresh.bbox_subnet_norm[0].weight == 1.0)


def test_residual_mode_multiplies_by_one_plus_mask():
    cfg = har_cfg(ALIGN=False, CLGN=False, CHANNEL=False)
    cfg.MODEL.HARNET.SPATIAL.MODE = "residual"
    head = perturb_(build_model(cfg)).head
    feats = [torch.randn(1, 32, s, s) for s in (8, 4, 2, 1, 1)]
    with torch.no_grad():
        logits, _ = head(feats)
        masks = head.spatial_masks(feats)
        ref = [head.cls_score(head.cls_subnet(x) * (1 + m)) for x, m in zip(feats, masks)]
    for a, b in zip(logits, ref):
        torch.testing.assert_close(a, b)


def test_inference_averages_logits_and_deltas_then_retinanet_decoding(full_model):
    """Eval output == Detectron2's RetinaNet decoding + NMS on the averaged predictions."""
    model = full_model.eval()
    inputs = make_inputs(with_instances=False, output_sizes=[(144, 192), (80, 104)])
    with torch.no_grad():
        out = model(copy.deepcopy(inputs))
        images, features = model._features(inputs)
        (la, da), (lb, db) = model.head.forward_predictors(features)["predictions"]
        avg = [[(a + b) / 2 for a, b in zip(la, lb)], [(a + b) / 2 for a, b in zip(da, db)]]
        logits, deltas = model._transpose_dense_predictions(avg, [model.num_classes, 4])
        anchors = model.anchor_generator(features)
        for i, size in enumerate(images.image_sizes):
            ref = RetinaNet.inference_single_image(
                model, anchors, [x[i].sigmoid() for x in logits], [x[i] for x in deltas], size
            )
            ref = detector_postprocess(ref, inputs[i]["height"], inputs[i]["width"])
            assert len(ref) > 0
            assert instances_equal(out[i]["instances"], ref, exact=False)


def test_candidates_then_suppress_equals_eval_forward(full_model):
    model = full_model.eval()
    inputs = make_inputs(with_instances=False, output_sizes=[(144, 192), (80, 104)])
    with torch.no_grad():
        out = model(copy.deepcopy(inputs))
        raw = model.forward_candidates(copy.deepcopy(inputs), do_postprocess=False)
        scaled = model.forward_candidates(copy.deepcopy(inputs), do_postprocess=True)
    for i, (o, c, s) in enumerate(zip(out, raw, scaled)):
        h, w = inputs[i]["height"], inputs[i]["width"]
        assert c.image_size == tuple(inputs[i]["image"].shape[1:])
        assert len(c) > len(o["instances"])  # suppression removed something
        # Per level at most TOPK candidates, all above the score threshold.
        assert len(c) <= 5 * model.test_topk_candidates
        assert torch.all(c.scores > model.test_score_thresh)
        ref = detector_postprocess(model.suppress(copy.deepcopy(c)), h, w)
        assert instances_equal(o["instances"], ref)
        assert instances_equal(s, detector_postprocess(copy.deepcopy(c), h, w))
        assert s.image_size == (h, w)


def test_attention_maps_shapes_and_values(full_model):
    model = full_model.eval()
    inputs = make_inputs(with_instances=False)
    maps = model.attention_maps(inputs)
    assert len(maps) == 2 and all(len(m) == 5 for m in maps)
    strides = (8, 16, 32, 64, 128)
    for (h, w), per_level in zip(((96, 128), (40, 52)), maps):
        assert [tuple(m.shape) for m in per_level] == [
            (math.ceil(h / s), math.ceil(w / s)) for s in strides
        ]
        assert all(torch.all((m > 0) & (m < 1)) for m in per_level)
    # The first image fills the padded batch's width: its maps are the head's full masks.
    with torch.no_grad():
        _, features = model._features(inputs)
        masks = model.head.spatial_masks(features)
    torch.testing.assert_close(maps[0][0], masks[0][0, 0, :12, :16])


def test_attention_maps_without_spatial_attention_names_the_key():
    model = build_model(har_cfg(SPATIAL=False)).eval()
    with pytest.raises(RuntimeError, match="MODEL.HARNET.SPATIAL.ENABLED"):
        model.attention_maps(make_inputs(with_instances=False))


@pytest.mark.parametrize("nms_type", ["hard", "gaussian"])
def test_inference_with_non_finite_deltas_drops_those_candidates(full_model, nms_type):
    # A diverged model: NaN / inf box deltas at some anchors. Inference goes on (soft-NMS and
    # voting included) and no detection is non-finite.
    import warnings

    model = copy.deepcopy(full_model).eval()
    model.postprocess_params = dict(model.postprocess_params, nms_type=nms_type, voting=True)
    predictors = [m for n, m in model.head.named_modules() if n.endswith("bbox_pred")]

    def poison(module, args, out):
        out = out.clone()
        out[:, 0, :2, :2] = float("nan")
        out[:, 1, 2:4, :2] = float("inf")
        return out

    hooks = [p.register_forward_hook(poison) for p in predictors]
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            out = model(make_inputs(with_instances=False))
    finally:
        for h in hooks:
            h.remove()
    for o in out:
        inst = o["instances"]
        assert len(inst) > 0
        assert torch.isfinite(inst.pred_boxes.tensor).all() and torch.isfinite(inst.scores).all()
