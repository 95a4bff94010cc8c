"""dev/gpu_check.py: its CPU mode end to end (``--cpu --quick``, so the GPU check is
exercised on every CI run), and its helpers against hand-made cases."""

from harnet_model_utils import REPO
import json
import os
import subprocess
import sys

import pytest
import torch

from harnet.devtools import gpu_check as gc

SCRIPT = os.path.join(REPO, "dev", "gpu_check.py")


# ------------------------------------------------------------------------ helpers
def test_find_cuda_tests(tmp_path):
    (tmp_path / "test_a.py").write_text(
        "import pytest, torch\n"
        "@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU')\n"
        "@pytest.mark.parametrize('x', [1, 2])\n"
        "def test_on_gpu(x):\n    pass\n\n"
        "def test_on_cpu():\n    pass\n\n"
        "@pytest.mark.skipif(True, reason='other')\n"
        "def test_other():\n    pass\n"
    )
    (tmp_path / "test_b.py").write_text(
        "import pytest, torch\n"
        "needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU')\n"
        "@needs_gpu\ndef test_alias():\n    pass\n\n"
        "@pytest.mark.slow\ndef test_plain():\n    pass\n"
    )
    (tmp_path / "test_c.py").write_text(
        "import pytest, torch\n"
        "pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='GPU')\n"
        "def test_one():\n    pass\n\ndef test_two():\n    pass\n"
    )
    (tmp_path / "helper.py").write_text(
        "@pytest.mark.skipif(not torch.cuda.is_available(), reason='x')\ndef test_x():\n    pass\n"
    )
    (tmp_path / "layers").mkdir()
    (tmp_path / "layers" / "test_d.py").write_text(
        "import pytest\n@pytest.mark.cuda\ndef test_marked():\n    pass\n\ndef test_not():\n    pass\n"
    )
    assert gc.find_cuda_tests(str(tmp_path)) == [
        "tests/test_a.py::test_on_gpu",
        "tests/test_b.py::test_alias",
        "tests/test_c.py::test_one",
        "tests/test_c.py::test_two",
        "tests/layers/test_d.py::test_marked",
    ]


def test_find_cuda_tests_in_repo():
    ids = gc.find_cuda_tests(os.path.join(REPO, "tests"))
    for known in (
        "tests/modeling/test_modules.py::test_aligned_attention_cuda_matches_cpu",
        "tests/modeling/test_dtype_device.py::test_harretinanet_cuda_autocast_fp16_train_and_infer",
    ):
        assert known in ids


