"""Export (tools/export_model.py, harnet.export): exported in one process, loaded in a fresh one
(TorchScript, traced or scripted: only torch + torchvision imported; torch.export: harnet for
its suppression op; ONNX: onnxruntime), compared with the eager model on three image sizes
other than the example's or beside it, one much larger."""

import os
import re
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from detectron2.modeling import build_model

from harnet_model_utils import REPO, har_cfg, perturb_

pytest.importorskip("detectron2.export", reason="Detectron2's export module (TracingAdapter)")

TRACE_SIZE = (96, 128)
SIZES = (TRACE_SIZE, (64, 80), (320, 448))
# torch.export's program takes sides >= 2 px, the longer >= the coarsest stride + 1 (129 px
# for P3-P7).
EXPORT_SIZE = (160, 192)
EXPORT_SIZES = (EXPORT_SIZE, (48, 203), (320, 448))
FORMATS = ("torchscript", "scripting", "export", "onnx")
# Formats whose program has that range: checked on EXPORT_SIZES.
DYNAMIC = ("export", "onnx")
VARIANTS = {
    "hard": [],
    "gaussian_voting": [
        "MODEL.HARNET.POSTPROCESS.NMS_TYPE", "gaussian",
        "MODEL.HARNET.POSTPROCESS.VOTING.ENABLED", "True",
        "MODEL.HARNET.POSTPROCESS.VOTING.SCORING", "unclaimed_top4",
    ],
}  # fmt: skip
# (ONNX's hard NMS is tested on its own: tests/layers/test_suppress_loop.py.)
EXPORTS = [(f, v) for f in FORMATS for v in VARIANTS if (f, v) != ("onnx", "hard")]

# Run in a fresh interpreter: nothing of Detectron2 or HARNet is imported.
LOAD_AND_RUN = textwrap.dedent("""
    import sys, torch, torchvision  # torchvision registers nms / deform_conv2d
    out_dir = sys.argv[1]
    images = torch.load(f"{out_dir}/images.pt")
    results = {}
    export_images = torch.load(f"{out_dir}/export_images.pt")
    for name in sys.argv[2:]:
        path = f"{out_dir}/{name}/model.ts"
        if name.startswith("export"):
            import harnet  # registers torch.ops.harnet.suppress_detections
            program = torch.export.load(f"{out_dir}/{name}/model.pt2").module()
            with torch.no_grad():
                results[name] = [program(im) for im in export_images]
        elif name.startswith("onnx"):
            import onnxruntime
            file = "network.onnx" if name == "onnx-network" else "model.onnx"
            session = onnxruntime.InferenceSession(f"{out_dir}/{name}/{file}")
            results[name] = [
                [torch.from_numpy(o) for o in session.run(None, {"image": im.numpy()})]
                for im in (images if name == "onnx-network" else export_images)
            ]
        else:
            model = torch.jit.load(path)
            with torch.no_grad():
                results[name] = [model(im) for im in images]
    torch.save(results, f"{out_dir}/results.pt")
    """)


def _run(cmd, env=None):
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    assert proc.returncode == 0, f"{cmd[:3]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _cfg(opts=()):
    cfg = har_cfg()
    cfg.MODEL.RETINANET.TOPK_CANDIDATES_TEST = 100  # a few hundred candidates per image
    cfg.TEST.DETECTIONS_PER_IMAGE = 60
    cfg.merge_from_list(list(opts))
    return cfg


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    cfg = _cfg()
    torch.manual_seed(0)
    model = perturb_(build_model(cfg).eval())  # non-zero deformable offsets too
    torch.save({"model": model.state_dict()}, out / "model.pth")
    (out / "config.yaml").write_text(cfg.dump())
    g = torch.Generator().manual_seed(2)
    images = [torch.rand(3, h, w, generator=g) * 255 for h, w in SIZES]
    export_images = [torch.rand(3, h, w, generator=g) * 255 for h, w in EXPORT_SIZES]
    torch.save(images, out / "images.pt")
    torch.save(export_images, out / "export_images.pt")
    tool = os.path.join(REPO, "tools", "export_model.py")
    # --no-check: the comparison is this test's, in a fresh process.
    common = ["--no-check", "--config-file", str(out / "config.yaml")]
    names, commands = [], []
    # The slowest first (ONNX's conversion), so that both workers stay busy to the end.
    for fmt, variant in sorted(EXPORTS, key=lambda e: e[0] != "onnx") + [("onnx-network", "")]:
        name = f"{fmt}_{variant}" if variant else fmt
        names.append(name)
        size = EXPORT_SIZE if fmt in DYNAMIC else TRACE_SIZE
        opts = ["MODEL.WEIGHTS", str(out / "model.pth"), *VARIANTS.get(variant, [])]
        commands.append([sys.executable, "-W", "always", tool, *common, "--format", fmt,
                         "--sample-size", *map(str, size), "--output", str(out / name),
                         *opts])  # fmt: skip
    # Two exports at a time, one thread each: mostly single-threaded tracing and compiling.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with ThreadPoolExecutor(max_workers=2) as pool:
        procs = list(pool.map(lambda cmd: _run(cmd, env=env), commands))
    for proc in procs:
        # No warning located in the project's own code ("<file>:<line>: <Category>: ...").
        own_warning = r"\s*" + re.escape(REPO) + r"/(projects|tools)/\S+:\d+: \w+Warning"
        own = [line for line in proc.stderr.splitlines() if re.match(own_warning, line)]
        assert not own, own
    _run([sys.executable, "-c", LOAD_AND_RUN, str(out), *names])
    results = torch.load(out / "results.pt")
    return out, {"images": images, "export_images": export_images}, results


