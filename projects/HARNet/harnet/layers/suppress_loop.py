"""Per-image suppression as ``while_loop`` loops over fixed-shape state: what the
whole-detector ONNX export runs (each loop becomes one ONNX ``Loop``; private).

:func:`suppress_detections_loop` gives :func:`harnet.layers.postprocess.suppress_detections`'
detections with the candidates laid out in rows, one per category (categories never
interact), every row advancing at each step:

- soft-NMS: each step, each row keeps its live candidate ``i`` of highest score (lowest
  index among ties) and decays its other live ones, ``s_j <- s_j * f(IoU(b_i, b_j))``
  (Gaussian: ``log s_j -= IoU^2 / sigma``), dropping those below the minimum score: as
  many steps as the largest category keeps boxes, each O(N) for N candidates;
- box voting: each step takes the next ``VOTING_BLOCK`` kept boxes of each row, in
  decreasing score order (the authors' rule claims candidates in that order), against
  their row's candidates.

Tensor ops only; the loops' state keeps its shape, as ``torch._higher_order_ops.while_loop``
requires. Scores and IoUs are computed as the PyTorch loop does (:mod:`._soft_nms_torch`):
the same soft-NMS bit for bit; sums over voters may round differently.
"""

import math
from typing import Optional, Tuple

import torch
from torch import Tensor
from torch._higher_order_ops import while_loop

from ._box_ops import plane_iou, pow2_scale
from ._soft_nms_torch import _decay
from .box_voting import _TOP_NEIGHBOURS
from .soft_nms import _by_decreasing_score

__all__ = ["suppress_detections_loop"]

# Kept boxes voted per loop step (each step compares them with their category's candidates
# at once: fewer steps, each [categories, VOTING_BLOCK, candidates] large).
VOTING_BLOCK = 16


