"""Weighted boxes fusion (Solovyev, Wang and Gabruseva, "Weighted boxes fusion: Ensembling
boxes from different object detection models", Image and Vision Computing 2021), as a
tensor function for CPU and GPU.

Definition (section 3 of the paper), per category, over the boxes of ``T`` views (models,
or test-time augmentations of one image): visit the boxes in decreasing order of score;
each box joins the cluster whose *fused* box (the score-weighted mean of the cluster so
far) it overlaps most, if that IoU exceeds ``iou_threshold``, else it starts a cluster.
The fused box of a cluster of boxes ``B_i`` with scores ``C_i`` is ``sum(C_i B_i) /
sum(C_i)``; its score is the mean of the ``C_i`` rescaled by ``min(T, cluster size) / T``,
so that a box found by one view only loses confidence.

The greedy assignment is sequential (every box changes the fused box it joins), but
categories are independent, so all of them advance together: step ``k`` assigns the
``k``-th best box of every category, as about 25 small tensor ops over that category's
clusters so far. The loop runs as many steps as the largest category has boxes, not as
many as the image has (COCO-like detections: about 13 steps for 3 views x 100 boxes; the
worst case, every box in one category, is one step per box), and categories are ordered by
their number of boxes so that the ones still running at step ``k`` are a prefix (plain
slicing, no compaction). Everything that does not steer the assignment (cluster sizes,
weight sums, views present, maxima) is computed once after the loop from the recorded
assignment. On CPU tensors, numba's compiled version of the same loop
(:mod:`._wbf_numba`, the same results bit for bit) replaces the tensor ops.
"""

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import _wbf_numba
from ._box_ops import box_checks, check_same_device, raise_failed, score_checks

__all__ = ["weighted_boxes_fusion", "WBF_CONF_TYPES"]

WBF_CONF_TYPES = ("avg", "max", "box_and_model_avg")


def weighted_boxes_fusion(
    boxes: Tensor,
    scores: Tensor,
    classes: Tensor,
    views: Tensor,
    num_views: int,
    *,
    view_weights: Optional[Union[Sequence[float], Tensor]] = None,
    iou_threshold: float = 0.55,
    skip_threshold: float = 0.0,
    conf_type: str = "avg",
) -> Tuple[Tensor, Tensor, Tensor]:
    """
    Fuses the detections of ``num_views`` views of one image by weighted boxes fusion.

    With view weights ``w_t`` (1 by default) a box of view ``t`` with score ``s`` counts as
    ``c = s * w_t``. Per category, boxes are visited in decreasing ``c`` (ties: lower index
    first) and each joins the existing cluster whose fused box it overlaps most if that
    IoU is ``> iou_threshold`` (ties: the older cluster), else starts a new one. A
    cluster's fused box is ``sum(c_i * box_i) / sum(c_i)``. Its score, with ``n`` boxes,
    ``W = sum_t w_t`` over all views:

    - ``"avg"`` (the paper): ``mean(c_i) * min(num_views, n) / W``;
    - ``"max"``: ``max(c_i) / max_t w_t``;
    - ``"box_and_model_avg"``: ``sum(c_i) / sum(w of the boxes)`` times the summed
      weight of the distinct views present in the cluster, over ``W``.

    These are the rules of the ``ensemble-boxes`` package's ``weighted_boxes_fusion``
    (which works on [0, 1] coordinates; this one on any, IoU being scale-invariant).

    Args:
        boxes (Tensor[N, 4]): boxes of all views in ``(x1, y1, x2, y2)`` format, one
            coordinate frame (e.g. the original image), ``x1 <= x2``, ``y1 <= y2``.
            Boxes of zero area are ignored (their IoU with each other is undefined).
        scores (Tensor[N]): their scores, same floating dtype; boxes with score below
            ``skip_threshold``, or with ``score * view weight <= 0``, are ignored.
        classes (Tensor[N]): integer categories; boxes of different categories never fuse.
        views (Tensor[N]): integer view index of each box, in ``[0, num_views)``.
        num_views (int): number of views ``T``, including views without boxes (they
            still count in the score rescaling).
        view_weights (sequence or Tensor[T], optional): non-negative weight of each view
            (at least one positive); all 1 when None.
        iou_threshold (float): in ``[0, 1]``; a box joins a cluster when its IoU with the
            fused box is strictly greater (the paper's ``thr``, 0.55).
        skip_threshold (float): boxes scoring below it (before weighting) are ignored.
        conf_type (str): one of ``"avg"``, ``"max"``, ``"box_and_model_avg"``.

    Returns:
        boxes (Tensor[K, 4]): the fused boxes, dtype and device of ``boxes``.
        scores (Tensor[K]): their scores, sorted in decreasing order (ties in a
            deterministic order).
        classes (Tensor[K]): their categories, int64.
    """
    w = _check_inputs(
        boxes, scores, classes, views, num_views, view_weights, iou_threshold, conf_type
    )
    box_w = w[views.long()] if len(views) else scores.new_zeros(0)
    weighted = scores * box_w
    wh = boxes[:, 2:] - boxes[:, :2]
    keep = (scores >= skip_threshold) & (weighted > 0) & (wh > 0).all(dim=1)
    boxes, weighted, box_w = boxes[keep], weighted[keep], box_w[keep]
    classes, views = classes[keep].long(), views[keep].long()
    if len(boxes) == 0:
        return boxes, weighted, classes

    grid = _to_grid(boxes, weighted, box_w, views, classes)
    # CPU: numba's compiled loop (the same bits); else, or without numba, the tensor loop.
    if _wbf_numba.supports(grid["boxes"]) and _wbf_numba.available():
        fused, sum_c, assign, num_clusters = _wbf_numba.cluster_numba(grid, iou_threshold)
    else:
        fused, sum_c, assign, num_clusters = _cluster(grid, iou_threshold)
    conf = _cluster_scores(grid, sum_c, assign, w, conf_type)

    exists = torch.arange(fused.shape[1], device=fused.device) < num_clusters[:, None]
    fused_boxes, conf = fused[exists], conf[exists]
    fused_classes = grid["labels"][:, None].expand_as(exists)[exists]
    conf, order = torch.sort(conf, descending=True, stable=True)
    return fused_boxes[order], conf, fused_classes[order]


