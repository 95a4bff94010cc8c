#!/usr/bin/env python
"""Model-zoo benchmark: parameters, FLOPs, inference latency, training iteration time and
peak memory of several configs, each also as a ratio to a baseline measured in the same run.

Default configs (configs/HARNet, R-50-FPN): the all-off baseline (Detectron2's RetinaNet),
each single module (aligned, CLGN, spatial, channel) and the full HAR-Net. Random weights
and random images (no download); batch 1 for inference, ``--train-batch`` images per
training iteration (SGD step included).

- FLOPs: fvcore flop counting of backbone + head (one multiply-add = one flop), with a
  handle for ``torchvision::deform_conv2d`` (tools/analyze_model.py's).
- Latency / iteration time: median of ``--iters`` runs after ``--warmup`` (all runs in
  ``--json``), of the network alone (image normalisation, backbone, head: what the FLOPs
  count) and of the whole inference (plus candidate selection and NMS, whose cost depends
  on how many candidates random weights happen to produce); the runs of all configs are
  interleaved (round robin) in one process, so that load from other processes affects
  every config alike. ``--clock cpu --threads 1`` measures CPU time instead of wall time,
  steadier on a machine shared with other jobs.
- Peak memory: one fresh process per config. CPU: peak resident set size
  (``getrusage`` maxrss) minus the size before the model was built, i.e. weights plus the
  peak of activations/workspaces; GPU: ``torch.cuda.max_memory_allocated``.
- ``lat/FLOP``: network-latency ratio divided by FLOPs ratio (1.0: the extra modules cost
  exactly what their arithmetic costs; the target for HAR-Net on CPU is <= 1.1).

Examples:
    python dev/benchmark.py                                   # 800x1333, CPU or GPU
    python dev/benchmark.py --size 512 640 --iters 3 --out bench.md
    python dev/benchmark.py --configs base=configs/HARNet/har_R_50_FPN_1x_baseline.yaml \\
        full=configs/HARNet/har_R_50_FPN_1x.yaml --skip-train --skip-memory --profile 15
    python dev/benchmark.py --size 256 320 MODEL.RESNETS.DEPTH 18 MODEL.RESNETS.RES2_OUT_CHANNELS 64
"""

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time

import torch
from tqdm import tqdm

from harnet.devtools import REPO

CFG_DIR = os.path.join(REPO, "configs", "HARNet")

# (label, config file, overrides)
DEFAULT_CONFIGS = [
    ("RetinaNet (all off)", "har_R_50_FPN_1x_baseline.yaml", []),
    ("aligned only", "har_R_50_FPN_1x_aligned_only.yaml", []),
    ("CLGN only", "har_R_50_FPN_1x_baseline.yaml", ["MODEL.HARNET.CLGN.ENABLED", "True"]),
    ("spatial only", "har_R_50_FPN_1x_spatial_only.yaml", []),
    ("channel only", "har_R_50_FPN_1x_channel_only.yaml", []),
    ("HAR-Net (full)", "har_R_50_FPN_1x.yaml", []),
]


def parse_config_entry(entry):
    """``[LABEL=]PATH[@KEY=VALUE]...`` -> (label, path, opts)."""
    from harnet.engine.defaults import parse_variant  # the same @KEY=VALUE syntax

    head, opts = parse_variant(entry)
    label, _, path = head.rpartition("=")
    return label or os.path.splitext(os.path.basename(path))[0], path, opts


def build_model_from(path, opts, device):
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    import harnet

    cfg = get_cfg()
    harnet.add_harnet_config(cfg)
    if not os.path.isabs(path) and not os.path.exists(path):
        path = os.path.join(CFG_DIR, path)
    cfg.merge_from_file(path)
    cfg.merge_from_list(list(opts) + ["MODEL.WEIGHTS", "", "MODEL.DEVICE", device])
    return cfg, build_model(cfg)