def test_detection_match_ignores_order_and_counts_close_boxes_only():
    boxes = torch.tensor([[0.0, 0, 10, 10], [5, 5, 20, 20], [30, 30, 40, 45]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    classes = torch.tensor([1, 2, 1])
    ref = (boxes, scores, classes)
    assert gc.match_detections(ref, ref, 0.0, 0.0) == 1.0
    perm = torch.tensor([2, 0, 1])  # order does not matter
    assert gc.match_detections(ref, tuple(t[perm] for t in ref), 0.0, 0.0) == 1.0
    moved = boxes.clone()
    moved[1, 2] += 0.5
    assert gc.match_detections(ref, (moved, scores, classes), 0.1, 0.0) == pytest.approx(2 / 3)
    assert gc.match_detections(ref, (moved, scores, classes), 0.5, 0.0) == 1.0
    assert gc.match_detections(
        ref, (boxes, scores, torch.tensor([1, 1, 1])), 1.0, 1.0
    ) == pytest.approx(2 / 3)
    assert gc.match_detections(ref, tuple(t[:2] for t in ref), 0.0, 0.0) == pytest.approx(2 / 3)
    empty = (boxes[:0], scores[:0], classes[:0])
    assert gc.match_detections(empty, empty, 0.0, 0.0) == 1.0
    assert gc.match_detections(ref, empty, 0.0, 0.0) == 0.0
    # One to one: two reference boxes cannot both match one subject box.
    dup = (boxes[[0, 0]], scores[[0, 0]], classes[[0, 0]])
    assert gc.match_detections(dup, tuple(t[:1] for t in ref), 0.0, 0.0) == 0.5


def test_rel_err_and_non_contiguous():
    a = torch.tensor([1.0, -2.0, 4.0])
    assert gc.rel_err(a, a) == 0.0
    assert gc.rel_err(a + torch.tensor([0.0, 0.0, 0.4]), a) == pytest.approx(0.1)
    assert gc.rel_err(a[:2], a) == float("inf")
    x = torch.randn(5, 4)
    y = gc.non_contiguous(x)
    assert not y.is_contiguous() and torch.equal(y, x)


def test_refuses_gpu_mode_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SystemExit) as err:
        gc.main(["--out", str(tmp_path)])
    assert err.value.code == 2


# ------------------------------------------------------------------- the CPU run
@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--cpu", "--quick", "--threads", "1", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    report_path = out / "gpu_check.json"
    assert report_path.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(report_path) as f:
        report = json.load(f)
    return proc, report, (out / "gpu_check.md").read_text()


@pytest.mark.slow
def test_cpu_quick_run_passes(cpu_run):
    proc, report, _ = cpu_run
    failed = [(n, r["check"]) for n in gc.SECTIONS for r in report[n]["rows"] if not r["ok"]]
    errors = {n: report[n]["error"] for n in gc.SECTIONS if report[n].get("error")}
    assert not errors and not failed, (errors, failed)
    assert report["ok"] and proc.returncode == 0
    assert report["environment"]["info"]["mode"] == "cpu quick"


@pytest.mark.slow
def test_cpu_quick_run_has_every_section(cpu_run):
    _, report, _ = cpu_run
    for name in gc.SECTIONS:
        assert name in report and not report[name].get("skipped"), name
        assert report[name]["wall_s"] > 0
    checks = [r["check"] for r in report["equivalence"]["rows"]]
    for module in ("SpatialAttention", "CrossLevelGroupNorm", "CrossLevelSE", "AlignedAttention"):
        for what in ("forward", "backward", "autocast"):
            assert any(c.startswith(module) and what in c for c in checks), (module, what)
    from harnet.layers import SOFT_NMS_METHODS, VOTING_SCORINGS

    for method in SOFT_NMS_METHODS:
        assert sum(c.startswith(f"soft-NMS {method},") for c in checks) >= 2  # both sets
    for scoring in VOTING_SCORINGS:
        assert sum(c.startswith(f"box voting {scoring},") for c in checks) >= 2
    assert sum(c.startswith("suppress_detections") for c in checks) >= 6
    assert sum(c.startswith("TTA") for c in checks) == 2
    # The CUDA-only tests were found and, without a GPU, all skipped.
    cuda = report["cuda_tests"]["info"]
    assert len(cuda["tests"]) >= 4 and cuda["outcomes"]
    assert set(cuda["outcomes"].values()) == {"skipped"}


@pytest.mark.slow
def test_cpu_quick_run_training_losses(cpu_run):
    _, report, _ = cpu_run
    runs = report["training"]["info"]["runs"]
    assert set(runs) == {"fp32", "fp16", "bf16"}
    iters = report["training"]["info"]["iterations"]
    for name, run in runs.items():
        assert len(run["total"]) == iters
        for losses in run["losses"]:
            assert set(losses) == {
                "loss_cls",
                "loss_box_reg",
                "loss_cls_channel",
                "loss_box_reg_channel",
            }
            assert all(0 < v < 1e3 for v in losses.values()), (name, losses)
    # AMP runs start from fp32's weights on fp32's batches: close, yet not bit-identical.
    for p in ("fp16", "bf16"):
        first, ref = runs[p]["total"][0], runs["fp32"]["total"][0]
        assert first != ref and abs(first - ref) <= gc.TOL_LOSS[p][0] * ref


@pytest.mark.slow
def test_cpu_quick_run_benchmark_and_table(cpu_run):
    _, report, md = cpu_run
    res = report["benchmark"]["info"]["results"]
    for model in ("HAR-Net", "RetinaNet"):
        for key in (
            "train_b2_s",
            "train_b4_s",
            "infer_ms",
            "network_ms",
            "mem_train_b2_mib",
            "mem_train_b4_mib",
            "mem_infer_b1_mib",
        ):
            assert res[model][key] > 0, (model, key)
    timings = report["postprocess"]["info"]["timings_ms"]
    assert any(k.startswith("COCO-like") and k.endswith("soft-NMS gaussian") for k in timings)
    assert any(
        k.startswith("dense") and k.endswith("suppress_detections, authors' settings")
        for k in timings
    )
    # One markdown table: a header and one line per check.
    rows = sum(len(report[n]["rows"]) for n in gc.SECTIONS)
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| section | check |") and len(table) == rows + 1
    assert "all checks passed" in md.splitlines()[0]
