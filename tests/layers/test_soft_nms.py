"""soft_nms / batched_soft_nms against a slow loop written from the definition, and hard mode
against torchvision's NMS."""

import functools
import math

import pytest
import torch
from torchvision.ops import batched_nms, nms

from harnet.layers import batched_soft_nms, soft_nms
from harnet.layers import _soft_nms_numba
from harnet.layers._soft_nms_torch import greedy_soft_nms_torch
from harnet.layers.soft_nms import _by_decreasing_score, batched_soft_nms_scriptable

METHODS = ("gaussian", "linear", "hard")
NUMBA = _soft_nms_numba.available()
# The greedy loop's implementations: the public function (numba on CPU when installed),
# the PyTorch loop in Python, and the same loop compiled by TorchScript (export).
BACKENDS = ("public", "torch", "torchscript")


def run_backend(backend, boxes, scores, idxs, method, sigma, iou_threshold, score_threshold):
    if backend == "public":
        return batched_soft_nms(boxes, scores, idxs, method, sigma, iou_threshold, score_threshold)
    fn = batched_soft_nms_scriptable
    if backend == "torchscript":
        fn = _scripted_soft_nms()
    return fn(
        boxes, scores, idxs, method, float(sigma), float(iou_threshold), float(score_threshold)
    )


_SCRIPTED = []


def _scripted_soft_nms():
    if not _SCRIPTED:
        _SCRIPTED.append(torch.jit.script(batched_soft_nms_scriptable))
    return _SCRIPTED[0]


def slow_soft_nms(boxes, scores, idxs, method, sigma, iou_threshold, score_threshold):
    """The definition, one category and one greedy step at a time, in Python floats."""
    boxes, scores, idxs = boxes.tolist(), scores.tolist(), idxs.tolist()
    keep, new_scores = [], []
    for c in sorted(set(idxs)):
        s = {i: scores[i] for i in range(len(boxes)) if idxs[i] == c}
        remaining = [i for i in s if s[i] >= score_threshold]
        while remaining:
            best = max(remaining, key=lambda i: (s[i], -i))  # ties: lowest index
            keep.append(best)
            new_scores.append(s[best])
            remaining.remove(best)
            bx1, by1, bx2, by2 = boxes[best]
            survivors = []
            for i in remaining:
                x1, y1, x2, y2 = boxes[i]
                inter = max(0.0, min(bx2, x2) - max(bx1, x1)) * max(
                    0.0, min(by2, y2) - max(by1, y1)
                )
                union = (bx2 - bx1) * (by2 - by1) + (x2 - x1) * (y2 - y1) - inter
                iou = inter / union if union > 0 else 0.0
                if method == "gaussian":
                    w = math.exp(-iou * iou / sigma)
                elif method == "linear":
                    w = 1.0 - iou if iou > iou_threshold else 1.0
                else:
                    w = 0.0 if iou > iou_threshold else 1.0
                s[i] *= w
                if s[i] >= score_threshold and w != 0:
                    survivors.append(i)
            remaining = survivors
    order = sorted(range(len(keep)), key=lambda k: (-new_scores[k], keep[k]))
    return [keep[k] for k in order], [new_scores[k] for k in order]


