"""Soft-NMS (Bodla et al., ICCV 2017), vectorised over boxes and categories.

Greedy definition, per category: take the box with the highest remaining score and keep it
with that score; multiply the score of every other remaining box by ``w(IoU)`` with the kept
box; drop the boxes whose score fell below ``score_threshold``; repeat until none remain.

Categories are independent, so all of them advance together: at every greedy step each
category picks its own best box. The loop runs as many steps as the largest category keeps
boxes (not as many as the image keeps), and each step is a handful of tensor ops over all
remaining boxes of all categories: the IoU of each category's pick with that category's
remaining boxes. Finished categories and dropped boxes are compacted away every few steps.
Memory is O(N) (no N x N IoU matrix, so no chunking is needed for large N): computing all
same-category pairs up front costs as much as as many steps as a category has boxes, which
is at least as many steps as remain, so it is only done for small problems, where per-op
overhead dominates.
"""

import math
from typing import Tuple

import torch
from torch import Tensor
from torchvision.ops import batched_nms as _tv_batched_nms

from ._box_ops import check_boxes, check_same_device, check_scores, elementwise_iou, pow2_scale

__all__ = ["soft_nms", "batched_soft_nms", "SOFT_NMS_METHODS"]

SOFT_NMS_METHODS = ("gaussian", "linear", "hard")

# Largest number of same-category pair weights (rows x boxes x boxes, padded) computed up
# front; above it (the usual case) each greedy step computes the IoU of the picked boxes
# with their rows. Computing all pairs costs as much as a row's length in greedy steps, so
# it only pays for small problems, where per-op overhead dominates (measured on CPU).
_PAIR_WEIGHTS_BUDGET = 1 << 15
# Greedy steps between checks for termination / compaction (each check syncs on GPU).
_CHECK_EVERY = 8


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
    check_boxes(boxes, "boxes")
    check_scores(scores, boxes.shape[0], "scores", "boxes")
    idxs = torch.zeros(boxes.shape[0], dtype=torch.int64, device=boxes.device)
    return _soft_nms_checked(boxes, scores, idxs, method, sigma, iou_threshold, score_threshold)


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
    other. All categories are processed together in one pass.

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
    check_boxes(boxes, "boxes")
    check_scores(scores, boxes.shape[0], "scores", "boxes")
    if not isinstance(idxs, Tensor):
        raise TypeError(f"idxs must be a torch.Tensor, got {type(idxs).__name__}")
    if idxs.dim() != 1 or idxs.shape[0] != boxes.shape[0]:
        raise ValueError(
            f"idxs must have shape [N] with N = len(boxes) = {boxes.shape[0]}, "
            f"got {list(idxs.shape)}"
        )
    if idxs.is_floating_point() or idxs.is_complex() or idxs.dtype == torch.bool:
        raise TypeError(f"idxs must be an integer tensor, got {idxs.dtype}")
    return _soft_nms_checked(boxes, scores, idxs, method, sigma, iou_threshold, score_threshold)


def _soft_nms_checked(boxes, scores, idxs, method, sigma, iou_threshold, score_threshold):
    check_same_device(boxes=boxes, scores=scores, idxs=idxs)
    if method not in SOFT_NMS_METHODS:
        raise ValueError(f"method must be one of {SOFT_NMS_METHODS}, got {method!r}")
    if method == "gaussian" and not sigma > 0:
        raise ValueError(f"sigma must be > 0 for Gaussian soft-NMS, got {sigma}")
    if method != "gaussian" and not 0 <= iou_threshold <= 1:
        raise ValueError(f"iou_threshold must be in [0, 1], got {iou_threshold}")
    if score_threshold != score_threshold:  # NaN
        raise ValueError("score_threshold must not be NaN")
    if method != "hard" and scores.numel() and bool((scores < 0).any()):
        # Multiplicative decay assumes scores >= 0 (decaying a negative score raises it).
        raise ValueError("scores must be non-negative for soft-NMS (e.g. probabilities)")

    candidates = torch.nonzero(scores >= score_threshold).squeeze(1)
    if method == "hard":
        # Hard NMS never changes a surviving score: torchvision's kernel gives the same keep
        # (on boxes rescaled exactly by a power of two: the same IoUs, no overflow).
        b = boxes[candidates]
        keep = candidates[
            _tv_batched_nms(
                b * pow2_scale(b), scores[candidates], idxs[candidates], float(iou_threshold)
            )
        ]
        return keep, scores[keep]
    return _greedy_soft_nms(
        boxes,
        scores,
        idxs,
        candidates,
        method,
        float(sigma),
        float(iou_threshold),
        float(score_threshold),
    )


