"""Box voting as Triton kernels, for CUDA tensors in eager mode (private).

Kept boxes and candidates come sorted by (category, x1), with each kept box's window of
candidates that can reach the IoU threshold (:func:`.box_voting._candidate_windows`). One
program per kept box scans its window in blocks: IoUs with :func:`._box_ops.plane_iou`'s
arithmetic in the input dtype (so the same candidates vote as in the PyTorch path), sums in
float64. No pair list in memory, no host synchronisation.

- "max" / "keep" / "avg": one kernel; every candidate at IoU >= threshold votes.
- "unclaimed_top4": a claim kernel (each candidate's first claiming kept box, in input order,
  by an atomic minimum; copies of kept boxes, IoU 1, marked) then a vote kernel (each kept
  box picks its 4 best claimed candidates by score, ties by lower index).

Triton is optional: :func:`available` is False without it (or with
``HARNET_BOX_VOTING_TRITON=0``) and callers use the PyTorch ops. Under ``TRITON_INTERPRET=1``
the kernels also run on CPU tensors (the tests do so). Floating-point contraction (FMA) is
off, so the GPU rounds as the definition does.
"""

import os
from typing import Tuple

import torch
from torch import Tensor

try:  # optional dependency
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: callers use the PyTorch ops
    triton = None

_SCORING_CODES = {"max": 0, "keep": 1, "avg": 2}
# Candidates one program loads per step.
_BLOCK = 128
# At most this many claimed neighbours vote with a kept box ("unclaimed_top4").
_TOP = 4


def available() -> bool:
    """True when the kernels can run (triton importable and not disabled)."""
    return triton is not None and os.environ.get("HARNET_BOX_VOTING_TRITON", "1") != "0"