def random_set(n, num_classes=3, dtype=torch.float64, clustered=True, g=None):
    """Random boxes with the hard cases: clusters, exact duplicates with equal scores, equal
    scores on different boxes, empty (zero-area) boxes and touching boxes."""
    if n == 0:
        return (
            torch.zeros(0, 4, dtype=dtype),
            torch.zeros(0, dtype=dtype),
            torch.zeros(0, dtype=torch.int64),
        )
    if clustered:
        centers = torch.rand(max(1, n // 6), 2, generator=g) * 60
        ctr = (
            centers[torch.randint(len(centers), (n,), generator=g)]
            + torch.randn(n, 2, generator=g) * 3
        )
        wh = 10 + torch.rand(n, 2, generator=g) * 15
    else:
        ctr, wh = torch.rand(n, 2, generator=g) * 60, torch.rand(n, 2, generator=g) * 25
    boxes = torch.cat([ctr - wh / 2, ctr + wh / 2], dim=1).to(dtype)
    scores = torch.rand(n, generator=g).to(dtype)
    classes = torch.randint(num_classes, (n,), generator=g)
    if n >= 6:
        boxes[1], scores[1], classes[1] = boxes[0], scores[0], classes[0]  # exact duplicate
        scores[3] = scores[2]  # tie on different boxes
        boxes[4, 2] = boxes[4, 0]  # empty box
        boxes[5, 0] = boxes[2, 2]  # touching box 2
        boxes[5, 2] = boxes[5, 0] + 5
    return boxes, scores, classes


def assert_matches_reference(keep, new_scores, ref_keep, ref_scores):
    assert keep.dtype == torch.int64
    assert keep.tolist() == ref_keep
    torch.testing.assert_close(
        new_scores, torch.tensor(ref_scores, dtype=new_scores.dtype), rtol=1e-5, atol=1e-7
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", METHODS)
def test_batched_matches_slow_definition(method, backend):
    g = torch.Generator().manual_seed(1)
    sizes = [0, 1, 2, 3, 7, 12, 20, 33, 50] * 5
    for trial, n in enumerate(sizes):
        boxes, scores, classes = random_set(
            n, num_classes=1 + trial % 4, g=g, clustered=trial % 3 > 0
        )
        sigma, thr, min_score = (0.5, 0.3, 0.001) if trial % 2 else (0.2, 0.5, 0.05)
        keep, new_scores = run_backend(
            backend, boxes, scores, classes, method, sigma, thr, min_score
        )
        ref = slow_soft_nms(boxes, scores, classes, method, sigma, thr, min_score)
        assert_matches_reference(keep, new_scores, *ref)


def dense_scene(n, num_classes=1, seed=0, dtype=torch.float32):
    """Candidates of a crowded scene (as dev/benchmark_postprocess.py's dense case): a
    1333 x 800 image, clusters of ~20 boxes, centres jittered by N(0, 15 px), sides
    log-uniform in [20, 300] px, scores U(0.05, 1)."""
    g = torch.Generator().manual_seed(seed)
    num_clusters = max(1, n // 20)
    centres = torch.rand(num_clusters, 2, generator=g) * torch.tensor([1333.0, 800.0])
    cluster = torch.randint(num_clusters, (n,), generator=g)
    ctr = centres[cluster] + torch.randn(n, 2, generator=g) * 15
    wh = torch.exp(math.log(20) + math.log(15) * torch.rand(n, 2, generator=g))
    boxes = torch.cat([ctr - wh / 2, ctr + wh / 2], dim=1)
    scores = 0.05 + 0.95 * torch.rand(n, generator=g)
    classes = torch.randint(num_classes, (num_clusters,), generator=g)[cluster]
    return boxes.to(dtype), scores.to(dtype), classes


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ("gaussian", "linear"))
def test_dense_scene_matches_slow_definition(method, backend):
    # One category with 1200 boxes: about a thousand greedy steps (the case numba is for).
    boxes, scores, classes = dense_scene(1200)
    keep, new_scores = run_backend(backend, boxes, scores, classes, method, 0.5, 0.5, 0.001)
    ref = _dense_reference(method)
    assert len(ref[0]) > 800
    assert_matches_reference(keep, new_scores, *ref)


@functools.lru_cache(maxsize=None)
def _dense_reference(method):
    boxes, scores, classes = dense_scene(1200)
    return slow_soft_nms(boxes, scores, classes, method, 0.5, 0.5, 0.001)


@pytest.mark.parametrize("method", ("gaussian", "linear"))
def test_dense_scene_all_paths_agree(method):
    # 4000 boxes, 1 and 80 categories: the compiled loop and the PyTorch loop (eager and
    # TorchScript) keep the same boxes in the same order.
    for num_classes in (1, 80):
        boxes, scores, classes = dense_scene(4000, num_classes, seed=num_classes)
        results = [
            run_backend(b, boxes, scores, classes, method, 0.5, 0.5, 0.001) for b in BACKENDS
        ]
        for keep, new_scores in results[1:]:
            assert torch.equal(keep, results[0][0])
            torch.testing.assert_close(new_scores, results[0][1], rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(not NUMBA, reason="numba is not installed")
def test_public_function_uses_the_compiled_loop_on_cpu(monkeypatch):
    # The dispatch itself: with numba the CPU path never runs the PyTorch loop, and with
    # HARNET_SOFT_NMS_NUMBA=0 it does.
    import importlib

    module = importlib.import_module("harnet.layers.soft_nms")
    calls = []
    original = module.greedy_soft_nms_torch
    monkeypatch.setattr(module, "greedy_soft_nms_torch", lambda *a: calls.append(1) or original(*a))
    boxes, scores, classes = dense_scene(50)
    batched_soft_nms(boxes, scores, classes)
    assert calls == []
    monkeypatch.setenv("HARNET_SOFT_NMS_NUMBA", "0")
    batched_soft_nms(boxes, scores, classes)
    assert calls == [1]


@pytest.mark.parametrize("method", ("gaussian", "linear"))
def test_single_class_matches_slow_definition_float32(method):
    g = torch.Generator().manual_seed(2)
    for n in (1, 5, 40, 120):
        boxes, scores, _ = random_set(n, dtype=torch.float32, g=g)
        keep, new_scores = soft_nms(boxes, scores, method, 0.5, 0.3, 0.001)
        ref = slow_soft_nms(
            boxes, scores, torch.zeros(n, dtype=torch.int64), method, 0.5, 0.3, 0.001
        )
        assert new_scores.dtype == torch.float32
        assert_matches_reference(keep, new_scores, *ref)


@pytest.mark.parametrize("method", ("gaussian", "linear"))
def test_long_greedy_loop_with_compaction(method):
    # Hundreds of boxes in a few categories: many greedy steps, rows and columns compacted.
    g = torch.Generator().manual_seed(3)
    boxes, scores, classes = random_set(400, num_classes=4, g=g)
    keep, new_scores = batched_soft_nms(boxes, scores, classes, method, 0.5, 0.3, 0.001)
    ref = slow_soft_nms(boxes, scores, classes, method, 0.5, 0.3, 0.001)
    assert len(ref[0]) > 40  # long enough to exercise the compaction
    assert_matches_reference(keep, new_scores, *ref)


@pytest.mark.parametrize("pair_decays_budget", [0, 1 << 30])
@pytest.mark.parametrize("method", METHODS)
def test_greedy_loop_both_weight_paths(method, pair_decays_budget):
    # Per-step IoU (budget 0) and precomputed pair decays give the definition's result.
    g = torch.Generator().manual_seed(4)
    for n in (1, 9, 60):
        boxes, scores, classes = random_set(n, g=g)
        cand = torch.nonzero(scores >= 0.01).squeeze(1)
        keep, new_scores = _by_decreasing_score(
            *greedy_soft_nms_torch(
                boxes, scores, classes, cand, method, 0.5, 0.4, 0.01, pair_decays_budget
            )
        )
        ref = slow_soft_nms(boxes, scores, classes, method, 0.5, 0.4, 0.01)
        assert_matches_reference(keep, new_scores, *ref)


@pytest.mark.parametrize("iou_threshold", [0.3, 0.5, 0.7])
def test_hard_equals_torchvision_nms(iou_threshold):
    g = torch.Generator().manual_seed(5)
    for n in (0, 1, 10, 80, 300):
        boxes, scores, classes = random_set(n, dtype=torch.float32, g=g)
        # Public API (dispatches to torchvision) and the vectorised greedy loop itself.
        keep, new_scores = soft_nms(
            boxes, scores, "hard", iou_threshold=iou_threshold, score_threshold=0.0
        )
        assert keep.tolist() == nms(boxes, scores, iou_threshold).tolist()
        assert torch.equal(new_scores, scores[keep])
        # The greedy loops themselves with method "hard" (the public path uses torchvision).
        expected = batched_nms(boxes, scores, classes, iou_threshold).tolist()
        loops = [greedy_soft_nms_torch] + ([_soft_nms_numba.greedy_soft_nms_numba] if NUMBA else [])
        for loop in loops:
            args = (boxes, scores, classes, torch.arange(n), "hard", 0.5, iou_threshold, 0.0)
            loop_keep, loop_scores = _by_decreasing_score(*loop(*args))
            assert loop_keep.tolist() == expected
            torch.testing.assert_close(
                loop_scores, scores[loop_keep], rtol=0, atol=0, check_dtype=False
            )


def test_hard_with_score_threshold_is_nms_of_the_boxes_above_it():
    g = torch.Generator().manual_seed(6)
    boxes, scores, classes = random_set(100, dtype=torch.float32, g=g)
    keep, _ = batched_soft_nms(
        boxes, scores, classes, "hard", iou_threshold=0.5, score_threshold=0.3
    )
    above = torch.nonzero(scores >= 0.3).squeeze(1)
    expected = above[batched_nms(boxes[above], scores[above], classes[above], 0.5)]
    assert keep.tolist() == expected.tolist()


@pytest.mark.parametrize("method", METHODS)
def test_batched_equals_per_class_loop(method):
    g = torch.Generator().manual_seed(7)
    boxes, scores, classes = random_set(150, num_classes=6, g=g)
    classes = classes * 7 - 3  # arbitrary (negative, sparse) category ids
    keep, new_scores = batched_soft_nms(boxes, scores, classes, method, 0.5, 0.3, 0.01)
    per_keep, per_scores = [], []
    for c in classes.unique():
        ids = torch.nonzero(classes == c).squeeze(1)
        k, s = soft_nms(boxes[ids], scores[ids], method, 0.5, 0.3, 0.01)
        per_keep.append(ids[k])
        per_scores.append(s)
    per_keep, per_scores = torch.cat(per_keep), torch.cat(per_scores)
    order = sorted(range(len(per_keep)), key=lambda i: (-float(per_scores[i]), int(per_keep[i])))
    assert keep.tolist() == per_keep[order].tolist()
    torch.testing.assert_close(new_scores, per_scores[order])


def test_decay_semantics_worked_by_hand():
    # Boxes 0 and 1: intersection 10 x 10, union 200 + 200 - 100: IoU 1/3.
    boxes = torch.tensor([[0.0, 0, 20, 10], [10, 0, 30, 10], [100, 100, 110, 110]])
    scores = torch.tensor([0.9, 0.8, 0.0005])
    iou = 100.0 / 300.0
    keep, s = soft_nms(boxes, scores, "gaussian", sigma=0.5, score_threshold=0.001)
    assert keep.tolist() == [0, 1]  # box 2 starts below the threshold: never kept
    torch.testing.assert_close(s, torch.tensor([0.9, 0.8 * math.exp(-iou * iou / 0.5)]))
    keep, s = soft_nms(boxes, scores, "linear", iou_threshold=0.3)
    torch.testing.assert_close(s, torch.tensor([0.9, 0.8 * (1 - iou)]))
    keep, s = soft_nms(boxes, scores, "linear", iou_threshold=0.4)  # IoU below: no decay
    torch.testing.assert_close(s, torch.tensor([0.9, 0.8]))
    keep, s = soft_nms(boxes, scores, "hard", iou_threshold=0.3)
    assert keep.tolist() == [0]
    # A decayed score below score_threshold drops the box.
    keep, s = soft_nms(boxes, scores, "linear", iou_threshold=0.3, score_threshold=0.6)
    assert keep.tolist() == [0]
    # The decayed order can differ from the input order: box 1 falls under box 3.
    boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 11], [50, 50, 60, 60]])
    keep, s = soft_nms(boxes, torch.tensor([0.9, 0.85, 0.5]), "gaussian", sigma=0.5)
    assert keep.tolist() == [0, 2, 1]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", METHODS)
def test_huge_coordinates_do_not_overflow(method, backend):
    # float32 areas of boxes ~1e24 overflow; results must match the (float64) definition.
    g = torch.Generator().manual_seed(9)
    boxes, scores, classes = random_set(40, g=g)
    boxes = boxes * 1e23
    keep, new_scores = run_backend(
        backend, boxes.float(), scores.float(), classes, method, 0.5, 0.3, 0.001
    )
    ref_keep, ref_scores = slow_soft_nms(boxes, scores, classes, method, 0.5, 0.3, 0.001)
    assert keep.tolist() == ref_keep
    torch.testing.assert_close(new_scores, torch.tensor(ref_scores, dtype=torch.float32))


def test_outputs_dtype_device_and_empty():
    keep, s = soft_nms(torch.zeros(0, 4), torch.zeros(0))
    assert keep.dtype == torch.int64 and keep.shape == (0,) and s.shape == (0,)
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11]], dtype=torch.float16)
    keep, s = soft_nms(boxes, torch.tensor([0.5, 0.6], dtype=torch.float16))
    assert s.dtype == torch.float16 and keep.tolist() == [1, 0]
    # All below the threshold.
    keep, s = soft_nms(boxes.float(), torch.tensor([1e-4, 1e-4]))
    assert keep.numel() == 0


