"""suppress_detections (the model's and the TTA's post-processing) and its config keys."""

import pytest
import torch
from torchvision.ops import batched_nms

from detectron2.config import get_cfg

import harnet
from harnet.layers import postprocess_params_from_cfg, suppress_detections
from harnet_model_utils import set_keys
from test_box_voting import slow_box_voting
from test_soft_nms import slow_soft_nms


def _candidates(n=300, num_classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Tight clusters of similar boxes (like a detector's candidates around objects), so
    # that soft-NMS drops some candidates and those can vote under the "caffe" rule.
    cluster = torch.randint(n // 8, (n,), generator=g)
    ctr = (torch.rand(n // 8, 2, generator=g) * 200)[cluster] + torch.randn(n, 2, generator=g)
    wh = (10 + torch.rand(n // 8, 2, generator=g) * 40)[cluster] * (
        1 + 0.05 * torch.randn(n, 2, generator=g)
    )
    boxes = torch.cat([ctr - wh / 2, ctr + wh / 2], dim=1)
    return (
        boxes,
        0.05 + 0.9 * torch.rand(n, generator=g),
        torch.randint(num_classes, (n,), generator=g),
    )


@pytest.mark.parametrize("max_detections", [1, 20, 1000])
def test_hard_without_voting_is_detectron2_retinanet(max_detections):
    boxes, scores, classes = _candidates()
    got = suppress_detections(
        boxes, scores, classes, iou_threshold=0.5, max_detections=max_detections
    )
    keep = batched_nms(boxes, scores, classes, 0.5)[:max_detections]
    for a, b in zip(got, (boxes[keep], scores[keep], classes[keep])):
        assert torch.equal(a, b)


def _slow_suppress(boxes, scores, classes, nms_type, iou, sigma, min_score, voting, voting_iou,
                   scoring, max_detections, final_min_score):
    """The pipeline from the definitions, in Python floats: the slow soft-NMS loop (hard
    NMS: its w = 0 case), the slow voting loop, a stable sort by score, the top K, the
    score floor."""
    keep, kept_scores = slow_soft_nms(boxes, scores, classes, nms_type, sigma, iou, min_score)
    keep_t = torch.tensor(keep, dtype=torch.long)
    kept_boxes = boxes[keep_t].tolist()
    if voting:
        kept_boxes, kept_scores = slow_box_voting(
            boxes[keep_t], torch.tensor(kept_scores, dtype=boxes.dtype), classes[keep_t],
            boxes, scores, classes, voting_iou, scoring,
        )  # fmt: skip
        order = sorted(range(len(keep)), key=lambda k: -kept_scores[k])  # stable
    else:
        order = list(range(len(keep)))
    order = [k for k in order[:max_detections] if kept_scores[k] >= final_min_score]
    return (
        [kept_boxes[k] for k in order],
        [kept_scores[k] for k in order],
        [int(classes[keep[k]]) for k in order],
    )


@pytest.mark.parametrize("voting", [False, True])
@pytest.mark.parametrize("nms_type", ["hard", "linear", "gaussian"])
def test_suppression_matches_the_slow_definition(nms_type, voting):
    boxes, scores, classes = _candidates(seed=1)
    boxes, scores = boxes.double(), scores.double()
    for scoring in ("max", "keep", "avg", "caffe") if voting else ("max",):
        kw = dict(nms_type=nms_type, iou=0.4, sigma=0.3, min_score=0.01, voting=voting,
                  voting_iou=0.6, scoring=scoring, max_detections=40, final_min_score=0.1)  # fmt: skip
        got_b, got_s, got_c = suppress_detections(
            boxes, scores, classes, nms_type=nms_type, iou_threshold=kw["iou"],
            soft_nms_sigma=kw["sigma"], soft_nms_min_score=kw["min_score"], voting=voting,
            voting_iou=0.6, voting_scoring=scoring, max_detections=40, min_score=0.1,
        )  # fmt: skip
        ref_b, ref_s, ref_c = _slow_suppress(boxes, scores, classes, **kw)
        assert len(got_s) == len(ref_s) > 10
        torch.testing.assert_close(got_b, torch.tensor(ref_b, dtype=got_b.dtype))
        torch.testing.assert_close(got_s, torch.tensor(ref_s, dtype=got_s.dtype))
        assert got_c.tolist() == ref_c
        assert bool((got_s[:-1] >= got_s[1:]).all())


def test_bad_arguments_raise():
    boxes, scores, classes = _candidates(20)
    with pytest.raises(ValueError, match="nms_type must be one of"):
        suppress_detections(boxes, scores, classes, nms_type="soft")
    with pytest.raises(ValueError, match="voting_scoring must be one of"):
        suppress_detections(boxes, scores, classes, voting=True, voting_scoring="mean")


def _cfg():
    cfg = get_cfg()
    harnet.add_harnet_config(cfg)
    return cfg


def test_params_from_cfg_defaults_and_authors_config():
    cfg = _cfg()
    assert postprocess_params_from_cfg(cfg) == dict(
        nms_type="hard",
        iou_threshold=0.5,
        max_detections=100,
        soft_nms_sigma=0.5,
        soft_nms_min_score=0.001,
        voting=False,
        voting_iou=0.6,
        voting_scoring="max",
        min_score=0.0,
    )
    plain = get_cfg()  # no HARNet keys: Detectron2's RetinaNet post-processing
    assert postprocess_params_from_cfg(plain) == dict(
        nms_type="hard", iou_threshold=0.5, max_detections=100
    )
    cfg.merge_from_list(
        [
            "MODEL.HARNET.POSTPROCESS.NMS_TYPE",
            "gaussian",
            "MODEL.HARNET.POSTPROCESS.VOTING.ENABLED",
            True,
            "MODEL.HARNET.POSTPROCESS.VOTING.SCORING",
            "caffe",
            "MODEL.RETINANET.NMS_THRESH_TEST",
            0.4,
            "TEST.DETECTIONS_PER_IMAGE",
            400,
        ]
    )
    params = postprocess_params_from_cfg(cfg)
    assert (
        params["nms_type"] == "gaussian"
        and params["voting"]
        and params["voting_scoring"] == "caffe"
    )
    assert params["iou_threshold"] == 0.4 and params["max_detections"] == 400
    boxes, scores, classes = _candidates(50)
    suppress_detections(boxes, scores, classes, **params)  # the dict is a valid call


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("MODEL.HARNET.POSTPROCESS.NMS_TYPE", "soft", "NMS_TYPE must be one of"),
        ("MODEL.HARNET.POSTPROCESS.SOFT_NMS_SIGMA", 0.0, "SOFT_NMS_SIGMA must be > 0"),
        ("MODEL.HARNET.POSTPROCESS.SOFT_NMS_MIN_SCORE", -0.1, "SOFT_NMS_MIN_SCORE"),
        ("MODEL.HARNET.POSTPROCESS.MIN_SCORE", 1.5, "POSTPROCESS.MIN_SCORE"),
        ("MODEL.HARNET.POSTPROCESS.VOTING.IOU_THRESH", 1.1, "VOTING.IOU_THRESH"),
        ("MODEL.HARNET.POSTPROCESS.VOTING.SCORING", "mean", "VOTING.SCORING must be one of"),
        ("MODEL.RETINANET.NMS_THRESH_TEST", 2.0, "NMS_THRESH_TEST"),
        ("TEST.DETECTIONS_PER_IMAGE", 0, "DETECTIONS_PER_IMAGE"),
    ],
)
def test_invalid_config_values_name_the_key(key, value, match):
    cfg = set_keys(_cfg(), **{key: value})
    with pytest.raises(ValueError, match=match):
        postprocess_params_from_cfg(cfg)


# ------------------------------------------------------------------ non-finite candidates
def _with_non_finite(n=120):
    """Candidates where a few have a NaN / inf score or coordinate, and the finite rest."""
    boxes, scores, classes = _candidates(n)
    bad = torch.zeros(n, dtype=torch.bool)
    bad[[3, 10, 11, 50, 77]] = True
    boxes, scores = boxes.clone(), scores.clone()
    scores[3], scores[10] = float("nan"), float("inf")
    boxes[11, 2], boxes[50, 0], boxes[77] = float("inf"), float("-inf"), float("nan")
    return (boxes, scores, classes), (boxes[~bad], scores[~bad], classes[~bad])


PATHS = [
    dict(nms_type="hard", voting=True),
    dict(nms_type="linear", voting=True, voting_scoring="avg"),
    dict(nms_type="gaussian"),
    dict(nms_type="gaussian", voting=True, voting_scoring="caffe"),
]


@pytest.mark.parametrize("params", PATHS, ids=lambda p: "-".join(map(str, p.values())))
def test_non_finite_candidates_are_dropped_on_every_path(params, monkeypatch):
    from harnet.layers import postprocess

    monkeypatch.setattr(postprocess, "_warned_non_finite", False)
    with_bad, finite = _with_non_finite()
    with pytest.warns(RuntimeWarning, match="dropped 5 candidate"):
        got = suppress_detections(*with_bad, **params, max_detections=1000)
    expected = suppress_detections(*finite, **params, max_detections=1000)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    assert torch.isfinite(got[0]).all() and torch.isfinite(got[1]).all() and len(got[1]) > 10
    # The exported (TorchScript) post-processing drops them too, silently.
    scripted = postprocess.scripted_suppress_detections()
    canonical = dict(params, voting_scoring="unclaimed_top4") if "caffe" in params.values() else params
    args = {**dict(nms_type="hard", iou_threshold=0.5, soft_nms_sigma=0.5,
                   soft_nms_min_score=0.001, voting=False, voting_iou=0.6, voting_scoring="max",
                   max_detections=1000, min_score=0.0), **canonical}  # fmt: skip
    for a, b in zip(scripted(*with_bad, *args.values()), expected):
        torch.testing.assert_close(a, b)


def test_hard_nms_alone_is_batched_nms_on_non_finite_input_too():
    # Detectron2's behaviour, with no host sync added; detector_postprocess's clipping and
    # empty-box filter then remove the non-finite boxes (HARRetinaNet's test below).
    (boxes, scores, classes), _ = _with_non_finite()
    got = suppress_detections(boxes, scores, classes, max_detections=1000)
    keep = batched_nms(boxes, scores, classes, 0.5)
    for a, b in zip(got, (boxes[keep], scores[keep], classes[keep])):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_non_finite_warning_once_per_process(monkeypatch):
    import warnings

    from harnet.layers import postprocess

    monkeypatch.setattr(postprocess, "_warned_non_finite", False)
    with_bad, _ = _with_non_finite()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            suppress_detections(*with_bad, nms_type="gaussian", voting=True)
    assert [str(w.message)[:40] for w in caught if w.category is RuntimeWarning] == [
        "suppress_detections: dropped 5 candidate"
    ]


def test_all_non_finite_gives_no_detections(monkeypatch):
    from harnet.layers import postprocess

    monkeypatch.setattr(postprocess, "_warned_non_finite", True)
    boxes = torch.full((4, 4), float("nan"))
    got = suppress_detections(boxes, torch.rand(4), torch.zeros(4, dtype=torch.long),
                              nms_type="gaussian", voting=True)  # fmt: skip
    assert [t.shape[0] for t in got] == [0, 0, 0]


@pytest.mark.parametrize("params", [
    dict(nms_type="hard"), dict(nms_type="gaussian"),
    dict(nms_type="linear", voting=True, voting_scoring="caffe"),
], ids=["hard", "gaussian", "linear-voting-caffe"])  # fmt: skip
def test_inputs_that_require_grad_give_the_same_detections(params):
    # A model's outputs outside torch.no_grad (Detectron2's GeneralizedRCNNWithTTA calls
    # the model so) reach the compiled loops, which read the data only.
    boxes, scores, classes = _candidates(seed=3)
    expected = suppress_detections(boxes, scores, classes, **params)
    got = suppress_detections(
        boxes.clone().requires_grad_(), scores.clone().requires_grad_(), classes, **params
    )
    for g, e in zip(got, expected):
        assert torch.equal(g.detach(), e)
