"""tools/compare_variants.py: variants of one config trained under
the same schedule over seeds, their COCO AP tabulated against a baseline."""
from harnet_model_utils import REPO
import glob
import json
import math
import os
import subprocess

import numpy as np
import pytest

from harnet_model_utils import pycocotools_box_ap

from harnet.commands import compare_variants as compare
from harnet_model_utils import DEMO_YAML, tiny_opts


def test_variant_syntax_gives_label_and_overrides_and_rejects_malformed_entries():
    assert compare.parse_variant("HAR-Net") == ("HAR-Net", [])
    assert compare.parse_variant("off@MODEL.HARNET.CLGN.ENABLED=False@SOLVER.STEPS=(1, 2)") == (
        "off", ["MODEL.HARNET.CLGN.ENABLED", "False", "SOLVER.STEPS", "(1, 2)"])
    with pytest.raises(ValueError, match="not KEY=VALUE"):
        compare.parse_variant("x@MODEL.HARNET.CLGN.ENABLED")
    with pytest.raises(ValueError, match="empty label"):
        compare.parse_variant("@A=1")


def test_default_variants_are_full_and_all_off():
    (full, full_opts), (base, base_opts) = map(compare.parse_variant, compare.DEFAULT_VARIANTS)
    assert full_opts == []
    assert dict(zip(base_opts[::2], base_opts[1::2])) == {
        f"MODEL.HARNET.{k}.ENABLED": "False" for k in ("ALIGN", "CLGN", "SPATIAL", "CHANNEL")}


def test_summarize_against_numpy():
    rng = np.random.RandomState(0)
    results = {
        name: {seed: {m: float(rng.uniform(0, 50)) for m in compare.METRICS} for seed in (0, 1, 2)}
        for name in ("a", "base")
    }
    results["a"][1]["APl"] = math.nan  # an area range without ground truth in one run
    s = compare.summarize(results, baseline="base")
    for name in results:
        for m in compare.METRICS:
            values = np.array([results[name][k][m] for k in (0, 1, 2)])
            values = values[np.isfinite(values)]
            mean, std = s[name][m]
            assert mean == pytest.approx(values.mean())
            assert std == pytest.approx(values.std(ddof=1))
    assert "diff" not in s["base"]
    for m in compare.METRICS:
        d = np.array([results["a"][k][m] - results["base"][k][m] for k in (0, 1, 2)])
        d = d[np.isfinite(d)]
        assert s["a"]["diff"][m] == pytest.approx((d.mean(), d.std(ddof=1)))
    # Only the seeds both variants have are paired.
    del results["base"][2]
    s = compare.summarize(results, baseline="base")
    assert s["a"]["diff_n"] == 2
    assert s["a"]["diff"]["AP"][0] == pytest.approx(
        np.mean([results["a"][k]["AP"] - results["base"][k]["AP"] for k in (0, 1)]))
    # One seed: std 0; no finite value: NaN.
    one = compare.summarize({"x": {0: {"AP": 3.0, "APl": math.nan}}})
    assert one["x"]["AP"] == (3.0, 0.0) and all(map(math.isnan, one["x"]["APl"]))


def test_summary_table_lists_mean_std_and_difference_to_the_baseline():
    results = {"full": {0: {m: 10.0 for m in compare.METRICS}, 1: {m: 12.0 for m in compare.METRICS}},
               "base": {0: {m: 8.0 for m in compare.METRICS}, 1: {m: 9.0 for m in compare.METRICS}}}
    results["full"][0]["APl"] = results["full"][1]["APl"] = math.nan
    s = compare.summarize(results, baseline="base")
    table = compare.format_table(s, results, baseline="base", seconds={"full": 0.3, "base": 0.2})
    lines = table.splitlines()
    assert lines[0].startswith("| variant | seeds | AP | AP50")
    assert "| full | 2 | 11.00 ± 1.41 |" in lines[2] and "| 10.00, 12.00 | 0.300 |" in lines[2]
    assert " - |" in lines[2]  # APl: no finite value
    assert lines[4].startswith("| full − base | 2 | +2.50 ± 0.71 |") and lines[4].endswith("x1.50 |")


