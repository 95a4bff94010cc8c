#!/usr/bin/env python
"""Parameters, FLOPs and CPU inference time of a HARNet model against Detectron2's RetinaNet.

Both models are built with random weights (no download) and analysed on the same random
image at the same input resolution (default 800x1333, Detectron2's test size). Prints:

- parameters and FLOPs (fvcore / Detectron2 flop counting: one multiply-add = one flop,
  element-wise ops ignored) of both models, and each HARNet module's share;
- the median inference time of each model over a few runs after warm-up, measured in this
  process with the runs of the two models interleaved, and their ratio.

The deformable convs of the aligned attention are counted like regular convs of the same
shape (torchvision::deform_conv2d has no fvcore handle; one is added here). The bilinear
sampling they add (4 multiply-adds per sampled value, i.e. 4 / C_out of the conv) is not.

Example:
    python tools/analyze_model.py --runs 3 --warmup 1
"""

import argparse
import os
import statistics
import sys
import time
from collections import OrderedDict

import torch
from fvcore.nn import parameter_count
from tabulate import tabulate
from tqdm import tqdm

from detectron2 import model_zoo
from detectron2.config import get_cfg
from detectron2.modeling import build_model

import harnet
from harnet.analysis import flop_count

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# HARNet's parts, by parameter-name prefix (disjoint). Everything else of the model is
# Detectron2's RetinaNet (ResNet, FPN, towers, predictor A, anchors).
MODULE_GROUPS = OrderedDict(
    [
        ("aligned attention (C4, C5)", ["backbone.bottom_up.aligned_attention."]),
        ("cross-level group norm", ["head.cls_subnet_norm.", "head.bbox_subnet_norm."]),
        ("spatial attention", ["head.spatial_attention."]),
        ("channel attention (SE)", ["head.cls_channel_attention.", "head.bbox_channel_attention."]),
        ("predictor B", ["head.channel_cls_score.", "head.channel_bbox_pred."]),
    ]
)
RETINANET_GROUPS = OrderedDict(
    [
        ("ResNet", ["backbone.bottom_up."]),
        ("FPN + P6/P7", ["backbone."]),
        ("towers", ["head.cls_subnet.", "head.bbox_subnet."]),
        ("predictor A", ["head.cls_score.", "head.bbox_pred."]),
    ]
)


def build(config_file, opts, har):
    cfg = get_cfg()
    if har:
        harnet.add_harnet_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(opts)
    cfg.MODEL.WEIGHTS = ""
    model = build_model(cfg)
    model.eval()
    return cfg, model


def group_sums(per_name, groups, taken):
    """Sum per_name (name -> count, per parameter or per module) over name prefixes; each
    name counts once, in the first group that claims it (`taken` collects claimed names)."""
    out = OrderedDict()
    for group, prefixes in groups.items():
        total = 0
        for name, value in per_name.items():
            if name not in taken and any(name.startswith(p) for p in prefixes):
                total += value
                taken.add(name)
        out[group] = total
    return out


def report_size(har_model, base_model, har_params, base_params, param_sizes, inputs):
    """Print the parameters / FLOPs table of both models and of HARNet's parts."""
    print("counting FLOPs (tracing both models) ...", file=sys.stderr)
    har_flops, har_own_flops, har_unsupported = flop_count(har_model, inputs)
    base_flops, _, base_unsupported = flop_count(base_model, inputs)

    taken_p, taken_f = set(), set()
    mod_params = group_sums(param_sizes, MODULE_GROUPS, taken_p)
    mod_flops = group_sums(har_own_flops, MODULE_GROUPS, taken_f)
    ret_params = group_sums(param_sizes, RETINANET_GROUPS, taken_p)
    ret_flops = group_sums(har_own_flops, RETINANET_GROUPS, taken_f)

    P, F = har_params[""], har_flops
    rows = [
        ["Detectron2 RetinaNet", f"{base_params[''] / 1e6:.2f}", "", f"{base_flops / 1e9:.1f}", ""],
        ["HARNet (total)", f"{P / 1e6:.2f}", "100.0", f"{F / 1e9:.1f}", "100.0"],
    ]
    for name in RETINANET_GROUPS:
        rows.append(
            [
                f"  RetinaNet part: {name}",
                f"{ret_params[name] / 1e6:.2f}",
                f"{100 * ret_params[name] / P:.1f}",
                f"{ret_flops[name] / 1e9:.1f}",
                f"{100 * ret_flops[name] / F:.1f}",
            ]
        )
    for name in MODULE_GROUPS:
        rows.append(
            [
                f"  HARNet module: {name}",
                f"{mod_params[name] / 1e6:.3f}",
                f"{100 * mod_params[name] / P:.2f}",
                f"{mod_flops[name] / 1e9:.2f}",
                f"{100 * mod_flops[name] / F:.2f}",
            ]
        )
    unclaimed_p = P - sum(mod_params.values()) - sum(ret_params.values())
    unclaimed_f = F - sum(mod_flops.values()) - sum(ret_flops.values())
    rows.append(["  other", f"{unclaimed_p / 1e6:.3f}", "", f"{unclaimed_f / 1e9:.2f}", ""])
    print(
        tabulate(
            rows,
            headers=["model / part", "params (M)", "% of HARNet", "GFLOPs", "% of HARNet"],
            tablefmt="github",
        )
    )
    print(
        f"\nHARNet / RetinaNet: parameters x{P / base_params['']:.3f} "
        f"(+{(P - base_params['']) / 1e6:.2f} M), FLOPs x{F / base_flops:.3f} "
        f"(+{(F - base_flops) / 1e9:.1f} G)"
    )
    for label, unsupported in (("HARNet", har_unsupported), ("RetinaNet", base_unsupported)):
        if unsupported:
            print(f"ops not counted ({label}): {unsupported}")


