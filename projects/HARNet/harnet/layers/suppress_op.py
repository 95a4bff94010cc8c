"""``torch.ops.harnet.suppress_detections``: :func:`suppress_detections` as a PyTorch
custom operator, so that ``torch.export`` keeps the data-dependent greedy loops of
soft-NMS and box voting as one call (run at each call on its own inputs) instead of
tracing them for one example. Importing ``harnet`` registers it; a program exported by
:func:`harnet.export.export_program` needs ``import harnet`` before ``torch.export.load``.
"""

from typing import Tuple

import torch
from torch import Tensor

from .postprocess import suppress_detections

__all__ = ["suppress_detections_op"]


@torch.library.custom_op("harnet::suppress_detections", mutates_args=())
def suppress_detections_op(
    boxes: Tensor,
    scores: Tensor,
    classes: Tensor,
    nms_type: str,
    iou_threshold: float,
    soft_nms_sigma: float,
    soft_nms_min_score: float,
    voting: bool,
    voting_iou: float,
    voting_scoring: str,
    max_detections: int,
    min_score: float,
) -> Tuple[Tensor, Tensor, Tensor]:
    """:func:`suppress_detections` with its keyword arguments positional (the order of
    :func:`harnet.layers.postprocess.suppression_args`); the same detections (the
    eager kernels: numba on CPU, Triton on CUDA)."""
    out = suppress_detections(
        boxes, scores, classes, nms_type=nms_type, iou_threshold=iou_threshold,
        soft_nms_sigma=soft_nms_sigma, soft_nms_min_score=soft_nms_min_score, voting=voting,
        voting_iou=voting_iou, voting_scoring=voting_scoring, max_detections=max_detections,
        min_score=min_score,
    )  # fmt: skip
    # A custom op's outputs may not alias its inputs (hard NMS can return views of them).
    return tuple(t.clone() for t in out)


@suppress_detections_op.register_fake
def _(boxes, scores, classes, nms_type, iou_threshold, soft_nms_sigma, soft_nms_min_score,
      voting, voting_iou, voting_scoring, max_detections, min_score):  # fmt: skip
    # The number of detections is data-dependent, at most max_detections.
    count = torch.library.get_ctx().new_dynamic_size(max=max(int(max_detections), 2))
    return (
        boxes.new_empty(count, 4),
        scores.new_empty(count),
        torch.empty(count, dtype=torch.long, device=classes.device),
    )
