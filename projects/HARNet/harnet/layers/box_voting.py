"""Box voting (Gidaris & Komodakis, ICCV 2015; HAR-Net, Detectron): refine each kept box with
the score-weighted mean of the candidates that overlap it, vectorised over boxes and categories.

Only pairs that can reach the IoU threshold ``t > 0`` are compared: an IoU of at least ``t``
needs the boxes' left edges within ``(1 - t) * max width`` of each other (the shared width
is at least ``t`` times either width), so kept boxes and candidates are both sorted by
(category, x1) and each block of kept boxes meets the window of candidates it can reach.

:func:`batched_box_voting_scriptable` is the TorchScript-compatible core (no input checks)
that an exported detector calls.
"""

from typing import List, Tuple

import torch
from torch import Tensor

from ._box_ops import (
    check_boxes,
    check_category_indices,
    check_same_device,
    check_scores,
    pairwise_iou,
    pow2_scale,
)

__all__ = [
    "box_voting",
    "batched_box_voting",
    "batched_box_voting_scriptable",
    "VOTING_SCORINGS",
    "VOTING_SCORING_ALIASES",
]

VOTING_SCORINGS = ("max", "keep", "avg", "unclaimed_top4")
# Other accepted names: "caffe" is the authors' Caffe release, where the rule comes from.
VOTING_SCORING_ALIASES = {"caffe": "unclaimed_top4"}

# "unclaimed_top4" fuses at most this many neighbours with the kept box, and divides the
# summed score by (this + 1) whatever the number of neighbours (the authors' release).
_TOP_NEIGHBOURS = 4
# Largest kept x candidates IoU block held in memory at once (float32: 16 MiB).
_IOU_BLOCK_BUDGET = 1 << 22
# Kept boxes per block (fewer when their candidate window is wide).
_ROWS_PER_BLOCK = 128


def box_voting(
    boxes: Tensor,
    scores: Tensor,
    candidate_boxes: Tensor,
    candidate_scores: Tensor,
    iou_threshold: float = 0.6,
    scoring: str = "max",
) -> Tuple[Tensor, Tensor]:
    """
    Refines kept detections by box voting.

    Each kept box ``boxes[n]`` is replaced by the score-weighted mean of its voters,
    ``sum_j(p_j * R_j) / sum_j(p_j)``: the candidates (detections before suppression, the
    kept box's own candidate included, with their original scores ``p_j``) whose IoU with
    it is ``>= iou_threshold``. The score becomes, by ``scoring``:

    - ``"max"``: the largest voter score (HAR-Net paper);
    - ``"keep"``: ``scores[n]`` unchanged (Detectron's ``"ID"``);
    - ``"avg"``: the mean voter score (Detectron's ``"AVG"``);
    - ``"unclaimed_top4"`` (alias ``"caffe"``): the authors' released rule. Voters are
      restricted to candidates that are not an exact copy (IoU 1) of any kept box and that
      no earlier kept box claimed: kept boxes are visited in the given order (soft-NMS
      order: decreasing score), and each claims every unclaimed candidate with IoU
      ``>= iou_threshold``; the 4 best-scoring claimed candidates and the kept box itself
      (weighted by ``scores[n]``) form the mean, and the score becomes their summed score
      divided by 5. A kept box that claims nothing is left unchanged.

    A kept box without voters (possible when it is not among the candidates), or whose
    voters all score 0, keeps its box and score.

    Args:
        boxes (Tensor[K, 4]): kept boxes, ``(x1, y1, x2, y2)`` with ``x1 <= x2``,
            ``y1 <= y2``, e.g. ``candidate_boxes[keep]`` after (soft-)NMS.
        scores (Tensor[K]): their scores after suppression (e.g. soft-NMS decayed scores).
        candidate_boxes (Tensor[M, 4]): the boxes before suppression.
        candidate_scores (Tensor[M]): their original scores (non-negative).
        iou_threshold (float): minimum IoU of a voter with the kept box, in [0, 1].
        scoring (str): ``"max"``, ``"keep"``, ``"avg"`` or ``"unclaimed_top4"``.

    Returns:
        voted_boxes (Tensor[K, 4]): the refined boxes, in the order of ``boxes``.
        voted_scores (Tensor[K]): their scores, in the same order (not re-sorted).
    """
    check_boxes(boxes, "boxes")
    check_boxes(candidate_boxes, "candidate_boxes")
    idxs = boxes.new_zeros(boxes.shape[0], dtype=torch.int64)
    cand_idxs = candidate_boxes.new_zeros(candidate_boxes.shape[0], dtype=torch.int64)
    return batched_box_voting(
        boxes, scores, idxs, candidate_boxes, candidate_scores, cand_idxs, iou_threshold, scoring
    )


