"""Soft-NMS's greedy loop as one Triton kernel, for CUDA tensors in eager mode (private).

One program per category: the category's boxes (at most :data:`MAX_GROUP` of them) are
loaded once into registers, and the program runs the whole greedy loop there, as the
definition does (:mod:`._soft_nms_numba`): per step, a block-wide first argmax picks the
best remaining box (ties: lowest index), every other box is decayed by its IoU with it,
boxes below ``score_threshold`` (or with weight 0) are dropped. No kernel launch and no
host synchronisation per step; all categories run in parallel. Arithmetic in float64 and
multiplicative decays, as :mod:`._soft_nms_numba`, whose results it reproduces (no FMA
contraction, so the GPU rounds as the CPU does).

Triton is optional: :func:`available` is False without it (or with
``HARNET_SOFT_NMS_TRITON=0``) and callers use :mod:`._soft_nms_torch`. Under
``TRITON_INTERPRET=1`` the kernel also runs on CPU tensors (the tests do so).
"""

import os
from typing import Tuple

import torch
from torch import Tensor

try:  # optional dependency
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: callers use the PyTorch loop
    triton = None

# Most boxes of one category the kernel holds (the block size); above it, callers use
# the PyTorch loop.
MAX_GROUP = 4096
_METHOD_CODES = {"gaussian": 0, "linear": 1}


def available() -> bool:
    """True when the kernel can run (triton importable and not disabled)."""
    return triton is not None and os.environ.get("HARNET_SOFT_NMS_TRITON", "1") != "0"


def supports(method: str, max_group_size: int) -> bool:
    """True for the methods and category sizes the kernel handles ("hard" NMS goes to
    torchvision's kernel; categories above :data:`MAX_GROUP` boxes to the PyTorch loop)."""
    return method in _METHOD_CODES and max_group_size <= MAX_GROUP


def group_candidates(idxs: Tensor, candidates: Tensor) -> Tuple[Tensor, Tensor, int]:
    """The candidates sorted by category (index order within one), each category's start
    (int64 [G + 1]) and the largest category's size (one host sync)."""
    category, order = torch.sort(idxs[candidates], stable=True)
    box_index = candidates[order]
    _, counts = torch.unique_consecutive(category, return_counts=True)
    starts = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    return box_index, starts, int(counts.max()) if counts.numel() else 0


