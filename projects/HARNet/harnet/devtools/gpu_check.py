#!/usr/bin/env python
"""GPU readiness check of HARNet: one command, one JSON and one markdown table.

On one GPU (default; at most about 8 minutes) it runs, in this order:

1. ``cuda_tests``: the test functions that skip without CUDA (found by their
   ``skipif(not torch.cuda.is_available() ...)`` marker in ``tests/``), in a pytest subprocess.
2. ``equivalence``: the same inputs through the CPU and the GPU (TF32 off while comparing):
   each attention module (SpatialAttention, CrossLevelGroupNorm, CrossLevelSE,
   AlignedAttention; forward and backward), soft-NMS (every method), box voting (every
   rule), ``suppress_detections`` (the GPU side with non-contiguous inputs) and the TTA
   wrapper; each module also under autocast (fp16, and bf16 where the GPU has it).
3. ``training``: HAR-Net R-50 (random weights, random 800x1333 images, batch 2) for 20
   iterations in fp32 (Detectron2's ``SimpleTrainer``), fp16 (Detectron2's ``AMPTrainer``,
   i.e. ``SOLVER.AMP.ENABLED``) and bf16 (upstream Detectron2's ``AMPTrainer(precision=
   torch.bfloat16)``; Detectron2 0.6's ``AMPTrainer`` is fp16-only, so there the same
   ``SimpleTrainer`` step runs with the model's forward under ``torch.autocast(bfloat16)``),
   all from the same weights on the same batches: losses finite, AMP losses close to fp32's.
4. ``benchmark``: HAR-Net R-50 against Detectron2's RetinaNet R-50 (the all-off config) in
   the same process: training s/iter at batch 2 and 8, inference latency at batch 1 (network
   alone and end to end), peak memory (one fresh process per model:
   ``torch.cuda.max_memory_allocated``), with ratios.
5. ``postprocess``: ``batched_nms`` (baseline), soft-NMS, box voting and
   ``suppress_detections`` on a COCO-like and a dense single-class candidate set (the
   generators of ``dev/benchmark_postprocess.py``); soft-NMS + voting through the Triton
   kernels and through the PyTorch fallback (``HARNET_SOFT_NMS_TRITON=0``,
   ``HARNET_BOX_VOTING_TRITON=0``), with the kernels' targets as ratios.

``--cpu --quick`` runs the same steps on the CPU at tiny sizes (ResNet-18 with a 32-channel
FPN, 64x96 images, batches 2 and 4, 4 training iterations) in a few minutes;
tests/test_gpu_check.py runs it. What the CPU mode compares, where there is no GPU:

- modules: CPU float32 against a CPU float64 reference (and CPU bf16 autocast vs float32);
- soft-NMS / suppress_detections: the PyTorch loop that the GPU runs (numba disabled) on
  non-contiguous inputs, against the default CPU path (numba) on contiguous ones;
- box voting: float32 non-contiguous inputs against a float64 reference;
- TTA: single-scale TTA equals the plain model's inference; double-scale + flip TTA gives
  finite float32 boxes inside the image;
- training: no ``AMPTrainer`` (it asserts CUDA): fp16 and bf16 run the ``SimpleTrainer``
  step with the forward under CPU autocast;
- timings and memory (peak RSS) are of tiny models: the ratios are not the GPU targets'.

Targets reported (GPU only): HAR-Net / RetinaNet training time <= 1.35 (FLOPs ratio 1.30),
inference time <= 1.30, Gaussian soft-NMS on the COCO-like set <= 1 ms.

harnet.devtools.benchmark (model building, random inputs, timed steps) and
harnet.devtools.benchmark_postprocess (candidate generators) are imported as modules.

Examples:
    python dev/gpu_check.py --out gpu_check_out
    python dev/gpu_check.py --cpu --quick --out /tmp/gpu_check
"""

import argparse
import contextlib
import copy
import importlib
import inspect
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from unittest import mock

import torch
from tqdm import tqdm

from harnet.devtools import REPO

SECTIONS = ("environment", "cuda_tests", "equivalence", "training", "benchmark", "postprocess")

# Tiny model for --quick: the shrink of tests/harnet_model_utils.make_tiny, as overrides.
QUICK_OPTS = [
    "MODEL.RESNETS.DEPTH",
    "18",
    "MODEL.RESNETS.RES2_OUT_CHANNELS",
    "64",
    "MODEL.FPN.OUT_CHANNELS",
    "32",
    "MODEL.HARNET.ALIGN.MID_CHANNELS",
    "[32]",
    "MODEL.HARNET.ALIGN.NORM_GROUPS",
    "8",
    "MODEL.HARNET.CLGN.NUM_GROUPS",
    "8",
    "MODEL.HARNET.SPATIAL.CHANNELS",
    "8",
    "MODEL.HARNET.CHANNEL.HIDDEN",
    "8",
]
HARNET_CFG, RETINANET_CFG = "har_R_50_FPN_1x.yaml", "har_R_50_FPN_1x_baseline.yaml"
TARGETS = {
    "train_ratio": 1.35,
    "infer_ratio": 1.30,
    "gaussian_coco_ms": 1.0,
    # Soft-NMS + box voting on the GPU (Triton kernels): ms against batched_nms on COCO-like
    # candidates (at most), speed-up over the PyTorch fallback on dense ones (at least).
    "kernels_vs_nms": 3.0,
    "kernels_vs_fallback": 10.0,
}

# Tolerances (relative: max |subject - reference| / max |reference|).
TOL_FWD, TOL_GRAD = 1e-4, 1e-3  # float32 vs float32 (other device) or float64
TOL_AUTOCAST = {torch.float16: 1e-2, torch.bfloat16: 5e-2}  # module output vs float32
TOL_SCORE, TOL_BOX = 1e-5, 1e-3  # post-processing: absolute, scores and pixels
# Training: total loss of AMP vs fp32, relative, at iteration 0 / averaged over iterations.
TOL_LOSS = {"fp16": (0.02, 0.05), "bf16": (0.05, 0.10)}


