"""Weighted boxes fusion's greedy assignment compiled by numba, for CPU tensors (private).

The same loop as :func:`.wbf._cluster`, one category (grid row) and one box at a time:
the box's IoU with each of the row's fused boxes so far, the first best, a match when it
is ``> iou_threshold``, the cluster's sums and fused box updated. The arithmetic is the
tensor loop's, in the grid's dtype and in the same order (IoU: clamped overlaps, their
product, ``(fused area + box area) - inter``, one division; sums: one addition per box),
so the results are bit for bit those of the tensor loop, without its ~25 tensor-op calls
per step (one step per box when one category holds them all).

numba is optional: :func:`available` is False without it (or with ``HARNET_WBF_NUMBA=0``)
and callers use the tensor loop. The kernel is compiled on first use (cached on disk by
numba afterwards).
"""

import numpy as np
import torch

from ._numba_kernel import LazyKernel


def available() -> bool:
    """True when the compiled loop can run (numba importable and not HARNET_WBF_NUMBA=0)."""
    return _KERNEL.available()


def supports(boxes: torch.Tensor) -> bool:
    """CPU float32 / float64 grids (other dtypes and devices: the tensor loop)."""
    return boxes.device.type == "cpu" and boxes.dtype in (torch.float32, torch.float64)


def cluster_numba(grid: dict, iou_threshold: float):
    """Same contract as :func:`.wbf._cluster` (``grid`` from :func:`.wbf._to_grid`, on
    the CPU, float32 or float64)."""
    # numba reads the data only (no autograd through it).
    boxes = grid["boxes"].detach().contiguous()
    contribution = grid["contribution"].detach().contiguous()
    num_rows, length = boxes.shape[:2]
    lengths = grid["valid"].sum(1).numpy()
    fused = torch.zeros_like(boxes)
    sums = torch.zeros_like(contribution)
    assign = torch.zeros((num_rows, length), dtype=torch.int64)
    num_clusters = torch.zeros(num_rows, dtype=torch.int64)
    # The threshold in the grid's dtype, as the tensor loop's comparison rounds it.
    threshold = np.asarray(iou_threshold, dtype=boxes.numpy().dtype)
    _KERNEL.get()(
        boxes.numpy(), contribution.numpy(), lengths, threshold[()],
        fused.numpy(), sums.numpy(), assign.numpy(), num_clusters.numpy(),
    )  # fmt: skip
    return fused, sums[..., 4], assign, num_clusters


def _cluster_kernel(boxes, contribution, lengths, threshold, fused, sums, assign, num_clusters):
    """Greedy WBF assignment of each row's ``lengths[r]`` boxes (decreasing score); fills
    ``fused``, ``sums``, ``assign`` and ``num_clusters`` (zero-initialised)."""
    zero = threshold - threshold  # 0 in the grid's dtype (literals would be float64)
    for r in range(boxes.shape[0]):
        if lengths[r] == 0:
            continue
        for j in range(4):
            fused[r, 0, j] = boxes[r, 0, j]
        for j in range(5):
            sums[r, 0, j] = contribution[r, 0, j]
        n = 1
        for k in range(1, lengths[r]):
            x1, y1, x2, y2 = boxes[r, k, 0], boxes[r, k, 1], boxes[r, k, 2], boxes[r, k, 3]
            area = (x2 - x1) * (y2 - y1)
            best, best_iou = 0, zero
            for c in range(n):
                fx1, fy1, fx2, fy2 = fused[r, c, 0], fused[r, c, 1], fused[r, c, 2], fused[r, c, 3]
                iw = max(min(x2, fx2) - max(x1, fx1), zero)
                ih = max(min(y2, fy2) - max(y1, fy1), zero)
                inter = iw * ih
                iou = inter / ((fx2 - fx1) * (fy2 - fy1) + area - inter)
                if iou > best_iou or c == 0:  # the first maximum wins
                    best, best_iou = c, iou
            matched = best_iou > threshold
            target = best if matched else n
            for j in range(5):
                sums[r, target, j] += contribution[r, k, j]
            for j in range(4):
                fused[r, target, j] = sums[r, target, j] / sums[r, target, 4] if matched else boxes[r, k, j]
            assign[r, k] = target
            if not matched:
                n += 1
        num_clusters[r] = n


_KERNEL = LazyKernel(_cluster_kernel, "HARNET_WBF_NUMBA")
