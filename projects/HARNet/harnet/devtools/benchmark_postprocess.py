#!/usr/bin/env python
"""Benchmark HARNet's post-processing (soft-NMS, box voting) and test-time augmentation.

``ops`` (default): soft-NMS / box voting / suppress_detections against torchvision's
``batched_nms`` on the same input in the same run, on CPU and on GPU when available. Inputs
are synthetic but shaped like a RetinaNet's candidates before suppression: clusters of
jittered boxes around objects (more candidates for larger objects, scores falling with the
jitter), weaker copies in confusable categories, and low-scoring background boxes; and
dense scenes (:func:`dense_scene_candidates`: thousands of overlapping boxes, one category
or 80). ``--fallback`` adds the PyTorch soft-NMS loop (what runs without numba, on GPU and
in exported models), eager and TorchScript-compiled.

``model``: a HARRetinaNet (random weights: no checkpoint needed) on one image: the share of
the post-processing (``model.suppress``) in the CPU inference time, and the time of
single-scale vs double-scale vs double-scale + flip TTA.

  python dev/benchmark_postprocess.py ops --repeats 20
  python dev/benchmark_postprocess.py ops --threads 1 --cases 4 5 6 --fallback
  python dev/benchmark_postprocess.py model --config-file configs/HARNet/har_R_50_FPN_1x.yaml

Both print markdown tables (median milliseconds; ratios against the baseline measured in
the same run).
"""

import argparse
import copy
import functools
import math
import statistics
import time
import warnings

import torch
from torchvision.ops import batched_nms
from tqdm import tqdm

from harnet.layers import batched_box_voting, batched_soft_nms, suppress_detections
from harnet.layers.box_voting import VOTING_SCORINGS
from harnet.layers.soft_nms import batched_soft_nms_scriptable

AUTHORS = dict(
    nms_type="gaussian",
    soft_nms_sigma=0.5,
    soft_nms_min_score=0.001,
    voting=True,
    voting_iou=0.6,
    voting_scoring="unclaimed_top4",
    max_detections=400,
    min_score=0.05,
)


def synthetic_candidates(
    num_candidates=1000,
    num_classes=80,
    num_objects=12,
    image_hw=(800, 1200),
    dense=False,
    seed=0,
    device="cpu",
):
    """RetinaNet-like candidates: (boxes Tensor[N,4], scores Tensor[N], classes Tensor[N])."""
    g = torch.Generator().manual_seed(seed)
    H, W = image_hw

    def rand(*shape):
        return torch.rand(*shape, generator=g)

    # Category frequencies: one dominant category (like COCO's person), then a long tail.
    freq = 1.0 / torch.arange(1, num_classes + 1, dtype=torch.float64) ** 1.2
    freq[0] *= 4
    boxes, scores, classes = [], [], []
    for _ in range(num_objects):
        size = math.exp(math.log(16) + (math.log(500) - math.log(16)) * float(rand(1)))
        aspect = math.exp(float(rand(1) - 0.5) * 1.5)
        w, h = size * math.sqrt(aspect), size / math.sqrt(aspect)
        cx, cy = float(rand(1)) * W, float(rand(1)) * H
        cls = 0 if dense else int(torch.multinomial(freq, 1, generator=g))
        conf = 0.3 + 0.65 * float(rand(1))
        # Larger objects are seen by more anchors on more pyramid levels.
        k = int(20 + 100 * min(1.0, size / 300))
        confusions = (
            []
            if dense
            else [
                (int(torch.multinomial(freq, 1, generator=g)), k // 3, conf * 0.35)
                for _ in range(int(rand(1) * 3))
            ]
        )
        for c, k_c, conf_c in [(cls, k, conf)] + confusions:
            jit = torch.randn(k_c, 4, generator=g) * 0.12
            bw, bh = w * torch.exp(jit[:, 2]), h * torch.exp(jit[:, 3])
            bx, by = cx + jit[:, 0] * w, cy + jit[:, 1] * h
            boxes.append(torch.stack([bx - bw / 2, by - bh / 2, bx + bw / 2, by + bh / 2], dim=1))
            quality = torch.exp(-jit.abs().sum(1) * 4)  # 1 at the object, falling with jitter
            scores.append(conf_c * quality * (0.7 + 0.3 * rand(k_c)))
            classes.append(torch.full((k_c,), c, dtype=torch.int64))
    nb = max(num_candidates // 10, 1)
    xy, wh = rand(nb, 2) * torch.tensor([W, H]), 8 + rand(nb, 2) * 200
    boxes.append(torch.cat([xy, xy + wh], dim=1))
    scores.append(0.05 + 0.07 * rand(nb))
    classes.append(
        torch.zeros(nb, dtype=torch.int64)
        if dense
        else torch.multinomial(freq, nb, replacement=True, generator=g)
    )
    boxes, scores, classes = torch.cat(boxes).float(), torch.cat(scores).float(), torch.cat(classes)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, W)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, H)
    keep = (scores > 0.05) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
    top = scores.argsort(descending=True)[:num_candidates]
    return boxes[top].to(device), scores[top].to(device), classes[top].to(device)


