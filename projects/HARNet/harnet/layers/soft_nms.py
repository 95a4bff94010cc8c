"""Soft-NMS (Bodla et al., ICCV 2017), per category.

Greedy definition, per category: take the box with the highest remaining score and keep it
with that score; multiply the score of every other remaining box by ``w(IoU)`` with the kept
box; drop the boxes whose score fell below ``score_threshold``; repeat until none remain.

Two implementations of the greedy loop give that result:

- :mod:`._soft_nms_numba`, on CPU when numba is installed: the definition as a compiled
  loop (dense scenes with thousands of boxes in one category need as many greedy steps);
- :mod:`._soft_nms_torch` everywhere else (GPU, no numba, TorchScript export): tensor ops,
  all categories advancing together, no host synchronisation per step.

:func:`batched_soft_nms_scriptable` is the TorchScript-compatible entry point (no input
checks, PyTorch loop only) that an exported detector calls.
"""

from typing import List, Tuple

import torch
from torch import Tensor
from torchvision.ops import batched_nms as _tv_batched_nms

from . import _soft_nms_numba, _soft_nms_triton
from ._box_ops import (
    box_checks,
    check_category_indices,
    check_same_device,
    pow2_scale,
    raise_failed,
    score_checks,
)
from ._soft_nms_torch import greedy_soft_nms_torch

__all__ = ["soft_nms", "batched_soft_nms", "batched_soft_nms_scriptable", "SOFT_NMS_METHODS"]

SOFT_NMS_METHODS = ("gaussian", "linear", "hard")


def soft_nms(
    boxes: Tensor,
    scores: Tensor,
    method: str = "gaussian",
    sigma: float = 0.5,
    iou_threshold: float = 0.3,
    score_threshold: float = 0.001,
) -> Tuple[Tensor, Tensor]:
    """
    Performs soft non-maximum suppression (soft-NMS) on the boxes.

    Greedily takes the box with the highest remaining score, keeps it with that score and
    decays the score of every other remaining box by ``w(IoU)`` with it:

    - ``"gaussian"``: ``w = exp(-IoU^2 / sigma)``;
    - ``"linear"``: ``w = 1 - IoU`` if ``IoU > iou_threshold`` else 1;
    - ``"hard"``: ``w = 0`` if ``IoU > iou_threshold`` else 1 (plain NMS).

    Boxes whose decayed score falls below ``score_threshold`` are dropped, as are boxes whose
    weight is 0 (suppressed by hard NMS, or exact duplicates under linear soft-NMS). Boxes
    that start below ``score_threshold`` are never kept. Hence with ``method="hard"``,
    ``keep`` equals ``torchvision.ops.nms`` on the boxes scoring at least
    ``score_threshold`` (all of them when ``score_threshold <= scores.min()``), and
    ``new_scores`` equals ``scores[keep]``. Among equal scores, the lower index is taken
    first.

    Args:
        boxes (Tensor[N, 4]): boxes in ``(x1, y1, x2, y2)`` format with
            ``x1 <= x2`` and ``y1 <= y2`` (continuous coordinates, as in
            Detectron2: IoU uses no "+1").
        scores (Tensor[N]): scores for each one of the boxes, non-negative for the soft
            methods (e.g. probabilities).
        method (str): ``"gaussian"``, ``"linear"`` or ``"hard"``.
        sigma (float): width of the Gaussian decay (used by ``"gaussian"`` only), > 0.
        iou_threshold (float): IoU above which ``"linear"`` and ``"hard"`` decay a box.
        score_threshold (float): boxes whose (decayed) score is below it are dropped.

    Returns:
        keep (Tensor[K]): int64 tensor with the indices of the kept boxes, sorted in
            decreasing order of their decayed scores.
        new_scores (Tensor[K]): the decayed scores of the kept boxes (same dtype as
            ``scores``), in the same order.
    """
    value_checks = box_checks(boxes, "boxes") + score_checks(scores, boxes.shape[0])
    idxs = torch.zeros(boxes.shape[0], dtype=torch.int64, device=boxes.device)
    return _checked_soft_nms(
        boxes, scores, idxs, method, sigma, iou_threshold, score_threshold, value_checks
    )


def batched_soft_nms(
    boxes: Tensor,
    scores: Tensor,
    idxs: Tensor,
    method: str = "gaussian",
    sigma: float = 0.5,
    iou_threshold: float = 0.3,
    score_threshold: float = 0.001,
) -> Tuple[Tensor, Tensor]:
    """
    Performs soft non-maximum suppression in a batched fashion.

    Each index value correspond to a category, and soft-NMS (see :func:`soft_nms`) is
    applied independently per category: boxes of different categories never decay each
    other.

    Args:
        boxes (Tensor[N, 4]): boxes in ``(x1, y1, x2, y2)`` format with
            ``x1 <= x2`` and ``y1 <= y2``.
        scores (Tensor[N]): scores for each one of the boxes.
        idxs (Tensor[N]): integer indices of the categories for each one of the boxes.
        method, sigma, iou_threshold, score_threshold: as in :func:`soft_nms`.

    Returns:
        keep (Tensor[K]): int64 tensor with the indices of the kept boxes, sorted in
            decreasing order of their decayed scores (over all categories).
        new_scores (Tensor[K]): the decayed scores of the kept boxes, in the same order.
    """
    value_checks = box_checks(boxes, "boxes") + score_checks(scores, boxes.shape[0])
    check_category_indices(idxs, boxes.shape[0], "idxs", "boxes")
    return _checked_soft_nms(
        boxes, scores, idxs, method, sigma, iou_threshold, score_threshold, value_checks
    )


