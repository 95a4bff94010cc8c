"""Per-level detection candidates as the authors' released test selects them
(``MODEL.HARNET.CANDIDATES.MODE = "authors"``; their ``proposal_layer.cpp``)."""

from typing import Tuple

import torch
from torch import Tensor

from detectron2.modeling.box_regression import Box2BoxTransform

__all__ = ["CANDIDATE_MODES", "authors_level_candidates"]

CANDIDATE_MODES = ("detectron2", "authors")


def authors_level_candidates(
    anchors: Tensor,
    scores: Tensor,
    deltas: Tensor,
    box2box_transform: Box2BoxTransform,
    image_size: Tuple[int, int],
    min_size: Tuple[float, float],
    score_thresh: float,
    topk: int,
) -> Tuple[Tensor, Tensor, Tensor]:
    """
    The candidates of one pyramid level, in the order of the authors' ProposalLayer:

    1. decode every anchor's box and clip it to the image (``[0, W] x [0, H]``);
    2. keep the anchors whose clipped box is at least ``min_size`` wide and high;
    3. over the kept anchors' (anchor, class) pairs, take the ``n = min(topk, number of
       kept anchors)`` best scores, and of those the ones scoring ``>= score_thresh``, the
       best one always (Detectron2 instead thresholds first, ``> score_thresh``, then takes
       the top ``topk`` pairs).

    Args:
        anchors (Tensor[R, 4]): the level's anchors (XYXY, network-input pixels).
        scores (Tensor[R, K]): class probabilities.
        deltas (Tensor[R, 4]): box deltas.
        box2box_transform (Box2BoxTransform): the model's box coder.
        image_size (tuple[int, int]): (H, W) of the image at the network input.
        min_size (tuple[float, float]): minimum (width, height) in network-input pixels
            (the authors: 8 original-image pixels times the resize scale).
        score_thresh (float): minimum score (all but the best candidate).
        topk (int): maximum number of candidates.

    Returns:
        boxes (Tensor[M, 4]) clipped, scores (Tensor[M]) in decreasing order,
        classes (Tensor[M], int64).
    """
    if scores.dim() != 2 or anchors.shape[0] != scores.shape[0] or deltas.shape != anchors.shape:
        raise ValueError(
            f"authors_level_candidates: anchors {list(anchors.shape)}, scores "
            f"{list(scores.shape)} and deltas {list(deltas.shape)} do not match"
        )
    # One host synchronisation (the final selection's size): no Boxes.clip assert, no
    # nonzero of the size filter; too-small anchors score -inf instead.
    b = box2box_transform.apply_deltas(deltas, anchors)
    h, w = image_size
    b = torch.stack(
        [b[:, 0].clamp(0, w), b[:, 1].clamp(0, h), b[:, 2].clamp(0, w), b[:, 3].clamp(0, h)], 1
    )
    keep = ((b[:, 2] - b[:, 0]) >= min_size[0]) & ((b[:, 3] - b[:, 1]) >= min_size[1])
    num_classes = scores.shape[1]
    m = min(int(topk), anchors.shape[0])  # n <= m: n = min(topk, kept anchors)
    if m == 0 or num_classes == 0:
        return (
            b.new_zeros((0, 4)),
            scores.new_zeros((0,)),
            torch.zeros(0, dtype=torch.long, device=scores.device),
        )
    masked = scores.masked_fill(~keep[:, None], float("-inf"))
    top_scores, flat = masked.flatten().topk(m)
    # The first n = min(topk, kept anchors) ranks are kept anchors' pairs (each has K).
    rank = torch.arange(m, device=scores.device)
    ok = (rank < keep.sum()) & ((top_scores >= score_thresh) | (rank == 0))
    sel = ok.nonzero().squeeze(1)
    top_scores, flat = top_scores[sel], flat[sel]
    anchor_idx = torch.div(flat, num_classes, rounding_mode="floor")
    return b[anchor_idx], top_scores, flat % num_classes
