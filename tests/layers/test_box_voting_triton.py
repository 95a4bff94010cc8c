"""The Triton box-voting kernels against the definition and the PyTorch path, run on CPU
tensors through Triton's interpreter (``TRITON_INTERPRET=1``) in a subprocess, so the
variable does not reach other tests (triton reads it when a kernel is defined, at import).
Also: every Triton kernel of the package compiles for a CUDA GPU (sm_90) without one."""

import inspect
import re

import pytest
import torch

triton = pytest.importorskip("triton")

from triton_cases import run_interpreted  # noqa: E402

# Runs in the subprocess: every case through the kernels, the PyTorch path and the slow
# definition of test_box_voting.py; prints the largest relative differences per case.
_CHECK = r'''
import json, math, sys, torch
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/layers"]
from harnet.layers import VOTING_SCORINGS as RULES, batched_soft_nms
from harnet.layers.box_voting import _kernel_box_voting, batched_box_voting_scriptable
from test_box_voting import dense_scene, slow_box_voting
from test_fuzz_postprocess import KINDS
from triton_cases import EMPTY, ONE, fuzz, scene

def rel(a, b):
    if not b.numel():
        return 0.0
    floor = 1e-6 * float(b.abs().max()) + 1e-300  # coordinates near 0: relative to the set
    return float(((a.double() - b.double()).abs() / b.double().abs().clamp(min=floor)).max())

cases = {"empty": EMPTY, "one": ONE, "random": scene(24, 3, 0),
         "ties": scene(18, 2, 1, True), "80 categories": scene(60, 80, 2),
         "dense": dense_scene(60, 1, 3), "thousands": dense_scene(2000, 1, 4)}
cases.update({f"fuzz {kind}": fuzz(kind, i, 16) for i, kind in enumerate(KINDS)})
f32, f64 = torch.float32, torch.float64
# (threshold, dtype, rule): every rule in float32 at the default threshold, the thresholds'
# extremes in float64 (and every rule in float64 on the fuzz cases).
combos = [(0.6, f32, r) for r in RULES] + [(0.0, f64, "max"), (1.0, f64, "unclaimed_top4")]
out = {}
for name, (b, s, i) in cases.items():
    keep, ks = batched_soft_nms(b, s, i, "gaussian", 0.5)
    if name == "thousands":  # a few kept boxes, each with a window of thousands
        keep, ks = keep[:6], ks[:6]
    # Fuzz cases in float64 ("overflow" areas are inf in float32: the fuzz tests' own).
    for thr, dtype, scoring in [(0.6, f64, r) for r in RULES] if "fuzz" in name else combos:
        args = (b[keep].to(dtype), ks.to(dtype), i[keep], b.to(dtype), s.to(dtype), i, thr)
        kb, kscore = _kernel_box_voting(*args, scoring)
        pb, pscore = batched_box_voting_scriptable(*args, scoring)
        db, dscore = slow_box_voting(*(a.double() if a.is_floating_point() else a
                                       for a in args[:6]), thr, scoring)
        db = torch.tensor(db, dtype=f64).reshape(-1, 4)
        out[f"{name}/{thr}/{str(dtype)[6:]}/{scoring}"] = {
            "n": kb.shape[0], "dtype_kept": kb.dtype == dtype and kscore.dtype == dtype,
            "moved": int((kb != args[0]).any(1).sum()),
            "rel_torch": max(rel(kb, pb), rel(kscore, pscore)),
            "rel_definition": max(rel(kb, db), rel(kscore, torch.tensor(dscore, dtype=f64))),
        }
print(json.dumps(out))
'''


@pytest.fixture(scope="module")
def interpreted_results():
    return run_interpreted(_CHECK, timeout=600)


def test_kernels_match_torch_path_and_definition_under_interpreter(interpreted_results):
    assert len(interpreted_results) == 7 * 6 + 7 * 4
    for case, r in interpreted_results.items():
        assert r["dtype_kept"], (case, r)
        # float32 inputs: the PyTorch path sums in float32, the kernels in float64.
        tol = 1e-6 if "float32" in case else 1e-12
        assert r["rel_torch"] <= tol, (case, r)
        assert r["rel_definition"] <= tol, (case, r)
    assert interpreted_results["empty/0.6/float32/max"]["n"] == 0
    assert interpreted_results["one/0.6/float32/avg"]["n"] == 1
    assert interpreted_results["fuzz overflow/0.6/float64/avg"]["n"] == 16
    # The cases exercise voting: boxes move, except the kept box alone at threshold 1.
    assert interpreted_results["dense/0.6/float32/unclaimed_top4"]["moved"] > 0
    assert interpreted_results["thousands/0.0/float64/max"]["moved"] == 6


