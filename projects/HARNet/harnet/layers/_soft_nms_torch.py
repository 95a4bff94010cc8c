"""Soft-NMS's greedy loop in PyTorch ops, all categories in parallel (private).

The portable path: any device, no compiled dependency, TorchScript-compatible (the exported
detector runs it; see :mod:`harnet.layers.postprocess`). On CPU,
:mod:`._soft_nms_numba` is faster when numba is installed; both give the greedy result.

Layout: one row per category, its boxes packed from the left in index order, so that a
row's first maximum is its lowest-index box; a score of -inf marks an empty or dead slot.
Every greedy step, each row picks its best box, which decays the rest of its row. The loop
runs as many steps as the largest category keeps boxes; each step is a handful of tensor
ops and none synchronises the host with a GPU: only the termination / compaction check
does, every ``CHECK_EVERY`` steps.
"""

import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ._box_ops import elementwise_iou, plane_iou

# Largest number of same-category pair decays (rows x boxes x boxes, padded) computed up
# front; above it (the usual case) each greedy step computes the IoU of the picked boxes
# with their rows. All pairs cost as much as a row's length in greedy steps, so they only
# pay for small problems, where per-op overhead dominates (measured on CPU).
PAIR_DECAYS_BUDGET = 1 << 15
# Greedy steps between termination / compaction checks (each check syncs a GPU).
CHECK_EVERY = 8


def greedy_soft_nms_torch(
    boxes: Tensor,
    scores: Tensor,
    idxs: Tensor,
    candidates: Tensor,
    method: str,
    sigma: float,
    iou_threshold: float,
    score_threshold: float,
    pair_decays_budget: int = PAIR_DECAYS_BUDGET,
) -> Tuple[Tensor, Tensor]:
    """The greedy soft-NMS loop over ``candidates`` (see :func:`harnet.layers.soft_nms`).

    Args:
        boxes (Tensor[N, 4]), scores (Tensor[N]), idxs (Tensor[N] integer): all boxes,
            validated, coordinates small enough for float32 areas (see ``pow2_scale``).
        candidates (Tensor[M] int64): the boxes taking part (score >= score_threshold).
        method (str): "gaussian", "linear" or "hard".

    Returns:
        keep (Tensor[K] int64), kept_scores (Tensor[K], float32 or float64): the kept
        boxes with their decayed scores, in no particular order.
    """
    # Half precision is too coarse for IoU and repeated decays.
    dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    # Gaussian decays are done on log-scores, log(s) -= IoU^2 / sigma: no exp per step
    # (transcendental ops are the costliest per element). A zero score cannot be
    # represented there; such boxes (possible with score_threshold <= 0) only decay each
    # other, by factors > 0: all are kept, last, with score 0.
    log_space = method == "gaussian"
    zero_score = candidates[:0]
    if log_space and score_threshold <= 0:
        is_zero = scores[candidates] == 0
        zero_score, candidates = candidates[is_zero], candidates[~is_zero]
    if candidates.numel() == 0:
        return zero_score, scores[zero_score].to(dtype)

    score_rows, coords, index_rows = _pack_rows(boxes, scores, idxs, candidates, log_space, dtype)
    if log_space:
        threshold = math.log(score_threshold) if score_threshold > 0 else float("-inf")
    else:
        threshold = score_threshold
    keep, kept_scores = _greedy_loop(
        score_rows, coords, index_rows, method, 1.0 / sigma, iou_threshold, threshold,
        not log_space and score_threshold <= 0, pair_decays_budget,
    )  # fmt: skip
    if log_space:
        # exp(log(s)) can round one step above s: a decay must never raise a score.
        kept_scores = torch.minimum(torch.exp(kept_scores), scores[keep].to(dtype))
    return torch.cat([keep, zero_score]), torch.cat([kept_scores, scores[zero_score].to(dtype)])


