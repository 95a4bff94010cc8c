"""Property-based fuzzing (hypothesis) of soft-NMS, box voting and the whole per-image
suppression: invariants that hold for every input, on random, clustered, degenerate
(zero-area, identical, sub-pixel, huge coordinates) and empty inputs.

Hypothesis draws the *shape* of a case (size, kind, categories, dtype, a seed); the values
come from a numpy generator with that seed, so scores are continuous and distinct (no
exact ties, which would make the greedy order, and so permutation invariance, ambiguous).
"""
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harnet.layers import (
    VOTING_SCORINGS,
    batched_box_voting,
    batched_soft_nms,
    box_voting,
    soft_nms,
    suppress_detections,
)

FUZZ = settings(
    max_examples=120, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
# "overflow": float32 areas overflow to inf (IoU NaN); outputs must still be finite.
KINDS = ("random", "clustered", "zero_area", "identical", "subpixel", "huge", "overflow")


def _boxes(rng, n, kind):
    if kind == "identical":
        base = np.array([10.0, 20.0, 110.0, 90.0])
        boxes = np.tile(base, (n, 1))
        boxes[: n // 4] = base + rng.uniform(-5, 5, (n // 4, 4))  # a few near-copies
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2])
        return boxes
    scale = {"subpixel": 1e-3, "huge": 1e12, "overflow": 1e25}.get(kind, 1000.0)
    if kind == "clustered":
        centers = rng.uniform(0, scale, (max(1, n // 6), 2))[rng.integers(0, max(1, n // 6), n)]
        centers = centers + rng.normal(0, 8, (n, 2))
        wh = rng.uniform(20, 200, (n, 2)) * rng.uniform(0.9, 1.1)
    else:
        centers = rng.uniform(0, scale, (n, 2))
        wh = rng.uniform(0.001, 0.3, (n, 2)) * scale
    boxes = np.concatenate([centers - wh / 2, centers + wh / 2], axis=1)
    if kind == "zero_area":
        flat = rng.random(n) < 0.5
        axis = rng.integers(0, 2, n)
        boxes[flat & (axis == 0), 2] = boxes[flat & (axis == 0), 0]
        boxes[flat & (axis == 1), 3] = boxes[flat & (axis == 1), 1]
    return boxes


@st.composite
def cases(draw, max_n=48):
    n = draw(st.integers(0, max_n))
    kind = draw(st.sampled_from(KINDS))
    num_classes = draw(st.integers(1, 4))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    boxes = torch.as_tensor(_boxes(rng, n, kind), dtype=dtype).reshape(n, 4)
    scores = torch.as_tensor(rng.uniform(0.0, 1.0, n), dtype=dtype)
    classes = torch.as_tensor(rng.integers(0, num_classes, n), dtype=torch.int64)
    perm = torch.as_tensor(rng.permutation(n), dtype=torch.int64)
    return boxes, scores, classes, perm, kind


methods = st.sampled_from(["gaussian", "linear", "hard"])
sigmas = st.sampled_from([0.1, 0.5, 2.0])
ious = st.sampled_from([0.0, 0.3, 0.5, 0.9, 1.0])
thresholds = st.sampled_from([0.0, 0.001, 0.05, 0.5])


def _as_map(keep, new_scores):
    """{input index: decayed score}."""
    return dict(zip(keep.tolist(), new_scores.tolist()))


# ---------------------------------------------------------------- soft-NMS


@FUZZ
@given(cases(), methods, sigmas, ious, thresholds)
def test_soft_nms_invariants(case, method, sigma, iou, thr):
    boxes, scores, classes, perm, kind = case
    keep, new = batched_soft_nms(boxes, scores, classes, method, sigma, iou, thr)
    # Scores never increase. Gaussian soft-NMS decays in log space, and exp(log(s)) may
    # exceed s by an ulp or two: allowed, nothing more.
    ulps = 1 + 4 * torch.finfo(scores.dtype).eps
    assert keep.dtype == torch.int64 and new.dtype == scores.dtype
    assert keep.shape == new.shape
    assert len(set(keep.tolist())) == len(keep)  # no box twice
    if len(keep):
        assert 0 <= int(keep.min()) and int(keep.max()) < len(boxes)
        assert torch.isfinite(new).all() and torch.isfinite(boxes[keep]).all()
        assert (new <= scores[keep] * ulps).all()
        assert (new >= thr).all()
        assert (new[:-1] >= new[1:]).all()  # sorted by decayed score
    # The best box of each category is kept with its own score.
    for c in classes.unique().tolist():
        in_c = (classes == c).nonzero().squeeze(1)
        best = int(in_c[scores[in_c].argmax()])
        if scores[best] >= thr:
            assert best in keep.tolist()
            assert scores[best] / ulps <= new[keep.tolist().index(best)] <= scores[best] * ulps


@FUZZ
@given(cases(), methods, sigmas, ious, thresholds)
def test_soft_nms_permutation_invariant(case, method, sigma, iou, thr):
    boxes, scores, classes, perm, kind = case
    keep, new = batched_soft_nms(boxes, scores, classes, method, sigma, iou, thr)
    keep_p, new_p = batched_soft_nms(boxes[perm], scores[perm], classes[perm], method, sigma, iou, thr)
    got, ref = _as_map(perm[keep_p], new_p), _as_map(keep, new)
    assert got.keys() == ref.keys()
    for k in ref:
        assert got[k] == pytest.approx(ref[k], rel=1e-6, abs=1e-12)


@FUZZ
@given(cases(), methods, sigmas, ious, thresholds)
def test_single_category_equals_batched_with_one_class(case, method, sigma, iou, thr):
    boxes, scores, _, _, kind = case
    keep, new = soft_nms(boxes, scores, method, sigma, iou, thr)
    keep_b, new_b = batched_soft_nms(
        boxes, scores, torch.zeros(len(boxes), dtype=torch.int64), method, sigma, iou, thr
    )
    assert keep.tolist() == keep_b.tolist()
    torch.testing.assert_close(new, new_b)


# ---------------------------------------------------------------- box voting


@FUZZ
@given(cases(), st.sampled_from(VOTING_SCORINGS), ious)
def test_box_voting_invariants(case, scoring, iou):
    cand_boxes, cand_scores, cand_classes, perm, _ = case
    keep, new = batched_soft_nms(cand_boxes, cand_scores, cand_classes, "gaussian", 0.5, 0.3, 0.001)
    boxes, classes = cand_boxes[keep], cand_classes[keep]
    voted, vscores = batched_box_voting(
        boxes, new, classes, cand_boxes, cand_scores, cand_classes, iou, scoring
    )
    assert voted.shape == boxes.shape and vscores.shape == new.shape
    assert torch.isfinite(voted).all() and torch.isfinite(vscores).all()
    assert (voted[:, 2:] >= voted[:, :2]).all()  # still boxes
    if scoring == "keep":
        assert torch.equal(vscores, new)
    # A weighted mean of same-category candidates (or the box itself) lies inside their
    # hull, and its score is never above the best original score of the category.
    for c in classes.unique().tolist():
        pool = torch.cat([cand_boxes[cand_classes == c], boxes[classes == c]])
        tol = 1e-6 * float(pool.abs().max())
        v = voted[classes == c]
        assert (v >= pool.min(0).values - tol).all() and (v <= pool.max(0).values + tol).all()
        top = max(float(cand_scores[cand_classes == c].max()), float(new[classes == c].max()))
        vs = vscores[classes == c]
        assert (vs >= 0).all() and (vs <= top * (1 + 1e-6)).all()


@FUZZ
@given(cases(), st.sampled_from(VOTING_SCORINGS), ious)
def test_box_voting_candidate_order_does_not_matter(case, scoring, iou):
    cand_boxes, cand_scores, cand_classes, perm, kind = case
    keep, new = batched_soft_nms(cand_boxes, cand_scores, cand_classes, "linear", 0.5, 0.3, 0.001)
    boxes, classes = cand_boxes[keep], cand_classes[keep]
    a = batched_box_voting(boxes, new, classes, cand_boxes, cand_scores, cand_classes, iou, scoring)
    b = batched_box_voting(
        boxes, new, classes, cand_boxes[perm], cand_scores[perm], cand_classes[perm], iou, scoring
    )
    scale = float(cand_boxes.abs().max()) if len(cand_boxes) else 1.0
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(a[1], b[1], rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- the whole suppression


@FUZZ
@given(
    cases(),
    methods,
    st.booleans(),
    st.sampled_from(VOTING_SCORINGS),
    st.integers(0, 30),
    st.sampled_from([0.0, 0.05]),
)
def test_suppress_detections_invariants_and_permutation(case, method, voting, scoring, k, min_score):
    boxes, scores, classes, perm, kind = case
    params = dict(nms_type=method, iou_threshold=0.5, voting=voting, voting_scoring=scoring,
                  max_detections=k, min_score=min_score)
    out_boxes, out_scores, out_classes = suppress_detections(boxes, scores, classes, **params)
    assert len(out_boxes) == len(out_scores) == len(out_classes) <= k
    assert out_classes.dtype == torch.int64
    assert torch.isfinite(out_boxes).all() and torch.isfinite(out_scores).all()
    assert (out_scores >= min_score).all()
    if scoring == "keep" or not voting:
        assert (out_scores[:-1] >= out_scores[1:]).all()
    for c in out_classes.unique().tolist():
        assert float(out_scores[out_classes == c].max()) <= float(scores[classes == c].max()) * (1 + 1e-6)

    p_boxes, p_scores, p_classes = suppress_detections(boxes[perm], scores[perm], classes[perm], **params)
    assert p_classes.tolist() == out_classes.tolist()
    scale = float(boxes.abs().max()) if len(boxes) else 1.0
    torch.testing.assert_close(p_scores, out_scores, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(p_boxes, out_boxes, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_empty_inputs_give_empty_outputs_of_the_input_dtype(dtype):
    boxes, scores = torch.zeros(0, 4, dtype=dtype), torch.zeros(0, dtype=dtype)
    classes = torch.zeros(0, dtype=torch.int64)
    for method in ("gaussian", "linear", "hard"):
        keep, new = batched_soft_nms(boxes, scores, classes, method)
        assert keep.shape == (0,) and keep.dtype == torch.int64 and new.shape == (0,)
        keep, new = soft_nms(boxes, scores, method)
        assert keep.shape == (0,)
    for scoring in VOTING_SCORINGS:
        voted, vs = box_voting(boxes, scores, boxes, scores, 0.6, scoring)
        assert voted.shape == (0, 4) and vs.shape == (0,)
        # kept boxes but no candidates: unchanged
        one = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=dtype)
        voted, vs = box_voting(one, torch.tensor([0.7], dtype=dtype), boxes, scores, 0.6, scoring)
        torch.testing.assert_close(voted, one)
        torch.testing.assert_close(vs, torch.tensor([0.7], dtype=dtype))
    out = suppress_detections(boxes, scores, classes, nms_type="gaussian", voting=True)
    assert [t.shape[0] for t in out] == [0, 0, 0]


# Found by the fuzzing above: float32 boxes whose areas overflow (coordinates ~1e24). The
# pairwise IoU was then inf, the linear weight 1 - IoU -inf, and a dead box's score (-inf)
# times -inf +inf: boxes came back to life and the greedy loop never ended.
_OVERFLOW_BOXES = [
    [3.44e24, 2.39e24, 4.19e24, 4.12e24], [7.89e24, -1.78e23, 9.66e24, 1.91e24],
    [6.92e24, 1.87e24, 9.07e24, 4.58e24], [4.7e24, 7.38e23, 6.13e24, 1.51e24],
    [3.96e24, -2.87e22, 4.18e24, 3.48e22], [6.57e24, 8.23e24, 8.32e24, 8.81e24],
    [-7.41e22, 6.87e24, 2.85e24, 7.2e24], [8.09e24, 3.12e24, 8.79e24, 5.37e24],
    [8.83e24, 8.65e24, 1.08e25, 1.08e25], [4.91e24, 7e24, 5.17e24, 8.07e24],
    [8.57e24, 6.72e24, 8.7e24, 7.31e24], [1.52e24, 7.43e24, 4.36e24, 7.92e24],
    [4.43e24, -2.96e23, 6.99e24, 2.17e24], [3.52e24, 3.26e24, 6e24, 5.31e24],
    [1.88e23, 7.97e24, 2.27e24, 1.07e25], [7.84e24, 5.7e24, 1.01e25, 5.97e24],
    [-2.39e23, 6.52e24, 1.04e24, 7.71e24], [5.38e24, 6.85e24, 6e24, 9.67e24],
    [9.48e24, 2.02e24, 1.05e25, 4.99e24], [1.31e24, 2.67e24, 2.11e24, 5.16e24],
    [5.79e24, 1.94e24, 8.73e24, 3.66e24], [6.17e24, 2.94e24, 7.76e24, 3.62e24],
    [5.07e24, 4.4e23, 7.16e24, 1.03e24],
]
_OVERFLOW_SCORES = [
    0.972, 0.841, 0.476, 0.712, 0.844, 0.678, 0.369, 0.563, 0.937, 0.388, 0.877, 0.895,
    0.0483, 0.636, 0.607, 0.118, 0.506, 0.816, 0.0751, 0.551, 0.773, 0.277, 0.592,
]


def _linear_soft_nms_child(queue):
    torch.set_num_threads(1)  # forked: no OpenMP region of the parent's
    boxes = torch.tensor(_OVERFLOW_BOXES, dtype=torch.float32)
    scores = torch.tensor(_OVERFLOW_SCORES, dtype=torch.float32)
    keep, new = soft_nms(boxes, scores, "linear")
    queue.put((keep.tolist(), new.tolist()))


def test_linear_soft_nms_terminates_when_areas_overflow():
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_linear_soft_nms_child, args=(queue,))
    child.start()
    child.join(10)  # the unscaled boxes take milliseconds
    if child.is_alive():
        child.kill()
        child.join()
        pytest.fail("soft_nms(method='linear') did not return within 10 s")
    keep, new = queue.get(timeout=5)
    top = float(torch.tensor(max(_OVERFLOW_SCORES), dtype=torch.float32))
    assert all(np.isfinite(new)) and all(0 < s <= top for s in new)
    assert keep[0] == int(np.argmax(_OVERFLOW_SCORES)) and new[0] == top
