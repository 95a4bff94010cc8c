#!/usr/bin/env python
"""Training speed of the demo config on this machine, and the whole demo's expected time.

Builds the demo's trainer (``HARNetTrainer``, the same data loader, model, optimizer and
schedule as ``tools/run_demo.sh``), runs ``--warmup`` training iterations, then times
``--iters`` more (wall clock, median and mean of each iteration) and prints s/iter and
the expected wall time of the whole demo: SOLVER.MAX_ITER times s/iter, plus the
evaluation, untrained evaluation, pictures and start-ups (``--overhead-s``, measured on the
machines named in the README). The CPU model comes from /proc/cpuinfo, the GPU from
``torch.cuda``. With ``--profile N``: a ``torch.profiler`` table of N iterations (the
operators taking the most self CPU time).

Examples:
    python dev/benchmark_demo.py                       # the demo config, 20 iterations
    python dev/benchmark_demo.py --iters 10 --profile 5
    python dev/benchmark_demo.py MODEL.DEVICE cpu SOLVER.IMS_PER_BATCH 2   # overrides
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
from detectron2.config import get_cfg
from detectron2.utils.events import EventStorage

from harnet.config import add_harnet_config
from harnet.devtools import device_name
from harnet.data import register_shapes_from_cfg
from harnet.engine import HARNetTrainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CFG = os.path.join(REPO, "configs", "HARNet", "demo", "har_R18_shapes_demo.yaml")


def build_cfg(config_file, opts, output_dir):
    """The demo's yacs config with ``opts`` applied; CUDA when available unless overridden."""
    cfg = get_cfg()
    add_harnet_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    if str(cfg.MODEL.DEVICE).startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    cfg.OUTPUT_DIR = output_dir
    cfg.freeze()
    register_shapes_from_cfg(cfg)
    return cfg


def time_iterations(trainer, warmup, iters, profile=0):
    """Seconds of each of ``iters`` training iterations after ``warmup`` ones.

    Returns:
        list[float] (length ``iters``); with ``profile`` > 0 also prints a profiler table.
    """
    device = trainer.cfg.MODEL.DEVICE
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    times = []
    with EventStorage(0) as storage:
        trainer._trainer.storage = storage
        for i in range(warmup + iters):
            storage.iter = i
            sync()
            t0 = time.perf_counter()
            trainer._trainer.run_step()
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        if profile:
            from torch.profiler import ProfilerActivity, profile as tprofile

            acts = [ProfilerActivity.CPU]
            if str(device).startswith("cuda"):
                acts.append(ProfilerActivity.CUDA)
            with tprofile(activities=acts) as prof:
                for _ in range(profile):
                    trainer._trainer.run_step()
                sync()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-file", default=DEMO_CFG)
    parser.add_argument("--warmup", type=int, default=5, help="untimed iterations first")
    parser.add_argument("--iters", type=int, default=20, help="timed iterations")
    parser.add_argument("--profile", type=int, default=0, help="profile N more iterations")
    parser.add_argument(
        "--overhead-s", type=float, default=None,
        help="seconds of the demo outside training (evaluations, pictures, start-ups); "
        "default: 75 on a CPU, 40 on a GPU",
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        cfg = build_cfg(args.config_file, args.opts, out)
        trainer = HARNetTrainer(cfg)
        trainer.resume_or_load(resume=False)
        times = time_iterations(trainer, args.warmup, args.iters, args.profile)
    med, mean = statistics.median(times), statistics.fmean(times)
    overhead = args.overhead_s
    if overhead is None:
        overhead = 40.0 if str(cfg.MODEL.DEVICE).startswith("cuda") else 75.0
    total = cfg.SOLVER.MAX_ITER * mean + overhead
    print(f"machine: {device_name(cfg.MODEL.DEVICE)}; torch {torch.__version__}; "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}")
    print(f"config: {os.path.relpath(args.config_file, REPO)} {' '.join(args.opts)}")
    print(f"train s/iter: median {med:.3f}, mean {mean:.3f}, min {min(times):.3f} "
          f"({len(times)} iterations after {args.warmup} warm-up)")
    print(f"expected whole demo: {cfg.SOLVER.MAX_ITER} it x {mean:.3f} s + {overhead:.0f} s "
          f"= {total / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