class Sizes:
    """Problem sizes of a run (full: the issue's; quick: tiny, for the CPU test)."""

    def __init__(self, quick):
        self.quick = quick
        self.image = (64, 96) if quick else (800, 1333)
        self.train_batches = (2, 4) if quick else (2, 8)
        self.train_iters = 3 if quick else 20
        self.bench_iters = 2 if quick else 10
        self.infer_iters = 3 if quick else 20
        self.warmup = 1 if quick else 2
        self.opts = list(QUICK_OPTS) if quick else []
        # Attention modules: channels, levels (P3 first), aligned attention in/mid/size.
        self.channels = 32 if quick else 256
        self.levels = (
            [(8, 12), (4, 6), (2, 3), (1, 2), (1, 1)]
            if quick
            else [(100, 168), (50, 84), (25, 42), (13, 21), (7, 11)]
        )
        self.groups = 8 if quick else 32
        self.aligned = (64, 32, (8, 12)) if quick else (1024, 256, (50, 84))
        self.coco_candidates = 300 if quick else 1000
        self.dense_candidates = (300,) if quick else (1000, 4000)
        self.pp_repeats = 3 if quick else 20
        self.tta_sizes = (64, 80) if quick else (800, 1000)


# ------------------------------------------------------------------------------ helpers
def devtool(name):
    """The module ``harnet.devtools.<name>`` (the code of ``dev/<name>.py``)."""
    return importlib.import_module(f"harnet.devtools.{name}")


def log(msg):
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cpu_seconds():
    """CPU time of this process and its finished children (user + system), in seconds."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN
    )
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def rel_err(subject, reference):
    """max |subject - reference| / max |reference| (float64, on the CPU)."""
    s, r = subject.detach().double().cpu(), reference.detach().double().cpu()
    if r.numel() == 0:
        return 0.0 if s.numel() == 0 else math.inf
    if s.shape != r.shape:
        return math.inf
    return float((s - r).abs().max() / r.abs().max().clamp(min=1e-12))


def row(check, value, limit, ok, **extra):
    """One result row: ``value`` compared with ``limit`` (a tolerance or a target)."""
    return dict(check=check, value=value, limit=limit, ok=bool(ok), **extra)


@contextlib.contextmanager
def no_tf32():
    """TF32 off (exact float32 convolutions / matmuls on Ampere+) while comparing devices."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def non_contiguous(t):
    """The same values in a non-contiguous layout (a strided view of a larger tensor)."""
    wide = torch.stack([t, torch.zeros_like(t)], dim=-1)
    out = wide[..., 0]
    assert not out.is_contiguous() or t.numel() <= 1
    return out


def match_detections(ref, sub, box_tol, score_tol):
    """Fraction of detections matched one to one (same class, every box coordinate within
    ``box_tol`` px, score within ``score_tol``) between two (boxes, scores, classes) sets, of
    the larger set; 1.0 when both are empty. Greedy over the reference in score order."""
    rb, rs, rc = (t.detach().cpu().double() for t in ref)
    sb, ss, sc = (t.detach().cpu().double() for t in sub)
    n = max(len(rs), len(ss))
    if n == 0:
        return 1.0
    if len(rs) == 0 or len(ss) == 0:
        return 0.0
    close = (rb[:, None, :] - sb[None, :, :]).abs().amax(dim=2) <= box_tol
    close &= (rs[:, None] - ss[None, :]).abs() <= score_tol
    close &= rc[:, None] == sc[None, :]
    taken, matched = set(), 0
    for i in range(len(rs)):
        for j in torch.nonzero(close[i]).flatten().tolist():
            if j not in taken:
                taken.add(j)
                matched += 1
                break
    return matched / n


def amp_trainer_has_precision():
    """Whether Detectron2's AMPTrainer takes ``precision`` (upstream: yes; 0.6: fp16 only)."""
    from detectron2.engine.train_loop import AMPTrainer

    return "precision" in inspect.signature(AMPTrainer.__init__).parameters


# ------------------------------------------------------------------------- sections
def section_environment(args, sizes):
    import detectron2
    import torchvision

    env = dict(
        mode=(
            "cpu" + (" quick" if sizes.quick else "")
            if args.cpu
            else "gpu" + (" quick" if sizes.quick else "")
        ),
        device=args.device,
        device_name=(
            torch.cuda.get_device_name()
            if args.device == "cuda"
            else f"CPU ({platform.machine()}), {torch.get_num_threads()} threads"
        ),
        torch=torch.__version__,
        torchvision=torchvision.__version__,
        detectron2=detectron2.__version__,
        python=platform.python_version(),
        image=list(sizes.image),
    )
    if args.device == "cuda":
        env["capability"] = list(torch.cuda.get_device_capability())
        env["bf16_supported"] = bool(torch.cuda.is_bf16_supported())
        env["tf32_default"] = dict(
            matmul=torch.backends.cuda.matmul.allow_tf32, cudnn=torch.backends.cudnn.allow_tf32
        )
    env["amp_trainer_precision_arg"] = amp_trainer_has_precision()
    return dict(info=env, rows=[])


CUDA_SKIP = re.compile(r"pytest\.mark\.(cuda\b|skipif\(\s*not\s+torch\.cuda\.is_available\(\))")
CUDA_ALIAS = re.compile(r"^(\w+)\s*=\s*" + CUDA_SKIP.pattern)


def find_cuda_tests(tests_dir):
    """Node ids ``tests/<path>::<function>`` of the tests that need CUDA, in ``tests_dir``
    and its subfolders: a ``@pytest.mark.cuda`` (or ``skipif(not
    torch.cuda.is_available() ...)``) decorator, a decorator named after a module-level
    alias of that marker, or a module-level ``pytestmark`` of it."""
    ids = []
    files = sorted(
        os.path.relpath(os.path.join(d, f), tests_dir)
        for d, _, names in os.walk(tests_dir)
        for f in names
        if f.startswith("test_") and f.endswith(".py")
    )
    files = sorted(files, key=lambda f: (f.count(os.sep), f))  # top level first
    for name in files:
        with open(os.path.join(tests_dir, name)) as f:
            lines = f.read().splitlines()
        aliases = {m.group(1) for m in map(CUDA_ALIAS.match, lines) if m}
        tests = [m.group(1) for m in (re.match(r"def\s+(test_\w+)", ln) for ln in lines) if m]
        if "pytestmark" in aliases:
            ids += [f"tests/{name}::{t}" for t in tests]
            continue
        for i, line in enumerate(lines):
            deco = line.strip()
            if not (deco.startswith("@") and (CUDA_SKIP.search(deco) or deco[1:] in aliases)):
                continue
            for nxt in lines[i + 1 :]:
                m = re.match(r"\s*def\s+(test_\w+)", nxt)
                if m:
                    ids.append(f"tests/{name}::{m.group(1)}")
                    break
                if not nxt.lstrip().startswith("@"):
                    break
    return sorted(set(ids), key=ids.index)