def make_inputs(size, batch, device, seed):
    """``batch`` random images of ``size`` (h, w), each with 4 random boxes of 3 classes."""
    from detectron2.structures import Boxes, Instances

    g = torch.Generator().manual_seed(seed)
    h, w = size
    out = []
    for _ in range(batch):
        xy = torch.rand(4, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
        wh = (0.05 + torch.rand(4, 2, generator=g) * 0.25) * torch.tensor([w, h])
        inst = Instances(
            (h, w),
            gt_boxes=Boxes(torch.cat([xy, xy + wh], 1)),
            gt_classes=torch.randint(0, 3, (4,), generator=g),
        )
        image = (torch.rand(3, h, w, generator=g) * 255).to(torch.uint8)
        out.append(
            {"image": image.to(device), "height": h, "width": w, "instances": inst.to(device)}
        )
    return out


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Runner:
    """One config: its model, optimizer and inputs, with timed inference / train steps."""

    def __init__(self, label, path, opts, args):
        from harnet.solver import build_optimizer

        self.label, self.path, self.opts, self.device = label, path, opts, args.device
        # "cpu": this process's CPU time (all threads): less sensitive than wall time to
        # other processes competing for the cores (use with --threads 1 on a busy machine).
        self.clock = (
            time.process_time if getattr(args, "clock", "wall") == "cpu" else time.perf_counter
        )
        torch.manual_seed(0)
        self.cfg, self.model = build_model_from(path, opts, args.device)
        self.optimizer = build_optimizer(self.cfg, self.model)
        # Learning rate 0: the SGD step does the same arithmetic, and the random weights stay
        # put (from-scratch R-50 steps diverge within two iterations on random images, and
        # NaN features crash torchvision's CPU deformable conv).
        for group in self.optimizer.param_groups:
            group["lr"] = 0.0
        self.infer_inputs = [
            {k: v for k, v in d.items() if k != "instances"}
            for d in make_inputs(args.size, 1, args.device, seed=1)
        ]
        self.train_inputs = make_inputs(args.size, args.train_batch, args.device, seed=2)
        self.params = sum(p.numel() for p in self.model.parameters())
        self.infer_times, self.dense_times, self.train_times = [], [], []
        from harnet.analysis import DenseForward  # what the FLOPs count: backbone + head

        self.dense = DenseForward(self.model)

    def infer(self):
        self.model.eval()
        _sync(self.device)
        start = self.clock()
        with torch.no_grad():
            self.model(self.infer_inputs)
        _sync(self.device)
        return self.clock() - start

    def dense_forward(self):
        self.model.eval()
        _sync(self.device)
        start = self.clock()
        with torch.no_grad():
            self.dense(self.infer_inputs[0]["image"])
        _sync(self.device)
        return self.clock() - start

    def train_step(self):
        from detectron2.utils.events import EventStorage

        self.model.train()
        _sync(self.device)
        start = self.clock()
        with EventStorage(0):
            losses = self.model(self.train_inputs)
            total = sum(losses.values())
            self.optimizer.zero_grad()
            total.backward()
            self.optimizer.step()
        _sync(self.device)
        return self.clock() - start

    def flops(self):
        from harnet.analysis import flop_count  # with the deform_conv2d handle

        self.model.eval()
        total, _, unsupported = flop_count(self.model, self.infer_inputs)
        return total, unsupported

    def profile(self, top):
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + (
            [ProfilerActivity.CUDA] if self.device.startswith("cuda") else []
        )
        self.model.eval()
        with torch.no_grad(), profile(activities=activities) as prof:
            self.model(self.infer_inputs)
        key = "self_cuda_time_total" if self.device.startswith("cuda") else "self_cpu_time_total"
        return prof.key_averages().table(sort_by=key, row_limit=top)


def _proc_status_mib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0  # kB
    raise KeyError(field)


def _reset_peak_rss():
    """Reset the kernel's peak-RSS mark (Linux >= 4.0); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_worker(spec):
    """Runs in a fresh process: peak memory of inference, then of training (MiB).

    CPU: the peak resident set size of each phase (the kernel's high-water mark, reset
    before the phase) minus the resident size before the model was built, so imports and
    their transient peaks are excluded. Without /proc (non-Linux) it falls back to
    ``getrusage`` maxrss, which includes the import peak."""
    args = argparse.Namespace(**spec["args"])
    args.size = tuple(args.size)
    cuda = args.device.startswith("cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
    import harnet  # noqa: F401  (imported before the reference point)
    from harnet.solver import build_optimizer  # noqa: F401

    if _reset_peak_rss():

        def peak():
            return _proc_status_mib("VmHWM")

        before = _proc_status_mib("VmRSS")
        reset = _reset_peak_rss
    else:

        def peak():
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

        before, reset = peak(), (lambda: None)
    runner = Runner(spec["label"], spec["path"], spec["opts"], args)
    out = {}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    reset()
    runner.infer()
    out["infer"] = torch.cuda.max_memory_allocated() / 2**20 if cuda else peak() - before
    if not args.skip_train:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        reset()
        for _ in range(2):  # the optimizer's state appears after the first step
            runner.train_step()
        out["train"] = torch.cuda.max_memory_allocated() / 2**20 if cuda else peak() - before
    print("BENCHMARK_MEMORY " + json.dumps(out))


def measure_memory(label, path, opts, args):
    spec = {"label": label, "path": path, "opts": opts, "args": vars(args)}
    cmd = [sys.executable, "-m", "harnet.devtools.benchmark", "--memory-worker", json.dumps(spec)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    for line in res.stdout.splitlines():
        if line.startswith("BENCHMARK_MEMORY "):
            return json.loads(line[len("BENCHMARK_MEMORY ") :])
    raise RuntimeError(f"memory worker for {label!r} failed:\n{res.stderr[-3000:]}")


def _fmt(value, base, digits, scale=1.0):
    if value is None:
        return ""
    text = f"{value * scale:.{digits}f}"
    if base:
        text += f" (x{value / base:.2f})"
    return text


def render_table(results, baseline):
    b = results[baseline]
    head = [
        "config",
        "params (M)",
        "GFLOPs",
        "network ms",
        "end-to-end ms",
        "train s/iter",
        "peak MiB infer",
        "peak MiB train",
        "lat/FLOP",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, r in results.items():
        lat_flop = ""
        if r.get("dense_median") and r.get("flops") and b.get("flops"):
            lat_flop = f"{(r['dense_median'] / b['dense_median']) / (r['flops'] / b['flops']):.2f}"
        cells = [
            label,
            _fmt(r["params"], b["params"], 2, 1e-6),
            _fmt(r.get("flops"), b.get("flops"), 1, 1e-9),
            _fmt(r.get("dense_median"), b.get("dense_median"), 0, 1e3),
            _fmt(r.get("infer_median"), b.get("infer_median"), 0, 1e3),
            _fmt(r.get("train_median"), b.get("train_median"), 2),
            _fmt(r.get("mem_infer"), b.get("mem_infer"), 0),
            _fmt(r.get("mem_train"), b.get("mem_train"), 0),
            lat_flop,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


LEGEND = (
    "network: image normalisation + backbone + head, what the FLOPs count; end-to-end: the "
    "model's inference including candidate selection and NMS (with random weights the number "
    "of candidates, hence this part, is arbitrary); train: forward + backward + SGD step; "
    "peak MiB: weights plus peak activations/workspace (CPU: peak RSS of a fresh process "
    "minus its size before the model was built; GPU: max allocated); lat/FLOP: network-time "
    "ratio / FLOPs ratio to the baseline (1.0: extra modules cost what their arithmetic costs)."
)


def _check_args(p, args):
    """Every numeric argument checked before any work (argparse's ``p.error``: usage, exit 2)."""
    at_least = {
        "--iters": (args.iters, 1),
        "--warmup": (args.warmup, 0),
        "--train-batch": (args.train_batch, 1),
        "--threads": (args.threads, 0),
        "--profile": (args.profile, 0),
    }
    if args.train_iters is not None and not args.skip_train:
        at_least["--train-iters"] = (args.train_iters, 1)
    for name, (value, low) in at_least.items():
        if value < low:
            p.error(f"{name} must be >= {low}, got {value}")
    if min(args.size) < 1:
        p.error(f"--size H W must be positive, got {' '.join(map(str, args.size))}")


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 1)[1],
    )
    p.add_argument(
        "--configs",
        nargs="+",
        default=None,
        metavar="[LABEL=]PATH[@KEY=VALUE]",
        help="configs to compare (paths relative to configs/HARNet allowed); "
        "default: baseline, each single module, full HAR-Net",
    )
    p.add_argument("--baseline", default=None, help="label of the baseline (default: first)")
    p.add_argument(
        "--size",
        nargs=2,
        type=int,
        default=(800, 1333),
        metavar=("H", "W"),
        help="input image size (default 800 1333, Detectron2's test size)",
    )
    p.add_argument("--iters", type=int, default=5, help="timed runs per config")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per config first")
    p.add_argument("--train-iters", type=int, default=None, help="default: --iters")
    p.add_argument("--train-batch", type=int, default=2, help="images per training iteration")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall time, or this process's CPU time (steadier on a busy machine "
        "with --threads 1; not for GPU)",
    )
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-flops", action="store_true")
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="print the N costliest ops of one inference per config",
    )
    p.add_argument("--out", default=None, help="also write the markdown report here")
    p.add_argument("--json", default=None, help="also write the raw numbers here")
    p.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("opts", nargs=argparse.REMAINDER, help="overrides for every config")
    args = p.parse_args(argv)
    _check_args(p, args)
    args.size = tuple(args.size)
    if args.clock == "cpu" and args.device.startswith("cuda"):
        p.error("--clock cpu measures CPU time; use the default wall clock on a GPU")
    if args.train_iters is None:
        args.train_iters = args.iters
    if args.memory_worker:
        return memory_worker(json.loads(args.memory_worker))
    if args.threads:
        torch.set_num_threads(args.threads)

    entries = (
        [parse_config_entry(e) for e in args.configs]
        if args.configs
        else [(label, f, o) for label, f, o in DEFAULT_CONFIGS]
    )
    entries = [(label, path, o + list(args.opts)) for label, path, o in entries]
    labels = [e[0] for e in entries]
    if len(set(labels)) != len(labels):
        p.error(f"config labels must be unique, got {labels}")
    baseline = args.baseline or labels[0]
    if baseline not in labels:
        p.error(f"--baseline {baseline!r} is not one of {labels}")

    runners = [Runner(label, path, o, args) for label, path, o in tqdm(entries, desc="build")]
    results = {r.label: {"params": r.params, "config": r.path, "opts": r.opts} for r in runners}
    for r in runners:
        for _ in range(args.warmup):
            r.infer()
            r.dense_forward()
    for _ in tqdm(range(args.iters), desc="inference (round robin)"):
        for r in runners:
            r.infer_times.append(r.infer())
            r.dense_times.append(r.dense_forward())
    if not args.skip_train:
        for r in runners:
            for _ in range(args.warmup):
                r.train_step()
        for _ in tqdm(range(args.train_iters), desc="training (round robin)"):
            for r in runners:
                r.train_times.append(r.train_step())
    for r in runners:
        res = results[r.label]
        res["infer_median"] = statistics.median(r.infer_times) if r.infer_times else None
        res["infer_min"] = min(r.infer_times) if r.infer_times else None
        res["dense_median"] = statistics.median(r.dense_times) if r.dense_times else None
        res["dense_min"] = min(r.dense_times) if r.dense_times else None
        res["train_median"] = statistics.median(r.train_times) if r.train_times else None
        res["infer_times"], res["train_times"] = r.infer_times, r.train_times
        res["dense_times"] = r.dense_times
        if not args.skip_flops:
            res["flops"], unsupported = r.flops()
            if unsupported:
                res["flops_not_counted"] = unsupported
    profiles = {r.label: r.profile(args.profile) for r in runners} if args.profile else {}
    del runners
    if not args.skip_memory:
        for label, path, o in tqdm(entries, desc="memory (fresh process each)"):
            mem = measure_memory(label, path, o, args)
            results[label]["mem_infer"] = mem["infer"]
            results[label]["mem_train"] = mem.get("train")

    dev = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"CPU, {torch.get_num_threads()} threads, {args.clock} clock"
    )
    train = (
        "training not measured"
        if args.skip_train
        else f"training batch {args.train_batch} (SGD step included), median of "
        f"{args.train_iters} runs"
    )
    report = [
        f"Input {args.size[0]}x{args.size[1]}, {dev}, torch {torch.__version__}; inference "
        f"batch 1, median of {args.iters} runs; {train}; after {args.warmup} warm-up, "
        f"configs interleaved; ratios (xN) to '{baseline}'.",
        "",
        render_table(results, baseline),
        "",
        LEGEND,
        "",
        "Command: python dev/benchmark.py "
        + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
    ]
    not_counted = {
        k: v["flops_not_counted"] for k, v in results.items() if "flops_not_counted" in v
    }
    if not_counted:
        report.append(f"Ops without a FLOP count (ignored): {not_counted}")
    text = "\n".join(report)
    print(text)
    for label, table in profiles.items():
        print(f"\n### Profile of one inference: {label}\n{table}")
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "args": {k: v for k, v in vars(args).items() if k != "memory_worker"},
                    "baseline": baseline,
                    "results": results,
                },
                f,
                indent=1,
                default=str,
            )
    return results


if __name__ == "__main__":
    main()