@pytest.mark.cuda
@pytest.mark.parametrize("method", METHODS)
def test_gpu_matches_cpu(method):
    g = torch.Generator().manual_seed(8)
    boxes, scores, classes = random_set(300, num_classes=5, dtype=torch.float32, g=g)
    k_cpu, s_cpu = batched_soft_nms(boxes, scores, classes, method)
    k_gpu, s_gpu = batched_soft_nms(boxes.cuda(), scores.cuda(), classes.cuda(), method)
    assert k_gpu.device.type == "cuda"
    assert k_gpu.cpu().tolist() == k_cpu.tolist()
    torch.testing.assert_close(s_gpu.cpu(), s_cpu)


def _ok():
    return torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11]]), torch.tensor([0.9, 0.8])


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(scores=torch.tensor([0.9])), ValueError, "scores must have shape"),
        (dict(boxes=torch.zeros(2, 3)), ValueError, r"boxes must have shape \[N, 4\]"),
        (
            dict(boxes=torch.tensor([[0.0, 0, float("nan"), 1], [0, 0, 1, 1]])),
            ValueError,
            "boxes contains non-finite",
        ),
        (
            dict(boxes=torch.tensor([[0.0, 0, float("inf"), 1], [0, 0, 1, 1]])),
            ValueError,
            "boxes contains non-finite",
        ),
        (dict(scores=torch.tensor([0.9, float("nan")])), ValueError, "scores contains non-finite"),
        (dict(boxes=torch.tensor([[5.0, 0, 1, 1], [0, 0, 1, 1]])), ValueError, "x1 <= x2"),
        (dict(method="softer"), ValueError, "method must be one of"),
        (dict(method="gaussian", sigma=0.0), ValueError, "sigma must be > 0"),
        (dict(method="linear", iou_threshold=1.5), ValueError, "iou_threshold"),
        (dict(scores=torch.tensor([0.9, -0.1])), ValueError, "non-negative"),
        (dict(boxes=torch.zeros(2, 4, dtype=torch.int64)), TypeError, "floating point"),
        (dict(boxes=[[0, 0, 1, 1]]), TypeError, "boxes must be a torch.Tensor"),
    ],
)
def test_invalid_inputs_raise(kwargs, error, match):
    boxes, scores = _ok()
    args = dict(boxes=boxes, scores=scores)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        soft_nms(**args)


def test_invalid_idxs_raise():
    boxes, scores = _ok()
    with pytest.raises(ValueError, match="idxs must have shape"):
        batched_soft_nms(boxes, scores, torch.tensor([0]))
    with pytest.raises(TypeError, match="idxs must be an integer tensor"):
        batched_soft_nms(boxes, scores, torch.tensor([0.0, 1.0]))