def start_cuda_tests(args):
    """Start pytest on the CUDA-only tests; returns (node ids, Popen or None)."""
    ids = find_cuda_tests(os.path.join(REPO, "tests"))
    if not ids:
        return ids, None
    xml = os.path.join(args.out, "cuda_tests.xml")
    if os.path.exists(xml):
        os.remove(xml)
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        f"--junitxml={xml}",
        *ids,
    ]
    log(f"pytest on {len(ids)} CUDA-only tests")
    with open(os.path.join(args.out, "cuda_tests.log"), "w") as f:
        return ids, subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)


def section_cuda_tests(args, sizes):
    ids, proc = getattr(args, "cuda_tests_started", None) or start_cuda_tests(args)
    if proc is None:
        return dict(info=dict(tests=[]), rows=[row("CUDA-only tests found", 0, ">= 1", False)])
    try:
        proc.wait(timeout=args.pytest_timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    xml = os.path.join(args.out, "cuda_tests.xml")
    with open(os.path.join(args.out, "cuda_tests.log")) as f:
        output = f.read()
    outcomes = {}
    if os.path.exists(xml):
        for case in ET.parse(xml).getroot().iter("testcase"):
            name = f"{case.get('classname')}::{case.get('name')}"
            kind = "passed"
            for child in case:
                if child.tag in ("failure", "error", "skipped"):
                    kind = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
            outcomes[name] = kind
    counts = {
        k: sum(v == k for v in outcomes.values()) for k in ("passed", "failed", "error", "skipped")
    }
    expect_run = args.device == "cuda"
    ok = (
        proc.returncode == 0
        and counts["failed"] == counts["error"] == 0
        and (counts["skipped"] == 0 if expect_run else counts["passed"] == 0)
    )
    summary = ", ".join(f"{v} {k}" for k, v in counts.items() if v)
    limit = "all pass" if expect_run else "all skip (no CUDA)"
    info = dict(
        tests=ids, outcomes=outcomes, returncode=proc.returncode, output_tail=output[-3000:]
    )
    return dict(
        info=info, rows=[row(f"pytest, {len(outcomes)} CUDA-only test cases", summary, limit, ok)]
    )


# ---- equivalence
def _module_cases(sizes):
    from harnet.modeling import (
        AlignedAttention,
        CrossLevelGroupNorm,
        CrossLevelSE,
        SpatialAttention,
    )

    c, g = sizes.channels, sizes.groups
    levels = lambda: [torch.randn(2, c, h, w) for h, w in sizes.levels]  # noqa: E731

    def aligned():
        cin, mid, (h, w) = sizes.aligned
        m = AlignedAttention(cin, mid, deform_groups=4, norm_groups=g)
        # Fractional, non-zero offsets (the zero init samples the regular grid) and a full
        # residual branch, so that the deformable sampling is what gets compared.
        torch.nn.init.normal_(m.conv2_offset.weight, std=0.05)
        torch.nn.init.constant_(m.norm3.weight, 1.0)
        return m, [torch.randn(2, cin, h, w)]

    return {
        "SpatialAttention": lambda: (
            SpatialAttention(c, 8 if sizes.quick else 16, (1, 2, 5, 2), 4),
            [torch.randn(2, c, *sizes.levels[0])],
        ),
        "CrossLevelGroupNorm": lambda: (CrossLevelGroupNorm(g, c), [levels()]),
        "CrossLevelSE": lambda: (
            CrossLevelSE(c, len(sizes.levels), 8 if sizes.quick else 32),
            [levels()],
        ),
        "AlignedAttention": aligned,
    }


def _to(x, device, dtype):
    if isinstance(x, (list, tuple)):
        return [_to(t, device, dtype) for t in x]
    return x.detach().to(device=device, dtype=dtype).requires_grad_(True)


def _leaves(x):
    return [t for t in x for t in _leaves(t)] if isinstance(x, (list, tuple)) else [x]


def _run_module(module, inputs, device, dtype, autocast_dtype=None):
    """Forward + backward of ``sum(out * r)`` (r fixed); returns outputs and gradients."""
    module = copy.deepcopy(module).to(device=device, dtype=dtype)
    inputs = _to(inputs, device, dtype)
    ctx = (
        torch.autocast(torch.device(device).type, dtype=autocast_dtype)
        if autocast_dtype
        else contextlib.nullcontext()
    )
    with ctx:
        out = module(*inputs)
    outs = _leaves(out)
    g = torch.Generator().manual_seed(1)
    loss = sum((o.float() * torch.randn(o.shape, generator=g).to(o.device)).sum() for o in outs)
    loss.backward()
    grads = [t.grad for t in _leaves(inputs)] + [p.grad for p in module.parameters()]
    return outs, grads


def _equiv_modules(args, sizes):
    rows = []
    if args.device == "cuda":
        ref_dev, ref_dt, sub_dev, label = "cpu", torch.float32, "cuda", "CUDA fp32 vs CPU fp32"
        autocast = [torch.float16] + ([torch.bfloat16] if torch.cuda.is_bf16_supported() else [])
    else:
        ref_dev, ref_dt, sub_dev, label = "cpu", torch.float64, "cpu", "CPU fp32 vs CPU fp64"
        autocast = [torch.bfloat16]
    for name, make in _module_cases(sizes).items():
        torch.manual_seed(0)
        module, inputs = make()
        with no_tf32():
            r_out, r_grad = _run_module(module, inputs, ref_dev, ref_dt)
            s_out, s_grad = _run_module(module, inputs, sub_dev, torch.float32)
        fwd = max(rel_err(s, r) for s, r in zip(s_out, r_out))
        grad = max(rel_err(s, r) for s, r in zip(s_grad, r_grad) if r is not None)
        rows.append(row(f"{name} forward, {label}", fwd, TOL_FWD, fwd <= TOL_FWD))
        rows.append(
            row(
                f"{name} backward (input and weight grads), {label}",
                grad,
                TOL_GRAD,
                grad <= TOL_GRAD,
            )
        )
        for dt in autocast:
            a_out, a_grad = _run_module(module, inputs, sub_dev, torch.float32, autocast_dtype=dt)
            err = max(rel_err(a, s) for a, s in zip(a_out, s_out))
            finite = all(bool(torch.isfinite(t).all()) for t in a_grad if t is not None)
            dtypes = sorted({str(o.dtype).replace("torch.", "") for o in a_out})
            tol = TOL_AUTOCAST[dt]
            rows.append(
                row(
                    f"{name} under {sub_dev} autocast {str(dt)[6:]} vs fp32 (out dtype "
                    f"{'/'.join(dtypes)}; grads finite: {finite})",
                    err,
                    tol,
                    err <= tol and finite,
                )
            )
    return rows


def _candidate_sets(sizes):
    bp = devtool("benchmark_postprocess")
    sets = {
        f"COCO-like ({sizes.coco_candidates}, 80 cls)": bp.synthetic_candidates(
            sizes.coco_candidates
        )
    }
    for n in sizes.dense_candidates:
        sets[f"dense ({n}, 1 cls)"] = bp.dense_scene_candidates(n)
    return sets


@contextlib.contextmanager
def _torch_soft_nms_loop():
    """Soft-NMS's PyTorch loop (what a GPU runs) on the CPU too: numba disabled."""
    module = importlib.import_module("harnet.layers.soft_nms")
    numba = getattr(module, "_soft_nms_numba", None)
    if numba is None or not hasattr(numba, "available"):
        yield False
        return
    with mock.patch.object(numba, "available", lambda: False):
        yield True


def _subject_side(args):
    """(device, context, label) of the post-processing subject run."""
    if args.device == "cuda":
        return "cuda", contextlib.nullcontext(), "CUDA non-contiguous vs CPU"
    return "cpu", _torch_soft_nms_loop(), "CPU PyTorch loop non-contiguous vs CPU default"


def _equiv_postprocess(args, sizes):
    from harnet.layers import (
        SOFT_NMS_METHODS,
        VOTING_SCORINGS,
        batched_box_voting,
        batched_soft_nms,
    )
    from harnet.layers import suppress_detections

    bp = devtool("benchmark_postprocess")
    rows = []
    dev, _, label = _subject_side(args)
    for set_name, (b, s, c) in _candidate_sets(sizes).items():
        nb, ns, nc = (non_contiguous(t.to(dev)) for t in (b, s, c))
        for method in SOFT_NMS_METHODS:
            rk, rs = batched_soft_nms(b, s, c, method)
            with _subject_side(args)[1]:
                sk, ss = batched_soft_nms(nb, ns, nc, method)
            ref, sub = dict(zip(rk.tolist(), rs.tolist())), dict(
                zip(sk.cpu().tolist(), ss.cpu().tolist())
            )
            # The same boxes kept with the same scores; the order is informative (scores
            # within rounding of each other may swap).
            same_set = set(ref) == set(sub)
            diff = max((abs(sub[i] - ref[i]) for i in ref), default=0.0) if same_set else math.inf
            in_order = sk.cpu().tolist() == rk.tolist()
            rows.append(
                row(
                    f"soft-NMS {method}, {set_name}: {label} (same kept boxes: {same_set}, "
                    f"same order: {in_order}, {len(rk)} kept), max |score diff|",
                    diff,
                    TOL_SCORE,
                    same_set and diff <= TOL_SCORE,
                )
            )
        k, ks = batched_soft_nms(b, s, c, "gaussian")
        for scoring in VOTING_SCORINGS:
            vb, vs = batched_box_voting(b[k], ks, c[k], b, s, c, 0.6, scoring)
            # Subject: float32, non-contiguous, on the device. Reference: CPU float32 (GPU
            # mode) or CPU float64 (CPU mode: the same code, so compare with more precision).
            sub = batched_box_voting(
                non_contiguous(b[k].to(dev)), ks.to(dev), c[k].to(dev), nb, ns, nc, 0.6, scoring
            )
            if args.device == "cuda":
                vlabel = "CUDA non-contiguous vs CPU"
            else:
                d = torch.float64
                vb, vs = batched_box_voting(
                    b[k].to(d), ks.to(d), c[k], b.to(d), s.to(d), c, 0.6, scoring
                )
                vlabel = "CPU fp32 non-contiguous vs CPU fp64"
            bdiff = (
                float((sub[0].double().cpu() - vb.double().cpu()).abs().max()) if len(vb) else 0.0
            )
            sdiff = (
                float((sub[1].double().cpu() - vs.double().cpu()).abs().max()) if len(vs) else 0.0
            )
            rows.append(
                row(
                    f"box voting {scoring}, {set_name}: {vlabel}, max |box diff| px "
                    f"(|score diff| {sdiff:.1e} <= {TOL_SCORE})",
                    bdiff,
                    TOL_BOX,
                    bdiff <= TOL_BOX and sdiff <= TOL_SCORE,
                )
            )
        settings = {
            "hard NMS": dict(nms_type="hard"),
            "authors (gaussian + caffe voting)": dict(bp.AUTHORS),
            "linear + max voting": dict(nms_type="linear", voting=True, voting_scoring="max"),
        }
        for sname, params in settings.items():
            ref = suppress_detections(b, s, c, **params)
            with _subject_side(args)[1]:
                sub = suppress_detections(nb, ns, nc, **params)
            frac = match_detections(ref, sub, TOL_BOX, TOL_SCORE)
            on_dev = all(t.device.type == dev for t in sub)
            rows.append(
                row(
                    f"suppress_detections {sname}, {set_name}: {label} ({len(ref[1])} kept; "
                    f"outputs on {dev}: {on_dev}), matched fraction",
                    frac,
                    1.0,
                    frac >= 1.0 and on_dev,
                )
            )
    return rows


def _tta_model(args, sizes, device):
    bench = devtool("benchmark")
    opts = sizes.opts + [
        "MODEL.RETINANET.SCORE_THRESH_TEST",
        "0.0",
        "MODEL.RETINANET.TOPK_CANDIDATES_TEST",
        "300",
        "MODEL.HARNET.POSTPROCESS.NMS_TYPE",
        "gaussian",
        "MODEL.HARNET.POSTPROCESS.VOTING.ENABLED",
        "True",
        "MODEL.HARNET.POSTPROCESS.VOTING.SCORING",
        "caffe",
        "INPUT.MIN_SIZE_TEST",
        str(sizes.tta_sizes[0]),
        "INPUT.MAX_SIZE_TEST",
        str(int(sizes.tta_sizes[1] * 5 / 3)),
    ]
    torch.manual_seed(0)
    cfg, model = bench.build_model_from(HARNET_CFG, opts, device)
    # Spread the random model's scores (the prior bias puts them all near 0.01).
    with torch.no_grad():
        for layer in (model.head.cls_score, getattr(model.head, "channel_cls_score", None)):
            if layer is not None:
                layer.weight.normal_(std=0.05)
                layer.bias.fill_(-1.0)
    return cfg, model.eval()


def _tta(cfg, model, sizes, min_sizes, flip):
    import harnet

    tcfg = cfg.clone()
    tcfg.defrost()
    tcfg.TEST.AUG.MIN_SIZES, tcfg.TEST.AUG.FLIP = tuple(min_sizes), flip
    tcfg.TEST.AUG.MAX_SIZE = int(math.ceil(max(min_sizes) * 5 / 3))
    return harnet.HARRetinaNetWithTTA(tcfg, model)


def _equiv_tta(args, sizes):
    rows = []
    h, w = sizes.image
    g = torch.Generator().manual_seed(3)
    image = (torch.rand(3, h, w, generator=g) * 255).to(torch.uint8)
    inputs = [{"image": image, "height": h, "width": w}]

    def dets(out):
        i = out[0]["instances"]
        return i.pred_boxes.tensor, i.scores, i.pred_classes

    cfg, model = _tta_model(args, sizes, args.device)
    # Images stay on the host, as a data loader gives them (DatasetMapperTTA resizes numpy
    # arrays); the model copies them to its device.
    with torch.no_grad(), no_tf32():
        plain = dets(model(copy.deepcopy(inputs)))
        single = dets(_tta(cfg, model, sizes, sizes.tta_sizes[:1], False)(copy.deepcopy(inputs)))
        double = dets(_tta(cfg, model, sizes, sizes.tta_sizes, True)(copy.deepcopy(inputs)))
    frac = match_detections(plain, single, 0.0, 0.0)
    rows.append(
        row(
            f"TTA single-scale, no flip == plain inference on {args.device} ({len(plain[1])} "
            "detections), matched fraction (exact)",
            frac,
            1.0,
            frac >= 1.0,
        )
    )
    b, s, c = double
    inside = bool(((b[:, 0] >= 0) & (b[:, 1] >= 0) & (b[:, 2] <= w) & (b[:, 3] <= h)).all())
    ok = (
        b.dtype == torch.float32
        and b.device.type == args.device
        and len(s) > 0
        and bool(torch.isfinite(b).all() and torch.isfinite(s).all())
        and inside
    )
    rows.append(
        row(
            f"TTA double-scale + flip on {args.device}: {len(s)} detections, boxes "
            f"{str(b.dtype)[6:]} on {b.device.type}, finite, inside the image",
            ok,
            True,
            ok,
        )
    )
    if args.device == "cuda":
        cpu_model = copy.deepcopy(model).to("cpu")
        with torch.no_grad():
            ref = dets(_tta(cfg, cpu_model, sizes, sizes.tta_sizes, True)(copy.deepcopy(inputs)))
        # Network outputs differ by float32 rounding between devices; near-tied scores of a
        # random model can then swap a few detections in and out of the top k.
        frac = match_detections(ref, double, 0.01, 1e-4)
        rows.append(
            row(
                f"TTA double-scale + flip, CUDA vs CPU ({len(ref[1])} detections; box "
                "0.01 px, score 1e-4), matched fraction",
                frac,
                0.95,
                frac >= 0.95,
            )
        )
    return rows


def section_equivalence(args, sizes):
    rows = []
    for name, fn in (
        ("attention modules", _equiv_modules),
        ("post-processing", _equiv_postprocess),
        ("TTA", _equiv_tta),
    ):
        log(f"equivalence: {name}")
        rows += fn(args, sizes)
    return dict(
        info=dict(
            tolerances=dict(
                forward=TOL_FWD,
                backward=TOL_GRAD,
                score=TOL_SCORE,
                box_px=TOL_BOX,
                autocast={str(k)[6:]: v for k, v in TOL_AUTOCAST.items()},
            )
        ),
        rows=rows,
    )


# ---- training precision
class _AutocastForward(torch.nn.Module):
    """The model's forward under ``torch.autocast(device, dtype)`` (for a trainer that has no
    precision argument: Detectron2 0.6's AMPTrainer, or any trainer on the CPU)."""

    def __init__(self, model, dtype):
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, *args, **kwargs):
        with torch.autocast(self.model.device.type, dtype=self.dtype):
            return self.model(*args, **kwargs)