def _planes(boxes: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    x1, y1, x2, y2 = boxes.t().contiguous()
    return x1, y1, x2, y2


def sorted_box_voting_triton(
    kb: Tensor, ks: Tensor, k_order: Tensor, cb: Tensor, cs: Tensor, c_order: Tensor,
    lo: Tensor, hi: Tensor, iou_threshold: float, scoring: str,
) -> Tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Box voting on sorted inputs (see :func:`.box_voting._sorted_inputs`).

    Args:
        kb (Tensor[K, 4]), ks (Tensor[K]): kept boxes (rescaled) and scores, sorted by
            (category, x1); float32 or float64, one dtype with ``cb``, ``cs``.
        k_order (Tensor[K] int64): each sorted kept box's input position.
        cb (Tensor[M, 4]), cs (Tensor[M]): candidates and their scores, sorted likewise.
        c_order (Tensor[M] int64): each sorted candidate's input index.
        lo, hi (Tensor[K] int64): each kept box's candidate window ``[lo, hi)``.
        iou_threshold (float): minimum IoU of a voter.
        scoring (str): a canonical rule of :data:`.box_voting.VOTING_SCORINGS`.

    Returns:
        voted_boxes (Tensor[K, 4] float64), voted_scores (Tensor[K] float64),
        has (Tensor[K] bool): in sorted order; ``has`` False: keep the input box and score.
    """
    k, m = kb.shape[0], cb.shape[0]
    device = kb.device
    f64 = torch.float64
    out = torch.empty((5, k), dtype=f64, device=device)  # x1, y1, x2, y2, score
    has = torch.zeros(k, dtype=torch.int32, device=device)
    if k == 0:
        return out[:4].t(), out[4], has.bool()
    kp, cp = _planes(kb), _planes(cb)
    lo, hi = lo.contiguous(), hi.contiguous()
    ks, cs = ks.contiguous(), cs.contiguous()
    t = float(iou_threshold)
    options = dict(BLOCK=_BLOCK, num_warps=4, enable_fp_fusion=False)
    if scoring == "unclaimed_top4":
        first_claim = torch.full((m,), k, dtype=torch.int64, device=device)
        is_copy = torch.zeros(m, dtype=torch.int32, device=device)
        _claim_kernel[(k,)](*kp, *cp, k_order.contiguous(), lo, hi, first_claim, is_copy, t,
                            **options)  # fmt: skip
        _top_vote_kernel[(k,)](
            *kp, ks, *cp, cs, k_order.contiguous(), c_order.contiguous(), lo, hi,
            first_claim, is_copy, out, has, k, TOP=_TOP, **options,
        )  # fmt: skip
    else:
        _weighted_vote_kernel[(k,)](*kp, ks, *cp, cs, lo, hi, out, has, k, t,
                                    SCORING=_SCORING_CODES[scoring], **options)  # fmt: skip
    return out[:4].t(), out[4], has.bool()


if triton is not None:

    @triton.jit
    def _iou(bx1, by1, bx2, by2, barea, x1, y1, x2, y2):
        """IoU of one box with a block of boxes, as :func:`._box_ops.plane_iou` computes it
        (clamped overlaps, union 0 -> IoU 0), in the inputs' dtype."""
        iw = tl.maximum(tl.minimum(bx2, x2) - tl.maximum(bx1, x1), 0.0)
        ih = tl.maximum(tl.minimum(by2, y2) - tl.maximum(by1, y1), 0.0)
        inter = iw * ih
        union = (barea + (x2 - x1) * (y2 - y1)) - inter
        union = tl.where(union == 0, 1.0, union).to(inter.dtype)
        # Correctly rounded division, as PyTorch's (float32 `/` is approximate in Triton).
        if inter.dtype == tl.float64:
            iou = inter / union
        else:
            iou = tl.math.div_rn(inter, union)
        return iou

    @triton.jit
    def _weighted_vote_kernel(
        kx1_ptr, ky1_ptr, kx2_ptr, ky2_ptr, ks_ptr,
        cx1_ptr, cy1_ptr, cx2_ptr, cy2_ptr, cs_ptr,
        lo_ptr, hi_ptr, out_ptr, has_ptr, k, iou_threshold,
        SCORING: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        """Kept box ``r = program_id``: score-weighted mean of the candidates of its window
        with IoU >= threshold; score by SCORING (0: max, 1: keep, 2: avg)."""
        r = tl.program_id(0)
        bx1, by1 = tl.load(kx1_ptr + r), tl.load(ky1_ptr + r)
        bx2, by2 = tl.load(kx2_ptr + r), tl.load(ky2_ptr + r)
        barea = (bx2 - bx1) * (by2 - by1)
        lo, hi = tl.load(lo_ptr + r), tl.load(hi_ptr + r)
        zero = tl.zeros([BLOCK], dtype=tl.float64)
        w_sum, w_x1, w_y1, w_x2, w_y2, w_max, n = zero, zero, zero, zero, zero, zero, zero
        for start in range(lo, hi, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            inside = offs < hi
            x1 = tl.load(cx1_ptr + offs, mask=inside, other=0.0)
            y1 = tl.load(cy1_ptr + offs, mask=inside, other=0.0)
            x2 = tl.load(cx2_ptr + offs, mask=inside, other=0.0)
            y2 = tl.load(cy2_ptr + offs, mask=inside, other=0.0)
            s = tl.load(cs_ptr + offs, mask=inside, other=0.0).to(tl.float64)
            vote = inside & (_iou(bx1, by1, bx2, by2, barea, x1, y1, x2, y2) >= iou_threshold)
            s = tl.where(vote, s, 0.0)
            w_sum += s
            w_x1 += s * x1.to(tl.float64)
            w_y1 += s * y1.to(tl.float64)
            w_x2 += s * x2.to(tl.float64)
            w_y2 += s * y2.to(tl.float64)
            w_max = tl.maximum(w_max, s)
            n += tl.where(vote, 1.0, 0.0)
        total = tl.sum(w_sum, axis=0)
        positive = total > 0
        safe = tl.where(positive, total, 1.0)
        if SCORING == 0:
            score = tl.max(w_max, axis=0)
        elif SCORING == 2:
            score = total / tl.maximum(tl.sum(n, axis=0), 1.0)
        else:
            score = tl.load(ks_ptr + r).to(tl.float64)
        tl.store(out_ptr + r, tl.sum(w_x1, axis=0) / safe)
        tl.store(out_ptr + k + r, tl.sum(w_y1, axis=0) / safe)
        tl.store(out_ptr + 2 * k + r, tl.sum(w_x2, axis=0) / safe)
        tl.store(out_ptr + 3 * k + r, tl.sum(w_y2, axis=0) / safe)
        tl.store(out_ptr + 4 * k + r, score)
        tl.store(has_ptr + r, positive.to(tl.int32))

    @triton.jit
    def _claim_kernel(
        kx1_ptr, ky1_ptr, kx2_ptr, ky2_ptr,
        cx1_ptr, cy1_ptr, cx2_ptr, cy2_ptr,
        k_order_ptr, lo_ptr, hi_ptr, first_claim_ptr, is_copy_ptr, iou_threshold,
        BLOCK: tl.constexpr,
    ):  # fmt: skip
        """Kept box ``r = program_id`` claims the candidates of its window with IoU >=
        threshold (``first_claim``: the smallest claiming input position) and marks its
        copies (IoU 1)."""
        r = tl.program_id(0)
        bx1, by1 = tl.load(kx1_ptr + r), tl.load(ky1_ptr + r)
        bx2, by2 = tl.load(kx2_ptr + r), tl.load(ky2_ptr + r)
        barea = (bx2 - bx1) * (by2 - by1)
        lo, hi = tl.load(lo_ptr + r), tl.load(hi_ptr + r)
        own = tl.load(k_order_ptr + r)
        for start in range(lo, hi, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            inside = offs < hi
            x1 = tl.load(cx1_ptr + offs, mask=inside, other=0.0)
            y1 = tl.load(cy1_ptr + offs, mask=inside, other=0.0)
            x2 = tl.load(cx2_ptr + offs, mask=inside, other=0.0)
            y2 = tl.load(cy2_ptr + offs, mask=inside, other=0.0)
            iou = _iou(bx1, by1, bx2, by2, barea, x1, y1, x2, y2)
            claim = inside & (iou >= iou_threshold)
            tl.atomic_min(first_claim_ptr + offs, tl.zeros([BLOCK], tl.int64) + own, mask=claim)
            tl.store(is_copy_ptr + offs, tl.full([BLOCK], 1, tl.int32), mask=claim & (iou == 1))

    @triton.jit
    def _top_vote_kernel(
        kx1_ptr, ky1_ptr, kx2_ptr, ky2_ptr, ks_ptr,
        cx1_ptr, cy1_ptr, cx2_ptr, cy2_ptr, cs_ptr,
        k_order_ptr, c_order_ptr, lo_ptr, hi_ptr, first_claim_ptr, is_copy_ptr,
        out_ptr, has_ptr, k,
        TOP: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        """Kept box ``r = program_id``: mean of itself (weight its score) and its TOP best
        claimed, non-copy candidates (score descending, input index ascending); score: their
        summed score / (TOP + 1)."""
        r = tl.program_id(0)
        own = tl.load(k_order_ptr + r)
        lo, hi = tl.load(lo_ptr + r), tl.load(hi_ptr + r)
        ks = tl.load(ks_ptr + r).to(tl.float64)
        bx1 = tl.load(kx1_ptr + r).to(tl.float64)
        by1 = tl.load(ky1_ptr + r).to(tl.float64)
        bx2 = tl.load(kx2_ptr + r).to(tl.float64)
        by2 = tl.load(ky2_ptr + r).to(tl.float64)
        w_sum, w_x1, w_y1, w_x2, w_y2 = ks, bx1 * ks, by1 * ks, bx2 * ks, by2 * ks
        none = tl.zeros([], dtype=tl.int64) + 9223372036854775807  # int64 max: no index
        prev_s = tl.zeros([], dtype=tl.float64) + float("inf")
        prev_i = tl.zeros([], dtype=tl.int64) - 1
        chosen = 0
        for _ in tl.static_range(TOP):
            # The best voter after (prev_s, prev_i) in (score desc, index asc) order.
            best_s = tl.zeros([], dtype=tl.float64) - 1.0  # scores are >= 0: -1 is none
            best_i = none
            best_pos = tl.zeros([], dtype=tl.int64)
            for start in range(lo, hi, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                inside = offs < hi
                claim = tl.load(first_claim_ptr + offs, mask=inside, other=-1)
                copy = tl.load(is_copy_ptr + offs, mask=inside, other=1)
                s = tl.load(cs_ptr + offs, mask=inside, other=0.0).to(tl.float64)
                idx = tl.load(c_order_ptr + offs, mask=inside, other=0)
                after = (s < prev_s) | ((s == prev_s) & (idx > prev_i))
                ok = inside & (claim == own) & (copy == 0) & after
                block_s = tl.max(tl.where(ok, s, -1.0), axis=0)
                tied = ok & (s == block_s)
                block_i = tl.min(tl.where(tied, idx, none), axis=0)
                block_pos = tl.min(tl.where(tied & (idx == block_i), offs, none), axis=0)
                better = (block_s > best_s) | ((block_s == best_s) & (block_i < best_i))
                best_s = tl.where(better, block_s, best_s)
                best_i = tl.where(better, block_i, best_i)
                best_pos = tl.where(better, block_pos, best_pos)
            found = best_s >= 0
            p = tl.where(found, best_pos, 0)
            take = tl.where(found, best_s, 0.0)
            w_sum += take
            w_x1 += take * tl.load(cx1_ptr + p).to(tl.float64)
            w_y1 += take * tl.load(cy1_ptr + p).to(tl.float64)
            w_x2 += take * tl.load(cx2_ptr + p).to(tl.float64)
            w_y2 += take * tl.load(cy2_ptr + p).to(tl.float64)
            chosen += found.to(tl.int32)
            prev_s = tl.where(found, best_s, prev_s)
            prev_i = tl.where(found, best_i, prev_i)
        positive = w_sum > 0
        safe = tl.where(positive, w_sum, 1.0)
        tl.store(out_ptr + r, tl.where(positive, w_x1 / safe, bx1))
        tl.store(out_ptr + k + r, tl.where(positive, w_y1 / safe, by1))
        tl.store(out_ptr + 2 * k + r, tl.where(positive, w_x2 / safe, bx2))
        tl.store(out_ptr + 3 * k + r, tl.where(positive, w_y2 / safe, by2))
        tl.store(out_ptr + 4 * k + r, w_sum / (TOP + 1))
        tl.store(has_ptr + r, (chosen > 0).to(tl.int32))
