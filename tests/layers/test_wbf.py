"""weighted_boxes_fusion: equal to the ensemble-boxes package's (an independent numpy
implementation, on [0, 1] coordinates) on random and crafted multi-view inputs, cases worked
by hand, and invariants (view permutation, a single view, empty views)."""

import warnings

import numpy as np
import pytest
import torch

from harnet.layers import WBF_CONF_TYPES, weighted_boxes_fusion

ensemble_boxes = pytest.importorskip("ensemble_boxes")

T = lambda *x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
W, H = 640.0, 480.0  # image size of the pixel-coordinate inputs


@pytest.fixture(autouse=True, params=["numba", "tensor loop"])
def implementation(request, monkeypatch):
    """Every test on both greedy loops: numba's (CPU default) and the tensor ops' (GPU, and
    CPU without numba)."""
    if request.param == "tensor loop":
        monkeypatch.setenv("HARNET_WBF_NUMBA", "0")
    return request.param


def _random_views(seed, sizes, num_classes, dtype=torch.float64):
    """Per view: boxes inside the W x H image (clustered around a few objects so that views
    overlap), distinct scores, categories."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.rand(6, 2, generator=g, dtype=dtype) * 0.6 + 0.2
    views = []
    for n in sizes:
        c = centers[torch.randint(0, len(centers), (n,), generator=g)]
        c = c + (torch.rand(n, 2, generator=g, dtype=dtype) - 0.5) * 0.08
        wh = torch.rand(n, 2, generator=g, dtype=dtype) * 0.2 + 0.05
        boxes = torch.cat([c - wh / 2, c + wh / 2], 1).clamp(0, 1) * T(W, H, W, H).to(dtype)
        scores = torch.rand(n, generator=g, dtype=dtype) * 0.95 + 0.05
        classes = torch.randint(0, num_classes, (n,), generator=g)
        views.append((boxes, scores, classes))
    return views


def _flat(views):
    """The views as the flat tensors of weighted_boxes_fusion, plus the view index."""
    boxes = torch.cat([v[0] for v in views])
    scores = torch.cat([v[1] for v in views])
    classes = torch.cat([v[2] for v in views])
    ids = torch.cat([torch.full((len(v[1]),), i, dtype=torch.long) for i, v in enumerate(views)])
    return boxes, scores, classes, ids


def _reference(views, weights=None, iou=0.55, skip=0.0, conf_type="avg"):
    """ensemble_boxes.weighted_boxes_fusion on coordinates normalised to [0, 1] (what it
    expects: lists of numpy arrays per view), boxes scaled back to pixels."""
    scale = np.array([W, H, W, H])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        boxes, scores, labels = ensemble_boxes.weighted_boxes_fusion(
            [v[0].double().numpy().reshape(-1, 4) / scale for v in views],
            [v[1].double().numpy() for v in views],
            [v[2].numpy() for v in views],
            weights=weights,
            iou_thr=iou,
            skip_box_thr=skip,
            conf_type=conf_type,
        )
    return (
        torch.as_tensor(boxes * scale).reshape(-1, 4),
        torch.as_tensor(scores),
        torch.as_tensor(labels).long(),
    )


def _canonical(boxes, scores, classes):
    """Rows (score, class, box) sorted: ensemble-boxes orders equal scores arbitrarily."""
    rows = torch.cat([scores[:, None].double(), classes[:, None].double(), boxes.double()], 1)
    for col in reversed(range(rows.shape[1])):
        rows = rows[torch.sort(rows[:, col], stable=True)[1]]
    return rows


def _assert_same(got, expected, atol=1e-3):
    """Same detections: scores to float32 precision (ensemble-boxes stores fused rows in
    float32), boxes to 1e-3 px, categories exactly."""
    g, e = _canonical(*got), _canonical(*expected)
    assert g.shape == e.shape, f"{len(g)} detections, expected {len(e)}"
    torch.testing.assert_close(g[:, 0], e[:, 0], rtol=1e-6, atol=1e-7)
    assert torch.equal(g[:, 1], e[:, 1])
    torch.testing.assert_close(g[:, 2:], e[:, 2:], rtol=0, atol=atol)


def _wbf(views, weights=None, iou=0.55, skip=0.0, conf_type="avg", num_views=None):
    boxes, scores, classes, ids = _flat(views)
    return weighted_boxes_fusion(
        boxes,
        scores,
        classes,
        ids,
        num_views or len(views),
        view_weights=weights,
        iou_threshold=iou,
        skip_threshold=skip,
        conf_type=conf_type,
    )


@pytest.mark.parametrize("conf_type", WBF_CONF_TYPES)
@pytest.mark.parametrize("iou,skip", [(0.55, 0.0), (0.3, 0.2), (0.8, 0.0)])
@pytest.mark.parametrize("weighted", [False, True])
def test_equals_ensemble_boxes_on_random_views(conf_type, iou, skip, weighted):
    for seed in range(4):
        sizes = [40, 0, 25, 60][: 2 + seed % 3]  # 2 to 4 views, one of them empty
        views = _random_views(seed, sizes, num_classes=3)
        weights = [1.0, 2.0, 0.5, 3.0][: len(views)] if weighted else None
        got = _wbf(views, weights, iou, skip, conf_type)
        expected = _reference(views, weights, iou, skip, conf_type)
        assert len(expected[0]) > 10
        _assert_same(got, expected)
        # Sorted by decreasing score, boxes well-formed, dtypes kept.
        assert bool((got[1][:-1] >= got[1][1:]).all())
        assert got[0].dtype == torch.float64 and got[2].dtype == torch.int64


def test_many_boxes_of_one_category_float32():
    # Long clustering chains (one category, 3 views x 100 boxes), float32 input.
    views = _random_views(7, [100, 100, 100], num_classes=1, dtype=torch.float32)
    got = _wbf(views)
    expected = _reference(views)
    assert 10 < len(expected[0]) < 250
    _assert_same(got, expected, atol=2e-2)  # float32 coordinates
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32


def test_crafted_clusters_by_hand():
    # Three views of two objects of category 0, one object of category 1 over the first.
    views = [
        (T([0, 0, 10, 10], [30, 30, 40, 40]), T(0.9, 0.5), torch.tensor([0, 0])),
        (T([1, 0, 11, 10], [0, 0, 10, 10]), T(0.6, 0.7), torch.tensor([0, 1])),
        (torch.zeros(0, 4, dtype=torch.float64), T(), torch.tensor([], dtype=torch.long)),
    ]
    boxes, scores, classes = _wbf(views)
    # Category 0: [0,0,10,10] (.9) and [1,0,11,10] (.6, IoU 90/110 > .55) fuse; the score
    # is their mean rescaled by min(3 views, 2 boxes) / 3. [30,30,40,40] stays alone (/3).
    fused = (0.9 * T(0, 0, 10, 10) + 0.6 * T(1, 0, 11, 10)) / 1.5
    torch.testing.assert_close(boxes, torch.stack([fused, T(0, 0, 10, 10), T(30, 30, 40, 40)]))
    torch.testing.assert_close(scores, T(0.75 * 2 / 3, 0.7 / 3, 0.5 / 3))
    assert classes.tolist() == [0, 1, 0]  # a category-1 box never fuses with category 0
    _assert_same((boxes, scores, classes), _reference(views))
    # "max": the best score over the largest view weight; "box_and_model_avg": the
    # weighted mean score times the share of the views present.
    w = [1.0, 2.0, 1.0]
    boxes, scores, _ = _wbf(views, weights=w, conf_type="max")
    fused = (0.9 * T(0, 0, 10, 10) + 1.2 * T(1, 0, 11, 10)) / 2.1
    torch.testing.assert_close(boxes[1], fused)  # after the category-1 box (1.4 / 2)
    torch.testing.assert_close(scores, T(1.4 / 2, 1.2 / 2, 0.5 / 2))
    _, scores, _ = _wbf(views, weights=w, conf_type="box_and_model_avg")
    torch.testing.assert_close(scores, T(2.1 / 3 * 3 / 4, 0.7 * 2 / 4, 0.5 * 1 / 4))


def test_clusters_grow_from_the_running_fused_box():
    # A box that overlaps the cluster's first box too little (IoU 5/15 = 0.33 < 0.4) but
    # its fused box enough (the cluster already holds a box shifted towards it): it joins.
    views = [
        (T([0, 0, 10, 1]), T(0.9), torch.tensor([0])),
        (T([4, 0, 14, 1]), T(0.8), torch.tensor([0])),  # IoU 6/14 = 0.43 with the first
        (T([5, 0, 15, 1]), T(0.7), torch.tensor([0])),
    ]
    boxes, scores, _ = _wbf(views, iou=0.4)
    expected_box = (0.9 * T(0, 0, 10, 1) + 0.8 * T(4, 0, 14, 1) + 0.7 * T(5, 0, 15, 1)) / 2.4
    torch.testing.assert_close(boxes, expected_box[None])
    torch.testing.assert_close(scores, T(0.8))
    _assert_same(_wbf(views, iou=0.4), _reference(views, iou=0.4))
    # The box joins the cluster it overlaps most, not the first one it overlaps.
    views = [
        (T([0, 0, 10, 10], [6, 0, 16, 10]), T(0.9, 0.8), torch.tensor([0, 0])),
        (T([5, 0, 15, 10]), T(0.7), torch.tensor([0])),  # IoU .33 with the first, .82
    ]
    boxes, scores, _ = _wbf(views, iou=0.3)
    # Its cluster (mean .75 x 2/2) now leads the first box's (.9 x 1/2).
    torch.testing.assert_close(boxes[0], (0.8 * T(6, 0, 16, 10) + 0.7 * T(5, 0, 15, 10)) / 1.5)
    torch.testing.assert_close(boxes[1], T(0, 0, 10, 10))
    torch.testing.assert_close(scores, T(0.75, 0.45))
    _assert_same(_wbf(views, iou=0.3), _reference(views, iou=0.3))


def test_threshold_is_strict_and_skip_threshold_drops_boxes():
    views = [
        (T([0, 0, 10, 10]), T(0.9), torch.tensor([2])),
        (T([0, 0, 10, 5]), T(0.6), torch.tensor([2])),  # IoU exactly 0.5
    ]
    assert len(_wbf(views, iou=0.5)[0]) == 2
    assert len(_wbf(views, iou=0.49)[0]) == 1
    # A box scoring below the skip threshold takes no part (keeps: >= threshold).
    boxes, scores, _ = _wbf(views, iou=0.49, skip=0.61)
    torch.testing.assert_close(boxes, T([0, 0, 10, 10]))
    torch.testing.assert_close(scores, T(0.9 / 2))
    assert len(_wbf(views, iou=0.49, skip=0.6)[0]) == 1 and len(_wbf(views, skip=0.95)[0]) == 0
    # More boxes than views in a cluster: the mean score, not more.
    views.append((T([0, 0, 10, 9], [0, 0, 10, 8]), T(0.3, 0.2), torch.tensor([2, 2])))
    _, scores, _ = _wbf(views, iou=0.49)
    torch.testing.assert_close(scores, T(2.0 / 4))
    _assert_same(_wbf(views, iou=0.49), _reference(views, iou=0.49))


@pytest.mark.parametrize("conf_type", WBF_CONF_TYPES)
def test_permuting_views_changes_nothing(conf_type):
    views = _random_views(11, [30, 50, 20], num_classes=4)
    weights = [1.0, 3.0, 0.5]
    got = _wbf(views, weights, conf_type=conf_type)
    for perm in ([2, 0, 1], [1, 2, 0]):
        # Views reordered (with their weights), and each view's boxes shuffled.
        shuffled = []
        for i in perm:
            order = torch.randperm(len(views[i][1]))
            shuffled.append(tuple(t[order] for t in views[i]))
        permuted = _wbf(shuffled, [weights[i] for i in perm], conf_type=conf_type)
        _assert_same(permuted, got, atol=1e-9)


@pytest.mark.parametrize("conf_type", WBF_CONF_TYPES)
def test_single_view_is_identity_up_to_the_score_rule(conf_type):
    # One view's detections after NMS at the WBF threshold do not fuse with each other:
    # they come back as they are, each with its score under the rule (T views, one present:
    # "avg" and "box_and_model_avg" give s / T, "max" s).
    from torchvision.ops import batched_nms

    boxes, scores, classes = _random_views(3, [200], num_classes=3)[0]
    keep = batched_nms(boxes, scores, classes, 0.55)
    view = (boxes[keep], scores[keep], classes[keep])
    for num_views, present in ((1, 0), (3, 1)):
        views = [(torch.zeros(0, 4, dtype=torch.float64), T(), classes[:0])] * num_views
        views[present] = view
        got_boxes, got_scores, got_classes = _wbf(views, conf_type=conf_type)
        assert torch.equal(got_boxes, view[0]) and torch.equal(got_classes, view[2])
        rule = 1.0 if conf_type == "max" else 1.0 / num_views
        torch.testing.assert_close(got_scores, view[1] * rule)
    # Overlapping boxes of a single view fuse (as ensemble-boxes does).
    views = [(boxes, scores, classes)]
    assert len(_wbf(views)[0]) < len(boxes)
    _assert_same(_wbf(views, conf_type=conf_type), _reference(views, conf_type=conf_type))


def test_empty_views_give_empty_fusion_and_count_in_the_score_rescaling():
    empty = (torch.zeros(0, 4, dtype=torch.float64), T(), torch.zeros(0, dtype=torch.long))
    for num_views in (1, 3):
        boxes, scores, classes = _wbf([empty] * num_views)
        assert boxes.shape == (0, 4) and scores.shape == (0,) and classes.shape == (0,)
        assert boxes.dtype == scores.dtype == torch.float64 and classes.dtype == torch.int64
    # Empty views count in the score rescaling ("avg": min(T, n) / T), nowhere else.
    views = _random_views(5, [30, 30], num_classes=2)
    two, four = _wbf(views), _wbf(views + [empty, empty])
    _assert_same(four, _reference(views + [empty, empty]))

    def by_box(boxes, scores, classes):
        rows = torch.cat([classes[:, None].double(), boxes], 1)
        order = sorted(range(len(rows)), key=lambda i: rows[i].tolist())
        return rows[order], scores[order]

    (rows2, scores2), (rows4, scores4) = by_box(*two), by_box(*four)
    assert torch.equal(rows2, rows4)
    # A cluster of n boxes: min(4, n) / 4 against min(2, n) / 2, i.e. x1/2, x3/4 or x1.
    ratio = scores4 / scores2
    assert bool(((ratio - 0.5).abs() < 1e-9).any()) and bool((ratio > 0.5 - 1e-9).all())
    assert bool((ratio < 1 + 1e-9).all())
    # Zero-area boxes are ignored (ensemble-boxes skips them too).
    flat = (T([3, 3, 3, 8], [0, 0, 4, 4]), T(0.9, 0.5), torch.tensor([0, 0]))
    torch.testing.assert_close(_wbf([flat])[0], T([0, 0, 4, 4]))


@pytest.mark.cuda
def test_cuda_equals_cpu():
    views = _random_views(13, [100, 80, 120], num_classes=5, dtype=torch.float32)
    cpu = _wbf(views, conf_type="box_and_model_avg")
    boxes, scores, classes, ids = (t.cuda() for t in _flat(views))
    gpu = weighted_boxes_fusion(boxes, scores, classes, ids, 3, conf_type="box_and_model_avg")
    assert all(t.is_cuda for t in gpu)
    _assert_same(tuple(t.cpu() for t in gpu), cpu, atol=1e-3)


def test_bad_input_names_the_argument():
    boxes, scores, classes, ids = _flat(_random_views(0, [5, 5], num_classes=2))

    def call(**kw):
        args = dict(boxes=boxes, scores=scores, classes=classes, views=ids, num_views=2)
        args.update(kw)
        return weighted_boxes_fusion(**args)
    with pytest.raises(ValueError, match="views must lie in"):
        call(num_views=1)
    with pytest.raises(ValueError, match="num_views"):
        call(num_views=0)
    with pytest.raises(ValueError, match="view_weights"):
        call(view_weights=[1.0])
    with pytest.raises(ValueError, match="view_weights"):
        call(view_weights=[0.0, 0.0])
    with pytest.raises(ValueError, match="conf_type"):
        call(conf_type="mean")
    with pytest.raises(ValueError, match="iou_threshold"):
        call(iou_threshold=1.5)
    with pytest.raises(TypeError, match="classes"):
        call(classes=classes.double())
    with pytest.raises(ValueError, match="views must have shape"):
        call(views=ids[:3])
    with pytest.raises(ValueError, match="boxes"):
        call(boxes=boxes[:, [2, 1, 0, 3]])  # x1 > x2
    with pytest.raises(TypeError, match="scores"):
        call(scores=scores.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_numba_loop_is_bit_identical_to_tensor_loop(dtype, implementation, monkeypatch):
    if implementation != "numba":
        pytest.skip("compares the two loops once")
    from harnet.layers import _wbf_numba

    assert _wbf_numba.available()
    cases = [([100, 100, 100], 1, 0.55), ([100] * 6, 1, 0.55), ([100, 100, 100], 80, 0.55),
             ([30, 0, 45], 3, 0.3), ([60, 60], 2, 0.8), ([1], 1, 0.55), ([50, 50], 1, 0.0),
             ([50, 50], 1, 1.0), ([100, 100, 100], 1, 0.1)]  # fmt: skip
    for seed, (sizes, num_classes, iou) in enumerate(cases):
        views = _random_views(seed, sizes, num_classes, dtype=dtype)
        for conf_type in WBF_CONF_TYPES:
            monkeypatch.delenv("HARNET_WBF_NUMBA", raising=False)
            compiled = _wbf(views, iou=iou, conf_type=conf_type)
            monkeypatch.setenv("HARNET_WBF_NUMBA", "0")
            tensor_ops = _wbf(views, iou=iou, conf_type=conf_type)
            for a, b in zip(compiled, tensor_ops):
                assert torch.equal(a, b), (sizes, num_classes, iou, conf_type)


def test_inputs_that_require_grad_give_the_same_fusion():
    boxes, scores, labels, ids = _flat(_random_views(4, [30, 25, 20], num_classes=3))
    expected = weighted_boxes_fusion(boxes, scores, labels, ids, 3)
    got = weighted_boxes_fusion(
        boxes.clone().requires_grad_(), scores.clone().requires_grad_(), labels, ids, 3
    )
    for g, e in zip(got, expected):
        assert torch.equal(g.detach(), e)