class _LossRecorder:
    """Forward hook keeping every training forward's loss terms (on the device: no sync)."""

    def __init__(self):
        self.losses = []

    def __call__(self, module, inputs, output):
        if module.training and isinstance(output, dict):
            self.losses.append({k: v.detach().float() for k, v in output.items()})


def _cycle(batches):
    while True:
        for b in batches:
            yield b


def _train(args, sizes, precision, state, batches):
    """``sizes.train_iters`` iterations from ``state``; returns (losses per iteration, s/iter,
    how it was run)."""
    from harnet.engine.faults import GuardedAMPTrainer, GuardedSimpleTrainer
    from harnet.solver import build_optimizer

    bench = devtool("benchmark")
    torch.manual_seed(0)
    cfg, model = bench.build_model_from(
        HARNET_CFG, sizes.opts + ["SOLVER.BASE_LR", "0.001"], args.device
    )
    model.load_state_dict(state)
    model.train()
    optimizer = build_optimizer(cfg, model)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    cuda = args.device == "cuda"
    if dtype is None:
        how, trainer = "SimpleTrainer", GuardedSimpleTrainer(model, _cycle(batches), optimizer)
    elif cuda and (dtype == torch.float16 or amp_trainer_has_precision()):
        kwargs = {} if dtype == torch.float16 else {"precision": dtype}
        how = "AMPTrainer" + ("" if dtype == torch.float16 else "(precision=torch.bfloat16)")
        trainer = GuardedAMPTrainer(model, _cycle(batches), optimizer, **kwargs)
    else:
        how = f"SimpleTrainer, forward under torch.autocast({args.device}, {str(dtype)[6:]})"
        trainer = GuardedSimpleTrainer(_AutocastForward(model, dtype), _cycle(batches), optimizer)
    recorder = _LossRecorder()
    model.register_forward_hook(recorder)
    sync(args.device)
    start = time.perf_counter()
    trainer.train(0, sizes.train_iters)
    sync(args.device)
    per_iter = (time.perf_counter() - start) / sizes.train_iters
    losses = [{k: float(v) for k, v in d.items()} for d in recorder.losses]
    return losses, per_iter, how


