"""Per-image suppression as ``while_loop`` loops over fixed-shape state: what the
whole-detector ONNX export runs (each loop becomes one ONNX ``Loop``; private).

:func:`suppress_detections_loop` gives :func:`harnet.layers.postprocess.suppress_detections`'
detections with one greedy step per kept box, all categories in one flat row:

- soft-NMS: each step keeps the live candidate ``i`` of highest score (lowest index among
  ties) and decays the live ones of its category, ``s_j <- s_j * f(IoU(b_i, b_j))``
  (Gaussian: ``log s_j -= IoU^2 / sigma``), dropping those below the minimum score. Each
  category's steps are its own greedy steps, as categories never decay each other;
- box voting: one step per kept box, in decreasing score order, with all candidates (the
  authors' rule claims candidates in that order).

Every step costs O(N) for N candidates and runs in tensor ops only; the loops' state keeps
its shape, as ``torch._higher_order_ops.while_loop`` requires. Scores and IoUs are computed
as the PyTorch loop does (:mod:`._soft_nms_torch`); sums over voters may round differently.
"""

import math
from typing import Tuple

import torch
from torch import Tensor
from torch._higher_order_ops import while_loop

from ._box_ops import box_area, plane_iou
from ._soft_nms_torch import _decay
from .box_voting import _TOP_NEIGHBOURS
from .soft_nms import _by_decreasing_score

__all__ = ["suppress_detections_loop"]


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
    scaled = boxes.to(dtype) * _pow2_scale(boxes).to(dtype)
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


def _pow2_scale(boxes: Tensor) -> Tensor:
    """:func:`pow2_scale` for one tensor, from ``log2`` (ONNX has no ``frexp``): a power of
    two with ``|coordinate| * scale <= 1`` above 2^60, else 1 (IoUs unchanged bit for bit)."""
    m = boxes.abs().flatten().to(torch.float64)
    m = torch.cat([m, m.new_zeros(1)]).max()  # (0 for no boxes)
    scale = torch.exp2(-torch.ceil(torch.log2(m)) - 1)
    return torch.where(m > 2.0**60, scale, torch.ones_like(m))


def _loop(cond, body, state):
    """``while_loop(cond, body, state)`` while exporting (one ONNX ``Loop``); eagerly, the
    same steps in Python (``while_loop`` would compile them first)."""
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return while_loop(cond, body, state)
    while bool(cond(*state)):
        state = body(*state)
    return state