def suppress_detections_loop(
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
    """:func:`suppress_detections_scriptable`'s detections (same arguments; ``voting_scoring``
    canonical) from fixed-shape loops, on any input: non-finite candidates are dropped on
    every path (hard NMS too), and hard NMS keeps ties in index order.

    Returns:
        boxes (Tensor[K, 4]), scores (Tensor[K]), classes (Tensor[K] int64), by decreasing
        score, ``K <= max_detections``.
    """
    from .postprocess import _best_detections  # (postprocess imports this module's peers)

    finite = torch.isfinite(scores) & torch.isfinite(boxes).all(dim=1)
    boxes, scores, classes = boxes[finite], scores[finite], classes[finite]
    dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    scaled = boxes.to(dtype) * pow2_scale([boxes]).to(dtype)
    if nms_type == "hard":
        candidates = torch.ones_like(scores, dtype=torch.bool)
    else:
        candidates = scores >= soft_nms_min_score
    keep, kept_scores = greedy_soft_nms_loop(
        scaled, scores.to(dtype), classes, candidates, nms_type, soft_nms_sigma, iou_threshold,
        soft_nms_min_score if nms_type != "hard" else float("-inf"),
    )  # fmt: skip
    kept_boxes, kept_classes = boxes[keep], classes[keep]
    kept_scores = kept_scores.to(scores.dtype)
    if voting:
        kept_boxes, kept_scores = box_voting_loop(
            kept_boxes, kept_scores, kept_classes, boxes, scores, classes, voting_iou,
            voting_scoring,
        )  # fmt: skip
    return _best_detections(
        kept_boxes, kept_scores, kept_classes, voting and voting_scoring != "keep",
        max_detections, min_score,
    )  # fmt: skip


def _loop(cond, body, state):
    """``while_loop(cond, body, state)`` while exporting (one ONNX ``Loop``); eagerly, the
    same steps in Python (``while_loop`` would compile them first)."""
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return while_loop(cond, body, state)
    while bool(cond(*state)):
        state = body(*state)
    return state


class _Rows:
    """One row per category, its entries in index order from the left (a padded slot:
    ``valid`` False): ``row``, ``col`` (Tensor[N] int64) of each entry, ``valid``
    (Tensor[R, C] bool), ``width`` (the longest row's length, 0-d tensor). A row of one
    dead slot more is always there (category -1, not an input's): a loop body is traced on
    non-empty rows. ``row`` given: those rows (of ``num_rows``), not the categories'.
    ``multiple``: ``C`` is a multiple of it, above the longest row's length."""

    def __init__(self, idxs: Tensor, row: Optional[Tensor] = None, num_rows=None, multiple=1):
        if row is None:
            idxs = torch.cat([idxs.new_full((1,), -1), idxs])  # the extra row's slot
            row = torch.unique(idxs, sorted=True, return_inverse=True)[1]
            num_rows, first = None, 1
        else:
            first = 0
        counts = torch.bincount(row, minlength=1)
        by_row = torch.sort(row, stable=True)[1]  # entries by row, index order within
        firsts = torch.cumsum(counts, 0) - counts
        col = torch.empty_like(row).index_copy_(
            0, by_row, torch.arange(row.shape[0], device=row.device) - firsts[row[by_row]]
        )
        self.row, self.col = row[first:], col[first:]
        self.width = counts.max()  # as a tensor too: a loop's condition compares with it
        # At least one slot more (a multiple of `multiple`): never empty, so that the
        # exported sizes (data-dependent) and strides of a loop's state are plain symbols.
        width = ((self.width // multiple + 1) * multiple).item()
        torch._check(width >= 1)
        self.shape = (counts.shape[0] if num_rows is None else num_rows, width)
        self.valid = self.scatter(torch.ones_like(self.row, dtype=torch.bool), False)

    def scatter(self, values: Tensor, fill) -> Tensor:
        """``values`` (Tensor[N, ...]) in rows: Tensor[R, C, ...], ``fill`` elsewhere."""
        out = values.new_full(self.shape + tuple(values.shape[1:]), fill)
        return out.index_put((self.row, self.col), values)

    def planes(self, boxes: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``(x1, y1, x2, y2, area)`` planes Tensor[R, C] of ``[N, 4]`` boxes (0 in padded
        slots): separate tensors, as a loop's captured tensors may not alias each other."""
        x1, y1, x2, y2 = (self.scatter(boxes[:, j], 0.0) for j in range(4))
        return x1, y1, x2, y2, (x2 - x1) * (y2 - y1)


def _picked(planes: Tuple[Tensor, ...], column: Tensor) -> Tuple[Tensor, ...]:
    """The planes at each row's ``column`` (Tensor[R, 1]): each Tensor[R, 1]."""
    return tuple(p.gather(1, column) for p in planes)


def greedy_soft_nms_loop(
    boxes: Tensor,
    scores: Tensor,
    idxs: Tensor,
    candidates: Tensor,
    method: str,
    sigma: float,
    iou_threshold: float,
    score_threshold: float,
) -> Tuple[Tensor, Tensor]:
    """The greedy (soft-)NMS steps over the ``candidates`` (bool mask), every category at
    once: each step, each row keeps its live box of highest score (the lowest index among
    ties) and decays the rest of its row.

    Args:
        boxes (Tensor[N, 4]), scores (Tensor[N]) of one float dtype, rescaled (finite
            areas); idxs (Tensor[N]) their categories.
        method (str): "gaussian", "linear" or "hard"; ``score_threshold``: the soft-NMS
            minimum score (-inf for hard NMS).

    Returns:
        keep (Tensor[K] int64), kept_scores (Tensor[K]): by decreasing score, ties by
        increasing index, as :func:`batched_soft_nms_scriptable` returns them.
    """
    log_space = method == "gaussian"
    # A zero score has no logarithm: such candidates (score_threshold <= 0) only decay each
    # other, by factors > 0, so all are kept with score 0 (as the PyTorch loop does).
    zero = (scores == 0) & candidates if log_space and score_threshold <= 0 else None
    if zero is not None:
        candidates = candidates & ~zero
    if log_space:
        threshold = math.log(score_threshold) if score_threshold > 0 else float("-inf")
    else:
        threshold = score_threshold
    rows = _Rows(idxs)
    start = torch.where(candidates, torch.log(scores) if log_space else scores, float("-inf"))
    start = rows.scatter(start, float("-inf"))
    index = rows.scatter(torch.arange(scores.shape[0], device=scores.device), -1)
    planes = rows.planes(boxes)
    columns = torch.arange(rows.shape[1], device=scores.device)
    inv_sigma = 1.0 / sigma
    zero_weight_drops = not log_space and score_threshold <= 0

    def live(step, s, keep, kept):
        return (s > float("-inf")).any()

    def pick(step, s, keep, kept):
        # argmax: the first maximum, the lowest index (a finished row picks a dead slot).
        i = s.argmax(dim=1, keepdim=True)
        best = s.gather(1, i)
        at_step = (columns == step)[None]
        keep = torch.where(at_step & (best > float("-inf")), index.gather(1, i), keep)
        kept = torch.where(at_step, best, kept)
        iou = plane_iou(*planes, *_picked(planes, i))
        decay = _decay(iou, method, inv_sigma, iou_threshold)
        decayed = s - decay if log_space else s * decay
        alive = decayed >= threshold
        if zero_weight_drops:  # else the threshold test drops zero weights
            alive = alive & (decay != 0)
        s = torch.where(alive & (columns[None] != i), decayed, float("-inf"))
        return step + 1, s, keep, kept

    state = (columns.new_zeros(()), start, torch.full_like(index, -1), torch.full_like(start, 0.0))
    _, _, keep, kept = _loop(live, pick, state)
    picked = keep >= 0
    keep, kept = keep[picked], kept[picked]
    if log_space:
        # exp(log(s)) can round one step above s: a decay must never raise a score.
        kept = torch.minimum(torch.exp(kept), scores[keep])
    if zero is not None:
        zeros = torch.nonzero(zero).squeeze(1)
        keep, kept = torch.cat([keep, zeros]), torch.cat([kept, scores[zeros]])
    return _by_decreasing_score(keep, kept)


def box_voting_loop(
    boxes: Tensor,
    scores: Tensor,
    idxs: Tensor,
    candidate_boxes: Tensor,
    candidate_scores: Tensor,
    candidate_idxs: Tensor,
    iou_threshold: float,
    scoring: str,
    block: int = VOTING_BLOCK,
) -> Tuple[Tensor, Tensor]:
    """:func:`batched_box_voting_scriptable` (``scoring`` canonical), every category at
    once: step ``t`` takes each category's kept boxes ``t * block ..`` (input order) and
    their candidates at IoU >= ``iou_threshold``.

    Returns:
        boxes (Tensor[K, 4]), scores (Tensor[K]): voted, in input order, dtypes kept; a kept
        box without voters keeps its box and score.
    """
    dtype = torch.float64 if boxes.dtype == torch.float64 else torch.float32
    scale = pow2_scale([boxes, candidate_boxes]).to(dtype)
    kb, cb = boxes.to(dtype) * scale, candidate_boxes.to(dtype) * scale
    ks, cs = scores.to(dtype), candidate_scores.to(dtype)
    # Kept boxes and candidates in the same rows (one per category): categories numbered
    # over both, then each side's columns.
    k = kb.shape[0]
    both = _Rows(torch.cat([idxs, candidate_idxs]))
    num_rows = both.shape[0]
    kept = _Rows(idxs, both.row[:k], num_rows, multiple=block)
    cand = _Rows(candidate_idxs, both.row[k:], num_rows)
    k_planes, c_planes = kept.planes(kb), cand.planes(cb)
    k_scores, c_scores = kept.scatter(ks, 0.0), cand.scatter(cs, 0.0)
    c_boxes = cand.scatter(cb, 0.0)  # [R, Cc, 4]
    offsets = torch.arange(block, device=kb.device)[None].expand(num_rows, block)

    def overlap(step: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """Each row's kept boxes of block ``step`` (columns ``at``, Tensor[R, B]) against
        its candidates: overlapping at IoU >= threshold (Tensor[R, B, Cc] bool), IoUs."""
        at = offsets + step * block
        picked = [p.gather(1, at)[:, :, None] for p in k_planes]
        iou = plane_iou(*(p[:, None, :] for p in c_planes), *picked)
        has_box = kept.valid.gather(1, at)
        over = cand.valid[:, None, :] & has_box[:, :, None] & (iou >= iou_threshold)
        return over, iou, at

    def remaining(step, *state):
        return step * block < kept.width

    zero = offsets.new_zeros(())
    if scoring == "unclaimed_top4":
        voted, voted_scores, has = _unclaimed_top4_voting(
            k_planes, k_scores, c_boxes, c_scores, overlap, remaining, zero
        )
    else:

        def vote(step, out_boxes, out_scores, has):
            over, _, at = overlap(step)
            w = torch.where(over, c_scores[:, None, :], 0.0)  # [R, B, Cc]
            weight_sum = w.sum(dim=2)
            positive = weight_sum > 0
            box = torch.matmul(w, c_boxes) / torch.where(positive, weight_sum, 1.0)[:, :, None]
            if scoring == "max":
                score = w.max(dim=2)[0]  # as amax from 0
            elif scoring == "avg":
                score = weight_sum / over.sum(dim=2).clamp(min=1).to(cs.dtype)
            else:  # "keep"
                score = k_scores.gather(1, at)
            old_box = out_boxes.gather(1, at[:, :, None].expand(-1, -1, 4))
            box = torch.where(positive[:, :, None], box, old_box)
            score = torch.where(positive, score, out_scores.gather(1, at))
            out_boxes = out_boxes.scatter(1, at[:, :, None].expand(-1, -1, 4), box)
            return (
                step + 1,
                out_boxes,
                out_scores.scatter(1, at, score),
                has.scatter(1, at, positive),
            )

        start = (zero, kept.scatter(kb, 0.0), k_scores.clone(),
                 torch.zeros_like(kept.valid))  # fmt: skip
        _, voted, voted_scores, has = _loop(remaining, vote, start)
    voted, voted_scores = voted[kept.row, kept.col], voted_scores[kept.row, kept.col]
    has = has[kept.row, kept.col]
    voted = torch.where(has[:, None], (voted / scale).to(boxes.dtype), boxes)
    return voted, torch.where(has, voted_scores.to(scores.dtype), scores)


def _unclaimed_top4_voting(
    k_planes, k_scores, c_boxes, c_scores, overlap, remaining, zero,
    top: int = _TOP_NEIGHBOURS,
):  # fmt: skip
    """The authors' rule (see :func:`harnet.layers.box_voting.box_voting`): each kept box in
    turn claims its row's unclaimed overlapping candidates (copies of kept boxes, IoU 1,
    never vote); the best ``top`` of them, by score then index, vote with the kept box.
    The loop finds each candidate's owner; the votes are then counted all at once."""

    def claim(step, owner, is_copy):
        over, iou, at = overlap(step)
        # The block's first kept box (input order) that overlaps the candidate.
        first = at.gather(1, over.to(torch.int8).argmax(dim=1))  # [R, Cc]
        owner = torch.where(over.any(dim=1) & (owner < 0), first, owner)
        return step + 1, owner, is_copy | (over & (iou == 1)).any(dim=1)

    owner = torch.full_like(c_scores, -1, dtype=torch.int64)
    _, owner, is_copy = _loop(remaining, claim, (zero, owner, torch.zeros_like(owner).bool()))
    voters = (owner >= 0) & ~is_copy
    # Each row's voters by (owner, decreasing score, lower index: columns keep index
    # order): rank is a candidate's place by score in its row.
    rows, cols = c_scores.shape
    order = torch.sort(c_scores, dim=1, descending=True, stable=True)[1]
    place = torch.arange(cols, device=order.device).expand_as(order).contiguous()
    rank = torch.empty_like(order).scatter_(1, order, place)
    key = torch.where(voters, owner * (cols + 1) + rank, (k_scores.shape[1] + 1) * (cols + 1))
    by_owner = torch.sort(key, dim=1)[1]
    voter = voters.gather(1, by_owner)
    owner = torch.where(voter, owner.gather(1, by_owner), 0)
    counts = torch.zeros_like(k_scores, dtype=torch.int64).scatter_add_(1, owner, voter.long())
    firsts = torch.cumsum(counts, dim=1) - counts
    best = voter & (place - firsts.gather(1, owner) < top)  # each owner's best `top`
    s = torch.where(best, c_scores.gather(1, by_owner), 0.0)
    # Summed from the kept box's own score and box, in the voters' order (as eagerly).
    weight_sum = k_scores.scatter_add(1, owner, s)
    k_boxes = torch.stack(k_planes[:4], dim=2)
    voter_boxes = c_boxes.gather(1, by_owner[:, :, None].expand(-1, -1, 4)) * s[:, :, None]
    weighted = (k_boxes * k_scores[:, :, None]).scatter_add(
        1, owner[:, :, None].expand(-1, -1, 4), voter_boxes
    )
    has = torch.zeros_like(k_scores).scatter_add_(1, owner, best.to(s.dtype)) > 0
    positive = weight_sum > 0
    safe = torch.where(positive, weight_sum, 1.0)
    voted = torch.where(positive[:, :, None], weighted / safe[:, :, None], k_boxes)
    return voted, weight_sum / (top + 1), has