def section_training(args, sizes):
    import logging

    from detectron2.utils.logger import setup_logger

    setup_logger(name="detectron2", abbrev_name="d2").setLevel(logging.WARNING)
    bench = devtool("benchmark")
    torch.manual_seed(0)
    _, model = bench.build_model_from(HARNET_CFG, sizes.opts, "cpu")
    state = copy.deepcopy(model.state_dict())
    del model
    batches = [
        bench.make_inputs(sizes.image, sizes.train_batches[0], args.device, seed=10 + i)
        for i in range(min(sizes.train_iters, 4))
    ]
    precisions = ["fp32", "fp16"]
    if args.device == "cpu" or torch.cuda.is_bf16_supported():
        precisions.append("bf16")
    runs, rows = {}, []
    for p in precisions:
        log(f"training {sizes.train_iters} iterations, {p}")
        try:
            losses, per_iter, how = _train(args, sizes, p, state, batches)
        except Exception as e:  # e.g. FloatingPointError: the other precisions still run
            rows.append(
                row(f"training {p}: {type(e).__name__}: {str(e)[:300]}", False, True, False)
            )
            runs[p] = dict(error=traceback.format_exc(), total=[])
            continue
        totals = [sum(d.values()) for d in losses]
        finite = len(totals) == sizes.train_iters and all(math.isfinite(t) for t in totals)
        runs[p] = dict(losses=losses, total=totals, s_per_iter=per_iter, trainer=how)
        rows.append(
            row(
                f"training {p} ({how}): {len(totals)} iterations, losses finite "
                f"({per_iter:.3f} s/iter)",
                finite,
                True,
                finite,
            )
        )
    base = runs["fp32"]["total"]
    for p in precisions[1:]:
        tot = runs[p]["total"]
        if not (base and tot and len(tot) == len(base)):
            continue
        first = abs(tot[0] - base[0]) / abs(base[0])
        mean = abs(statistics.mean(tot) - statistics.mean(base)) / abs(statistics.mean(base))
        tol0, tolm = TOL_LOSS[p]
        rows.append(
            row(
                f"training {p} vs fp32: total loss at iteration 0, relative difference",
                first,
                tol0,
                first <= tol0,
            )
        )
        rows.append(
            row(
                f"training {p} vs fp32: mean total loss over {len(tot)} iterations, relative "
                "difference",
                mean,
                tolm,
                mean <= tolm,
            )
        )
    info = dict(
        runs=runs,
        batch=sizes.train_batches[0],
        iterations=sizes.train_iters,
        base_lr=0.001,
        tolerances={k: dict(iteration0=v[0], mean=v[1]) for k, v in TOL_LOSS.items()},
    )
    return dict(info=info, rows=rows)


