#!/usr/bin/env python
"""Train and evaluate variants of one config under the same schedule over several seeds,
and print their COCO box AP (AP, AP50, AP75, APs, APm, APl; mean ± std over seeds) with the
paired difference to a baseline. Default: the CPU demo config, HAR-Net against the all-off
baseline (Detectron2's RetinaNet), seeds 0 1 2.

    python tools/compare_variants.py                          # output/compare/summary.md
    python tools/compare_variants.py --seeds 0 -- SOLVER.MAX_ITER 300   # '--' ends --seeds
    python tools/compare_variants.py --config-file configs/HARNet/demo/har_R18_shapes_demo.yaml \\
        --variants "HAR-Net" "spatial off@MODEL.HARNET.SPATIAL.ENABLED=False" \\
        "RetinaNet@MODEL.HARNET.ALIGN.ENABLED=False@MODEL.HARNET.CLGN.ENABLED=False@MODEL.HARNET.SPATIAL.ENABLED=False@MODEL.HARNET.CHANNEL.ENABLED=False"

Each run is a train_net.py process (its progress lines with ETA are shown) in
OUTPUT/<variant>/seed<N>; finished runs are reused, interrupted ones resume.

Each run is ``train_net.py --resume --config-file CFG <common overrides> <variant
overrides> OUTPUT_DIR <out>/<variant>/seed<N> SEED N`` in a fresh process, so a run is
exactly what a user gets from the command line; only the variant's overrides and the seed
differ between runs. A run whose results exist (``results.json`` in its folder, written by
the same command) is reused, an interrupted one resumes from its last checkpoint.

The AP of one run is the evaluation that training ends with (Detectron2's ``EvalHook``,
also written to ``metrics.json``), so every variant is evaluated by the same
``COCOEvaluator`` on the same test set. ``--extra-evals LABEL@KEY=VALUE...`` evaluates every
trained model again (``train_net.py --eval-only`` with those overrides, results read from
its ``eval_results.json``), e.g. on another test set or at another test size: one more
table each.
"""
import argparse
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

from harnet.engine.defaults import EVAL_RESULTS_FILE, build_config, parse_variant
from harnet.engine.defaults import argument_parser as argument_parser_train

__all__ = [
    "DEFAULT_VARIANTS",
    "METRICS",
    "parse_variant",
    "run_command",
    "read_final_metrics",
    "summarize",
    "format_table",
    "main",
]

from harnet.devtools import REPO
DEMO_CONFIG = os.path.join("configs", "HARNet", "demo", "har_R18_shapes_demo.yaml")
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
ALL_OFF = [f"MODEL.HARNET.{k}.ENABLED=False" for k in ("ALIGN", "CLGN", "SPATIAL", "CHANNEL")]
# The config as it is (the full hybrid), and all four switches off: Detectron2's RetinaNet.
DEFAULT_VARIANTS = ["HAR-Net", "RetinaNet (all off)@" + "@".join(ALL_OFF)]
RESULTS_FILE = "results.json"


def _slug(label: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)
    return "_".join(p for p in keep.split("_") if p) or "variant"


def run_command(config_file: str, out_dir: str, seed: int, variant_opts: Sequence[str],
                common_opts: Sequence[str], python: str = sys.executable) -> List[str]:
    """The ``train_net.py`` command line of one run (variant overrides after the common
    ones, so a variant's switches win)."""
    return [python, os.path.join(REPO, "train_net.py"), "--resume", "--config-file", config_file,
            *common_opts, *variant_opts, "OUTPUT_DIR", out_dir, "SEED", str(seed)]


def read_final_metrics(out_dir: str) -> Dict[str, object]:
    """The last evaluation and the training speed of a finished run, from its
    ``metrics.json`` (Detectron2's ``JSONWriter``).

    Returns:
        dict: ``bbox`` (metric name -> value, COCO AP in %; NaN for an area range without
        ground truth), ``iteration`` (of that evaluation), ``time`` (median seconds per
        training iteration over the logged windows; None if never logged).
    """
    path = os.path.join(out_dir, "metrics.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: the run in {out_dir} did not train")
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}, line {n}: not JSON ({e})") from e
    evals = [r for r in rows if "bbox/AP" in r]
    if not evals:
        if any(k.endswith("/bbox/AP") for r in rows for k in r):
            raise ValueError(f"{path}: evaluations of several test sets; compare_variants "
                             "compares one (set DATASETS.TEST to one dataset)")
        raise ValueError(f"{path} has no evaluation (bbox/AP): is DATASETS.TEST empty?")
    last = evals[-1]
    bbox = {k[len("bbox/"):]: float(v) for k, v in last.items() if k.startswith("bbox/")}
    times = [r["time"] for r in rows if "time" in r]
    return {"bbox": bbox, "iteration": last["iteration"],
            "time": statistics.median(times) if times else None}