def _check_inputs(boxes, scores, classes, views, num_views, view_weights, iou_threshold, conf_type):
    """Validates the arguments; returns the view weights as a Tensor[T] like ``scores``."""
    value_checks = box_checks(boxes) + score_checks(scores, len(boxes))
    for name, t in (("classes", classes), ("views", views)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 1 or len(t) != len(boxes):
            raise ValueError(
                f"{name} must have shape [N] with N = len(boxes) = {len(boxes)}, "
                f"got {list(t.shape)}"
            )
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    check_same_device(boxes=boxes, scores=scores, classes=classes, views=views)
    if scores.dtype != boxes.dtype:
        raise TypeError(f"scores must have the dtype of boxes ({boxes.dtype}), got {scores.dtype}")
    if isinstance(num_views, bool) or not isinstance(num_views, int) or num_views < 1:
        raise ValueError(f"num_views must be a positive int, got {num_views!r}")
    if len(views):
        value_checks.append(
            (
                (views.min() >= 0) & (views.max() < num_views),
                lambda: f"views must lie in [0, num_views) = [0, {num_views}), got values in "
                f"[{int(views.min())}, {int(views.max())}]",
            )
        )
    raise_failed(value_checks)  # one host synchronisation for all value checks
    if not 0.0 <= float(iou_threshold) <= 1.0:
        raise ValueError(f"iou_threshold must be in [0, 1], got {iou_threshold}")
    if conf_type not in WBF_CONF_TYPES:
        raise ValueError(f"conf_type must be one of {WBF_CONF_TYPES}, got {conf_type!r}")
    if view_weights is None:
        return scores.new_ones(num_views)
    w = torch.as_tensor(view_weights, dtype=scores.dtype).to(scores.device).flatten()
    if len(w) != num_views:
        raise ValueError(f"view_weights must have num_views = {num_views} entries, got {len(w)}")
    if not (bool(torch.isfinite(w).all()) and bool((w >= 0).all()) and float(w.sum()) > 0):
        raise ValueError(f"view_weights must be finite, >= 0 and not all 0, got {w.tolist()}")
    return w


def _to_grid(boxes, weighted, box_w, views, classes) -> dict:
    """Lays the boxes out as a [R, L] grid: row r holds one category's boxes in decreasing
    weighted score (ties: input order), rows ordered by decreasing number of boxes, zero
    padded to the longest row L."""
    labels, inverse, counts = torch.unique(classes, return_inverse=True, return_counts=True)
    by_count = torch.sort(counts, descending=True, stable=True)[1]
    row_of_label = torch.empty_like(by_count)
    row_of_label[by_count] = torch.arange(len(by_count), device=by_count.device)
    labels, counts, row = labels[by_count], counts[by_count], row_of_label[inverse]

    order = torch.sort(weighted, descending=True, stable=True)[1]
    order = order[torch.sort(row[order], stable=True)[1]]
    row = row[order]
    start = torch.cumsum(counts, 0) - counts
    col = torch.arange(len(order), device=order.device) - start[row]

    counts_cpu = counts.cpu()
    num_rows, length = len(counts_cpu), int(counts_cpu[0])
    # Rows still running at step k: a prefix, since rows are sorted by length.
    active = (counts_cpu[None, :] > torch.arange(length)[:, None]).sum(1).tolist()

    def grid(values, *trailing):
        out = values.new_zeros((num_rows, length) + trailing)
        out[row, col] = values[order]
        return out

    return dict(
        labels=labels,
        active=active,
        valid=grid(torch.ones_like(weighted, dtype=torch.bool)),
        boxes=grid(boxes, 4),
        # Each box's contribution to its cluster's sums: (c x1, c y1, c x2, c y2, c).
        contribution=grid(torch.cat([boxes * weighted[:, None], weighted[:, None]], 1), 5),
        weighted=grid(weighted),
        box_w=grid(box_w),
        views=grid(views),
    )


def _cluster(grid: dict, iou_threshold: float):
    """The greedy assignment, all categories at once.

    Returns:
        fused (Tensor[R, L, 4]): fused box of each cluster slot (row's clusters first).
        sum_c (Tensor[R, L]): sum of the weighted scores of each cluster.
        assign (Tensor[R, L] int64): cluster slot of each grid box (padding: 0).
        num_clusters (Tensor[R] int64): clusters per row.
    """
    boxes, contribution = grid["boxes"], grid["contribution"]
    num_rows, length = boxes.shape[:2]
    device = boxes.device
    # Step 0: every row's best box starts cluster 0 (exactly that box, as any new cluster).
    # Unused slots hold zero boxes: IoU 0 with any box (all have positive area), so they
    # never match and need no mask.
    fused = torch.zeros_like(boxes)
    fused[:, 0] = boxes[:, 0]
    sums = torch.zeros_like(contribution)  # per cluster: (sum c x1, ..., sum c y2, sum c)
    sums[:, 0] = contribution[:, 0]
    assign = torch.zeros((num_rows, length), dtype=torch.long, device=device)
    num_clusters = torch.ones(num_rows, dtype=torch.long, device=device)
    flat_sums, flat_fused = sums.view(-1, 5), fused.view(-1, 4)
    fused_lo, fused_hi = fused[..., :2], fused[..., 2:]
    row_start = torch.arange(num_rows, device=device) * length
    # Per-step inputs sliced once, outside the loop: every op call counts at these sizes.
    area = ((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1]))[..., None]
    step_box = boxes.unbind(1)
    step_lo, step_hi = boxes[..., None, :2].unbind(1), boxes[..., None, 2:].unbind(1)
    step_area, step_contribution = area.unbind(1), contribution.unbind(1)

    for k in range(1, length):
        a = grid["active"][k]  # rows with a k-th box: a prefix
        # IoU with the row's clusters so far (at most k: slots [0, k)).
        f_lo, f_hi = fused_lo[:a, :k], fused_hi[:a, :k]
        inter = torch.minimum(step_hi[k][:a], f_hi)
        inter = inter.sub_(torch.maximum(step_lo[k][:a], f_lo)).clamp_(min=0).prod(dim=-1)
        union = (f_hi - f_lo).prod(dim=-1).add_(step_area[k][:a]).sub_(inter)
        best_iou, best = inter.div_(union).max(dim=1)
        matched = best_iou > iou_threshold
        n = num_clusters[:a]
        target = torch.where(matched, best, n)
        flat = row_start[:a] + target
        flat_sums.index_add_(0, flat, step_contribution[k][:a])
        total = flat_sums[flat]
        flat_fused[flat] = torch.where(
            matched[:, None], total[:, :4] / total[:, 4:], step_box[k][:a]
        )
        assign[:a, k] = target
        n += ~matched
    return fused, sums[..., 4], assign, num_clusters