def dense_scene_candidates(
    num_candidates=1000,
    num_classes=1,
    image_wh=(1333, 800),
    cluster_size=20,
    seed=0,
    device="cpu",
):
    """Crowded-scene candidates (pedestrians, shelves, aerial views): boxes in clusters of
    about ``cluster_size`` around object centres uniform in the image; each box's centre is
    its cluster's jittered by N(0, 15 px), each side log-uniform in [20, 300] px (clipped
    to the image), each score U(0.05, 1). Each cluster has one category, uniform in
    ``range(num_classes)``.

    Returns:
        boxes (Tensor[N, 4] float32), scores (Tensor[N] float32), classes (Tensor[N] int64).
    """
    g = torch.Generator().manual_seed(seed)
    W, H = image_wh
    num_clusters = max(1, round(num_candidates / cluster_size))
    centres = torch.rand(num_clusters, 2, generator=g) * torch.tensor([W, H])
    cluster_classes = torch.randint(num_classes, (num_clusters,), generator=g)
    cluster = torch.randint(num_clusters, (num_candidates,), generator=g)
    ctr = centres[cluster] + torch.randn(num_candidates, 2, generator=g) * 15
    lo, hi = math.log(20), math.log(300)
    wh = torch.exp(lo + (hi - lo) * torch.rand(num_candidates, 2, generator=g))
    boxes = torch.cat([ctr - wh / 2, ctr + wh / 2], dim=1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, W)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, H)
    scores = 0.05 + 0.95 * torch.rand(num_candidates, generator=g)
    return boxes.to(device), scores.to(device), cluster_classes[cluster].to(device)