def greedy_soft_nms_triton(
    boxes: Tensor,
    scores: Tensor,
    box_index: Tensor,
    starts: Tensor,
    max_group_size: int,
    method: str,
    sigma: float,
    iou_threshold: float,
    score_threshold: float,
) -> Tuple[Tensor, Tensor]:
    """Same contract as :func:`._soft_nms_numba.greedy_soft_nms_numba`, on candidates
    grouped by :func:`group_candidates` (``max_group_size <= MAX_GROUP``).

    Args:
        boxes (Tensor[N, 4]), scores (Tensor[N]): all boxes, validated (scores >= 0).
        box_index (Tensor[M] int64): the candidates, grouped by category.
        starts (Tensor[G + 1] int64): where each category's candidates start.
        method (str): "gaussian" or "linear".

    Returns:
        keep (Tensor[K] int64), kept_scores (Tensor[K] float64): the kept boxes with their
        decayed scores, in no particular order.
    """
    n = box_index.numel()
    device = boxes.device
    if n == 0:
        return box_index, torch.zeros(0, dtype=torch.float64, device=device)
    if not supports(method, max_group_size):
        raise ValueError(f"the Triton soft-NMS takes gaussian/linear, <= {MAX_GROUP} boxes "
                         f"per category; got {method!r}, {max_group_size}")  # fmt: skip
    planes = boxes[box_index].to(torch.float64).t().contiguous()
    s = scores[box_index].to(torch.float64).contiguous()
    num_groups = starts.numel() - 1
    keep_pos = torch.empty(n, dtype=torch.int64, device=device)
    kept_scores = torch.empty(n, dtype=torch.float64, device=device)
    counts = torch.zeros(num_groups, dtype=torch.int64, device=device)
    block = max(16, 1 << (max_group_size - 1).bit_length())
    _soft_nms_kernel[(num_groups,)](
        planes[0], planes[1], planes[2], planes[3], s, starts.contiguous(),
        keep_pos, kept_scores, counts,
        float(sigma), float(iou_threshold), float(score_threshold),
        METHOD=_METHOD_CODES[method], BLOCK=block, num_warps=min(16, max(1, block // 256)),
        enable_fp_fusion=False,  # no FMA contraction: the definition's rounding
    )  # fmt: skip
    # Category g wrote its kept boxes to [starts[g], starts[g] + counts[g]).
    sizes = starts[1:] - starts[:-1]
    group = torch.repeat_interleave(torch.arange(num_groups, device=device), sizes, output_size=n)
    valid = torch.arange(n, device=device) - starts[:-1][group] < counts[group]
    where = torch.nonzero(valid).squeeze(1)
    return box_index[keep_pos[where]], kept_scores[where]


if triton is not None:

    @triton.jit
    def _soft_nms_kernel(
        x1_ptr, y1_ptr, x2_ptr, y2_ptr, score_ptr, starts_ptr,
        keep_ptr, kept_score_ptr, count_ptr,
        sigma, iou_threshold, score_threshold,
        METHOD: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        """Greedy soft-NMS of the boxes ``[starts[g], starts[g + 1])`` of category
        ``g = program_id``: writes kept positions / scores from ``starts[g]`` on and their
        number to ``count[g]``. METHOD 0: Gaussian, 1: linear."""
        g = tl.program_id(0)
        start = tl.load(starts_ptr + g)
        n = tl.load(starts_ptr + g + 1) - start
        offs = tl.arange(0, BLOCK)
        inside = offs < n
        x1 = tl.load(x1_ptr + start + offs, mask=inside, other=0.0)
        y1 = tl.load(y1_ptr + start + offs, mask=inside, other=0.0)
        x2 = tl.load(x2_ptr + start + offs, mask=inside, other=0.0)
        y2 = tl.load(y2_ptr + start + offs, mask=inside, other=0.0)
        s = tl.load(score_ptr + start + offs, mask=inside, other=0.0)
        neg_inf = float("-inf")
        s = tl.where(inside & (s >= score_threshold), s, neg_inf)
        area = (x2 - x1) * (y2 - y1)
        num_kept = 0
        best_score = tl.max(s, axis=0)
        while best_score > neg_inf:
            best = tl.argmax(s, axis=0, tie_break_left=True)
            tl.store(keep_ptr + start + num_kept, best + start)
            tl.store(kept_score_ptr + start + num_kept, best_score)
            num_kept += 1
            kx1 = tl.load(x1_ptr + start + best)
            ky1 = tl.load(y1_ptr + start + best)
            kx2 = tl.load(x2_ptr + start + best)
            ky2 = tl.load(y2_ptr + start + best)
            iw = tl.minimum(x2, kx2) - tl.maximum(x1, kx1)
            ih = tl.minimum(y2, ky2) - tl.maximum(y1, ky1)
            overlap = (iw > 0) & (ih > 0)  # else IoU 0: weight 1 for every method
            inter = tl.where(overlap, iw * ih, 0.0)
            union = (kx2 - kx1) * (ky2 - ky1) + area - inter
            iou = tl.where(union > 0, inter / tl.where(union > 0, union, 1.0), 0.0)
            if METHOD == 0:
                w = tl.exp(-iou * iou / sigma)
            else:
                w = tl.where(iou > iou_threshold, tl.maximum(1.0 - iou, 0.0), 1.0)
            decayed = s * w  # dead boxes: -inf, or NaN (weight 0): dropped below
            dropped = overlap & ((decayed != decayed) | (decayed < score_threshold) | (w == 0))
            s = tl.where(overlap, decayed, s)
            s = tl.where(dropped | (offs == best), neg_inf, s)
            best_score = tl.max(s, axis=0)
        tl.store(count_ptr + g, num_kept)
