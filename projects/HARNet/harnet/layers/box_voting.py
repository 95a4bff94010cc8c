"""Box voting (Gidaris & Komodakis, ICCV 2015; HAR-Net, Detectron): refine each kept box with
the score-weighted mean of the candidates that overlap it, vectorised over boxes and categories.

Only pairs that can reach the IoU threshold ``t > 0`` are compared: an IoU of at least ``t``
needs a candidate's left edge within ``(1 - t) / t * w`` left or ``(1 - t) * w`` right of
a kept box's of width ``w`` (their shared width is at least ``t`` times either width), so
kept boxes and candidates are both sorted by (category, x1), each kept box's window of
candidates is found by binary search, and only the pairs inside the windows are compared.

:func:`batched_box_voting_scriptable` is the TorchScript-compatible core (no input checks)
that an exported detector calls.
"""

from typing import List, Tuple

import torch
from torch import Tensor

from . import _box_voting_triton
from ._box_ops import (
    box_area,
    box_checks,
    check_category_indices,
    check_same_device,
    plane_iou,
    pow2_scale,
    raise_failed,
    score_checks,
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
    box_checks(boxes, "boxes", values=False)  # shapes: the values are checked once, below
    box_checks(candidate_boxes, "candidate_boxes", values=False)
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
    value_checks = (
        box_checks(boxes, "boxes")
        + score_checks(scores, boxes.shape[0], "scores", "boxes")
        + box_checks(candidate_boxes, "candidate_boxes")
        + score_checks(
            candidate_scores, candidate_boxes.shape[0], "candidate_scores", "candidate_boxes"
        )
    )
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
    if candidate_scores.numel():
        message = "candidate_scores must be non-negative (they weight the mean)"
        value_checks.append(((candidate_scores >= 0).all(), message))
    raise_failed(value_checks)  # one host synchronisation for all value checks
    return box_voting_eager(
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
    pair_budget: int = 0,
) -> Tuple[Tensor, Tensor]:
    """:func:`batched_box_voting` without input checks (``scoring`` must be canonical):
    TorchScript-compatible, any device. ``pair_budget``: most (kept box, candidate) pairs
    compared at once (a kept box's pairs are never split); 0: a default per device."""
    if pair_budget <= 0:
        # About 60 bytes per pair. On CPU, chunks that stay in cache: on the dense
        # 4000-candidate benchmark 2^15 pairs at a time take 25 ms, 2^22 48 ms (fresh pages
        # for every large temporary); on 1000 candidates both take 3 ms.
        pair_budget = 1 << 15 if boxes.device.type == "cpu" else 1 << 22
    out_boxes, out_scores = boxes.clone(), scores.clone()
    if boxes.shape[0] == 0 or candidate_boxes.shape[0] == 0:
        return out_boxes, out_scores
    kb, ks, k_idx, k_order, cb, cs, c_idx, c_order, scale = _sorted_inputs(
        boxes, scores, idxs, candidate_boxes, candidate_scores, candidate_idxs
    )
    rows, cols, iou = _overlapping_pairs(kb, k_idx, cb, c_idx, iou_threshold, pair_budget)
    if scoring == "unclaimed_top4":
        voted_boxes, voted_scores, has = _unclaimed_top4_voting(
            kb, ks, k_order, cb, cs, c_order, rows, cols, iou, iou_threshold
        )
    else:
        voted_boxes, voted_scores, has = _weighted_voting(
            kb, ks, cb, cs, rows, cols, iou, iou_threshold, scoring
        )
    return _in_input_order(out_boxes, out_scores, voted_boxes, voted_scores, has, k_order, scale)


@torch.jit.unused
def box_voting_eager(
    boxes: Tensor,
    scores: Tensor,
    idxs: Tensor,
    candidate_boxes: Tensor,
    candidate_scores: Tensor,
    candidate_idxs: Tensor,
    iou_threshold: float,
    scoring: str,
) -> Tuple[Tensor, Tensor]:
    """:func:`batched_box_voting_scriptable` in eager mode: the Triton kernels on CUDA
    tensors when triton is installed (not while ``torch.compile``, ``torch.export`` or
    ``torch.jit.trace`` traces: exports get the portable ops), else the PyTorch ops. Same
    results (float64 sums in the kernels)."""
    args = (boxes, scores, idxs, candidate_boxes, candidate_scores, candidate_idxs)
    if boxes.device.type == "cuda" and _box_voting_triton.available():
        if not (torch.compiler.is_compiling() or torch.jit.is_tracing()):
            return _kernel_box_voting(*args, iou_threshold, scoring)
    return batched_box_voting_scriptable(*args, iou_threshold, scoring)


def _kernel_box_voting(
    boxes: Tensor,
    scores: Tensor,
    idxs: Tensor,
    candidate_boxes: Tensor,
    candidate_scores: Tensor,
    candidate_idxs: Tensor,
    iou_threshold: float,
    scoring: str,
) -> Tuple[Tensor, Tensor]:
    """The Triton path of :func:`box_voting_eager` on any device (CPU tensors need
    ``TRITON_INTERPRET=1``)."""
    out_boxes, out_scores = boxes.clone(), scores.clone()
    if boxes.shape[0] == 0 or candidate_boxes.shape[0] == 0:
        return out_boxes, out_scores
    kb, ks, k_idx, k_order, cb, cs, c_idx, c_order, scale = _sorted_inputs(
        boxes, scores, idxs, candidate_boxes, candidate_scores, candidate_idxs
    )
    lo, hi = _candidate_windows(kb, k_idx, cb, c_idx, iou_threshold)
    voted_boxes, voted_scores, has = _box_voting_triton.sorted_box_voting_triton(
        kb, ks, k_order, cb, cs, c_order, lo, hi, iou_threshold, scoring
    )
    return _in_input_order(out_boxes, out_scores, voted_boxes, voted_scores, has, k_order, scale)


def _sorted_inputs(
    boxes: Tensor,
    scores: Tensor,
    idxs: Tensor,
    candidate_boxes: Tensor,
    candidate_scores: Tensor,
    candidate_idxs: Tensor,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Kept boxes and candidates rescaled (:func:`pow2_scale`) in float32 or float64 and
    sorted by (category, x1): ``kb, ks, k_idx, k_order, cb, cs, c_idx, c_order, scale``."""
    dtype = torch.float64 if boxes.dtype == torch.float64 else torch.float32
    scale = pow2_scale([boxes, candidate_boxes])  # exact; no overflowing areas or sums
    kb, k_idx, k_order = _sorted_by_category_and_x1(boxes.to(dtype) * scale, idxs)
    cb, c_idx, c_order = _sorted_by_category_and_x1(
        candidate_boxes.to(dtype) * scale, candidate_idxs
    )
    ks, cs = scores.to(dtype)[k_order], candidate_scores.to(dtype)[c_order]
    return kb, ks, k_idx, k_order, cb, cs, c_idx, c_order, scale


def _in_input_order(
    out_boxes: Tensor,
    out_scores: Tensor,
    voted_boxes: Tensor,
    voted_scores: Tensor,
    has: Tensor,
    k_order: Tensor,
    scale: Tensor,
) -> Tuple[Tensor, Tensor]:
    """The voted boxes and scores (sorted order, rescaled) back in input order, scale and
    dtype; where ``has`` is False, ``out_boxes`` / ``out_scores`` unchanged."""
    has_in_order = torch.zeros_like(has).index_copy_(0, k_order, has)
    voted_in_order = torch.empty_like(voted_boxes).index_copy_(0, k_order, voted_boxes)
    scores_in_order = torch.empty_like(voted_scores).index_copy_(0, k_order, voted_scores)
    voted_in_order = (voted_in_order / scale).to(out_boxes.dtype)
    out_boxes = torch.where(has_in_order[:, None], voted_in_order, out_boxes)
    out_scores = torch.where(has_in_order, scores_in_order.to(out_scores.dtype), out_scores)
    return out_boxes, out_scores


def _sorted_by_category_and_x1(boxes: Tensor, idxs: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Boxes and categories sorted by (category, x1), ties by index; and the order."""
    by_x1 = torch.sort(boxes[:, 0], stable=True)[1]
    order = by_x1[torch.sort(idxs[by_x1], stable=True)[1]]
    return boxes[order], idxs[order].long(), order


def _candidate_windows(
    kb: Tensor, k_idx: Tensor, cb: Tensor, c_idx: Tensor, iou_threshold: float
) -> Tuple[Tensor, Tensor]:
    """For each kept box (both sides sorted by (category, x1)), the range ``[lo, hi)`` of
    candidates that can be its voters: its category's, and (``t > 0``) those whose x1 is
    within its reach. Tensors ``lo``, ``hi`` (int64 [K]), ``hi >= lo``."""
    lo = torch.searchsorted(c_idx, k_idx, right=False)
    hi = torch.searchsorted(c_idx, k_idx, right=True)
    if iou_threshold <= 0:
        return lo, hi
    # IoU >= t needs the x-overlap ow >= t * max(w_k, w_c). A candidate right of the kept
    # box then has x1 within w_k - ow <= (1 - t) * w_k of it; one left of it within
    # w_c - ow <= (1 - t) * w_c <= (1 - t) / t * w_k (as w_c <= ow / t <= w_k / t).
    f64 = torch.float64
    k_w = (kb[:, 2] - kb[:, 0]).to(f64)
    max_width = torch.maximum(k_w.max(), (cb[:, 2] - cb[:, 0]).max().to(f64))
    # A little slack: IoUs are rounded, the bounds are exact arithmetic.
    slack = 1e-6 * max_width
    right = (1.0 - iou_threshold) * 1.001 * k_w + slack
    left = (1.0 - iou_threshold) / iou_threshold * 1.001 * k_w + slack
    # Search each window within its category's range, in one sorted sequence of keys:
    # (category - smallest category) * span + x1 (span: wider than any x1 plus any reach).
    c_x1, k_x1 = cb[:, 0].to(f64), kb[:, 0].to(f64)
    reach = (1.0 - iou_threshold) / iou_threshold * 1.001 * max_width + slack
    x_min = torch.minimum(c_x1.min(), k_x1.min()) - 2 * reach
    span = torch.maximum(c_x1.max(), k_x1.max()) - x_min + 2 * reach + 1.0
    # (Category values, not ranks: no sync for torch.unique; huge ids fail `exact` below.)
    c_min = torch.minimum(c_idx.min(), k_idx.min())
    ckey = (c_idx - c_min).to(f64) * span + (c_x1 - x_min)
    kkey = (k_idx - c_min).to(f64) * span + (k_x1 - x_min)
    lo_x = torch.searchsorted(ckey, kkey - left, right=False)
    hi_x = torch.searchsorted(ckey, kkey + right, right=True)
    # Only where the keys' rounding is far below the slack (else the category's range:
    # slower, same result).
    exact = ckey.max() * 2.0**-50 < 1e-4 * max_width
    lo = torch.where(exact, torch.maximum(lo, lo_x), lo)
    hi = torch.where(exact, torch.minimum(hi, hi_x), hi)
    return lo, torch.maximum(hi, lo)


def _overlapping_pairs(
    kb: Tensor, k_idx: Tensor, cb: Tensor, c_idx: Tensor, iou_threshold: float, pair_budget: int
) -> Tuple[Tensor, Tensor, Tensor]:
    """The (kept box, candidate) pairs of one category with IoU >= ``iou_threshold``, as
    sorted positions ``rows``, ``cols`` (int64 [P]) and their IoUs ([P]); only pairs
    within :func:`_candidate_windows` are compared, at most ``pair_budget`` at a time."""
    lo, hi = _candidate_windows(kb, k_idx, cb, c_idx, iou_threshold)
    counts = hi - lo
    ends = torch.cumsum(counts, 0)
    firsts = ends - counts  # each kept box's first pair
    # Pair p of kept box r (pairs numbered over all kept boxes) meets candidate p + offset[r].
    offset = lo - firsts
    # Chunks of kept boxes of about pair_budget pairs each: bounds[i] is a chunk's first
    # kept box, pair_ends[i] the number of pairs before it (host ints: repeat_interleave
    # gets its output size, no sync). One sync when one chunk (the usual case), else two.
    total = int(ends[-1])
    bounds: List[int] = [0, kb.shape[0]]
    pair_ends: List[int] = [0, total]
    if total > pair_budget:
        at = torch.arange(pair_budget, total, pair_budget, device=kb.device)
        marks = torch.searchsorted(ends, at, right=True)  # rising, maybe repeated
        found: List[int] = torch.cat([marks, ends[(marks - 1).clamp(min=0)]]).tolist()
        n = len(found) // 2
        for b, e in zip(found[:n], found[n:]):
            if bounds[-2] < b < kb.shape[0]:
                bounds.insert(len(bounds) - 1, b)
                pair_ends.insert(len(pair_ends) - 1, e)
    rows_out: List[Tensor] = []
    cols_out: List[Tensor] = []
    iou_out: List[Tensor] = []
    # Coordinate planes [5, N] (x1, y1, x2, y2, area): contiguous after index_select, which
    # on CPU is several times faster than advanced indexing.
    k_planes = torch.cat([kb.t(), box_area(kb)[None]]).contiguous()
    c_planes = torch.cat([cb.t(), box_area(cb)[None]]).contiguous()
    for i in range(len(bounds) - 1):
        start, end = bounds[i], bounds[i + 1]
        rows = torch.repeat_interleave(
            torch.arange(start, end, device=kb.device),
            counts[start:end],
            output_size=pair_ends[i + 1] - pair_ends[i],
        )
        pair = torch.arange(rows.shape[0], device=kb.device) + firsts[start]
        cols = pair.add_(offset.index_select(0, rows))
        k, c = k_planes.index_select(1, rows), c_planes.index_select(1, cols)
        iou = plane_iou(k[0], k[1], k[2], k[3], k[4], c[0], c[1], c[2], c[3], c[4])
        keep = torch.nonzero(iou >= iou_threshold).squeeze(1)
        rows_out.append(rows.index_select(0, keep))
        cols_out.append(cols.index_select(0, keep))
        iou_out.append(iou.index_select(0, keep))
    return torch.cat(rows_out), torch.cat(cols_out), torch.cat(iou_out)


def _weighted_voting(
    kb: Tensor, ks: Tensor, cb: Tensor, cs: Tensor, rows: Tensor, cols: Tensor, iou: Tensor,
    iou_threshold: float, scoring: str,
) -> Tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """ "max" / "keep" / "avg": every candidate at IoU >= threshold votes."""
    k = kb.shape[0]
    s = cs[cols]
    weight_sum = ks.new_zeros(k).index_add_(0, rows, s)
    weighted_boxes = kb.new_zeros((k, 4)).index_add_(0, rows, cb[cols] * s[:, None])
    has = weight_sum > 0
    voted_boxes = (
        weighted_boxes / torch.where(has, weight_sum, torch.ones_like(weight_sum))[:, None]
    )
    if scoring == "max":
        voted_scores = ks.new_zeros(k).scatter_reduce_(0, rows, s, "amax")
    elif scoring == "avg":
        count = ks.new_zeros(k).index_add_(0, rows, torch.ones_like(s))
        voted_scores = weight_sum / count.clamp(min=1)
    else:  # "keep"
        voted_scores = ks
    return voted_boxes, voted_scores, has


def _unclaimed_top4_voting(
    kb: Tensor, ks: Tensor, k_order: Tensor, cb: Tensor, cs: Tensor, c_order: Tensor,
    rows: Tensor, cols: Tensor, iou: Tensor, iou_threshold: float, top: int = _TOP_NEIGHBOURS,
) -> Tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """The authors' rule (see :func:`box_voting`); kept boxes claim in input order."""
    k, m = kb.shape[0], cb.shape[0]
    device = kb.device
    # first_claim[j]: input position of the first kept box (in input order) of j's category
    # with IoU >= threshold; k = none.
    first_claim = torch.full((m,), k, dtype=torch.int64, device=device)
    first_claim.scatter_reduce_(0, cols, k_order[rows], "amin")
    # Copies of kept boxes (the kept boxes themselves) never vote.
    is_copy = torch.zeros(m, dtype=iou.dtype, device=device).index_add_(
        0, cols, (iou == 1).to(iou.dtype)
    )
    first_claim = torch.where(is_copy > 0, k, first_claim)
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
    # The best `top` of each owner vote; the others get weight 0 (no boolean mask: no sync).
    best = (rank < top).to(s.dtype)
    s = s * best
    has = torch.zeros(k, dtype=s.dtype, device=device).index_add_(0, owner, best) > 0
    weight_sum = ks.clone().index_add_(0, owner, s)
    weighted = (kb * ks[:, None]).index_add_(0, owner, cb[voters] * s[:, None])
    positive = weight_sum > 0
    safe = torch.where(positive, weight_sum, torch.ones_like(weight_sum))
    voted_boxes = torch.where(positive[:, None], weighted / safe[:, None], kb)
    return voted_boxes, weight_sum / (top + 1), has