def check_soft_nms_params(method: str, sigma: float, iou_threshold: float, score_threshold: float):
    """Raise ``ValueError`` naming the bad argument of :func:`soft_nms`."""
    if method not in SOFT_NMS_METHODS:
        raise ValueError(f"method must be one of {SOFT_NMS_METHODS}, got {method!r}")
    if method == "gaussian" and not sigma > 0:
        raise ValueError(f"sigma must be > 0 for Gaussian soft-NMS, got {sigma}")
    if method != "gaussian" and not 0 <= iou_threshold <= 1:
        raise ValueError(f"iou_threshold must be in [0, 1], got {iou_threshold}")
    if score_threshold != score_threshold:  # NaN
        raise ValueError("score_threshold must not be NaN")


def check_soft_nms_inputs(boxes, scores, idxs, method, sigma, iou_threshold, score_threshold,
                          value_checks, extra_flags=()) -> List[bool]:  # fmt: skip
    """Raise, naming the argument, for inputs :func:`soft_nms_eager` cannot take; the value
    checks (``value_checks`` plus non-negative scores) are read with one host sync, which
    also reads and returns ``extra_flags`` (0-d boolean tensors)."""
    check_same_device(boxes=boxes, scores=scores, idxs=idxs)
    check_soft_nms_params(method, sigma, iou_threshold, score_threshold)
    if method != "hard" and scores.numel():
        # Multiplicative decay assumes scores >= 0 (decaying a negative score raises it).
        message = "scores must be non-negative for soft-NMS (e.g. probabilities)"
        value_checks = value_checks + [((scores >= 0).all(), message)]
    return raise_failed(value_checks, extra_flags)


def _checked_soft_nms(
    boxes, scores, idxs, method, sigma, iou_threshold, score_threshold, value_checks
):
    check_soft_nms_inputs(
        boxes, scores, idxs, method, sigma, iou_threshold, score_threshold, value_checks
    )
    return soft_nms_eager(
        boxes, scores, idxs, method, float(sigma), float(iou_threshold), float(score_threshold)
    )


@torch.jit.unused
def soft_nms_eager(
    boxes: Tensor,
    scores: Tensor,
    idxs: Tensor,
    method: str,
    sigma: float,
    iou_threshold: float,
    score_threshold: float,
) -> Tuple[Tensor, Tensor]:
    """:func:`batched_soft_nms` without input checks, in eager mode: numba's compiled loop
    on CPU tensors when numba is installed, the Triton kernel on CUDA tensors when triton
    is installed (categories of at most ``_soft_nms_triton.MAX_GROUP`` boxes), else
    :func:`batched_soft_nms_scriptable`."""
    if boxes.device.type == "cuda" and _soft_nms_triton.available() and method != "hard":
        if not (torch.compiler.is_compiling() or torch.jit.is_tracing()):
            candidates = torch.nonzero(scores >= score_threshold).squeeze(1)
            box_index, starts, largest = _soft_nms_triton.group_candidates(idxs, candidates)
            if _soft_nms_triton.supports(method, largest):
                keep, kept_scores = _soft_nms_triton.greedy_soft_nms_triton(
                    boxes, scores, box_index, starts, largest,
                    method, sigma, iou_threshold, score_threshold,
                )  # fmt: skip
                return _by_decreasing_score(keep, kept_scores.to(scores.dtype))
    if method == "hard" or boxes.device.type != "cpu" or not _soft_nms_numba.available():
        return batched_soft_nms_scriptable(
            boxes, scores, idxs, method, sigma, iou_threshold, score_threshold
        )
    candidates = torch.nonzero(scores >= score_threshold).squeeze(1)
    keep, kept_scores = _soft_nms_numba.greedy_soft_nms_numba(
        boxes, scores, idxs, candidates, method, sigma, iou_threshold, score_threshold
    )
    return _by_decreasing_score(keep, kept_scores.to(scores.dtype))


def batched_soft_nms_scriptable(
    boxes: Tensor,
    scores: Tensor,
    idxs: Tensor,
    method: str,
    sigma: float,
    iou_threshold: float,
    score_threshold: float,
) -> Tuple[Tensor, Tensor]:
    """:func:`batched_soft_nms` without input checks, in PyTorch ops only: the same
    results on any device, and TorchScript-compatible (``torch.jit.script`` compiles it;
    an exported detector runs it on images of any size)."""
    candidates = torch.nonzero(scores >= score_threshold).squeeze(1)
    # Power-of-two rescaling is exact: the same IoUs, no overflowing areas.
    scale = pow2_scale([boxes[candidates]])
    if method == "hard":
        # Hard NMS never changes a surviving score: torchvision's kernel gives the same keep.
        # float32 for torchvision's kernel (its CPU nms has no half-precision one, and it
        # wants boxes and scores of one dtype).
        keep = candidates[
            _tv_batched_nms(
                (boxes[candidates] * scale).float(),
                scores[candidates].float(),
                idxs[candidates],
                iou_threshold,
            )
        ]
        return keep, scores[keep]
    keep, kept_scores = greedy_soft_nms_torch(
        boxes * scale, scores, idxs, candidates, method, sigma, iou_threshold, score_threshold
    )
    return _by_decreasing_score(keep, kept_scores.to(scores.dtype))


def _by_decreasing_score(keep: Tensor, scores: Tensor) -> Tuple[Tensor, Tensor]:
    """Sorts kept boxes by decreasing score, ties by increasing index (the greedy order)."""
    keep, by_index = torch.sort(keep)
    scores, by_score = torch.sort(scores[by_index], descending=True, stable=True)
    return keep[by_score], scores
