"""Scripting (Detectron2's scripting_with_instances) and torch.export of HARRetinaNet, in
process: every post-processing option, images of several sizes, saved and reloaded; what
cannot export says why."""

import io
import os
import subprocess
import sys
import warnings

import pytest
import torch

from detectron2.modeling import build_model
from detectron2.structures import Boxes

from harnet_model_utils import REPO, har_cfg, perturb_

pytest.importorskip("detectron2.export", reason="Detectron2's export module")

POSTPROCESS = {
    "hard": {},
    "linear": {"NMS_TYPE": "linear"},
    "gaussian": {"NMS_TYPE": "gaussian"},
    "gaussian_voting_caffe": {"NMS_TYPE": "gaussian", "VOTING.ENABLED": True,
                              "VOTING.SCORING": "unclaimed_top4"},
    "hard_voting_max": {"VOTING.ENABLED": True},
}  # fmt: skip
FIELDS = {"pred_boxes": Boxes, "scores": torch.Tensor, "pred_classes": torch.Tensor}


def _model(postprocess=(), candidates="detectron2"):
    cfg = har_cfg()
    cfg.MODEL.RETINANET.TOPK_CANDIDATES_TEST = 100
    cfg.TEST.DETECTIONS_PER_IMAGE = 60
    cfg.MODEL.HARNET.CANDIDATES.MODE = candidates
    for key, value in dict(postprocess).items():
        cfg.merge_from_list([f"MODEL.HARNET.POSTPROCESS.{key}", value])
    torch.manual_seed(0)
    return perturb_(build_model(cfg).eval())


def _script(model):
    from detectron2.export import scripting_with_instances

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated
        scripted = scripting_with_instances(model, FIELDS)
        buffer = io.BytesIO()
        torch.jit.save(scripted, buffer)
        buffer.seek(0)
        return torch.jit.load(buffer)


@pytest.mark.parametrize("candidates", ["detectron2", "authors"])
@pytest.mark.parametrize("postprocess", list(POSTPROCESS))
def test_scripted_model_gives_the_eager_detections(postprocess, candidates, monkeypatch):
    model = _model(POSTPROCESS[postprocess], candidates)
    scripted = _script(model)
    # The scripted suppression is the PyTorch loop: eager with it, bit for bit.
    monkeypatch.setenv("HARNET_SOFT_NMS_NUMBA", "0")
    g = torch.Generator().manual_seed(3)
    for (h, w), out_size in [((96, 128), None), ((64, 80), (128, 160)), ((150, 90), (100, 60))]:
        image = torch.rand(3, h, w, generator=g) * 255
        inputs = {"image": image}
        if out_size:
            inputs.update(height=out_size[0], width=out_size[1])
        with torch.no_grad():
            want = model([inputs])[0]["instances"]
            script_inputs = {k: torch.as_tensor(v) for k, v in inputs.items()}
            got = scripted([script_inputs])[0]["instances"]
        assert len(want) > 5
        assert tuple(got.image_size) == want.image_size == (out_size or (h, w))
        assert torch.equal(got.pred_boxes.tensor, want.pred_boxes.tensor)
        assert torch.equal(got.scores, want.scores)
        assert torch.equal(got.pred_classes, want.pred_classes)


def test_scripting_leaves_the_model_as_it_was_and_needs_eval_mode():
    model = _model(POSTPROCESS["gaussian_voting_caffe"])
    names = list(model.state_dict())
    modules = [name for name, _ in model.named_modules()]
    _script(model)
    assert list(model.state_dict()) == names
    assert [name for name, _ in model.named_modules()] == modules
    assert not hasattr(model, "_scripted_postprocess")
    with pytest.raises((ValueError, AssertionError), match="eval"):
        _script(model.train())


def test_scripting_creates_no_module_while_torch_traverses_the_model():
    """torch.jit.script memoises modules by id() while it calls __prepare_scriptable__, and
    Detectron2's FPN / ResNet ones free modules on the way: a module created later could
    take a freed id and resolve to another module (a head tower typed as the FPN). So the
    model's copy arrives with its head prepared, and preparing it again creates nothing."""
    model = _model()
    prepared = model.__prepare_scriptable__()
    head = prepared.head
    assert "_scripting_cls_tower" in head._modules and "_scripting_bbox_tower" in head._modules
    assert head.__prepare_scriptable__() is head
    assert model.head.__prepare_scriptable__() is not model.head  # the eager head: a copy
    assert "_scripting_cls_tower" not in model.head._modules


@pytest.mark.parametrize("fmt", ["export", "onnx"])
def test_export_program_and_onnx_refuse_what_they_cannot_export(fmt, tmp_path):
    from harnet.export import export_onnx, export_program

    export, path = (export_program, tmp_path / "m.pt2") if fmt == "export" else (
        export_onnx, tmp_path / "m.onnx")  # fmt: skip
    model = _model()
    with pytest.raises(ValueError, match=r"\(96, 128\).*\[2, 4096\].*longer one >= 129"):
        export(model, torch.rand(3, 96, 128) * 255, str(path))
    with pytest.raises(ValueError, match="CANDIDATES.MODE"):
        export(_model(candidates="authors"), torch.rand(3, 160, 192) * 255, str(path))
    if fmt == "onnx":
        with pytest.raises(ValueError, match="opset >= 19"):
            export_onnx(model, torch.rand(3, 160, 192) * 255, str(path), opset_version=17)
    with pytest.raises(ValueError, match="eval mode"):
        export(_model().train(), torch.rand(3, 160, 192) * 255, str(path))
    assert not path.exists()


def test_export_tool_says_which_format_and_option_cannot_export(tmp_path):
    cfg = har_cfg()
    cfg.MODEL.HARNET.CANDIDATES.MODE = "authors"
    (tmp_path / "config.yaml").write_text(cfg.dump())
    cmd = [sys.executable, os.path.join(REPO, "tools", "export_model.py"), "--config-file",
           str(tmp_path / "config.yaml"), "--format", "export", "--output", str(tmp_path / "out"),
           "--sample-size", "160", "192"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--format export" in proc.stderr and "CANDIDATES.MODE" in proc.stderr
    assert "Traceback" not in proc.stderr
