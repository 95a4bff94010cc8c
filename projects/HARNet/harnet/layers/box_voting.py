"""Box voting (Gidaris & Komodakis, ICCV 2015; HAR-Net, Detectron): refine each kept box with
the score-weighted mean of the candidates that overlap it, vectorised over boxes and categories.
"""

from typing import Tuple

import torch
from torch import Tensor

from ._box_ops import check_boxes, check_same_device, check_scores, pairwise_iou, pow2_scale

__all__ = ["box_voting", "batched_box_voting", "VOTING_SCORINGS"]

VOTING_SCORINGS = ("max", "keep", "avg", "caffe")

# The authors' released rule fuses at most this many neighbours with the kept box, and
# divides the summed score by (this + 1) whatever the number of neighbours.
_CAFFE_NEIGHBORS = 4
# Largest kept x candidates IoU block held in memory at once (float32: 16 MiB).
_IOU_BLOCK_BUDGET = 1 << 22
# Kept boxes per block when voting per category (blocks follow the category order).
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
    - ``"caffe"``: the authors' released rule. Voters are restricted to candidates that
      are not an exact copy (IoU 1) of any kept box and that no earlier kept box claimed:
      kept boxes are visited in the given order (soft-NMS order: decreasing score), and
      each claims every unclaimed candidate with IoU ``>= iou_threshold``; the 4
      best-scoring claimed candidates and the kept box itself (weighted by ``scores[n]``)
      form the mean, and the score becomes their summed score divided by 5. A kept box
      that claims nothing is left unchanged.

    A kept box without voters (possible when it is not among the candidates), or whose
    voters all score 0, keeps its box and score.

    Args:
        boxes (Tensor[K, 4]): kept boxes, ``(x1, y1, x2, y2)`` with ``x1 <= x2``,
            ``y1 <= y2``, e.g. ``candidate_boxes[keep]`` after (soft-)NMS.
        scores (Tensor[K]): their scores after suppression (e.g. soft-NMS decayed scores).
        candidate_boxes (Tensor[M, 4]): the boxes before suppression.
        candidate_scores (Tensor[M]): their original scores (non-negative).
        iou_threshold (float): minimum IoU of a voter with the kept box, in [0, 1].
        scoring (str): ``"max"``, ``"keep"``, ``"avg"`` or ``"caffe"``.

    Returns:
        voted_boxes (Tensor[K, 4]): the refined boxes, in the order of ``boxes``.
        voted_scores (Tensor[K]): their scores, in the same order (not re-sorted).
    """
    _check_voting_inputs(boxes, scores, candidate_boxes, candidate_scores, iou_threshold, scoring)
    return _box_voting(
        boxes,
        scores,
        None,
        candidate_boxes,
        candidate_scores,
        None,
        float(iou_threshold),
        scoring,
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
    box's own category vote (and, for ``"caffe"``, only kept boxes of the same category
    claim candidates or exclude their copies). All categories are processed together.

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
    _check_voting_inputs(boxes, scores, candidate_boxes, candidate_scores, iou_threshold, scoring)
    for name, t, n in (
        ("idxs", idxs, boxes.shape[0]),
        ("candidate_idxs", candidate_idxs, candidate_boxes.shape[0]),
    ):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 1 or t.shape[0] != n:
            raise ValueError(f"{name} must have shape [{n}], got {list(t.shape)}")
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    check_same_device(boxes=boxes, idxs=idxs, candidate_idxs=candidate_idxs)
    return _box_voting(
        boxes,
        scores,
        idxs,
        candidate_boxes,
        candidate_scores,
        candidate_idxs,
        float(iou_threshold),
        scoring,
    )


def _check_voting_inputs(boxes, scores, candidate_boxes, candidate_scores, iou_threshold, scoring):
    check_boxes(boxes, "boxes")
    check_scores(scores, boxes.shape[0], "scores", "boxes")
    check_boxes(candidate_boxes, "candidate_boxes")
    check_scores(candidate_scores, candidate_boxes.shape[0], "candidate_scores", "candidate_boxes")
    check_same_device(
        boxes=boxes,
        scores=scores,
        candidate_boxes=candidate_boxes,
        candidate_scores=candidate_scores,
    )
    if scoring not in VOTING_SCORINGS:
        raise ValueError(f"scoring must be one of {VOTING_SCORINGS}, got {scoring!r}")
    if not 0 <= iou_threshold <= 1:
        raise ValueError(f"iou_threshold must be in [0, 1], got {iou_threshold}")
    if candidate_scores.numel() and bool((candidate_scores < 0).any()):
        raise ValueError("candidate_scores must be non-negative (they weight the mean)")


def _iou_blocks(boxes, idxs, candidate_boxes, candidate_idxs):
    """Yields (rows, columns, IoU block) over blocks of kept boxes; -1 across categories.

    With categories (``idxs`` not None), both inputs must be sorted by category: a block of
    consecutive kept boxes is only compared with the candidates of the categories it spans,
    so the work is close to sum over categories of kept x candidates, not all pairs.
    """
    k, m = boxes.shape[0], candidate_boxes.shape[0]
    if idxs is None:
        step = max(1, _IOU_BLOCK_BUDGET // max(m, 1))
        for start in range(0, k, step):
            rows = slice(start, min(start + step, k))
            yield rows, slice(0, m), pairwise_iou(boxes[rows], candidate_boxes)
        return
    lo = torch.searchsorted(candidate_idxs, idxs, right=False).tolist()
    hi = torch.searchsorted(candidate_idxs, idxs, right=True).tolist()
    start = 0
    while start < k:
        end = min(start + _ROWS_PER_BLOCK, k)
        while end - start > 1 and (end - start) * (hi[end - 1] - lo[start]) > _IOU_BLOCK_BUDGET:
            end = start + (end - start) // 2
        rows, cols = slice(start, end), slice(lo[start], hi[end - 1])
        iou = pairwise_iou(boxes[rows], candidate_boxes[cols])
        yield rows, cols, iou.masked_fill_(idxs[rows, None] != candidate_idxs[None, cols], -1.0)
        start = end


def _box_voting(boxes, scores, idxs, cand_boxes, cand_scores, cand_idxs, iou_threshold, scoring):
    k = boxes.shape[0]
    dtype = torch.promote_types(boxes.dtype, torch.float32)
    out_boxes, out_scores = boxes.clone(), scores.clone()
    if k == 0 or cand_boxes.shape[0] == 0:
        return out_boxes, out_scores
    scale = pow2_scale(boxes, cand_boxes)  # exact; no overflowing areas or sums
    b, cb = boxes.to(dtype) * scale, cand_boxes.to(dtype) * scale
    sc, cs = scores.to(dtype), cand_scores.to(dtype)
    if idxs is not None:
        # Sort both sides by category (stable: "caffe" visits a category's kept boxes in the
        # given order, and ranks tied candidates by index).
        idxs, k_order = torch.sort(idxs.long(), stable=True)
        cand_idxs, c_order = torch.sort(cand_idxs.long(), stable=True)
        b, sc, cb, cs = b[k_order], sc[k_order], cb[c_order], cs[c_order]
    if scoring == "caffe":
        voted_boxes, voted_scores, has = _caffe_voting(
            b, sc, idxs, cb, cs, cand_idxs, iou_threshold
        )
    else:
        weight_sum = torch.zeros(k, dtype=dtype, device=b.device)
        weighted_boxes = torch.zeros((k, 4), dtype=dtype, device=b.device)
        stat = torch.zeros(k, dtype=dtype, device=b.device)  # voters' max score or count
        for rows, cols, iou in _iou_blocks(b, idxs, cb, cand_idxs):
            w = (iou >= iou_threshold).to(dtype)
            if scoring == "avg":
                stat[rows] = w.sum(dim=1)
            w.mul_(cs[cols])  # voters' scores, 0 elsewhere (scores are >= 0)
            if scoring == "max" and w.shape[1]:
                stat[rows] = w.amax(dim=1)
            weight_sum[rows] = w.sum(dim=1)
            weighted_boxes[rows] = w @ cb[cols]
        has = weight_sum > 0
        safe = torch.where(has, weight_sum, torch.ones_like(weight_sum))
        voted_boxes = weighted_boxes / safe[:, None]
        if scoring == "max":
            voted_scores = stat
        elif scoring == "avg":
            voted_scores = weight_sum / stat.clamp(min=1)
        else:  # "keep"
            voted_scores = sc
    if idxs is not None:  # back to the input order
        voted_boxes = torch.empty_like(voted_boxes).index_copy_(0, k_order, voted_boxes)
        voted_scores = torch.empty_like(voted_scores).index_copy_(0, k_order, voted_scores)
        has = torch.empty_like(has).index_copy_(0, k_order, has)
    out_boxes[has] = (voted_boxes[has] / scale).to(out_boxes.dtype)
    out_scores[has] = voted_scores[has].to(out_scores.dtype)
    return out_boxes, out_scores


def _caffe_voting(boxes, scores, idxs, cand_boxes, cand_scores, cand_idxs, iou_threshold):
    k, m = boxes.shape[0], cand_boxes.shape[0]
    device = boxes.device
    # owner[j]: first kept box (in order) of j's category with IoU >= threshold; k = none.
    owner = torch.full((m,), k, dtype=torch.int64, device=device)
    is_copy = torch.zeros(m, dtype=torch.bool, device=device)
    for rows, cols, iou in _iou_blocks(boxes, idxs, cand_boxes, cand_idxs):
        if iou.numel() == 0:
            continue
        is_copy[cols] |= (iou == 1).any(dim=0)
        hits = iou >= iou_threshold
        # First hit of each candidate in this block (argmax takes the first maximum).
        first = hits.to(torch.uint8).argmax(dim=0) + rows.start
        owner[cols] = torch.where((owner[cols] == k) & hits.any(dim=0), first, owner[cols])
    owner[is_copy] = k  # copies of kept boxes (the kept boxes themselves) never vote
    voters = torch.nonzero(owner < k).squeeze(1)
    own, s = owner[voters], cand_scores[voters]
    # Rank each owner's voters by decreasing score (ties: lower candidate index first).
    s, by_score = torch.sort(s, descending=True, stable=True)
    voters, own = voters[by_score], own[by_score]
    own, by_owner = torch.sort(own, stable=True)
    voters, s = voters[by_owner], s[by_owner]
    counts = torch.bincount(own, minlength=k)
    rank = torch.arange(own.numel(), device=device) - (torch.cumsum(counts, 0) - counts)[own]
    top = rank < _CAFFE_NEIGHBORS
    voters, own, s = voters[top], own[top], s[top]

    has = torch.bincount(own, minlength=k) > 0
    weight_sum = scores.clone().index_add_(0, own, s)
    weighted = (boxes * scores[:, None]).index_add_(0, own, cand_boxes[voters] * s[:, None])
    safe = torch.where(weight_sum > 0, weight_sum, torch.ones_like(weight_sum))
    voted_boxes = torch.where((weight_sum > 0)[:, None], weighted / safe[:, None], boxes)
    return voted_boxes, weight_sum / (_CAFFE_NEIGHBORS + 1), has