def _mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (0 for one value) of the finite values; NaN when
    none is finite (e.g. APl on a test set without large objects)."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), (statistics.stdev(finite) if len(finite) > 1 else 0.0)


def summarize(results: Dict[str, Dict[int, Dict[str, float]]], baseline: Optional[str] = None):
    """Per-variant mean and standard deviation over seeds, and the paired difference to the
    baseline (per seed, then averaged: the seeds share data and schedule).

    Args:
        results: variant label -> seed -> metric name -> value.
        baseline: label of the variant the others are compared to (None: no differences).

    Returns:
        dict: label -> {"n": seeds, metric: (mean, std), "diff": {metric: (mean, std)}}.
    """
    out = {}
    for label, by_seed in results.items():
        row = {"n": len(by_seed)}
        for m in METRICS:
            row[m] = _mean_std([by_seed[s].get(m, math.nan) for s in sorted(by_seed)])
        if baseline is not None and label != baseline and baseline in results:
            common = sorted(set(by_seed) & set(results[baseline]))
            row["diff"] = {m: _mean_std([by_seed[s].get(m, math.nan)
                                         - results[baseline][s].get(m, math.nan) for s in common])
                           for m in METRICS}
            row["diff_n"] = len(common)
        out[label] = row
    return out


def _cell(mean_std, signed=False):
    mean, std = mean_std
    if not math.isfinite(mean):
        return "-"
    fmt = "{:+.2f}" if signed else "{:.2f}"
    return fmt.format(mean) + (f" ± {std:.2f}" if std > 0 else "")


