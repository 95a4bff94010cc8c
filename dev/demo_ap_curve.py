#!/usr/bin/env python
"""AP against training time of a run that evaluated periodically (TEST.EVAL_PERIOD), and
the budget a log-linear fit puts on a target AP.

    python train_net.py --config-file configs/HARNet/demo/har_R18_shapes_demo.yaml \\
        OUTPUT_DIR output/demo_curve SOLVER.MAX_ITER 2700 TEST.EVAL_PERIOD 300
    python dev/demo_ap_curve.py output/demo_curve --target 20 --plot curve.png

Reads OUTPUT_DIR/metrics.json (Detectron2's JSONWriter): every "bbox/AP" row is one
evaluation; training seconds at an evaluation = the sum of the logged per-iteration
"time" medians x the iterations between log rows (evaluation time excluded). Prints one
row per evaluation (iteration, training minutes, AP, AP50, per-class AP) and, from the
evaluations after the first, the least-squares fit AP = a + b ln(iterations) and the
iterations / minutes at which it reaches --target AP (and --target50 AP50): an
extrapolation, valid only as far as the curve keeps its shape. Note that a step schedule
(SOLVER.STEPS) lifts AP right after each decay, so intermediate points sit below what a
run that ends there would reach.
"""
import argparse
import json
import math
import os
import sys

import numpy as np


def read_curve(out_dir):
    """[(iteration, train_seconds, row)] for each evaluation row of metrics.json."""
    path = os.path.join(out_dir, "metrics.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no metrics.json (is {out_dir!r} a training OUTPUT_DIR?)")
    rows = [json.loads(line) for line in open(path) if line.strip()]
    curve, seconds, last_iter = [], 0.0, -1
    for r in rows:
        if "time" in r:
            seconds += r["time"] * (r["iteration"] - last_iter)
            last_iter = r["iteration"]
        if "bbox/AP" in r:
            # Periodic evaluations are stored at the last finished iteration's index, the
            # final one at MAX_ITER: iterations done = index + 1, at most the last logged + 1.
            curve.append((min(r["iteration"], last_iter) + 1, seconds, r))
    if not curve:
        raise ValueError(f"{path}: no evaluation rows (train with TEST.EVAL_PERIOD > 0)")
    return curve


def fit_log(iters, values):
    """Least squares ``value = a + b ln(iters)``; returns (a, b)."""
    b, a = np.polyfit(np.log(np.asarray(iters, float)), np.asarray(values, float), 1)
    return float(a), float(b)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("output_dir")
    p.add_argument("--target", type=float, default=20.0, help="AP to reach (default 20)")
    p.add_argument("--target50", type=float, default=40.0, help="AP50 to reach (default 40)")
    p.add_argument("--plot", default="", help="write the curve as PNG here")
    args = p.parse_args(argv)
    curve = read_curve(args.output_dir)
    classes = [k[len("bbox/AP-"):] for k in curve[-1][2] if k.startswith("bbox/AP-")]
    print("| iterations | train min | AP | AP50 | " + " | ".join(classes) + " |")
    print("|---|---|---|---|" + "---|" * len(classes))
    for it, sec, r in curve:
        print(f"| {it} | {sec / 60:.1f} | {r['bbox/AP']:.2f} | {r['bbox/AP50']:.2f} | "
              + " | ".join(f"{r['bbox/AP-' + c]:.1f}" for c in classes) + " |")
    pts = curve[1:] if len(curve) > 2 else curve
    sec_per_iter = curve[-1][1] / curve[-1][0]
    if len(pts) >= 2:
        for key, target in (("bbox/AP", args.target), ("bbox/AP50", args.target50)):
            a, b = fit_log([c[0] for c in pts], [c[2][key] for c in pts])
            line = f"fit {key[5:]} = {a:.2f} + {b:.2f} ln(iterations)"
            if b > 0:
                need = math.exp((target - a) / b)
                line += (f": {key[5:]} {target:g} at ~{need:.0f} iterations "
                         f"(~{need * sec_per_iter / 60:.0f} min at {sec_per_iter:.2f} s/iter)")
            else:
                line += f": not rising, no estimate for {key[5:]} {target:g}"
            print(line)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        ax.plot([c[1] / 60 for c in curve], [c[2]["bbox/AP"] for c in curve], "o-", label="AP")
        ax.plot([c[1] / 60 for c in curve], [c[2]["bbox/AP50"] for c in curve], "s-", label="AP50")
        ax.set_xlabel("training minutes (evaluation excluded)")
        ax.set_ylabel("COCO AP (%)")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
