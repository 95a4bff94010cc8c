"""The Triton soft-NMS kernel against the definition and the numba loop, run on CPU tensors
through Triton's interpreter (``TRITON_INTERPRET=1``) in a subprocess, so the variable does
not reach other tests (triton reads it when a kernel is defined, at import)."""

import pytest
import torch

triton = pytest.importorskip("triton")

from triton_cases import run_interpreted  # noqa: E402

# Runs in the subprocess: every case through the kernel, the slow definition (one category
# at a time, float64, first maximum wins) and the numba loop; prints the largest relative
# score difference per case, and whether keep and order were equal.
_CHECK = r'''
import json, math, sys, torch
import numpy as np
sys.path[:0] = [sys.argv[1] + "/layers"]
from test_fuzz_postprocess import KINDS
from triton_cases import EMPTY as empty, ONE as one, fuzz, scene
from harnet.layers import _soft_nms_numba, _soft_nms_triton as T
from harnet.layers.soft_nms import _by_decreasing_score

def definition(boxes, scores, idxs, method, sigma, thr, score_thr):
    keep, kept = [], []
    for c in sorted(set(idxs.tolist())):
        live = {i: float(scores[i]) for i in range(len(scores))
                if int(idxs[i]) == c and scores[i] >= score_thr}
        while live:
            best = max(live, key=lambda i: (live[i], -i))
            keep.append(best); kept.append(live.pop(best))
            b = boxes[best].tolist()
            for i in list(live):
                o = boxes[i].tolist()
                iw = min(b[2], o[2]) - max(b[0], o[0]); ih = min(b[3], o[3]) - max(b[1], o[1])
                if iw <= 0 or ih <= 0:
                    continue
                inter = iw * ih
                union = (b[2] - b[0]) * (b[3] - b[1]) + (o[2] - o[0]) * (o[3] - o[1]) - inter
                iou = inter / union if union > 0 else 0.0
                w = math.exp(-iou * iou / sigma) if method == "gaussian" else (
                    max(0.0, 1 - iou) if iou > thr else 1.0)
                live[i] *= w
                if not live[i] >= score_thr or w == 0:
                    del live[i]
    return _by_decreasing_score(torch.tensor(keep, dtype=torch.int64),
                                torch.tensor(kept, dtype=torch.float64))

def kernel(boxes, scores, idxs, method, sigma, thr, score_thr):
    cand = torch.nonzero(scores >= score_thr).squeeze(1)
    box_index, starts, largest = T.group_candidates(idxs, cand)
    keep, kept = T.greedy_soft_nms_triton(boxes, scores, box_index, starts, largest,
                                          method, sigma, thr, score_thr)
    return _by_decreasing_score(keep, kept)

def rel(a, b):
    return float(((a - b).abs() / b.abs().clamp(min=1e-300)).max()) if b.numel() else 0.0

cases = {"empty": empty, "one": one, "random": scene(60, 3, 0), "ties": scene(30, 2, 1, True),
         "80 categories": scene(160, 80, 2), "dense": scene(100, 1, 3, spread=20.0),
         "thousands": scene(2000, 4, 4, spread=400.0)}
cases.update({f"fuzz {kind}": fuzz(kind, i, 24) for i, kind in enumerate(KINDS)})
settings = [("gaussian", 0.3, 0.001), ("linear", 0.5, 0.0), ("gaussian", 0.3, 0.2)]
out = {}
for name, (b, s, i) in cases.items():
    # Large and fuzz cases: one setting each (the interpreter is slow).
    for method, thr, score_thr in settings[2:] if name == "thousands" or "fuzz" in name else settings:
        k, ks = kernel(b, s, i, method, 0.5, thr, score_thr)
        dk, ds = definition(b, s, i, method, 0.5, thr, score_thr)
        cand = torch.nonzero(s >= score_thr).squeeze(1)
        nk, ns = _by_decreasing_score(*_soft_nms_numba.greedy_soft_nms_numba(
            b, s, i, cand, method, 0.5, thr, score_thr))
        out[f"{name}/{method}/{thr}/{score_thr}"] = {
            "kept": k.numel(), "same_keep": torch.equal(k, dk) and torch.equal(k, nk),
            "rel_definition": rel(ks, ds), "rel_numba": rel(ks, ns)}
print(json.dumps(out))
'''


@pytest.fixture(scope="module")
def interpreted_results():
    return run_interpreted(_CHECK, timeout=300)


def test_kernel_matches_definition_and_numba_under_interpreter(interpreted_results):
    assert len(interpreted_results) == 6 * 3 + 1 + 7
    for case, r in interpreted_results.items():
        assert r["same_keep"], case
        assert r["rel_definition"] <= 1e-6, (case, r)
        assert r["rel_numba"] <= 1e-6, (case, r)
    assert interpreted_results["empty/gaussian/0.3/0.001"]["kept"] == 0
    assert interpreted_results["one/linear/0.5/0.0"]["kept"] == 1
    assert interpreted_results["thousands/gaussian/0.3/0.2"]["kept"] > 500


def test_unsupported_inputs_fall_back_to_pytorch():
    from harnet.layers import _soft_nms_triton as T

    assert not T.supports("hard", 10)
    assert not T.supports("gaussian", T.MAX_GROUP + 1)
    assert T.supports("linear", T.MAX_GROUP)


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["gaussian", "linear"])
def test_cuda_dispatch_matches_cpu(method):
    from harnet.layers import batched_soft_nms, _soft_nms_triton

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    assert _soft_nms_triton.available()
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(3000, 2, generator=g) * 300
    boxes = torch.cat([xy, xy + torch.rand(3000, 2, generator=g) * 60 + 1], 1)
    scores, idxs = torch.rand(3000, generator=g), torch.randint(0, 80, (3000,), generator=g)
    keep, s = batched_soft_nms(boxes, scores, idxs, method)
    keep_gpu, s_gpu = batched_soft_nms(boxes.cuda(), scores.cuda(), idxs.cuda(), method)
    assert torch.equal(keep_gpu.cpu(), keep)
    torch.testing.assert_close(s_gpu.cpu(), s, rtol=1e-6, atol=0)
