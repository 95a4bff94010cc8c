"""Small box helpers shared by soft-NMS and box voting (private)."""

import math

import torch
from torch import Tensor


def elementwise_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of broadcastable box tensors ``a[..., 4]`` and ``b[..., 4]`` (x1, y1, x2, y2).

    Same arithmetic as ``torchvision.ops.box_iou`` (continuous coordinates, no +1), except
    that two zero-area boxes have IoU 0 instead of NaN.

    Returns:
        Tensor[...]: the broadcast shape of ``a`` and ``b`` without the last dimension.
    """
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    wh = (rb - lt).clamp_(min=0)
    inter = wh[..., 0] * wh[..., 1]
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    union = area_a + area_b - inter
    # union == 0 only when both boxes are empty; then inter == 0 too and IoU is 0.
    return inter / torch.where(union > 0, union, torch.ones_like(union))


def pairwise_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU matrix ``Tensor[N, M]`` between ``a: Tensor[N, 4]`` and ``b: Tensor[M, 4]``
    (same values as :func:`elementwise_iou`)."""
    # One contiguous vector per coordinate: ops on strided (..., 4) views are much slower.
    a, b = a.t().contiguous(), b.t().contiguous()
    inter = torch.minimum(a[2, :, None], b[2]).sub_(torch.maximum(a[0, :, None], b[0]))
    ih = torch.minimum(a[3, :, None], b[3]).sub_(torch.maximum(a[1, :, None], b[1]))
    inter = inter.clamp_(min=0).mul_(ih.clamp_(min=0))
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    union = (area_a[:, None] + area_b).sub_(inter)
    # union == 0 only when both boxes are empty; then inter == 0 too and IoU is 0.
    return inter.div_(union.masked_fill_(union == 0, 1.0))


def pow2_scale(*boxes: Tensor) -> float:
    """A power of two to multiply the given boxes' coordinates with, so that areas cannot
    overflow in float32: 1 for any sane input, else ``s`` with ``|coordinate| * s <= 1``.

    Multiplying by a power of two is exact and IoU is scale-invariant, so IoUs (and
    score-weighted means, divided back) computed on rescaled boxes equal those on the
    originals bit for bit. Coordinates beyond ~1e19 would otherwise give infinite areas,
    NaN IoUs and weights outside [0, 1].
    """
    m = max((float(b.abs().max()) for b in boxes if b.numel()), default=0.0)
    return 2.0 ** -math.frexp(m)[1] if m > 2.0**60 else 1.0


def check_boxes(boxes: Tensor, name: str = "boxes") -> None:
    """Raise ``ValueError`` naming ``name`` unless it is a finite float Tensor[N, 4] of
    well-formed boxes (x1 <= x2, y1 <= y2)."""
    if not isinstance(boxes, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(boxes).__name__}")
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{name} must have shape [N, 4], got {list(boxes.shape)}")
    if not boxes.is_floating_point():
        raise TypeError(f"{name} must be a floating point tensor, got {boxes.dtype}")
    if boxes.numel() == 0:
        return
    if not bool(torch.isfinite(boxes).all()):
        raise ValueError(f"{name} contains non-finite values (inf or nan)")
    if bool((boxes[:, 2:] < boxes[:, :2]).any()):
        raise ValueError(f"{name} must satisfy x1 <= x2 and y1 <= y2 (XYXY_ABS format)")


def check_scores(scores: Tensor, num: int, name: str = "scores", boxes_name: str = "boxes"):
    """Raise unless ``scores`` is a finite float Tensor[num]."""
    if not isinstance(scores, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(scores).__name__}")
    if scores.dim() != 1 or scores.shape[0] != num:
        raise ValueError(
            f"{name} must have shape [N] with N = len({boxes_name}) = {num}, "
            f"got {list(scores.shape)}"
        )
    if not scores.is_floating_point():
        raise TypeError(f"{name} must be a floating point tensor, got {scores.dtype}")
    if scores.numel() and not bool(torch.isfinite(scores).all()):
        raise ValueError(f"{name} contains non-finite values (inf or nan)")


def check_same_device(**tensors) -> None:
    devices = {k: t.device for k, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all inputs must be on the same device, got {devices}")