def _eager(name, out):
    model = build_model(_cfg(VARIANTS.get(name, []))).eval()
    model.load_state_dict(torch.load(out / "model.pth")["model"])
    return model


@pytest.mark.parametrize("fmt,name", EXPORTS)
def test_whole_detector_exports_give_the_eager_detections_at_any_size(
    fmt, name, exported, monkeypatch
):
    out, images, results = exported
    model = _eager(name, out)
    inputs = images["export_images" if fmt in DYNAMIC else "images"]
    for image, (boxes, classes, scores) in zip(inputs, results[f"{fmt}_{name}"]):
        with torch.no_grad():
            eager = model([{"image": image}])[0]["instances"]
        if fmt == "onnx":
            _assert_same_detections_up_to_ties((boxes, classes, scores), eager)
            continue
        with torch.no_grad():
            # The PyTorch soft-NMS loop (what TorchScript runs): bit for bit.
            monkeypatch.setenv("HARNET_SOFT_NMS_NUMBA", "0")
            torch_loop = model([{"image": image}])[0]["instances"]
            monkeypatch.delenv("HARNET_SOFT_NMS_NUMBA")
        assert len(eager) > 10
        # torch.export calls the eager suppression (an op): eager's detections exactly;
        # TorchScript runs the PyTorch loop.
        want = eager if fmt == "export" else torch_loop
        assert torch.equal(boxes, want.pred_boxes.tensor)
        assert torch.equal(scores, want.scores)
        assert torch.equal(classes, want.pred_classes)
        # The default (compiled loop on CPU): the same detections up to float rounding.
        assert torch.equal(classes, eager.pred_classes)
        torch.testing.assert_close(scores, eager.scores, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(boxes, eager.pred_boxes.tensor, rtol=1e-5, atol=1e-3)


def _assert_same_detections_up_to_ties(got, instances):
    """Whole-detector ONNX: as many detections, nearly the same scores by rank, and nearly
    all detections found among the eager ones with their class, box and score (and the
    converse). Not all: onnxruntime's network rounds differently (~1e-7), so candidates
    whose scores tie up to rounding (many, with these random weights) can be picked or
    claimed by voting in another order; the suppression itself is exact on given
    candidates (tests/layers/test_suppress_loop.py)."""
    boxes, classes, scores = got
    want = (instances.pred_boxes.tensor, instances.pred_classes, instances.scores)
    assert len(boxes) == len(want[0]) > 10
    torch.testing.assert_close(scores, want[2], rtol=0, atol=1e-3)
    for a, b in [(got, want), (want, got)]:
        found = _matched_fraction(a, b, box_tol=1e-3, score_tol=1e-5)
        assert found >= 0.9, f"only {found:.0%} of the detections have a match"


def _matched_fraction(got, want, box_tol, score_tol):
    """The fraction of ``got``'s detections ``(boxes, classes, scores)`` with one in ``want``
    of their class, box within ``box_tol`` and score within ``score_tol``."""
    (b, c, s), (wb, wc, ws) = got, want
    match = (
        (c[:, None] == wc[None])
        & ((b[:, None] - wb[None]).abs().amax(2) < box_tol)
        & ((s[:, None] - ws[None]).abs() < score_tol)
    )
    return float(match.any(dim=1).float().mean())


def test_onnx_network_then_postprocessing_gives_the_eager_detections(exported):
    from harnet.export import HeadOutputs, detections_from_head_outputs

    out, images, results = exported
    for name in VARIANTS:
        model = _eager(name, out)
        for image, outputs in zip(images["images"], results["onnx-network"]):
            with torch.no_grad():
                network = HeadOutputs(model)(image)
                eager = model([{"image": image}])[0]["instances"]
            assert len(outputs) == len(network) == 2 * len(model.head_in_features)
            for got, want in zip(outputs, network):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            size = tuple(image.shape[1:])
            # The separate post-processing step is the detector's: exact on its outputs.
            _assert_same_instances(detections_from_head_outputs(model, network, size), eager)
            # On onnxruntime's outputs (within ~1e-5 of PyTorch's) near-tied scores may
            # swap places or the last place: same scores, each box found among eager's.
            det = detections_from_head_outputs(model, outputs, size)
            assert len(det) == len(eager) > 10
            found = _matched_fraction(
                (det.pred_boxes.tensor, det.pred_classes, det.scores),
                (eager.pred_boxes.tensor, eager.pred_classes, eager.scores),
                box_tol=1e-2, score_tol=1e-4,
            )  # fmt: skip
            assert found >= 0.9, f"only {found:.0%} of the ONNX detections match the eager ones"


def _assert_same_instances(a, b):
    assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
    assert torch.equal(a.scores, b.scores)
    assert torch.equal(a.pred_classes, b.pred_classes)