def _decay_weights(iou: Tensor, method: str, iou_threshold: float) -> Tensor:
    """Multiplicative decay of "linear" and "hard" (Gaussian decays in log space)."""
    if method == "linear":
        # Rounding can make IoU exceed 1 by an ulp: keep weights in [0, 1], so that a dead
        # box's -inf score never turns into +inf.
        return torch.where(iou > iou_threshold, (1 - iou).clamp_(min=0), torch.ones_like(iou))
    return (iou <= iou_threshold).to(iou.dtype)  # "hard"


def _greedy_soft_nms(
    boxes: Tensor,
    scores: Tensor,
    idxs: Tensor,
    candidates: Tensor,
    method: str,
    sigma: float,
    iou_threshold: float,
    score_threshold: float,
    pair_weights_budget: int = _PAIR_WEIGHTS_BUDGET,
) -> Tuple[Tensor, Tensor]:
    """The greedy loop, all categories in parallel (also usable with ``method="hard"``)."""
    device = boxes.device
    out_dtype = scores.dtype
    # Half precision is too coarse for IoU and repeated decays.
    dtype = torch.promote_types(scores.dtype, torch.float32)
    # Gaussian decays are done on log-scores, log(s) -= IoU^2 / sigma: no exp per step
    # (transcendental ops are the costliest per element, and start parallel regions early).
    # A zero score cannot be represented there; such boxes (possible with
    # score_threshold <= 0) can never decay anything but each other, by factors > 0: all
    # are kept, last, with score 0.
    log_space = method == "gaussian"
    zero_score = candidates[:0]
    if log_space and score_threshold <= 0:
        is_zero = scores[candidates] == 0
        zero_score, candidates = candidates[is_zero], candidates[~is_zero]
    n = candidates.numel()
    if n == 0:
        return zero_score, scores[zero_score]

    # Layout: one row per category, its boxes packed from the left in index order
    # (so that a row's first maximum is its lowest-index box); -inf marks no/dead box.
    cls, order = torch.sort(idxs[candidates], stable=True)
    orig = candidates[order]
    _, counts = torch.unique_consecutive(cls, return_counts=True)
    num_rows, num_cols = counts.numel(), int(counts.max())
    row = torch.repeat_interleave(torch.arange(num_rows, device=device), counts)
    col = torch.arange(n, device=device) - (torch.cumsum(counts, 0) - counts)[row]
    S = torch.full((num_rows, num_cols), float("-inf"), dtype=dtype, device=device)
    s0 = scores[orig].to(dtype)
    S[row, col] = torch.log(s0) if log_space else s0
    # Coordinates as four contiguous planes: strided (..., 4) views are several times slower.
    C = torch.zeros((4, num_rows, num_cols), dtype=dtype, device=device)
    C[:, row, col] = boxes[orig].to(dtype).t() * pow2_scale(boxes[orig])
    index = torch.full((num_rows, num_cols), -1, dtype=torch.int64, device=device)
    index[row, col] = orig
    area = (C[2] - C[0]) * (C[3] - C[1])
    if log_space:
        threshold = math.log(score_threshold) if score_threshold > 0 else float("-inf")
    else:
        threshold = score_threshold
    # A zero weight (hard / linear at IoU 1) drops a box; with score_threshold > 0 the
    # threshold test already does.
    check_zero = not log_space and score_threshold <= 0
    inv_sigma = 1.0 / sigma
    neg_inf = torch.tensor(float("-inf"), dtype=dtype, device=device)

    def pair_decays():
        # All same-row pairs cost as much as as many greedy steps as the row is long, which
        # is at least as many as remain: only worth it while per-op overhead dominates.
        if S.shape[0] * S.shape[1] * S.shape[1] > pair_weights_budget:
            return None
        B = C.permute(1, 2, 0)
        iou = elementwise_iou(B[:, :, None, :], B[:, None, :, :])
        return (
            iou.mul_(iou).mul_(inv_sigma)
            if log_space
            else _decay_weights(iou, method, iou_threshold)
        )

    W = pair_decays()
    x1, y1, x2, y2 = C.unbind(0)
    kept_index, kept_scores = [], []
    step, next_check = 0, 1
    while True:
        # argmax + gather, not max(dim=1): the latter runs a parallel region even for tiny
        # inputs, very slow on a busy CPU. argmax takes the first maximum (lowest index).
        j = S.argmax(dim=1, keepdim=True)
        kept_index.append(index.gather(1, j))
        kept_scores.append(S.gather(1, j))
        if W is not None:
            w = W.gather(1, j[:, :, None].expand(-1, -1, W.shape[2])).squeeze(1)
        else:
            # The picked box of each row, each coordinate (rows, 1).
            px1, py1, px2, py2 = C.gather(2, j[None].expand(4, -1, -1)).unbind(0)
            inter = torch.minimum(x2, px2).sub_(torch.maximum(x1, px1)).clamp_(min=0)
            inter.mul_(torch.minimum(y2, py2).sub_(torch.maximum(y1, py1)).clamp_(min=0))
            union = (area + area.gather(1, j)).sub_(inter)
            # union == 0 only for two empty boxes (then inter == 0 and IoU is 0).
            iou = inter.div_(union.clamp_(min=torch.finfo(dtype).tiny))
            w = iou.mul_(iou) if log_space else _decay_weights(iou, method, iou_threshold)
        if log_space:
            S.sub_(w, alpha=1.0 if W is not None else inv_sigma)  # -inf stays -inf
        else:
            S.mul_(w)  # dead boxes stay -inf, or NaN where w == 0: both fail the test below
        live = S >= threshold
        if check_zero:
            live &= w != 0
        S = torch.where(live, S, neg_inf)
        S.scatter_(1, j, float("-inf"))
        step += 1
        if step < next_check and step < num_cols:
            continue
        next_check = step + _CHECK_EVERY
        # Termination / compaction: drop finished rows and the dead columns' tail.
        alive = S > float("-inf")
        alive_per_row = alive.sum(dim=1)
        live_rows = torch.nonzero(alive_per_row).squeeze(1)
        if live_rows.numel() == 0:
            break
        if step >= num_cols:  # each step removes a box from every unfinished row
            raise RuntimeError("soft-NMS: the greedy loop did not terminate (non-finite IoU?)")
        width = int(alive_per_row.max())
        if live_rows.numel() < 0.75 * S.shape[0] or width < 0.75 * S.shape[1]:
            # Live boxes move left keeping their (index) order: perm[r, c] is the old column
            # of new column c (padding: column 0, masked dead). No sort: a sort over rows
            # is as slow as max(dim=1) on a busy CPU.
            live_alive = alive[live_rows]
            rr, cc = torch.nonzero(live_alive, as_tuple=True)
            new_cc = live_alive.cumsum(dim=1)[rr, cc] - 1
            perm = torch.zeros((live_rows.numel(), width), dtype=torch.int64, device=device)
            perm[rr, new_cc] = cc
            padding = torch.ones((live_rows.numel(), width), dtype=torch.bool, device=device)
            padding[rr, new_cc] = False
            r = live_rows[:, None]
            S = S[r, perm].masked_fill_(padding, float("-inf"))
            C, index, area = C[:, r, perm], index[r, perm], area[r, perm]
            x1, y1, x2, y2 = C.unbind(0)
            if W is not None:
                W = W[live_rows[:, None, None], perm[:, :, None], perm[:, None, :]]
            else:
                W = pair_decays()
        num_cols = step + S.shape[1]  # no row can need more steps than this

    keep = torch.cat(kept_index).squeeze(1)
    new_scores = torch.cat(kept_scores).squeeze(1)
    valid = new_scores > float("-inf")
    keep, new_scores = keep[valid], new_scores[valid]
    if log_space:
        # exp(log(s)) can round one step above s: a decay must never raise a score.
        new_scores = torch.minimum(torch.exp(new_scores), scores[keep].to(new_scores.dtype))
    keep = torch.cat([keep, zero_score])
    new_scores = torch.cat([new_scores, scores[zero_score].to(dtype)])
    # Decreasing score; ties by increasing index (the order the greedy loop takes them).
    keep, by_index = torch.sort(keep)
    new_scores = new_scores[by_index]
    new_scores, by_score = torch.sort(new_scores, descending=True, stable=True)
    return keep[by_score], new_scores.to(out_dtype)