def _planes(boxes: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Coordinate planes and areas ``(x1, y1, x2, y2, area)`` of ``[N, 4]`` boxes: separate
    tensors (a loop's captured tensors may not alias each other)."""
    x1, y1, x2, y2 = (boxes[:, j].clone() for j in range(4))
    return x1, y1, x2, y2, box_area(boxes)


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
    """The greedy (soft-)NMS steps over the ``candidates`` (bool mask) of all categories.

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
    # One dead slot more (never picked): argmax is traced on a non-empty row.
    n = scores.shape[0]
    boxes = torch.cat([boxes, boxes.new_zeros(1, 4)])
    idxs = torch.cat([idxs, idxs.new_full((1,), -1)])
    candidates = torch.cat([candidates, candidates.new_zeros(1)])
    scores = torch.cat([scores, scores.new_ones(1)])
    neg_inf = torch.full_like(scores, float("-inf"))
    start = torch.where(candidates, torch.log(scores) if log_space else scores, neg_inf)
    if log_space:
        threshold = math.log(score_threshold) if score_threshold > 0 else float("-inf")
    else:
        threshold = score_threshold
    x1, y1, x2, y2, area = _planes(boxes)
    positions = torch.arange(scores.shape[0], device=scores.device)
    inv_sigma = 1.0 / sigma
    zero_weight_drops = not log_space and score_threshold <= 0

    def live(step, s, keep, kept):
        return (s > float("-inf")).any()

    def pick(step, s, keep, kept):
        i = s.argmax(dim=0, keepdim=True)  # the first maximum: the lowest index
        at_step = positions == step
        keep = torch.where(at_step, i, keep)
        kept = torch.where(at_step, s.index_select(0, i), kept)
        iou = plane_iou(x1, y1, x2, y2, area, x1.index_select(0, i), y1.index_select(0, i),
                        x2.index_select(0, i), y2.index_select(0, i), area.index_select(0, i))
        decay = _decay(iou, method, inv_sigma, iou_threshold)
        decayed = s - decay if log_space else s * decay
        alive = decayed >= threshold
        if zero_weight_drops:  # else the threshold test drops zero weights
            alive = alive & (decay != 0)
        same = idxs == idxs.index_select(0, i)
        s = torch.where(same, torch.where(alive, decayed, neg_inf), s)
        s = torch.where(positions == i, neg_inf, s)
        return step + 1, s, keep, kept

    state = (positions.new_zeros(()), start, torch.full_like(positions, -1), neg_inf.clone())
    _, _, keep, kept = _loop(live, pick, state)
    picked = keep >= 0
    keep, kept, scores = keep[picked], kept[picked], scores[:n]
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
) -> Tuple[Tensor, Tensor]:
    """:func:`batched_box_voting_scriptable` (``scoring`` canonical), one step per kept box
    in input order: its same-category candidates at IoU >= ``iou_threshold`` vote.

    Returns:
        boxes (Tensor[K, 4]), scores (Tensor[K]): voted, in input order, dtypes kept; a kept
        box without voters keeps its box and score.
    """
    dtype = torch.float64 if boxes.dtype == torch.float64 else torch.float32
    scale = _pow2_scale(torch.cat([boxes, candidate_boxes])).to(dtype)
    kb, cb = boxes.to(dtype) * scale, candidate_boxes.to(dtype) * scale
    ks, cs = scores.to(dtype), candidate_scores.to(dtype)
    k_planes, c_planes = _planes(kb), _planes(cb)
    rows = torch.arange(kb.shape[0], device=kb.device)

    def overlap(step: Tensor) -> Tuple[Tensor, Tensor]:
        """The kept box ``step``'s same-category candidates at IoU >= threshold, and IoUs."""
        at = step.view(1)
        iou = plane_iou(*c_planes, *(p.index_select(0, at) for p in k_planes))
        same = candidate_idxs == idxs.index_select(0, at)
        return same & (iou >= iou_threshold), iou

    def remaining(step, *state):
        return step < kb.shape[0]

    start = (rows.new_zeros(()), kb.clone(), ks.clone(), torch.zeros_like(ks, dtype=torch.bool))
    if scoring == "unclaimed_top4":
        voted, voted_scores, has = _unclaimed_top4_loop(
            kb, ks, cb, cs, overlap, remaining, start
        )
    else:

        def vote(step, out_boxes, out_scores, has):
            over, _ = overlap(step)
            w = torch.where(over, cs, torch.zeros_like(cs))
            weight_sum = w.sum()
            positive = weight_sum > 0
            box = (cb * w[:, None]).sum(0) / torch.where(positive, weight_sum, 1.0)
            if scoring == "max":
                # The voters' best, or 0 (as amax from 0; a non-empty max when traced).
                score = torch.cat([w, w.new_zeros(1)]).max()
            elif scoring == "avg":
                score = weight_sum / over.sum().clamp(min=1).to(cs.dtype)
            else:  # "keep"
                score = ks.index_select(0, step.view(1))[0]
            at_step = rows == step
            out_boxes = torch.where(at_step[:, None] & positive, box, out_boxes)
            out_scores = torch.where(at_step & positive, score, out_scores)
            return step + 1, out_boxes, out_scores, has | (at_step & positive)

        _, voted, voted_scores, has = _loop(remaining, vote, start)
    voted = torch.where(has[:, None], (voted / scale).to(boxes.dtype), boxes)
    return voted, torch.where(has, voted_scores.to(scores.dtype), scores)


def _unclaimed_top4_loop(kb, ks, cb, cs, overlap, remaining, start, top: int = _TOP_NEIGHBOURS):
    """The authors' rule (see :func:`harnet.layers.box_voting.box_voting`): each kept box in
    turn claims its unclaimed overlapping candidates (copies of kept boxes, IoU 1, never
    vote); the best ``top`` of them, by score then index, vote with the kept box."""
    n = cb.shape[0]

    def mark_copies(step, is_copy):
        over, iou = overlap(step)
        return step + 1, is_copy | (over & (iou == 1))

    _, is_copy = _loop(
        remaining, mark_copies, (start[0], torch.zeros_like(cs, dtype=torch.bool))
    )
    # rank[j]: j's place by decreasing score, ties by lower index; n marks "no voter".
    order = torch.sort(cs, descending=True, stable=True)[1]
    rank = torch.empty_like(order).index_copy_(0, order, torch.arange(n, device=cs.device))
    # "No voter" ranks, as tensors: a loop body cannot take the symbolic size n as a number.
    unranked = torch.full_like(rank, n)
    no_voter = torch.full((top,), n, dtype=rank.dtype, device=rank.device)
    cs_pad = torch.cat([cs, cs.new_zeros(top)])
    cb_pad = torch.cat([cb, cb.new_zeros(top, 4)])
    rows = torch.arange(kb.shape[0], device=kb.device)

    def claim(step, out_boxes, out_scores, has, claimed):
        over, _ = overlap(step)
        voters = over & ~claimed & ~is_copy
        ranks = torch.cat([torch.where(voters, rank, unranked), no_voter])
        best_rank, best = torch.topk(ranks, top, largest=False)
        valid = best_rank < no_voter
        s = torch.where(valid, cs_pad.index_select(0, best), torch.zeros_like(best, dtype=cs.dtype))
        at = step.view(1)
        own_score = ks.index_select(0, at)
        weight_sum = own_score + s.sum()
        own_box = kb.index_select(0, at)[0]
        weighted = own_box * own_score + (cb_pad.index_select(0, best) * s[:, None]).sum(0)
        positive = weight_sum > 0
        box = torch.where(positive, weighted / torch.where(positive, weight_sum, 1.0), own_box)
        at_step = rows == step
        voted = at_step & valid.any()
        out_boxes = torch.where(voted[:, None], box, out_boxes)
        out_scores = torch.where(voted, weight_sum / (top + 1), out_scores)
        return step + 1, out_boxes, out_scores, has | voted, claimed | (over & ~claimed)

    _, voted, voted_scores, has, _ = _loop(
        remaining, claim, (*start, torch.zeros_like(cs, dtype=torch.bool))
    )
    return voted, voted_scores, has