# ---- benchmark against RetinaNet
def memory_worker(spec):
    """Fresh process: peak memory (MiB) of inference at batch 1 and of training at each
    batch size, for one config. GPU: ``max_memory_allocated`` (weights, gradients,
    optimizer state, activations); CPU: peak RSS minus the RSS before the model was built."""
    import harnet  # noqa: F401

    bench = devtool("benchmark")
    args = argparse.Namespace(
        size=tuple(spec["size"]),
        train_batch=spec["batches"][0],
        device=spec["device"],
        clock="wall",
    )
    cuda = args.device == "cuda"
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    bench._reset_peak_rss()
    before = bench._proc_status_mib("VmRSS")

    def reset():
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        bench._reset_peak_rss()

    def peak():
        sync(args.device)
        return (
            torch.cuda.max_memory_allocated() / 2**20
            if cuda
            else bench._proc_status_mib("VmHWM") - before
        )

    runner = bench.Runner(spec["label"], spec["config"], spec["opts"], args)
    out = {}
    reset()
    runner.infer()
    out["infer_b1"] = peak()
    for batch in spec["batches"]:
        runner.train_inputs = bench.make_inputs(args.size, batch, args.device, seed=2)
        reset()
        for _ in range(2):  # the optimizer's state appears at the first step
            runner.train_step()
        out[f"train_b{batch}"] = peak()
    print("GPU_CHECK_MEMORY " + json.dumps(out), flush=True)


