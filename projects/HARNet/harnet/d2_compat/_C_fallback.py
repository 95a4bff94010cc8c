"""Pure-Python stand-in for Detectron2's compiled extension ``detectron2._C``.

HARNet's installer copies this file to ``detectron2/_C.py`` when Detectron2 had to be
installed from its published Python sources without building the C++/CUDA extension
(the "fallback" install mode, see README). Detectron2 imports ``_C`` at import time in
a few modules, so the module must exist; what it can honestly provide on top of
torch/torchvision is implemented here:

- version queries used by ``detectron2.utils.collect_env``;
- DCNv1 / DCNv2 (``deform_conv_*``, ``modulated_deform_conv_*``), forward and backward,
  through ``torchvision.ops.deform_conv2d`` (CPU and GPU).

Every other op of the compiled extension (rotated boxes, rotated ROIAlign, the fast
COCO evaluator, ...) raises :class:`NotCompiledError`, which names the op. HARNet itself
uses none of them.
"""
import torch
from torchvision.ops import deform_conv2d

HARNET_FALLBACK = True
__all__ = [
    "HARNET_FALLBACK",
    "NotCompiledError",
    "get_compiler_version",
    "get_cuda_version",
    "has_cuda",
]


class NotCompiledError(RuntimeError):
    """An op of Detectron2's compiled extension was called, but it is not built."""


def get_compiler_version():
    return "none (HARNet fallback detectron2._C, no compiled ops)"


def get_cuda_version():
    return "none (HARNet fallback detectron2._C, no compiled ops)"


def has_cuda():
    # The fallback has no CUDA kernels of its own; torchvision supplies them.
    return False


# ---------------------------------------------------------------------------------------
# Deformable convolution. Detectron2's autograd functions call these with preallocated
# output / gradient buffers that are filled in place; the scratch buffers (columns, ones)
# are not needed by torchvision and are ignored.


def _deform(input, weight, offset, mask, stride, padding, dilation, group, deformable_group):
    # torchvision infers the offset groups from offset.shape[1]; check it matches what
    # Detectron2 asked for so a mismatch is an error, not silently different math.
    kh, kw = weight.shape[-2:]
    if offset.shape[1] != 2 * deformable_group * kh * kw:
        raise ValueError(
            f"deform_conv: offset has {offset.shape[1]} channels, expected "
            f"2*{deformable_group}*{kh}*{kw} for deformable_group={deformable_group}"
        )
    if group != 1:
        # torchvision's deform_conv2d has no weight groups argument but infers them
        # from weight.shape[1] vs input channels.
        if input.shape[1] != weight.shape[1] * group:
            raise ValueError("deform_conv: input channels must equal weight.shape[1]*group")
    return deform_conv2d(
        input, offset, weight, None, stride=stride, padding=padding, dilation=dilation, mask=mask
    )


def deform_conv_forward(
    input, weight, offset, output, columns, ones, kW, kH, dW, dH, padW, padH,
    dilW, dilH, group, deformable_group, im2col_step,
):
    out = _deform(
        input, weight, offset, None, (dH, dW), (padH, padW), (dilH, dilW), group, deformable_group
    )
    output.resize_as_(out).copy_(out)


def _grads(input, weight, offset, mask, grad_output, stride, padding, dilation, group, dg):
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) for t in (input, weight, offset)]
        m = None if mask is None else mask.detach().requires_grad_(True)
        out = _deform(leaves[0], leaves[1], leaves[2], m, stride, padding, dilation, group, dg)
        wrt = leaves + ([m] if m is not None else [])
        return torch.autograd.grad(out, wrt, grad_output, allow_unused=True)


def deform_conv_backward_input(
    input, offset, gradOutput, gradInput, gradOffset, weight, columns, kW, kH, dW, dH,
    padW, padH, dilW, dilH, group, deformable_group, im2col_step,
):
    g_in, _, g_off = _grads(
        input, weight, offset, None, gradOutput, (dH, dW), (padH, padW), (dilH, dilW),
        group, deformable_group,
    )
    gradInput.resize_as_(g_in).copy_(g_in)
    gradOffset.resize_as_(g_off).copy_(g_off)


def deform_conv_backward_filter(
    input, offset, gradOutput, gradWeight, columns, ones, kW, kH, dW, dH, padW, padH,
    dilW, dilH, group, deformable_group, scale, im2col_step,
):
    _, g_w, _ = _grads(
        input, _weight_like(gradWeight, input), offset, None, gradOutput, (dH, dW),
        (padH, padW), (dilH, dilW), group, deformable_group,
    )
    gradWeight.add_(g_w, alpha=scale)


def _weight_like(grad_weight, input):
    # The weight gradient of a convolution does not depend on the weight values, so
    # any tensor of the right shape gives the same result.
    return torch.zeros_like(grad_weight, dtype=input.dtype)


def modulated_deform_conv_forward(
    input, weight, bias, ones, offset, mask, output, columns, kernel_h, kernel_w,
    stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group, deformable_group,
    with_bias,
):
    out = _deform(
        input, weight, offset, mask, (stride_h, stride_w), (pad_h, pad_w),
        (dilation_h, dilation_w), group, deformable_group,
    )
    if with_bias:
        out = out + bias.view(1, -1, 1, 1)
    output.resize_as_(out).copy_(out)


def modulated_deform_conv_backward(
    input, weight, bias, ones, offset, mask, columns, grad_input, grad_weight, grad_bias,
    grad_offset, grad_mask, grad_output, kernel_h, kernel_w, stride_h, stride_w, pad_h,
    pad_w, dilation_h, dilation_w, group, deformable_group, with_bias,
):
    g_in, g_w, g_off, g_m = _grads(
        input, weight, offset, mask, grad_output, (stride_h, stride_w), (pad_h, pad_w),
        (dilation_h, dilation_w), group, deformable_group,
    )
    grad_input.resize_as_(g_in).copy_(g_in)
    grad_weight.resize_as_(g_w).copy_(g_w)
    grad_offset.resize_as_(g_off).copy_(g_off)
    grad_mask.resize_as_(g_m).copy_(g_m)
    if with_bias:
        grad_bias.resize_as_(bias).copy_(grad_output.sum(dim=(0, 2, 3)))


# ---------------------------------------------------------------------------------------
# Ops that need the compiled extension. Accessing them is allowed (Detectron2 looks some
# up at import time); calling one raises an error naming it.

_NOT_IMPLEMENTED = (
    "box_iou_rotated",
    "nms_rotated",
    "roi_align_rotated_forward",
    "roi_align_rotated_backward",
    "COCOevalAccumulate",
    "COCOevalEvaluateImages",
    "InstanceAnnotation",
    "ImageEvaluation",
)


def _not_compiled(name):
    hint = ""
    if name.startswith("COCOeval") or name in ("InstanceAnnotation", "ImageEvaluation"):
        hint = " Use COCOEvaluator(..., use_fast_impl=False) for pycocotools' evaluation."

    def op(*args, **kwargs):
        raise NotCompiledError(
            f"detectron2._C.{name} is not available: Detectron2 was installed without its "
            f"compiled ops (HARNet fallback install mode).{hint} Build Detectron2 from "
            "source to use it."
        )

    op.__name__ = name
    op.__qualname__ = name
    return op


for _name in _NOT_IMPLEMENTED:
    globals()[_name] = _not_compiled(_name)


def __getattr__(name):
    # Unknown names: an AttributeError (so hasattr() stays truthful) that still says why.
    raise AttributeError(
        f"detectron2._C has no op {name!r}: Detectron2 was installed without its compiled "
        "ops (HARNet fallback install mode)"
    )
