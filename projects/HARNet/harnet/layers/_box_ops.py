"""Box helpers shared by soft-NMS, box voting and box fusion (private).

The tensor functions are TorchScript-compatible: the post-processing that uses them is
scripted for export (see :mod:`harnet.layers.postprocess`).
"""

from typing import Callable, List, Tuple, Union

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


def pow2_scale(boxes: List[Tensor]) -> Tensor:
    """A power of two to multiply the given boxes' coordinates with, so that areas cannot
    overflow in float32: 1 for any sane input, else ``s`` with ``|coordinate| * s <= 1``.
    A 0-d float64 tensor on the boxes' device (no host synchronisation).

    Multiplying by a power of two is exact and IoU is scale-invariant, so IoUs (and
    score-weighted means, divided back) computed on rescaled boxes equal those on the
    originals bit for bit. Coordinates beyond ~1e19 would otherwise give infinite areas,
    NaN IoUs and weights outside [0, 1].
    """
    # (No test of sizes and no frexp: the same ops export, e.g. to ONNX.)
    flat = [b.abs().flatten().to(torch.float64) for b in boxes]
    m = torch.cat(flat + [flat[0].new_zeros(1)]).max()  # 0 for no boxes
    # Any power of two keeps IoUs; this one makes |coordinate| * scale <= 1/2.
    scale = torch.exp2(-torch.ceil(torch.log2(m)) - 1)
    return torch.where(m > 2.0**60, scale, torch.ones_like(m))


# ---------------------------------------------------------------- input checks (eager only)
def raise_failed(
    checks: List[Tuple[Tensor, Union[str, Callable[[], str]]]], extra_flags=()
) -> List[bool]:
    """Reads the 0-d boolean tensors of ``checks`` (``(ok, message)`` pairs, all on one
    device) with one host synchronisation, and raises ``ValueError(message)`` of the first
    that is False (``message()`` if callable: details computed only on failure). The same
    read returns the values of ``extra_flags`` (0-d boolean tensors)."""
    flags = [flag for flag, _ in checks] + list(extra_flags)
    if not flags:
        return []
    ok = torch.stack(flags).tolist()
    for good, (_, message) in zip(ok, checks):
        if not good:
            raise ValueError(message() if callable(message) else message)
    return ok[len(checks):]


def box_checks(
    boxes: Tensor, name: str = "boxes", values: bool = True
) -> List[Tuple[Tensor, str]]:
    """Raise ``TypeError``/``ValueError`` naming ``name`` unless ``boxes`` is a float
    Tensor[N, 4]; return the value checks (finite, x1 <= x2, y1 <= y2) for
    :func:`raise_failed` (none with ``values=False``: no tensor op when the caller checks
    the values elsewhere)."""
    if not isinstance(boxes, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(boxes).__name__}")
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{name} must have shape [N, 4], got {list(boxes.shape)}")
    if not boxes.is_floating_point():
        raise TypeError(f"{name} must be a floating point tensor, got {boxes.dtype}")
    if boxes.numel() == 0 or not values:
        return []
    return [
        (torch.isfinite(boxes).all(), f"{name} contains non-finite values (inf or nan)"),
        (
            (boxes[:, 2:] >= boxes[:, :2]).all(),
            f"{name} must satisfy x1 <= x2 and y1 <= y2 (XYXY_ABS format)",
        ),
    ]


def score_checks(
    scores: Tensor, num: int, name: str = "scores", boxes_name: str = "boxes", values: bool = True
) -> List[Tuple[Tensor, str]]:
    """Raise unless ``scores`` is a float Tensor[num]; return the value check (finite)
    for :func:`raise_failed` (none with ``values=False``)."""
    if not isinstance(scores, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(scores).__name__}")
    if scores.dim() != 1 or scores.shape[0] != num:
        raise ValueError(
            f"{name} must have shape [N] with N = len({boxes_name}) = {num}, "
            f"got {list(scores.shape)}"
        )
    if not scores.is_floating_point():
        raise TypeError(f"{name} must be a floating point tensor, got {scores.dtype}")
    if scores.numel() == 0 or not values:
        return []
    return [(torch.isfinite(scores).all(), f"{name} contains non-finite values (inf or nan)")]


def check_boxes(boxes: Tensor, name: str = "boxes") -> None:
    """Raise ``ValueError`` naming ``name`` unless it is a finite float Tensor[N, 4] of
    well-formed boxes (x1 <= x2, y1 <= y2)."""
    raise_failed(box_checks(boxes, name))


def check_scores(scores: Tensor, num: int, name: str = "scores", boxes_name: str = "boxes"):
    """Raise unless ``scores`` is a finite float Tensor[num]."""
    raise_failed(score_checks(scores, num, name, boxes_name))


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