def test_read_final_metrics(tmp_path):
    with pytest.raises(FileNotFoundError, match="did not train"):
        compare.read_final_metrics(str(tmp_path))
    rows = [{"iteration": 19, "time": 0.5, "total_loss": 1.0},
            {"iteration": 39, "time": 0.3, "total_loss": 0.9},
            {"iteration": 39, "bbox/AP": 1.0, "bbox/APs": float("nan")},
            {"iteration": 59, "time": 0.4, "total_loss": 0.8},
            {"iteration": 59, "bbox/AP": 2.5, "bbox/APs": 1.5, "bbox/AP-circle": 4.0}]
    with open(tmp_path / "metrics.json", "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows[:3]) + "\n")
    assert compare.read_final_metrics(str(tmp_path))["iteration"] == 39
    assert math.isnan(compare.read_final_metrics(str(tmp_path))["bbox"]["APs"])
    with open(tmp_path / "metrics.json", "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    res = compare.read_final_metrics(str(tmp_path))
    assert res == {"bbox": {"AP": 2.5, "APs": 1.5, "AP-circle": 4.0}, "iteration": 59, "time": 0.4}
    with open(tmp_path / "metrics.json", "w") as f:
        f.write(json.dumps(rows[0]) + "\n")
    with pytest.raises(ValueError, match="no evaluation"):
        compare.read_final_metrics(str(tmp_path))
    with open(tmp_path / "metrics.json", "w") as f:
        f.write(json.dumps(rows[0]) + "\n{broken\n")
    with pytest.raises(ValueError, match="line 2"):
        compare.read_final_metrics(str(tmp_path))


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        compare.main(["--config-file", str(tmp_path / "nope.yaml")])
    with pytest.raises(SystemExit, match="--baseline 'x'"):
        compare.main(["--config-file", DEMO_YAML, "--baseline", "x", "--dry-run"])
    with pytest.raises(SystemExit, match="labels must differ"):
        compare.main(["--config-file", DEMO_YAML, "--variants", "a", "a@SEED=1", "--dry-run"])


def assert_same_metrics(ours, reference):
    for m in compare.METRICS:
        if math.isnan(reference[m]):
            assert math.isnan(ours[m]), (m, ours[m])
        else:
            assert ours[m] == pytest.approx(reference[m], abs=1e-6), m


@pytest.mark.slow
def test_compare_runs_train_net_and_matches_pycocotools(tmp_path, monkeypatch):
    data, out = str(tmp_path / "data"), str(tmp_path / "cmp")
    # Common overrides: the demo shrunk to a few iterations (OUTPUT_DIR is set per run).
    opts = tiny_opts(data, "unused", max_iter=3)
    # An extra evaluation: a test set at twice the resolution (objects up to 80 px), resized
    # to the training scale (INPUT.MIN_SIZE_TEST 64 of tiny_opts).
    double = "2x@DATASETS.SHAPES.IMAGE_SIZE=(128, 128)@DATASETS.SHAPES.OBJECT_SIZE=(16.0, 80.0)"
    argv = ["--config-file", DEMO_YAML, "--seeds", "5", "--output", out,
            "--extra-evals", double, "--"] + opts
    assert compare.main(argv) == 0
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["baseline"] == "RetinaNet (all off)"
    assert summary["test_set"] == "harnet_shapes_val" and set(summary["results"]) == {
        "harnet_shapes_val", "2x"}
    runs = {"HAR-Net": os.path.join(out, "HAR-Net", "seed5"),
            "RetinaNet (all off)": os.path.join(out, "RetinaNet_all_off", "seed5")}
    # The two val sets (1x and 2x), told apart by their image size.
    val_sets = {json.load(open(p))["images"][0]["width"]: p
                for p in glob.glob(os.path.join(data, "shapes_seed1_n3_*", "annotations.json"))}
    val, val2x = val_sets[64], val_sets[128]
    for label, run_dir in runs.items():
        # The run's own config: the seed, the common overrides and the variant's switches.
        with open(os.path.join(run_dir, "config.yaml")) as f:
            text = f.read()
        assert "SEED: 5" in text and "MAX_ITER: 3" in text
        assert text.count("ENABLED: false") >= (4 if label != "HAR-Net" else 0)
        # The AP read back is what pycocotools computes from the run's detections, for the
        # training's own evaluation and for the extra one (on its own, larger images).
        assert_same_metrics(summary["results"]["harnet_shapes_val"][label]["5"],
                            pycocotools_box_ap(val, os.path.join(
                                run_dir, "inference", "coco_instances_results.json")))
        eval_dir = os.path.join(run_dir, "eval", "2x")
        with open(os.path.join(eval_dir, "config.yaml")) as f:
            assert "IMAGE_SIZE:\n    - 128\n    - 128" in f.read()
        assert_same_metrics(summary["results"]["2x"][label]["5"], pycocotools_box_ap(
            val2x, os.path.join(eval_dir, "inference", "coco_instances_results.json")))
    with open(os.path.join(eval_dir, "inference", "coco_instances_results.json")) as f:
        # Boxes in the 128-px images' coordinates (the network saw them resized to 64 px).
        assert 64 < max(d["bbox"][0] + d["bbox"][2] for d in json.load(f)) <= 128
    # The all-off run is Detectron2's RetinaNet: no attention parameters in its checkpoint.
    import torch

    base = torch.load(os.path.join(runs["RetinaNet (all off)"], "model_final.pth"), weights_only=True)
    full = torch.load(os.path.join(runs["HAR-Net"], "model_final.pth"), weights_only=True)
    assert len(full["model"]) > len(base["model"])
    assert not [k for k in base["model"] if "spatial" in k or "refiner" in k]
    with open(os.path.join(out, "summary.md")) as f:
        md = f.read()
    assert md.count("| HAR-Net − RetinaNet (all off) | 1 |") == 2 and "tools/compare_variants.py" in md

    # A second call reuses the finished runs and evaluations: no process is started.
    def no_process(*a, **k):
        raise AssertionError(f"ran again: {a}")

    monkeypatch.setattr(subprocess, "call", no_process)
    assert compare.main(argv) == 0
    assert json.load(open(os.path.join(out, "summary.json")))["results"] == summary["results"]
    # Other settings into the same folders are refused, naming both command lines.
    with pytest.raises(SystemExit, match="different command(.|\n)*MAX_ITER 4"):
        compare.main(argv + ["SOLVER.MAX_ITER", "4"])
    with pytest.raises(SystemExit, match="evaluation '2x'"):
        compare.main([a.replace("(16.0, 80.0)", "(16.0, 90.0)") for a in argv])
    monkeypatch.undo()

    # --force trains again; training is deterministic for a seed: the same AP.
    first = os.path.getmtime(os.path.join(runs["HAR-Net"], "model_final.pth"))
    assert compare.main(["--variants", "HAR-Net", "--force"] + argv) == 0
    assert os.path.getmtime(os.path.join(runs["HAR-Net"], "model_final.pth")) > first
    again = json.load(open(os.path.join(out, "summary.json")))["results"]
    assert again["harnet_shapes_val"]["HAR-Net"] == summary["results"]["harnet_shapes_val"]["HAR-Net"]
    assert again["2x"]["HAR-Net"] == summary["results"]["2x"]["HAR-Net"]


def test_every_variant_is_checked_before_any_run(tmp_path, monkeypatch):
    # Before: the misspelt key of the second variant failed only when its run started,
    # after training the first variant.
    def no_run(cmd, what, log):
        raise AssertionError(f"nothing may run before every variant is checked: {what}")

    monkeypatch.setattr(compare, "_call", no_run)
    argv = ["--config-file", DEMO_YAML, "--output", str(tmp_path), "--seeds", "0",
            "--variants", "ok", "typo@MODEL.HARNET.SPATAL.ENABLED=False", "--"] + tiny_opts(
        str(tmp_path / "shapes"), str(tmp_path / "unused"))
    with pytest.raises(SystemExit, match="variant 'typo'.*MODEL.HARNET.SPATAL"):
        compare.main(argv)
    bad_value = argv[:argv.index("--variants")] + ["--variants", "ok", "v@SOLVER.MAX_ITER=0", "--"] + argv[argv.index("--") + 1:]
    with pytest.raises(SystemExit, match="variant 'v'.*SOLVER.MAX_ITER"):
        compare.main(bad_value)
    bad_eval = argv[:argv.index("--variants")] + ["--extra-evals", "e@TEST.AUG.ENABLED=True@TEST.AUG.MAX_SIZE=0", "--"] + argv[argv.index("--") + 1:]
    with pytest.raises(SystemExit, match="extra evaluation|TEST.AUG.MAX_SIZE"):
        compare.main(bad_eval)
    assert not os.path.exists(tmp_path / "ok")


def _benchmark_main():
    from harnet.devtools import benchmark

    return benchmark


@pytest.mark.parametrize("argv, words", [
    (["--iters", "0"], "--iters must be >= 1"),
    (["--size", "0", "0"], "--size H W must be positive"),
    (["--warmup", "-1"], "--warmup must be >= 0"),
    (["--train-iters", "0"], "--train-iters must be >= 1"),
    (["--train-batch", "0"], "--train-batch must be >= 1"),
])
def test_benchmark_arguments_checked_before_any_work(argv, words, capsys, monkeypatch):
    # Before: --iters 0 printed an empty table, --size 0 0 a raw convolution error.
    bench = _benchmark_main()
    monkeypatch.setattr(bench, "Runner", None)  # building a model would fail the test
    with pytest.raises(SystemExit) as e:
        bench.main(argv + ["--device", "cpu"])
    assert e.value.code == 2
    assert words in capsys.readouterr().err