def batched_box_voting(
    boxes: Tensor,
    scores: Tensor,
    idxs: Tensor,
    candidate_boxes: Tensor,
    candidate_scores: Tensor,
    candidate_idxs: Tensor,
    iou_threshold: float = 0.6,
    scoring: str = "max",
) -> Tuple[Tensor, Tensor]:
    """
    Box voting per category: as :func:`box_voting`, where only candidates of the kept
    box's own category vote (and, for ``"unclaimed_top4"``, only kept boxes of the same
    category claim candidates or exclude their copies). All categories are processed
    together.

    Args:
        boxes (Tensor[K, 4]), scores (Tensor[K]): kept detections.
        idxs (Tensor[K]): integer category of each kept box.
        candidate_boxes (Tensor[M, 4]), candidate_scores (Tensor[M]): the detections
            before suppression.
        candidate_idxs (Tensor[M]): integer category of each candidate.
        iou_threshold (float), scoring (str): as in :func:`box_voting`.

    Returns:
        voted_boxes (Tensor[K, 4]), voted_scores (Tensor[K]): as in :func:`box_voting`.
    """
    check_boxes(boxes, "boxes")
    check_scores(scores, boxes.shape[0], "scores", "boxes")
    check_boxes(candidate_boxes, "candidate_boxes")
    check_scores(candidate_scores, candidate_boxes.shape[0], "candidate_scores", "candidate_boxes")
    check_category_indices(idxs, boxes.shape[0], "idxs", "boxes")
    check_category_indices(
        candidate_idxs, candidate_boxes.shape[0], "candidate_idxs", "candidate_boxes"
    )
    check_same_device(
        boxes=boxes,
        scores=scores,
        idxs=idxs,
        candidate_boxes=candidate_boxes,
        candidate_scores=candidate_scores,
        candidate_idxs=candidate_idxs,
    )
    scoring = canonical_voting_scoring(scoring)
    if not 0 <= iou_threshold <= 1:
        raise ValueError(f"iou_threshold must be in [0, 1], got {iou_threshold}")
    if candidate_scores.numel() and bool((candidate_scores < 0).any()):
        raise ValueError("candidate_scores must be non-negative (they weight the mean)")
    return batched_box_voting_scriptable(
        boxes,
        scores,
        idxs,
        candidate_boxes,
        candidate_scores,
        candidate_idxs,
        float(iou_threshold),
        scoring,
    )


def canonical_voting_scoring(scoring: str, name: str = "scoring") -> str:
    """The rule's name in :data:`VOTING_SCORINGS` (aliases resolved); ``ValueError``
    naming ``name`` for an unknown rule."""
    scoring = VOTING_SCORING_ALIASES.get(scoring, scoring) if isinstance(scoring, str) else scoring
    if scoring not in VOTING_SCORINGS:
        accepted = VOTING_SCORINGS + tuple(VOTING_SCORING_ALIASES)
        raise ValueError(f"{name} must be one of {accepted}, got {scoring!r}")
    return scoring


def batched_box_voting_scriptable(
    boxes: Tensor,
    scores: Tensor,
    idxs: Tensor,
    candidate_boxes: Tensor,
    candidate_scores: Tensor,
    candidate_idxs: Tensor,
    iou_threshold: float,
    scoring: str,
    block_budget: int = _IOU_BLOCK_BUDGET,
    rows_per_block: int = _ROWS_PER_BLOCK,
) -> Tuple[Tensor, Tensor]:
    """:func:`batched_box_voting` without input checks (``scoring`` must be canonical):
    TorchScript-compatible, any device. ``block_budget``: most IoUs held at once;
    ``rows_per_block``: most kept boxes per block."""
    out_boxes, out_scores = boxes.clone(), scores.clone()
    if boxes.shape[0] == 0 or candidate_boxes.shape[0] == 0:
        return out_boxes, out_scores
    dtype = torch.float64 if boxes.dtype == torch.float64 else torch.float32
    scale = pow2_scale([boxes, candidate_boxes])  # exact; no overflowing areas or sums
    kept = _sorted_by_category_and_x1(boxes.to(dtype) * scale, idxs)
    cands = _sorted_by_category_and_x1(candidate_boxes.to(dtype) * scale, candidate_idxs)
    kb, k_idx, k_order = kept
    cb, c_idx, c_order = cands
    ks, cs = scores.to(dtype)[k_order], candidate_scores.to(dtype)[c_order]
    windows = _candidate_windows(kb, k_idx, cb, c_idx, iou_threshold, block_budget, rows_per_block)
    if scoring == "unclaimed_top4":
        voted_boxes, voted_scores, has = _unclaimed_top4_voting(
            kb, ks, k_idx, k_order, cb, cs, c_idx, c_order, windows, iou_threshold
        )
    else:
        voted_boxes, voted_scores, has = _weighted_voting(
            kb, ks, k_idx, cb, cs, c_idx, windows, iou_threshold, scoring
        )
    # Back to the input order, and to the input scale and dtype.
    has_in_order = torch.zeros_like(has).index_copy_(0, k_order, has)
    voted_in_order = torch.empty_like(voted_boxes).index_copy_(0, k_order, voted_boxes)
    scores_in_order = torch.empty_like(voted_scores).index_copy_(0, k_order, voted_scores)
    out_boxes[has_in_order] = (voted_in_order[has_in_order] / scale).to(out_boxes.dtype)
    out_scores[has_in_order] = scores_in_order[has_in_order].to(out_scores.dtype)
    return out_boxes, out_scores