def format_table(summary, results, baseline=None, seconds=None) -> str:
    """A markdown table: COCO box AP (%) per variant (mean ± std over seeds), the AP of
    each seed, training s/iter, and the difference to the baseline."""
    head = ["variant", "seeds"] + list(METRICS) + ["AP per seed"]
    if seconds:
        head.append("s/iter")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, row in summary.items():
        per_seed = ", ".join(f"{results[label][s]['AP']:.2f}" for s in sorted(results[label]))
        cells = [label, str(row["n"])] + [_cell(row[m]) for m in METRICS] + [per_seed]
        if seconds:
            cells.append(f"{seconds[label]:.3f}" if seconds.get(label) else "-")
        lines.append("| " + " | ".join(cells) + " |")
    for label, row in summary.items():
        if "diff" in row:
            cells = [f"{label} − {baseline}", str(row["diff_n"])]
            cells += [_cell(row["diff"][m], signed=True) for m in METRICS] + [""]
            if seconds:
                s, b = seconds.get(label), seconds.get(baseline)
                cells.append(f"x{s / b:.2f}" if s and b else "-")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def argument_parser():
    p = argparse.ArgumentParser(
        prog="tools/compare_variants.py",
        description="Train and evaluate config variants under the same schedule over several "
        "seeds; print their COCO box AP (mean ± std) and the difference to a baseline.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config-file", default=DEMO_CONFIG, help="yacs config (default: the CPU demo)")
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS,
                   metavar="LABEL[@KEY=VALUE]",
                   help="variants of the config (default: the config as is, 'HAR-Net', and "
                   "'RetinaNet (all off)' with the four MODEL.HARNET.*.ENABLED False)")
    p.add_argument("--baseline", default=None,
                   help="label of the variant to compare against (default: the last variant)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="cfg.SEED of the runs")
    p.add_argument("--extra-evals", nargs="+", default=[], metavar="LABEL[@KEY=VALUE]",
                   help="also evaluate every trained model (train_net.py --eval-only) with these "
                   "overrides, e.g. another test set or test size; one table each")
    p.add_argument("--output", default=os.path.join("output", "compare"),
                   help="runs go to OUTPUT/<variant>/seed<N>; summary.md and summary.json here")
    p.add_argument("--force", action="store_true",
                   help="delete the runs' folders and train them again")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("opts", nargs=argparse.REMAINDER,
                   help="KEY VALUE overrides for every variant (e.g. SOLVER.MAX_ITER 300); after "
                   "'--' when they follow --variants, --seeds or --extra-evals")
    return p


def _call(cmd, what, log):
    log(shlex.join(cmd))
    rc = subprocess.call(cmd, cwd=REPO)
    if rc != 0:
        raise RuntimeError(f"{what} failed with exit code {rc}: {shlex.join(cmd)}")


def _single_dataset(results, path):
    """The bbox metrics of the only test set in ``--eval-only`` results."""
    if len(results) != 1:
        raise ValueError(f"{path}: results of {sorted(results)}; compare_variants evaluates "
                         "one test set per evaluation (set DATASETS.TEST to one dataset)")
    (res,) = results.values()
    return {k: float(v) for k, v in res["bbox"].items()}


def _check_same_command(res, key, cmd, path):
    """A reused result must come from the same command line (python executable aside)."""
    old = res.get(key)
    if old is not None and old[1:] != cmd[1:]:
        raise SystemExit(
            f"{path} was made by a different command:\n  {shlex.join(old[1:])}\nnow:\n  "
            f"{shlex.join(cmd[1:])}\nuse another --output, or --force to train again")


def _run_one(config, out_dir, seed, opts, args, extra_evals, log):
    """Train (or reuse) one run and evaluate it with every extra evaluation it lacks;
    returns its ``results.json`` content."""
    done = os.path.join(out_dir, RESULTS_FILE)
    cmd = run_command(config, out_dir, seed, opts, args.opts)
    if os.path.isfile(done):
        with open(done) as f:
            res = json.load(f)
        _check_same_command(res, "command", cmd, done)
        log(f"reusing {done}")
    else:
        os.makedirs(out_dir, exist_ok=True)
        start = time.time()
        _call(cmd, f"training in {out_dir}", log)
        res = read_final_metrics(out_dir)
        res.update(wall_s=time.time() - start, command=cmd)
    res.setdefault("evals", {})
    res.setdefault("eval_commands", {})
    for label, eval_opts in extra_evals:
        eval_dir = os.path.join(out_dir, "eval", _slug(label))
        cmd = run_command(config, eval_dir, seed, opts, args.opts)
        cmd.insert(2, "--eval-only")
        cmd += [*eval_opts, "MODEL.WEIGHTS", os.path.join(out_dir, "model_final.pth")]
        if label in res["evals"]:
            _check_same_command(res["eval_commands"], label, cmd, f"{done} (evaluation {label!r})")
            continue
        log(f"evaluating {out_dir} ({label})")
        _call(cmd, f"evaluation '{label}' of {out_dir}", log)
        path = os.path.join(eval_dir, EVAL_RESULTS_FILE)
        with open(path) as f:
            res["evals"][label] = _single_dataset(json.load(f), path)
        res["eval_commands"][label] = cmd
    with open(done, "w") as f:
        json.dump(res, f, indent=1)
    return res


def main(argv=None) -> int:
    args = argument_parser().parse_args(argv)
    if args.opts[:1] == ["--"]:  # "--" ends a several-value option (--seeds 0 1 -- KEY VALUE)
        args.opts = args.opts[1:]
    if args.config_file.endswith(".py"):
        raise SystemExit("compare_variants takes yacs (.yaml) configs; variants are KEY=VALUE overrides")
    config = args.config_file if os.path.isfile(args.config_file) else \
        os.path.join(REPO, args.config_file)
    if not os.path.isfile(config):
        raise SystemExit(f"--config-file {args.config_file!r} does not exist")
    config = os.path.abspath(config)
    if len(args.opts) % 2:
        raise SystemExit(f"overrides must be KEY VALUE pairs, got {args.opts}")
    try:
        variants = [parse_variant(v) for v in args.variants]
        extra_evals = [parse_variant(v) for v in args.extra_evals]
    except ValueError as e:
        raise SystemExit(str(e)) from None
    labels = [label for label, _ in variants]
    if len({_slug(label) for label in labels}) != len(labels):
        raise SystemExit(f"variant labels must differ (also as folder names): {labels}")
    baseline = args.baseline or labels[-1]
    if baseline not in labels:
        raise SystemExit(f"--baseline {baseline!r} is none of the variants {labels}")
    output = os.path.abspath(args.output)
    log = lambda msg: print(f"[compare] {msg}", flush=True)  # noqa: E731
    test_set = ", ".join(_test_sets(config, args.opts))
    evaluations = [test_set] + [label for label, _ in extra_evals]
    if len(set(evaluations)) != len(evaluations) or len(
            {_slug(e) for e, _ in extra_evals}) != len(extra_evals):
        raise SystemExit(f"evaluation labels must differ from each other and the test set: {evaluations}")

    _check_configs(config, args.opts, variants, extra_evals)

    # Seed-major order: after each seed every variant has a result to compare.
    plan = [(label, opts, seed) for seed in args.seeds for label, opts in variants]
    results = {e: {label: {} for label in labels} for e in evaluations}
    seconds = {label: [] for label in labels}
    for k, (label, opts, seed) in enumerate(plan, 1):
        out_dir = os.path.join(output, _slug(label), f"seed{seed}")
        log(f"run {k}/{len(plan)}: {label}, seed {seed} -> {out_dir}")
        if args.dry_run:
            log(shlex.join(run_command(config, out_dir, seed, opts, args.opts)))
            continue
        if args.force and os.path.isdir(out_dir):
            shutil.rmtree(out_dir)
        res = _run_one(config, out_dir, seed, opts, args, extra_evals, log)
        results[test_set][label][seed] = res["bbox"]
        for e, _ in extra_evals:
            results[e][label][seed] = res["evals"][e]
        if res.get("time"):
            seconds[label].append(res["time"])
        for e in evaluations:
            bbox = results[e][label][seed]
            log(f"{label}, seed {seed}, {e}: " + ", ".join(f"{m} {bbox[m]:.2f}" for m in METRICS))
    if args.dry_run:
        return 0
    secs = {label: statistics.median(v) if v else None for label, v in seconds.items()}
    reproduce = shlex.join(["python", "tools/compare_variants.py"] + (argv if argv is not None else sys.argv[1:]))
    text = (f"COCO box AP (%), config `{os.path.relpath(config, REPO)}`, seeds {args.seeds}: "
            "mean ± sample std over seeds; differences paired by seed; s/iter: median training "
            "time per iteration.\n")
    summaries = {}
    for e in evaluations:
        summaries[e] = summarize(results[e], baseline=baseline)
        opts = dict(extra_evals).get(e)
        how = "the evaluation training ends with" if opts is None else \
            "--eval-only with " + " ".join(opts)
        text += f"\n**{e}** ({how})\n\n" + format_table(
            summaries[e], results[e], baseline=baseline, seconds=secs if e == test_set else None) + "\n"
    text += f"\n```bash\n{reproduce}\n```\n"
    print("\n" + text)
    os.makedirs(output, exist_ok=True)
    with open(os.path.join(output, "summary.md"), "w") as f:
        f.write(text)
    with open(os.path.join(output, "summary.json"), "w") as f:
        json.dump({"config": config, "seeds": args.seeds, "baseline": baseline,
                   "variants": dict(variants), "extra_evals": dict(extra_evals),
                   "test_set": test_set, "results": results, "summary": summaries,
                   "seconds_per_iter": secs}, f, indent=1)
    log(f"summary written to {os.path.join(output, 'summary.md')}")
    return 0


def _check_configs(config, common_opts, variants, extra_evals):
    """Build every run's config (each variant's, each extra evaluation's) before any run,
    so that a misspelt key or a bad value stops the command at once, naming the variant
    (not after training the variants before it)."""
    parser = argument_parser_train()
    for label, opts in variants:
        try:
            build_config(parser.parse_args(["--config-file", config, *common_opts, *opts]))
            for e, eval_opts in extra_evals:
                what = f"extra evaluation {e!r}"
                build_config(parser.parse_args(
                    ["--config-file", config, *common_opts, *opts, *eval_opts]), purpose="eval")
        except Exception as err:  # yacs: KeyError / ValueError / AssertionError ...
            raise SystemExit(f"variant {label!r}: {type(err).__name__}: {err}") from None


def _test_sets(config, opts):
    """The config's test sets, as train_net.py's config setup resolves them."""
    cfg = build_config(argument_parser_train().parse_args(["--config-file", config, *opts]))
    return list(cfg.DATASETS.TEST)


if __name__ == "__main__":
    sys.exit(main())
