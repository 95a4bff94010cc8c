"""Soft-NMS's greedy loop compiled by numba, for CPU tensors (private).

The definition, one category and one greedy step at a time, as a compiled loop: per step,
one pass over the category's remaining boxes decays them by the kept box, drops those
below the threshold, compacts the rest and finds the next best. The work is O(N x kept)
IoUs with no per-step tensor-op overhead: a dense single-category scene of 1000 boxes
needs about 900 steps, a few milliseconds here against ~100 ms of tensor ops per step
(``dev/benchmark_postprocess.py``). Arithmetic in float64 and multiplicative decays, as
in the definition.

numba is optional: :func:`available` is False without it (or with
``HARNET_SOFT_NMS_NUMBA=0``) and callers use :mod:`._soft_nms_torch`. The kernel is
compiled on first use (about a second, cached on disk by numba afterwards).
"""

import math
from typing import Tuple

import numpy as np
import torch
from torch import Tensor

from ._numba_kernel import LazyKernel

_METHOD_CODES = {"gaussian": 0, "linear": 1, "hard": 2}


def available() -> bool:
    """True when the compiled loop can run (numba importable and not HARNET_SOFT_NMS_NUMBA=0)."""
    return _KERNEL.available()


def greedy_soft_nms_numba(
    boxes: Tensor,
    scores: Tensor,
    idxs: Tensor,
    candidates: Tensor,
    method: str,
    sigma: float,
    iou_threshold: float,
    score_threshold: float,
) -> Tuple[Tensor, Tensor]:
    """Same contract as :func:`._soft_nms_torch.greedy_soft_nms_torch` (CPU tensors only).

    Returns:
        keep (Tensor[K] int64), kept_scores (Tensor[K] float64): the kept boxes with their
        decayed scores, in no particular order.
    """
    # numba reads the data only: no autograd through it (inputs that require grad, e.g.
    # a model's outputs outside torch.no_grad, are read as they are).
    boxes, scores = boxes.detach(), scores.detach()
    # Categories one after the other, each in index order (ties go to the lower index).
    category, order = torch.sort(idxs[candidates], stable=True)
    box_index = candidates[order]
    _, counts = torch.unique_consecutive(category, return_counts=True)
    starts = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    planes = boxes[box_index].to(torch.float64).t().contiguous().numpy()
    n = box_index.numel()
    keep = np.empty(n, dtype=np.int64)
    kept_scores = np.empty(n, dtype=np.float64)
    num_kept = _KERNEL.get()(
        planes[0], planes[1], planes[2], planes[3],
        scores[box_index].to(torch.float64).numpy(), starts.numpy(),
        _METHOD_CODES[method], float(sigma), float(iou_threshold), float(score_threshold),
        keep, kept_scores,
    )  # fmt: skip
    keep = box_index[torch.from_numpy(keep[:num_kept])]
    return keep, torch.from_numpy(kept_scores[:num_kept])


def _greedy_kernel(
    x1, y1, x2, y2, scores, starts, method, sigma, iou_threshold, score_threshold,
    keep, kept_scores,
):  # fmt: skip
    """Greedy soft-NMS of the boxes ``[starts[c], starts[c + 1])`` of each category ``c``;
    writes kept positions and scores to ``keep`` / ``kept_scores``, returns their number.
    Method 0: Gaussian, 1: linear, 2: hard."""
    n = x1.shape[0]
    # The remaining boxes of the current category, compacted after every step.
    rx1, ry1, rx2, ry2 = np.empty(n), np.empty(n), np.empty(n), np.empty(n)
    r_area, r_score = np.empty(n), np.empty(n)
    r_pos = np.empty(n, dtype=np.int64)
    num_kept = 0
    for c in range(starts.shape[0] - 1):
        remaining, best = 0, -1
        for i in range(starts[c], starts[c + 1]):
            if scores[i] >= score_threshold:
                rx1[remaining], ry1[remaining] = x1[i], y1[i]
                rx2[remaining], ry2[remaining] = x2[i], y2[i]
                r_area[remaining] = (x2[i] - x1[i]) * (y2[i] - y1[i])
                r_score[remaining], r_pos[remaining] = scores[i], i
                if best < 0 or scores[i] > r_score[best]:  # strict: first maximum wins
                    best = remaining
                remaining += 1
        while remaining > 0:
            keep[num_kept], kept_scores[num_kept] = r_pos[best], r_score[best]
            num_kept += 1
            kx1, ky1, kx2, ky2, k_area = rx1[best], ry1[best], rx2[best], ry2[best], r_area[best]
            survivors, next_best = 0, -1
            for t in range(remaining):
                if t == best:
                    continue
                s = r_score[t]
                iw = min(kx2, rx2[t]) - max(kx1, rx1[t])
                ih = min(ky2, ry2[t]) - max(ky1, ry1[t])
                if iw > 0 and ih > 0:  # else IoU 0: weight 1 for every method
                    inter = iw * ih
                    union = k_area + r_area[t] - inter
                    iou = inter / union if union > 0 else 0.0
                    if method == 0:
                        w = math.exp(-iou * iou / sigma)
                    elif method == 1:
                        w = max(0.0, 1.0 - iou) if iou > iou_threshold else 1.0
                    else:
                        w = 0.0 if iou > iou_threshold else 1.0
                    s *= w
                    if not s >= score_threshold or w == 0:
                        continue  # dropped
                rx1[survivors], ry1[survivors] = rx1[t], ry1[t]
                rx2[survivors], ry2[survivors] = rx2[t], ry2[t]
                r_area[survivors], r_score[survivors], r_pos[survivors] = r_area[t], s, r_pos[t]
                if next_best < 0 or s > r_score[next_best]:
                    next_best = survivors
                survivors += 1
            remaining, best = survivors, next_best
    return num_kept


_KERNEL = LazyKernel(_greedy_kernel, "HARNET_SOFT_NMS_NUMBA")
