"""Box helpers shared by soft-NMS, box voting and box fusion (private).

The tensor functions are TorchScript-compatible: the post-processing that uses them is
scripted for export (see :mod:`harnet.layers.postprocess`).
"""

from typing import List

import torch
from torch import Tensor


def plane_iou(
    x1: Tensor,
    y1: Tensor,
    x2: Tensor,
    y2: Tensor,
    area: Tensor,
    ox1: Tensor,
    oy1: Tensor,
    ox2: Tensor,
    oy2: Tensor,
    other_area: Tensor,
) -> Tensor:
    """IoU of boxes given as broadcastable coordinate planes (the one IoU implementation).

    Same arithmetic as ``torchvision.ops.box_iou`` (continuous coordinates, no +1), except
    that two zero-area boxes have IoU 0 instead of NaN. Separate contiguous planes, not
    strided ``(..., 4)`` views: elementwise ops on those are several times slower.

    Args:
        x1, y1, x2, y2, area: the first boxes' coordinates and areas.
        ox1, oy1, ox2, oy2, other_area: the second boxes', broadcastable with the first.

    Returns:
        Tensor: the IoUs, in the broadcast shape, dtype of the inputs.
    """
    inter = torch.minimum(x2, ox2).sub_(torch.maximum(x1, ox1)).clamp_(min=0)
    inter.mul_(torch.minimum(y2, oy2).sub_(torch.maximum(y1, oy1)).clamp_(min=0))
    union = (area + other_area).sub_(inter)
    # union == 0 only when both boxes are empty; then inter == 0 too and IoU is 0.
    return inter.div_(union.masked_fill_(union == 0, 1.0))


def box_area(boxes: Tensor) -> Tensor:
    """Areas ``Tensor[...]`` of boxes ``Tensor[..., 4]`` (x1, y1, x2, y2)."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def elementwise_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of broadcastable box tensors ``a[..., 4]`` and ``b[..., 4]`` (x1, y1, x2, y2).

    Returns:
        Tensor[...]: the broadcast shape of ``a`` and ``b`` without the last dimension
        (values of :func:`plane_iou`).
    """
    a_area, b_area = box_area(a), box_area(b)
    return plane_iou(a[..., 0], a[..., 1], a[..., 2], a[..., 3], a_area,
                     b[..., 0], b[..., 1], b[..., 2], b[..., 3], b_area)  # fmt: skip


def pairwise_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU matrix ``Tensor[N, M]`` between ``a: Tensor[N, 4]`` and ``b: Tensor[M, 4]``
    (values of :func:`plane_iou`)."""
    a, b = a.t().contiguous(), b.t().contiguous()
    a_area = ((a[2] - a[0]) * (a[3] - a[1]))[:, None]
    b_area = (b[2] - b[0]) * (b[3] - b[1])
    return plane_iou(a[0, :, None], a[1, :, None], a[2, :, None], a[3, :, None], a_area,
                     b[0], b[1], b[2], b[3], b_area)  # fmt: skip


def pow2_scale(boxes: List[Tensor]) -> float:
    """A power of two to multiply the given boxes' coordinates with, so that areas cannot
    overflow in float32: 1 for any sane input, else ``s`` with ``|coordinate| * s <= 1``.

    Multiplying by a power of two is exact and IoU is scale-invariant, so IoUs (and
    score-weighted means, divided back) computed on rescaled boxes equal those on the
    originals bit for bit. Coordinates beyond ~1e19 would otherwise give infinite areas,
    NaN IoUs and weights outside [0, 1].
    """
    m = 0.0
    for b in boxes:
        if b.numel() > 0:
            m = max(m, float(b.abs().max()))
    if m <= 2.0**60:
        return 1.0
    exponent = int(torch.frexp(torch.tensor(m, dtype=torch.float64)).exponent)
    return 2.0 ** (-exponent)


# ---------------------------------------------------------------- input checks (eager only)
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


def check_category_indices(idxs: Tensor, num: int, name: str = "idxs", boxes_name: str = "boxes"):
    """Raise unless ``idxs`` is an integer Tensor[num] (one category per box)."""
    if not isinstance(idxs, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(idxs).__name__}")
    if idxs.dim() != 1 or idxs.shape[0] != num:
        raise ValueError(
            f"{name} must have shape [N] with N = len({boxes_name}) = {num}, "
            f"got {list(idxs.shape)}"
        )
    if idxs.is_floating_point() or idxs.is_complex() or idxs.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {idxs.dtype}")


def check_same_device(**tensors) -> None:
    devices = {k: t.device for k, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all inputs must be on the same device, got {devices}")