def _pack_rows(
    boxes: Tensor,
    scores: Tensor,
    idxs: Tensor,
    candidates: Tensor,
    log_space: bool,
    dtype: torch.dtype,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Scores ``[R, C]`` (log-scores in log space), coordinates ``[4, R, C]`` and box
    indices ``[R, C]`` (-1: empty slot), one row per category (see the module doc)."""
    device = boxes.device
    category, order = torch.sort(idxs[candidates], stable=True)
    box_index = candidates[order]
    _, counts = torch.unique_consecutive(category, return_counts=True)
    num_rows, num_cols = counts.numel(), int(counts.max())
    row = torch.repeat_interleave(torch.arange(num_rows, device=device), counts)
    col = torch.arange(box_index.numel(), device=device) - (torch.cumsum(counts, 0) - counts)[row]
    score_rows = torch.full((num_rows, num_cols), float("-inf"), dtype=dtype, device=device)
    s = scores[box_index].to(dtype)
    score_rows[row, col] = torch.log(s) if log_space else s
    coords = torch.zeros((4, num_rows, num_cols), dtype=dtype, device=device)
    coords[:, row, col] = boxes[box_index].to(dtype).t()
    index_rows = torch.full((num_rows, num_cols), -1, dtype=torch.int64, device=device)
    index_rows[row, col] = box_index
    return score_rows, coords, index_rows


def _decay(iou: Tensor, method: str, inv_sigma: float, iou_threshold: float) -> Tensor:
    """The decay of a box by a kept box at ``iou``: the log-score decrement
    ``IoU^2 / sigma`` for "gaussian", the multiplicative weight for "linear" / "hard"."""
    if method == "gaussian":
        return iou.mul_(iou).mul_(inv_sigma)
    if method == "linear":
        # Rounding can make IoU exceed 1 by an ulp: keep weights in [0, 1], so that a dead
        # box's -inf score never turns into +inf.
        return torch.where(iou > iou_threshold, (1 - iou).clamp_(min=0), torch.ones_like(iou))
    return (iou <= iou_threshold).to(iou.dtype)  # "hard"


def _pair_decays(
    coords: Tensor, method: str, inv_sigma: float, iou_threshold: float, budget: int
) -> Optional[Tensor]:
    """Decays ``[R, C, C]`` of every same-row pair, or None above ``budget`` pairs."""
    rows, cols = coords.shape[1], coords.shape[2]
    if rows * cols * cols > budget:
        return None
    b = coords.permute(1, 2, 0)
    return _decay(
        elementwise_iou(b[:, :, None, :], b[:, None, :, :]), method, inv_sigma, iou_threshold
    )


def _decay_by_picked(
    coords: Tensor,
    area: Tensor,
    picked: Tensor,
    method: str,
    inv_sigma: float,
    iou_threshold: float,
) -> Tensor:
    """Decays ``[R, C]`` of each row's boxes by the row's picked box (``picked: [R, 1]``)."""
    p = coords.gather(2, picked[None].expand(4, -1, -1))  # [4, R, 1]
    iou = plane_iou(coords[0], coords[1], coords[2], coords[3], area,
                    p[0], p[1], p[2], p[3], area.gather(1, picked))  # fmt: skip
    return _decay(iou, method, inv_sigma, iou_threshold)


def _greedy_loop(
    score_rows: Tensor,
    coords: Tensor,
    index_rows: Tensor,
    method: str,
    inv_sigma: float,
    iou_threshold: float,
    threshold: float,
    zero_weight_drops: bool,
    pair_decays_budget: int,
    check_every: int = CHECK_EVERY,
) -> Tuple[Tensor, Tensor]:
    """Runs the greedy steps on packed rows (every ``check_every`` steps: stop when all
    rows are done, compact when a quarter of the rows or columns is dead); returns the
    picked box indices and their scores (log-scores in log space)."""
    log_space = method == "gaussian"
    area = (coords[2] - coords[0]) * (coords[3] - coords[1])
    pair_decays = _pair_decays(coords, method, inv_sigma, iou_threshold, pair_decays_budget)
    neg_inf = torch.full((), float("-inf"), dtype=score_rows.dtype, device=score_rows.device)
    kept_index: List[Tensor] = []
    kept_scores: List[Tensor] = []
    # No row can need more steps than this (each step removes a box from every live row).
    max_steps = score_rows.shape[1]
    step, next_check = 0, 1
    while True:
        # argmax + gather, not max(dim=1): the latter runs a parallel region even for tiny
        # inputs, very slow on a busy CPU. argmax takes the first maximum (lowest index).
        picked = score_rows.argmax(dim=1, keepdim=True)
        kept_index.append(index_rows.gather(1, picked))
        kept_scores.append(score_rows.gather(1, picked))
        if pair_decays is not None:
            decay = pair_decays.gather(1, picked[:, :, None].expand(-1, -1, pair_decays.shape[2]))
            decay = decay.squeeze(1)
        else:
            decay = _decay_by_picked(coords, area, picked, method, inv_sigma, iou_threshold)
        score_rows = _decayed(
            score_rows, decay, picked, log_space, threshold, zero_weight_drops, neg_inf
        )
        step += 1
        if step < next_check and step < max_steps:
            continue
        next_check = step + check_every
        alive = score_rows > float("-inf")
        alive_per_row = alive.sum(dim=1)
        live_rows = torch.nonzero(alive_per_row).squeeze(1)
        if live_rows.numel() == 0:
            break
        if step >= max_steps:
            raise RuntimeError("soft-NMS: the greedy loop did not terminate (non-finite IoU?)")
        width = int(alive_per_row.max())
        if live_rows.numel() < 0.75 * score_rows.shape[0] or width < 0.75 * score_rows.shape[1]:
            # Drop finished rows and move live boxes left: fewer, shorter rows.
            source, padding = _compaction_source(alive[live_rows], width)
            r = live_rows[:, None]
            score_rows = score_rows[r, source].masked_fill_(padding, float("-inf"))
            coords, index_rows, area = coords[:, r, source], index_rows[r, source], area[r, source]
            if pair_decays is not None:
                pair_decays = pair_decays[
                    live_rows[:, None, None], source[:, :, None], source[:, None, :]
                ]
            else:  # now perhaps small enough
                pair_decays = _pair_decays(
                    coords, method, inv_sigma, iou_threshold, pair_decays_budget
                )
        max_steps = step + score_rows.shape[1]

    keep = torch.cat(kept_index).squeeze(1)
    kept = torch.cat(kept_scores).squeeze(1)
    valid = kept > float("-inf")  # rows that had finished when picking
    return keep[valid], kept[valid]


def _decayed(
    score_rows: Tensor, decay: Tensor, picked: Tensor, log_space: bool, threshold: float,
    zero_weight_drops: bool, neg_inf: Tensor,
) -> Tensor:  # fmt: skip
    """Scores after each row's picked box decayed the row: the picked boxes and those
    that fell below ``threshold`` (or got weight 0, if ``zero_weight_drops``) become -inf."""
    if log_space:
        score_rows.sub_(decay)  # -inf stays -inf
    else:
        score_rows.mul_(decay)  # dead: -inf, or NaN where decay == 0: both fail the test
    live = score_rows >= threshold
    if zero_weight_drops:  # else the threshold test already drops zero weights
        live &= decay != 0
    return torch.where(live, score_rows, neg_inf).scatter_(1, picked, float("-inf"))


def _compaction_source(alive: Tensor, width: int) -> Tuple[Tensor, Tensor]:
    """For live rows' ``alive [R, C]`` mask: the old column of each new column
    ``[R, width]`` (live boxes move left keeping their index order) and the padding mask
    (new columns with no box; their source is column 0, to be masked dead). No sort: a
    sort over rows is as slow as max(dim=1) on a busy CPU."""
    rows, cols = alive.nonzero().unbind(1)
    new_cols = alive.cumsum(dim=1)[rows, cols] - 1
    shape = (alive.shape[0], width)
    source = torch.zeros(shape, dtype=torch.int64, device=alive.device)
    source[rows, new_cols] = cols
    padding = torch.ones(shape, dtype=torch.bool, device=alive.device)
    padding[rows, new_cols] = False
    return source, padding