def _cluster_scores(grid, sum_c, assign, w, conf_type) -> Tensor:
    """Score of every cluster slot, Tensor[R, L] (meaningless for unused slots)."""
    valid = grid["valid"]
    num_rows, length = valid.shape
    flat = (torch.arange(num_rows, device=valid.device)[:, None] * length + assign)[valid]
    size = torch.zeros(num_rows * length, dtype=sum_c.dtype, device=sum_c.device)
    size.index_add_(0, flat, torch.ones_like(flat, dtype=sum_c.dtype))
    size = size.view(num_rows, length).clamp_(min=1)
    num_views = len(w)
    if conf_type == "avg":
        return sum_c / size * size.clamp(max=num_views) / w.sum()
    if conf_type == "max":
        best = torch.zeros_like(sum_c)
        best.view(-1).scatter_reduce_(0, flat, grid["weighted"][valid], "amax", include_self=False)
        return best / w.max()
    # box_and_model_avg: weighted mean score times the weight share of the views present.
    sum_w = torch.zeros_like(sum_c).view(-1).index_add_(0, flat, grid["box_w"][valid])
    present = torch.zeros((num_rows * length, num_views), dtype=w.dtype, device=w.device)
    present[flat, grid["views"][valid]] = 1.0
    views_w = (present @ w).view(num_rows, length)
    sum_w = sum_w.view(num_rows, length).clamp(min=torch.finfo(w.dtype).tiny)  # unused slots
    return sum_c / sum_w * views_w / w.sum()