def _time_ms(fn, repeats, device):
    """Median milliseconds per call: wall time on GPU; on CPU the process CPU time, which a
    shared machine's load disturbs much less than wall time (with one torch thread it is
    the op's own time)."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1000)
        else:
            t0 = time.process_time()
            fn()
            times.append((time.process_time() - t0) * 1000)
    return statistics.median(times)


def _scripted_soft_nms():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.script(batched_soft_nms_scriptable)


def run_ops(args):
    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    cases = [
        ("COCO-like, 80 cls", synthetic_candidates, dict(num_candidates=1000)),
        (
            "COCO-like x2 (double-scale), 80 cls",
            synthetic_candidates,
            dict(num_candidates=2000, num_objects=24),
        ),
        (
            "few objects, 1 cls",
            synthetic_candidates,
            dict(num_candidates=1000, dense=True, num_objects=40),
        ),
        (
            "few objects, 1 cls",
            synthetic_candidates,
            dict(num_candidates=4000, dense=True, num_objects=120),
        ),
        ("dense scene, 80 cls", dense_scene_candidates, dict(num_candidates=1000, num_classes=80)),
        ("dense scene, 1 cls", dense_scene_candidates, dict(num_candidates=1000)),
        ("dense scene, 1 cls", dense_scene_candidates, dict(num_candidates=4000)),
    ]
    if args.cases:
        cases = [cases[i] for i in args.cases]
    rows = []
    for dev in devices:
        device = torch.device(dev)
        for name, make, kw in tqdm(cases, desc=f"ops on {dev}", leave=False):
            b, s, c = make(device=device, **kw)
            k, ns = batched_soft_nms(b, s, c, "gaussian", 0.5)
            ops = {
                "torchvision batched_nms (baseline)": lambda: batched_nms(b, s, c, 0.5),
                "soft-NMS gaussian": lambda: batched_soft_nms(b, s, c, "gaussian", 0.5),
                "soft-NMS linear": lambda: batched_soft_nms(b, s, c, "linear", 0.5, 0.5),
                **{
                    f"box voting {rule} (on the gaussian output)": functools.partial(
                        batched_box_voting, b[k], ns, c[k], b, s, c, 0.6, rule
                    )
                    for rule in VOTING_SCORINGS
                },
                "suppress_detections, authors' settings": lambda: suppress_detections(
                    b, s, c, **AUTHORS
                ),
            }
            if args.fallback:
                # The portable loop (GPU, no numba, exported models), eager and TorchScript.
                scripted = _scripted_soft_nms()
                ops["soft-NMS gaussian, PyTorch loop"] = lambda: batched_soft_nms_scriptable(
                    b, s, c, "gaussian", 0.5, 0.3, 0.001
                )
                ops["soft-NMS gaussian, PyTorch loop, TorchScript"] = lambda: scripted(
                    b, s, c, "gaussian", 0.5, 0.3, 0.001
                )
            base = None
            for op, fn in ops.items():
                ms = _time_ms(fn, args.repeats, device)
                base = base or ms
                rows.append(
                    (dev, name, len(s), int(torch.bincount(c).max()), len(k), op, ms, ms / base)
                )
    print(
        f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}, median of "
        f"{args.repeats} runs (CPU: process CPU time; GPU: wall time)\n"
    )
    print(
        "| device | input | candidates | max per class | kept (gaussian) | op | ms "
        "| x batched_nms |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for dev, name, n, per_cls, kept, op, ms, ratio in rows:
        print(f"| {dev} | {name} | {n} | {per_cls} | {kept} | {op} | {ms:.2f} | {ratio:.1f} |")


def run_model(args):
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    import harnet

    cfg = get_cfg()
    harnet.add_harnet_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.MODEL.DEVICE = args.device
    cfg.MODEL.WEIGHTS = ""
    # Random weights score every anchor near the prior (0.01): lower the candidate score
    # threshold so that suppression sees candidates (0: the most RetinaNet keeps, top-k per
    # level on every level).
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = args.score_thresh
    cfg.INPUT.MIN_SIZE_TEST = args.size
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    h, w = args.size, int(args.size * 4 / 3)
    image = (torch.rand(3, h, w) * 255).to(torch.uint8)
    inputs = [{"image": image, "height": h, "width": w}]
    cuda = torch.device(args.device).type == "cuda"

    def clock():
        # On CPU, the process CPU time as well as wall time: on a shared machine the wall
        # time of one run swings with other processes' load, the CPU time much less.
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter(), time.process_time()

    last = {}
    original_suppress = model.suppress

    def timed_suppress(instances):
        t0 = clock()
        out = original_suppress(instances)
        t1 = clock()
        last.update(n=len(instances), wall=t1[0] - t0[0], cpu=t1[1] - t0[1])
        return out

    model.suppress = timed_suppress
    settings = {
        "hard NMS (Detectron2)": dict(model.postprocess_params),
        "authors (gaussian + caffe voting)": dict(model.postprocess_params, **AUTHORS),
    }
    tests = {"plain model": model}
    for label, sizes, flip in (
        ("TTA single-scale", (args.size,), False),
        ("TTA double-scale", (args.size, args.size2), False),
        ("TTA double-scale + flip", (args.size, args.size2), True),
    ):
        tcfg = cfg.clone()
        tcfg.TEST.AUG.MIN_SIZES, tcfg.TEST.AUG.FLIP = sizes, flip
        tcfg.TEST.AUG.MAX_SIZE = int(math.ceil(max(sizes) * 5 / 3))
        tests[label] = harnet.HARRetinaNetWithTTA(tcfg, model)
    results = {}  # (setting, test) -> list of (wall, cpu, suppress wall, suppress cpu, n)
    with torch.no_grad():
        for name, params in settings.items():
            model.postprocess_params = params
            model(copy.deepcopy(inputs))  # warm-up
            # Interleaved, so that a change of load hits every test alike.
            for _ in tqdm(range(args.iters), desc=name, leave=False):
                for label, m in tests.items():
                    t0 = clock()
                    m(copy.deepcopy(inputs))
                    t1 = clock()
                    results.setdefault((name, label), []).append(
                        (t1[0] - t0[0], t1[1] - t0[1], last["wall"], last["cpu"], last["n"])
                    )
    print(
        f"{args.config_file}, random weights, SCORE_THRESH_TEST {args.score_thresh}, "
        f"image {h}x{w}, second scale {args.size2}, {args.device}, torch threads "
        f"{torch.get_num_threads()}; best of {args.iters} runs; CPU = process CPU time\n"
    )
    print(
        "| post-processing | test | candidates suppressed | CPU ms | wall ms | suppress CPU ms "
        "| suppress share (CPU) | x plain model (CPU) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in settings:
        base = None
        for label in tests:
            runs = results[(name, label)]
            wall, cpu = min(r[0] for r in runs), min(r[1] for r in runs)
            s_cpu = min(r[3] for r in runs)
            base = base or cpu
            print(
                f"| {name} | {label} | {runs[0][4]} | {cpu * 1e3:.0f} | {wall * 1e3:.0f} "
                f"| {s_cpu * 1e3:.1f} | {100 * s_cpu / cpu:.2f}% | {cpu / base:.2f} |"
            )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd")
    ops = sub.add_parser("ops", help="post-processing ops vs batched_nms")
    ops.add_argument("--devices", nargs="+", default=None, help="default: cpu [cuda]")
    ops.add_argument("--repeats", type=int, default=10)
    ops.add_argument(
        "--cases", type=int, nargs="+", default=None, help="case numbers (default: all)"
    )
    ops.add_argument(
        "--fallback", action="store_true", help="also time the PyTorch soft-NMS loop (no numba)"
    )
    mod = sub.add_parser("model", help="post-processing share and TTA cost in a model")
    mod.add_argument("--config-file", default="configs/HARNet/har_R_50_FPN_1x.yaml")
    mod.add_argument("--device", default="cpu")
    mod.add_argument("--size", type=int, default=800, help="test short side")
    mod.add_argument("--size2", type=int, default=1000, help="second scale of double-scale")
    mod.add_argument("--score-thresh", type=float, default=0.0)
    mod.add_argument("--iters", type=int, default=3)
    for p in (ops, mod):
        p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.cmd is None:
        args = parser.parse_args(["ops"])
    if args.threads:
        torch.set_num_threads(args.threads)
    (run_model if args.cmd == "model" else run_ops)(args)


if __name__ == "__main__":
    main()
