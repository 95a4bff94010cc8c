#!/usr/bin/env python
"""Measure how exactly ``train_net.py --resume`` continues a killed run.

For each process count (``--procs 1 2``: one process, or ``--cpu-procs N`` with gloo) it
trains the demo config shrunk to a tiny schedule three times, each a fresh
``train_net.py`` process:

1. uninterrupted, ``--iters`` iterations;
2. the same, killed with SIGKILL (the whole process group) as soon as the checkpoint of
   iteration ``--kill-after`` is on disk;
3. ``--resume`` of run 2 to the end;

and prints the largest absolute difference between the final weights of runs 1 and 3
(0 = the resumed run is the uninterrupted one). The dataset (40 built-in shapes images of
mixed aspect ratios, multi-scale resize, flips) is large enough that the data order
matters. ``--no-jit`` runs with ``PYTORCH_JIT=0``, a cross-check only: the training path calls
fvcore's eager focal loss (TorchScript's profiling executor changed the last bits of the
scripted one's gradient after its first calls in each process, so a resumed run differed).

    python dev/check_resume.py --procs 1 2
"""
import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "configs", "HARNet", "demo", "har_R18_shapes_demo.yaml")


def tiny_opts(root, out, iters, period):
    return [
        "OUTPUT_DIR", out, "DATASETS.SHAPES.ROOT", root,
        "DATASETS.SHAPES.NUM_TRAIN", "40", "DATASETS.SHAPES.NUM_VAL", "1",
        "DATASETS.SHAPES.IMAGE_SIZE", "(32, 48)", "DATASETS.SHAPES.OBJECT_SIZE", "(8.0, 24.0)",
        "DATASETS.SHAPES.OBJECTS_PER_IMAGE", "(1, 3)",
        "INPUT.MIN_SIZE_TRAIN", "(32, 40)", "INPUT.MAX_SIZE_TRAIN", "56",
        "INPUT.MIN_SIZE_TEST", "32", "INPUT.MAX_SIZE_TEST", "48",
        "MODEL.RESNETS.NORM", "GN", "MODEL.FPN.OUT_CHANNELS", "16",
        "MODEL.BACKBONE.FREEZE_AT", "5",
        "SOLVER.IMS_PER_BATCH", "4", "SOLVER.MAX_ITER", str(iters),
        "SOLVER.STEPS", f"({int(iters * 0.7)},)", "SOLVER.WARMUP_ITERS", "3",
        "SOLVER.CHECKPOINT_PERIOD", str(period), "DATALOADER.NUM_WORKERS", "1",
        "TEST.EVAL_PERIOD", "0", "SEED", "3",
    ]


def command(procs, opts, resume=False):
    cmd = [sys.executable, os.path.join(REPO, "train_net.py"), "--config-file", DEMO]
    if procs > 1:
        cmd[2:2] = ["--cpu-procs", str(procs)]
    if resume:
        cmd.insert(2, "--resume")
    return cmd + opts


def run(cmd, env, log, kill_when=None):
    with open(log, "a") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                             start_new_session=True)
        while p.poll() is None:
            if kill_when is not None and os.path.exists(kill_when):
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                return "killed"
            time.sleep(0.1)
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}); see {log}")
    return "finished"


def max_weight_difference(a, b):
    wa = torch.load(a, map_location="cpu", weights_only=True)["model"]
    wb = torch.load(b, map_location="cpu", weights_only=True)["model"]
    assert wa.keys() == wb.keys()
    return max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--procs", nargs="+", type=int, default=[1, 2], help="process counts")
    p.add_argument("--iters", type=int, default=16)
    p.add_argument("--period", type=int, default=5, help="SOLVER.CHECKPOINT_PERIOD")
    p.add_argument("--kill-after", type=int, default=4, help="kill once model_<this>.pth exists")
    p.add_argument("--no-jit", action="store_true", help="PYTORCH_JIT=0 in the runs")
    p.add_argument("--work", default=None, help="folder for the runs (default: a temp folder)")
    args = p.parse_args(argv)
    if not (0 <= args.kill_after < args.iters - 1 and (args.kill_after + 1) % args.period == 0):
        p.error("--kill-after must be a checkpoint iteration ((k + 1) % --period == 0) "
                "before the last one")
    if min(args.procs) < 1 or args.iters < 2:
        p.error("--procs must be >= 1 and --iters >= 2")
    work = args.work or tempfile.mkdtemp(prefix="check_resume_")
    os.makedirs(work, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.no_jit:
        env["PYTORCH_JIT"] = "0"
    root = os.path.join(work, "shapes")
    rows = []
    for procs in args.procs:
        straight = os.path.join(work, f"p{procs}_straight")
        broken = os.path.join(work, f"p{procs}_killed")
        log = os.path.join(work, f"p{procs}.log")
        t = time.time()
        run(command(procs, tiny_opts(root, straight, args.iters, args.period)), env, log)
        ckpt = os.path.join(broken, f"model_{args.kill_after:07d}.pth")
        how = run(command(procs, tiny_opts(root, broken, args.iters, args.period)), env, log,
                  kill_when=ckpt)
        if how != "killed" or os.path.exists(os.path.join(broken, "model_final.pth")):
            raise SystemExit(f"{procs} process(es): the run ended before it could be killed")
        left = sorted(f for f in os.listdir(broken) if f.endswith(".pth"))
        run(command(procs, tiny_opts(root, broken, args.iters, args.period), resume=True), env,
            log)
        diff = max_weight_difference(os.path.join(straight, "model_final.pth"),
                                     os.path.join(broken, "model_final.pth"))
        rows.append((procs, left, diff, time.time() - t))
        print(f"{procs} process(es): killed with checkpoints {left}; max |w_uninterrupted - "
              f"w_resumed| = {diff:.3g} ({time.time() - t:.0f} s)", flush=True)
    print(f"\n| processes | checkpoints when killed | max weight difference |\n|---|---|---|")
    for procs, left, diff, _ in rows:
        print(f"| {procs} | {', '.join(left)} | {diff:.3g} |")
    print(f"\n{args.iters} iterations, PYTORCH_JIT={'0' if args.no_jit else 'default'}, runs in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
