"""The installed environment: harnet registers itself, Detectron2 works, the _C fallback
is honest about what it implements."""
from harnet_model_utils import REPO
import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from torchvision.ops import deform_conv2d

import harnet
from harnet.collect_env import collect_env_info, detectron2_install_mode
from harnet.d2_compat import _C_fallback as fallback


def test_harnet_registers_meta_arch():
    from detectron2.modeling import META_ARCH_REGISTRY

    assert "HARRetinaNet" in META_ARCH_REGISTRY
    assert hasattr(harnet, "add_harnet_config")


def test_collect_env_reports_versions_and_mode():
    info = collect_env_info()
    for key in ("torch", "torchvision", "detectron2", "detectron2 install mode", "CUDA available"):
        assert key in info
    assert detectron2_install_mode() in ("compiled", "fallback")


def test_collect_env_command_runs():
    out = subprocess.run(
        [sys.executable, "-m", "harnet.collect_env"], capture_output=True, text=True, check=True
    ).stdout
    assert "detectron2 install mode" in out


@pytest.mark.parametrize("op", ["box_iou_rotated", "nms_rotated", "COCOevalEvaluateImages"])
def test_fallback_unimplemented_op_names_itself(op):
    with pytest.raises(fallback.NotCompiledError, match=rf"detectron2\._C\.{op} .*without its compiled ops"):
        getattr(fallback, op)(torch.zeros(1, 5), torch.zeros(1, 5))


def test_fallback_unknown_attribute_is_attribute_error():
    assert not hasattr(fallback, "no_such_op")
    with pytest.raises(AttributeError, match="compiled ops"):
        fallback.no_such_op


def test_installed_detectron2_C_matches_install_mode():
    # Per version: the fallback's _C names the ops it lacks; a compiled _C has them. With
    # angle 0, rotated IoU is the axis-aligned IoU (torchvision's box_iou as reference).
    import detectron2._C as C
    from detectron2.layers.rotated_boxes import pairwise_iou_rotated
    from torchvision.ops import box_iou

    xyxy = torch.tensor([[0.0, 0, 10, 10], [5, 5, 15, 25]])
    rotated = torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2],
                         torch.zeros(2, 1)], dim=1)
    if detectron2_install_mode() == "fallback":
        assert getattr(C, "HARNET_FALLBACK", False)
        with pytest.raises(RuntimeError, match="box_iou_rotated"):
            pairwise_iou_rotated(rotated, rotated)
    else:
        assert detectron2_install_mode() == "compiled"
        assert not getattr(C, "HARNET_FALLBACK", False)
        torch.testing.assert_close(pairwise_iou_rotated(rotated, rotated), box_iou(xyxy, xyxy))


def _deform_inputs(dg=2):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 4, 7, 6, generator=g)
    w = torch.rand(6, 4, 3, 3, generator=g)
    off = torch.randn(2, 2 * dg * 9, 7, 6, generator=g)
    mask = torch.rand(2, dg * 9, 7, 6, generator=g)
    return x, w, off, mask


def test_fallback_deform_conv_matches_torchvision_forward_and_backward():
    x, w, off, _ = _deform_inputs()
    ref_x, ref_w, ref_off = (t.clone().requires_grad_(True) for t in (x, w, off))
    ref = deform_conv2d(ref_x, ref_off, ref_w, padding=(1, 1))
    gout = torch.randn_like(ref)
    ref.backward(gout)

    out = x.new_empty(0)
    # Detectron2's argument order: kW, kH, dW, dH, padW, padH, dilW, dilH, group, dg, step
    args = (3, 3, 1, 1, 1, 1, 1, 1, 1, 2, 64)
    fallback.deform_conv_forward(x, w, off, out, None, None, *args)
    torch.testing.assert_close(out, ref.detach())
    g_in, g_off = torch.empty(0), torch.empty(0)
    fallback.deform_conv_backward_input(x, off, gout, g_in, g_off, w, None, *args)
    torch.testing.assert_close(g_in, ref_x.grad)
    torch.testing.assert_close(g_off, ref_off.grad)
    g_w = torch.zeros_like(w)
    fallback.deform_conv_backward_filter(x, off, gout, g_w, None, None, *args[:-1], 1.0, 64)
    torch.testing.assert_close(g_w, ref_w.grad)


def test_fallback_modulated_deform_conv_matches_torchvision():
    x, w, off, mask = _deform_inputs()
    b = torch.randn(6)
    leaves = [t.clone().requires_grad_(True) for t in (x, w, off, mask, b)]
    ref = deform_conv2d(leaves[0], leaves[2], leaves[1], leaves[4], padding=1, mask=leaves[3])
    gout = torch.randn_like(ref)
    ref.backward(gout)
    geo = (3, 3, 1, 1, 1, 1, 1, 1, 1, 2, True)
    out = torch.empty(0)
    fallback.modulated_deform_conv_forward(x, w, b, None, off, mask, out, None, *geo)
    torch.testing.assert_close(out, ref.detach())
    grads = [torch.empty(0) for _ in range(5)]  # input, weight, bias, offset, mask
    fallback.modulated_deform_conv_backward(
        x, w, b, None, off, mask, None, grads[0], grads[1], grads[2], grads[3], grads[4], gout, *geo
    )
    for got, leaf in zip(grads, [leaves[0], leaves[1], leaves[4], leaves[2], leaves[3]]):
        torch.testing.assert_close(got, leaf.grad)


def test_fallback_rejects_offset_group_mismatch():
    x, w, off, _ = _deform_inputs(dg=2)
    with pytest.raises(ValueError, match="deformable_group=3"):
        fallback.deform_conv_forward(x, w, off, torch.empty(0), None, None, 3, 3, 1, 1, 1, 1, 1, 1, 1, 3, 64)


def test_detectron2_retinanet_r50_trains_and_infers_on_cpu():
    """Detectron2's own RetinaNet (model-zoo config) in this environment: one step, one inference."""
    from detectron2 import model_zoo
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model
    from detectron2.structures import Boxes, Instances
    from detectron2.utils.events import EventStorage

    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file("COCO-Detection/retinanet_R_50_FPN_1x.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    model = build_model(cfg)
    assert type(model).__name__ == "RetinaNet"
    inst = Instances((160, 192))
    inst.gt_boxes = Boxes(torch.tensor([[10.0, 20.0, 100.0, 120.0], [50.0, 30.0, 90.0, 60.0]]))
    inst.gt_classes = torch.tensor([3, 7])
    batch = [{"image": torch.rand(3, 160, 192) * 255, "instances": inst}]
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    with EventStorage():
        losses = model(batch)
    assert set(losses) == {"loss_cls", "loss_box_reg"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert model.head.cls_score.weight.grad.abs().sum() > 0
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())

    model.eval()
    with torch.no_grad():
        out = model([{"image": torch.rand(3, 160, 192) * 255, "height": 320, "width": 384}])
    det = out[0]["instances"]
    assert det.image_size == (320, 384)  # rescaled to the requested output size
    assert set(det.get_fields()) == {"pred_boxes", "scores", "pred_classes"}
    assert len(det) <= cfg.TEST.DETECTIONS_PER_IMAGE
    assert torch.isfinite(det.pred_boxes.tensor).all()


def test_installer_module_does_not_import_detectron2():
    """The installer must run before Detectron2 exists (setup_env.sh runs it as a script)."""
    path = os.path.join(REPO, "tools",
                        "install_detectron2.py")
    code = (
        "import sys, runpy; sys.modules['detectron2'] = None; "
        f"runpy.run_path({path!r}, run_name='not_main')"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