def time_models(models, inputs, warmup, runs):
    """Median seconds per inference of each model; runs of the models interleaved."""
    times = {name: [] for name in models}
    with torch.no_grad():
        for _ in tqdm(range(warmup), desc="warm-up", leave=False):
            for model in models.values():
                model(inputs)
        for _ in tqdm(range(runs), desc="timed runs"):
            for name, model in models.items():
                start = time.perf_counter()
                model(inputs)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--config-file", default=os.path.join(REPO, "configs/HARNet/har_R_50_FPN_1x.yaml")
    )
    parser.add_argument(
        "--baseline-config",
        default="COCO-Detection/retinanet_R_50_FPN_1x.yaml",
        help="Detectron2 model-zoo config (or a path to a yaml) of the baseline",
    )
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1333)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = default")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--skip-flops", action="store_true")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="overrides for the HARNet config")
    args = parser.parse_args(argv)

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    opts = ["MODEL.DEVICE", "cpu"] + args.opts
    baseline_file = (
        args.baseline_config
        if os.path.exists(args.baseline_config)
        else model_zoo.get_config_file(args.baseline_config)
    )
    _, har_model = build(args.config_file, opts, har=True)
    _, base_model = build(baseline_file, ["MODEL.DEVICE", "cpu"], har=False)

    image = torch.rand(3, args.height, args.width) * 255
    inputs = [{"image": image}]
    print(
        f"HARNet:   {os.path.relpath(args.config_file)}\nbaseline: {args.baseline_config}\n"
        f"input: 1 image {args.height}x{args.width}, CPU, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}"
    )

    # ---- parameters
    har_params = parameter_count(har_model)
    base_params = parameter_count(base_model)
    param_sizes = OrderedDict((n + ".", p.numel()) for n, p in har_model.named_parameters())

    # ---- flops
    if args.skip_flops:
        print(
            f"parameters: RetinaNet {base_params[''] / 1e6:.2f} M, HARNet "
            f"{har_params[''] / 1e6:.2f} M"
        )
    else:
        report_size(har_model, base_model, har_params, base_params, param_sizes, inputs)

    # ---- time
    if not args.skip_timing:
        medians, all_times = time_models(
            {"RetinaNet": base_model, "HARNet": har_model}, inputs, args.warmup, args.runs
        )
        print(
            f"\nCPU inference, median of {args.runs} runs after {args.warmup} warm-up: "
            f"RetinaNet {medians['RetinaNet']:.2f} s, HARNet {medians['HARNet']:.2f} s, "
            f"ratio HARNet/RetinaNet = {medians['HARNet'] / medians['RetinaNet']:.2f}"
        )
        fastest = {k: min(v) for k, v in all_times.items()}
        print(
            f"fastest runs (less sensitive to other load on the machine): RetinaNet "
            f"{fastest['RetinaNet']:.2f} s, HARNet {fastest['HARNet']:.2f} s, ratio "
            f"{fastest['HARNet'] / fastest['RetinaNet']:.2f}"
        )
        print(
            "all runs (s): "
            + ", ".join(f"{k}: [{', '.join(f'{t:.2f}' for t in v)}]" for k, v in all_times.items())
        )


if __name__ == "__main__":
    main()