def _measure_memory(args, sizes, configs):
    """{label: peaks} of ``memory_worker`` for each (label, config), the processes in
    parallel (each measures only itself)."""
    procs = {}
    for label, config in configs.items():
        spec = dict(
            label=label,
            config=config,
            opts=sizes.opts,
            size=list(sizes.image),
            batches=list(sizes.train_batches),
            device=args.device,
            threads=args.threads,
        )
        cmd = [sys.executable, "-m", "harnet.devtools.gpu_check", "--memory-worker", json.dumps(spec)]
        procs[label] = subprocess.Popen(
            cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    out = {}
    for label, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        for line in stdout.splitlines():
            if line.startswith("GPU_CHECK_MEMORY "):
                out[label] = json.loads(line[len("GPU_CHECK_MEMORY ") :])
        if label not in out:
            raise RuntimeError(f"memory worker for {label} failed:\n{stderr[-3000:]}")
    return out


def section_benchmark(args, sizes):
    bench = devtool("benchmark")
    bargs = argparse.Namespace(
        size=sizes.image, train_batch=sizes.train_batches[0], device=args.device, clock="wall"
    )
    labels = {"RetinaNet": RETINANET_CFG, "HAR-Net": HARNET_CFG}
    runners = {k: bench.Runner(k, path, sizes.opts, bargs) for k, path in labels.items()}
    res = {k: {} for k in labels}
    for r in runners.values():
        for _ in range(sizes.warmup):
            r.infer()
            r.dense_forward()
    inf = {k: [] for k in labels}
    net = {k: [] for k in labels}
    for _ in tqdm(range(sizes.infer_iters), desc="inference batch 1 (interleaved)", leave=False):
        for k, r in runners.items():
            inf[k].append(r.infer())
            net[k].append(r.dense_forward())
    for k in labels:
        res[k]["infer_ms"] = statistics.median(inf[k]) * 1e3
        res[k]["network_ms"] = statistics.median(net[k]) * 1e3
    for batch in sizes.train_batches:
        times = {k: [] for k in labels}
        for k, r in runners.items():
            r.train_inputs = bench.make_inputs(sizes.image, batch, args.device, seed=2)
            for _ in range(sizes.warmup):
                r.train_step()
        for _ in tqdm(
            range(sizes.bench_iters), desc=f"training batch {batch} (interleaved)", leave=False
        ):
            for k, r in runners.items():
                times[k].append(r.train_step())
        for k in labels:
            res[k][f"train_b{batch}_s"] = statistics.median(times[k])
    del runners
    if args.device == "cuda":
        torch.cuda.empty_cache()
    log("benchmark: peak memory (one fresh process per model)")
    for k, peaks in _measure_memory(args, sizes, labels).items():
        for key, mib in peaks.items():
            res[k][f"mem_{key}_mib"] = mib
    gpu = args.device == "cuda"
    rows = []
    for key, label, target in (
        [
            (f"train_b{b}_s", f"training s/iter, batch {b}", TARGETS["train_ratio"])
            for b in sizes.train_batches
        ]
        + [
            ("network_ms", "inference ms, batch 1, network", TARGETS["infer_ratio"]),
            ("infer_ms", "inference ms, batch 1, end to end", TARGETS["infer_ratio"]),
        ]
        + [
            (f"mem_train_b{b}_mib", f"peak MiB, training batch {b}", None)
            for b in sizes.train_batches
        ]
        + [("mem_infer_b1_mib", "peak MiB, inference batch 1", None)]
    ):
        h, b = res["HAR-Net"][key], res["RetinaNet"][key]
        ratio = h / b if b else math.inf
        text = f"{label}: HAR-Net {h:.4g} / RetinaNet {b:.4g}, ratio"
        if target is None or not gpu:
            rows.append(
                row(
                    text + ("" if target is None else " (GPU target; CPU: informative)"),
                    ratio,
                    target if target else "",
                    True,
                    target_met=None if target is None else ratio <= target,
                )
            )
        else:
            rows.append(row(text, ratio, target, ratio <= target, target_met=ratio <= target))
    info = dict(
        results=res,
        image=list(sizes.image),
        iterations=dict(train=sizes.bench_iters, infer=sizes.infer_iters),
        note="random weights (lr 0: weights stay put); end-to-end inference includes candidate "
        "selection and NMS, whose cost depends on the candidates random weights produce",
    )
    return dict(info=info, rows=rows)


def _time_ms(fn, repeats, device):
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@contextlib.contextmanager
def _without_triton():
    """Soft-NMS and box voting on their PyTorch fallback (the Triton kernels switched off)."""
    off = {"HARNET_SOFT_NMS_TRITON": "0", "HARNET_BOX_VOTING_TRITON": "0"}
    with mock.patch.dict(os.environ, off):
        yield


def section_postprocess(args, sizes):
    from torchvision.ops import batched_nms

    from harnet.layers import batched_box_voting, batched_soft_nms, suppress_detections

    bp = devtool("benchmark_postprocess")
    dev, rows, timings = args.device, [], {}
    for set_name, cands in _candidate_sets(sizes).items():
        b, s, c = (t.to(dev) for t in cands)
        k, ks = batched_soft_nms(b, s, c, "gaussian")

        def soft_nms_and_voting():
            keep, kept_scores = batched_soft_nms(b, s, c, "gaussian", 0.5)
            return batched_box_voting(b[keep], kept_scores, c[keep], b, s, c, 0.6, "caffe")

        def on_fallback(fn):
            def run():
                with _without_triton():
                    return fn()

            return run

        voting = lambda: batched_box_voting(b[k], ks, c[k], b, s, c, 0.6, "caffe")  # noqa: E731
        ops = {
            "torchvision batched_nms (baseline)": lambda: batched_nms(b, s, c, 0.5),
            "soft-NMS gaussian": lambda: batched_soft_nms(b, s, c, "gaussian", 0.5),
            "soft-NMS linear": lambda: batched_soft_nms(b, s, c, "linear", 0.5, 0.5),
            "box voting caffe": voting,
            "box voting caffe, PyTorch fallback": on_fallback(voting),
            "soft-NMS gaussian + box voting caffe": soft_nms_and_voting,
            "soft-NMS gaussian + box voting caffe, PyTorch fallback": on_fallback(
                soft_nms_and_voting
            ),
            "suppress_detections, authors' settings": lambda: suppress_detections(
                b, s, c, **bp.AUTHORS
            ),
        }
        base = None
        for op, fn in ops.items():
            ms = _time_ms(fn, sizes.pp_repeats, dev)
            base = base or ms
            timings[f"{set_name} | {op}"] = ms
            target = (
                TARGETS["gaussian_coco_ms"]
                if (op == "soft-NMS gaussian" and set_name.startswith("COCO"))
                else None
            )
            text = f"{op}, {set_name}, {dev}: ms (x{ms / base:.1f} batched_nms)"
            rows.append(_target_row(text, ms, target, ms <= (target or 0), dev, sizes))
        rows.append(_kernel_ratio_row(set_name, timings, dev, sizes))
    return dict(info=dict(timings_ms=timings, repeats=sizes.pp_repeats), rows=rows)


def _target_row(text, value, target, met, dev, sizes):
    """A timing row; its target gates only on a GPU at full size."""
    gate = target is not None and dev == "cuda" and not sizes.quick
    suffix = "" if target is None or gate else " (GPU target; informative here)"
    return row(text + suffix, value, target if target else "", met if gate else True,
               target_met=None if target is None else met)  # fmt: skip


def _kernel_ratio_row(set_name, timings, dev, sizes):
    """Soft-NMS + voting through the kernels: within TARGETS["kernels_vs_nms"] x
    batched_nms on COCO-like candidates; TARGETS["kernels_vs_fallback"] x faster than the
    PyTorch fallback on dense ones."""
    op = f"{set_name} | soft-NMS gaussian + box voting caffe"
    kernels = timings[op]
    if set_name.startswith("COCO"):
        ratio = kernels / timings[f"{set_name} | torchvision batched_nms (baseline)"]
        target = TARGETS["kernels_vs_nms"]
        text = f"soft-NMS + voting / batched_nms, {set_name}, {dev}: ratio"
        return _target_row(text, ratio, target, ratio <= target, dev, sizes)
    ratio = timings[op + ", PyTorch fallback"] / kernels
    target = TARGETS["kernels_vs_fallback"]
    text = f"PyTorch fallback / kernels, soft-NMS + voting, {set_name}, {dev}: speed-up (>=)"
    return _target_row(text, ratio, target, ratio >= target, dev, sizes)


# ---------------------------------------------------------------------------- report
def _fmt(v):
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return "inf" if math.isinf(v) else (f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}")
    return str(v)


def render_markdown(report):
    env = report["environment"]["info"]
    lines = [
        f"GPU readiness check ({env['mode']}): {env['device_name']}; torch {env['torch']}, "
        f"torchvision {env['torchvision']}, detectron2 {env['detectron2']}; wall time "
        f"{report['wall_s']:.0f} s (CPU time {report['cpu_s']:.0f} s, subprocesses included); "
        f"{'all checks passed' if report['ok'] else 'SOME CHECKS FAILED'}.",
        "",
        "| section | check | value | tolerance / target | ok |",
        "|---|---|---|---|---|",
    ]
    for name in SECTIONS:
        sec = report[name]
        if sec.get("error"):
            lines.append(f"| {name} | ERROR: {sec['error'].splitlines()[-1][:200]} | | | no |")
        for r in sec.get("rows", []):
            ok = "yes" if r["ok"] else "**no**"
            if r.get("target_met") is not None and r["ok"]:
                ok += " (target met)" if r["target_met"] else " (target missed)"
            lines.append(
                f"| {name} | {r['check']} | {_fmt(r['value'])} | {_fmt(r['limit'])} | {ok} |"
            )
    lines += ["", "Command: python dev/gpu_check.py " + " ".join(report["argv"])]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 1)[1],
    )
    p.add_argument("--cpu", action="store_true", help="run on the CPU (CPU-vs-CPU comparisons)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (ResNet-18, 64x96 images)")
    p.add_argument(
        "--out", default="gpu_check_out", help="folder for gpu_check.json / gpu_check.md"
    )
    p.add_argument(
        "--sections",
        nargs="+",
        choices=SECTIONS[1:],
        default=list(SECTIONS[1:]),
        help="sections to run (default: all)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--pytest-timeout", type=int, default=300, help=argparse.SUPPRESS)
    p.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_worker:
        memory_worker(json.loads(args.memory_worker))
        return {"ok": True}
    if not args.cpu and not torch.cuda.is_available():
        p.error("no CUDA device: run on a GPU machine, or with --cpu (CPU-vs-CPU checks)")
    args.device = "cpu" if args.cpu else "cuda"
    os.makedirs(args.out, exist_ok=True)
    sizes = Sizes(args.quick)
    import harnet  # noqa: F401  (registers the architectures)

    fns = dict(
        environment=section_environment,
        cuda_tests=section_cuda_tests,
        equivalence=section_equivalence,
        training=section_training,
        benchmark=section_benchmark,
        postprocess=section_postprocess,
    )
    start = time.perf_counter()
    report = dict(argv=argv)
    todo = ["environment"] + args.sections
    order = list(SECTIONS)
    if args.device == "cpu" and "cuda_tests" in todo:
        # No GPU to share: pytest (all skips, mostly imports) runs beside the other
        # sections. On a GPU it runs first and alone, not to disturb the timings.
        args.cuda_tests_started = start_cuda_tests(args)
        order.remove("cuda_tests")
        order.append("cuda_tests")
    for i, name in enumerate(order, 1):
        if name not in todo:
            report[name] = dict(skipped=True, rows=[])
            continue
        log(f"[{i}/{len(SECTIONS)}] {name}")
        t0, c0 = time.perf_counter(), cpu_seconds()
        try:
            report[name] = fns[name](args, sizes)
        except Exception:  # one broken section must not cost the others' results
            report[name] = dict(error=traceback.format_exc(), rows=[])
            log(f"{name} FAILED:\n{report[name]['error']}")
        report[name]["wall_s"] = time.perf_counter() - t0
        report[name]["cpu_s"] = cpu_seconds() - c0
        failed = [r["check"] for r in report[name]["rows"] if not r["ok"]]
        log(
            f"{name}: {len(report[name]['rows'])} checks, {len(failed)} failed "
            f"({report[name]['wall_s']:.1f} s)" + "".join(f"\n    FAILED: {c}" for c in failed)
        )
    report["wall_s"] = time.perf_counter() - start
    report["cpu_s"] = cpu_seconds()  # includes the imports before `start`
    report["ok"] = all(
        not report[n].get("error") and all(r["ok"] for r in report[n]["rows"]) for n in SECTIONS
    )
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    text = render_markdown(report)
    with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
        f.write(text)
    print(text, flush=True)
    log(f"wrote {args.out}/gpu_check.json and gpu_check.md in {report['wall_s']:.0f} s")
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