def _sorted_by_category_and_x1(boxes: Tensor, idxs: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Boxes and categories sorted by (category, x1), ties by index; and the order."""
    by_x1 = torch.sort(boxes[:, 0], stable=True)[1]
    order = by_x1[torch.sort(idxs[by_x1], stable=True)[1]]
    return boxes[order], idxs[order].long(), order


def _candidate_windows(
    kb: Tensor,
    k_idx: Tensor,
    cb: Tensor,
    c_idx: Tensor,
    iou_threshold: float,
    block_budget: int,
    rows_per_block: int,
) -> List[List[int]]:
    """Blocks of kept boxes ``[start, end)`` with the candidate range ``[lo, hi)`` their
    voters lie in (both sides sorted by (category, x1)): ``[start, end, lo, hi,
    one_category]`` each, ``one_category`` 1 when the block and its range hold a single
    category (no masking needed)."""
    # Same-category candidates, then (t > 0) those whose x1 is within the reach.
    lo_t = torch.searchsorted(c_idx, k_idx, right=False)
    hi_t = torch.searchsorted(c_idx, k_idx, right=True)
    if iou_threshold > 0:
        max_width = float(torch.maximum((kb[:, 2] - kb[:, 0]).max(), (cb[:, 2] - cb[:, 0]).max()))
        # A little slack: IoUs are rounded, the bound is exact arithmetic.
        reach = (1.0 - iou_threshold) * max_width * 1.001 + 1e-6 * max_width
        c_x1 = cb[:, 0].contiguous()
        # Search each kept box's x1 +- reach within its category's range, in one sorted
        # sequence of keys: category rank * span + x1 (span: wider than any x1 + reach).
        x_min = float(torch.minimum(c_x1.min(), kb[:, 0].min()))
        x_max = float(torch.maximum(c_x1.max(), kb[:, 0].max()))
        span = x_max - x_min + 4 * reach + 1.0
        x_min -= 2 * reach
        categories = torch.unique(torch.cat([c_idx, k_idx]))
        cat_rank = torch.searchsorted(categories, c_idx)
        k_rank = torch.searchsorted(categories, k_idx)
        ckey = cat_rank.to(torch.float64) * span + (c_x1.to(torch.float64) - x_min)
        kkey = k_rank.to(torch.float64) * span + (kb[:, 0].to(torch.float64) - x_min)
        # Keys' rounding far below the slack, else no window (slower, same result).
        if float(ckey.max()) * 2.0**-50 < 1e-4 * max_width:
            lo_x = torch.searchsorted(ckey, kkey - reach, right=False)
            hi_x = torch.searchsorted(ckey, kkey + reach, right=True)
            lo_t, hi_t = torch.maximum(lo_t, lo_x), torch.minimum(hi_t, hi_x)
            hi_t = torch.maximum(hi_t, lo_t)
    lo: List[int] = lo_t.tolist()
    hi: List[int] = hi_t.tolist()
    # Both bounds rise along the kept boxes: a block's range is [lo[first], hi[last]).
    hi_run: List[int] = torch.cummax(hi_t, 0)[0].tolist()
    k_cat: List[int] = k_idx.tolist()
    c_cat: List[int] = c_idx.tolist()
    blocks: List[List[int]] = []
    k, start = kb.shape[0], 0
    while start < k:
        end = min(start + rows_per_block, k)
        while end - start > 1 and (end - start) * (hi_run[end - 1] - lo[start]) > block_budget:
            end = start + (end - start) // 2
        block_lo, block_hi = lo[start], max(hi_run[end - 1], lo[start])
        one = (
            block_hi > block_lo
            and k_cat[start] == k_cat[end - 1] == c_cat[block_lo] == c_cat[block_hi - 1]
        )
        blocks.append([start, end, block_lo, block_hi, int(one)])
        start = end
    return blocks


def _block_iou(kb: Tensor, k_idx: Tensor, cb: Tensor, c_idx: Tensor, block: List[int]) -> Tensor:
    """IoU of a block's kept boxes with its candidate window; -1 across categories."""
    start, end, lo, hi, one_category = block[0], block[1], block[2], block[3], block[4]
    iou = pairwise_iou(kb[start:end], cb[lo:hi])
    if one_category:
        return iou
    return iou.masked_fill_(k_idx[start:end, None] != c_idx[None, lo:hi], -1.0)


def _weighted_voting(
    kb: Tensor, ks: Tensor, k_idx: Tensor, cb: Tensor, cs: Tensor, c_idx: Tensor,
    windows: List[List[int]], iou_threshold: float, scoring: str,
) -> Tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """ "max" / "keep" / "avg": every candidate at IoU >= threshold votes."""
    k = kb.shape[0]
    weight_sum = torch.zeros(k, dtype=kb.dtype, device=kb.device)
    weighted_boxes = torch.zeros((k, 4), dtype=kb.dtype, device=kb.device)
    stat = torch.zeros(k, dtype=kb.dtype, device=kb.device)  # voters' max score or count
    for block in windows:
        start, end, lo, hi = block[0], block[1], block[2], block[3]
        if hi <= lo:
            continue
        w = (_block_iou(kb, k_idx, cb, c_idx, block) >= iou_threshold).to(kb.dtype)
        if scoring == "avg":
            stat[start:end] = w.sum(dim=1)
        w.mul_(cs[lo:hi])  # voters' scores, 0 elsewhere (scores are >= 0)
        if scoring == "max":
            stat[start:end] = w.amax(dim=1)
        weight_sum[start:end] = w.sum(dim=1)
        weighted_boxes[start:end] = w @ cb[lo:hi]
    has = weight_sum > 0
    voted_boxes = (
        weighted_boxes / torch.where(has, weight_sum, torch.ones_like(weight_sum))[:, None]
    )
    if scoring == "max":
        voted_scores = stat
    elif scoring == "avg":
        voted_scores = weight_sum / stat.clamp(min=1)
    else:  # "keep"
        voted_scores = ks
    return voted_boxes, voted_scores, has


def _unclaimed_top4_voting(
    kb: Tensor, ks: Tensor, k_idx: Tensor, k_order: Tensor, cb: Tensor, cs: Tensor, c_idx: Tensor,
    c_order: Tensor, windows: List[List[int]], iou_threshold: float, top: int = _TOP_NEIGHBOURS,
) -> Tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """The authors' rule (see :func:`box_voting`); kept boxes claim in input order."""
    k, m = kb.shape[0], cb.shape[0]
    device = kb.device
    # owner[j]: the kept box (sorted position) first in input order among those of j's
    # category with IoU >= threshold; k = none. Claimed by input order = smallest k_order.
    first_claim = torch.full((m,), k_order.numel(), dtype=torch.int64, device=device)
    is_copy = torch.zeros(m, dtype=torch.bool, device=device)
    for block in windows:
        start, end, lo, hi = block[0], block[1], block[2], block[3]
        if hi <= lo:
            continue
        iou = _block_iou(kb, k_idx, cb, c_idx, block)
        is_copy[lo:hi] = is_copy[lo:hi] | (iou == 1).any(dim=0)
        claim = torch.where(iou >= iou_threshold, k_order[start:end, None], k_order.numel())
        first_claim[lo:hi] = torch.minimum(first_claim[lo:hi], claim.amin(dim=0))
    first_claim[is_copy] = k  # copies of kept boxes (the kept boxes themselves) never vote
    voters = torch.nonzero(first_claim < k).squeeze(1)
    # Input position -> sorted position of the owning kept box.
    position = torch.empty_like(k_order).index_copy_(0, k_order, torch.arange(k, device=device))
    owner, s = position[first_claim[voters]], cs[voters]
    # Rank each owner's voters by decreasing score, ties by lower candidate index.
    by_index = torch.sort(c_order[voters])[1]
    voters, owner, s = voters[by_index], owner[by_index], s[by_index]
    s, by_score = torch.sort(s, descending=True, stable=True)
    voters, owner = voters[by_score], owner[by_score]
    owner, by_owner = torch.sort(owner, stable=True)
    voters, s = voters[by_owner], s[by_owner]
    counts = torch.bincount(owner, minlength=k)
    rank = torch.arange(owner.numel(), device=device) - (torch.cumsum(counts, 0) - counts)[owner]
    best = rank < top
    voters, owner, s = voters[best], owner[best], s[best]

    has = torch.bincount(owner, minlength=k) > 0
    weight_sum = ks.clone().index_add_(0, owner, s)
    weighted = (kb * ks[:, None]).index_add_(0, owner, cb[voters] * s[:, None])
    positive = weight_sum > 0
    safe = torch.where(positive, weight_sum, torch.ones_like(weight_sum))
    voted_boxes = torch.where(positive[:, None], weighted / safe[:, None], kb)
    return voted_boxes, weight_sum / (top + 1), has