def test_eager_dispatch_uses_the_kernel_only_for_cuda(monkeypatch):
    import importlib

    from harnet.layers import _box_voting_triton

    bv = importlib.import_module("harnet.layers.box_voting")
    called = []
    monkeypatch.setattr(bv, "_kernel_box_voting", lambda *a: called.append(a) or a[:2])
    b = torch.tensor([[0.0, 0, 10, 10]])
    args = (b, torch.ones(1), torch.zeros(1, dtype=torch.int64)) * 2
    bv.box_voting_eager(*args, 0.6, "max")  # CPU tensors: the PyTorch path
    assert not called
    monkeypatch.setenv("HARNET_BOX_VOTING_TRITON", "0")
    assert not _box_voting_triton.available()
    monkeypatch.delenv("HARNET_BOX_VOTING_TRITON")
    assert _box_voting_triton.available()


# ---------------------------------------------------------------- compiles for a GPU
def _signature(fn, floats):
    """Triton signature of a kernel from its parameter names: ``*_ptr`` pointers (float
    data ``floats``, integer data int64 / int32), upper-case names constexpr."""
    ints = {"lo_ptr", "hi_ptr", "k_order_ptr", "c_order_ptr", "first_claim_ptr", "starts_ptr",
            "keep_ptr", "count_ptr"}  # fmt: skip
    sig = {}
    for name in inspect.signature(fn.fn).parameters:
        if name.isupper():
            sig[name] = "constexpr"
        elif name in ("has_ptr", "is_copy_ptr"):
            sig[name] = "*i32"
        elif name in ints:
            sig[name] = "*i64"
        elif name in ("out_ptr", "kept_score_ptr"):
            sig[name] = "*fp64"
        elif name.endswith("_ptr"):
            sig[name] = "*" + floats
        else:
            sig[name] = "i64" if name == "k" else "fp64"
    return sig


def _compile_cases():
    from harnet.layers import _box_voting_triton as V, _soft_nms_triton as S

    yield "soft-NMS", S._soft_nms_kernel, "fp64", {"METHOD": 0, "BLOCK": 1024}
    for floats in ("fp32", "fp64"):
        yield f"weighted vote {floats}", V._weighted_vote_kernel, floats, {"SCORING": 2, "BLOCK": 128}
        yield f"claim {floats}", V._claim_kernel, floats, {"BLOCK": 128}
        yield f"top-4 vote {floats}", V._top_vote_kernel, floats, {"TOP": 4, "BLOCK": 128}


@pytest.mark.parametrize("case", list(range(7)))
def test_kernels_compile_for_cuda_without_rounding_shortcuts(case):
    # What a GPU would run, built for sm_90 by Triton's own compiler (no GPU needed): the
    # kernels compile, and their float32 divisions round correctly (Triton's plain `/` is
    # approximate), with no FMA contraction in the voting kernels.
    pytest.importorskip("triton.backends.nvidia")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name, fn, floats, constexprs = list(_compile_cases())[case]
    source = ASTSource(fn=fn, signature=_signature(fn, floats), constexprs=constexprs)
    options = {"enable_fp_fusion": False, "num_warps": 4}
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    ptx = compiled.asm["ptx"]
    assert compiled.asm["cubin"], name
    assert not re.search(r"div\.(full|approx)", ptx), name
    if name != "soft-NMS":  # exp() in the soft-NMS kernel uses FMAs by itself
        assert "fma." not in ptx, name


@pytest.mark.cuda
@pytest.mark.parametrize("scoring", ["max", "avg", "unclaimed_top4"])
def test_cuda_dispatch_matches_cpu(scoring):
    from harnet.layers import _box_voting_triton, batched_box_voting, batched_soft_nms

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    assert _box_voting_triton.available()
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(3000, 2, generator=g) * 300
    boxes = torch.cat([xy, xy + torch.rand(3000, 2, generator=g) * 60 + 1], 1)
    scores, idxs = torch.rand(3000, generator=g), torch.randint(0, 80, (3000,), generator=g)
    keep, ks = batched_soft_nms(boxes, scores, idxs, "gaussian")
    args = (boxes[keep], ks, idxs[keep], boxes, scores, idxs, 0.6, scoring)
    cpu = batched_box_voting(*args)
    gpu = batched_box_voting(*(a.cuda() if isinstance(a, torch.Tensor) else a for a in args))
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(gpu[1].cpu(), cpu[1], rtol=1e-6, atol=0)
