"""RetinaNet losses normalised per pyramid level, as the authors' released network does
(``MODEL.HARNET.LOSS.NORMALIZER = "per_level"``)."""

from typing import Dict, List

import torch
from torch import Tensor
from torch.nn import functional as F

from detectron2.modeling.box_regression import Box2BoxTransform, _dense_box_regression_loss
from detectron2.structures import Boxes

try:  # fvcore's TorchScript'ed focal loss, as Detectron2's RetinaNet uses it
    from fvcore.nn import sigmoid_focal_loss_jit as _sigmoid_focal_loss
except ImportError:  # pragma: no cover - fvcore always ships it today
    from fvcore.nn import sigmoid_focal_loss as _sigmoid_focal_loss

__all__ = ["LOSS_NORMALIZERS", "per_level_normalized_losses"]

# "running": Detectron2's RetinaNet (one sum over all levels / running mean of positives);
# "per_level": the authors' (each level's sum / max(positives at that level, minimum)).
LOSS_NORMALIZERS = ("running", "per_level")


def per_level_normalized_losses(
    anchors: List[Boxes],
    pred_logits: List[Tensor],
    gt_labels: List[Tensor],
    pred_anchor_deltas: List[Tensor],
    gt_boxes: List[Tensor],
    *,
    num_classes: int,
    focal_loss_alpha: float,
    focal_loss_gamma: float,
    box2box_transform: Box2BoxTransform,
    box_reg_loss_type: str,
    smooth_l1_beta: float,
    min_normalizer: float = 100.0,
) -> Dict[str, Tensor]:
    """
    RetinaNet's focal and box-regression losses with one normaliser per pyramid level:

        loss_cls     = sum_l  FL_l  / max(P_l, min_normalizer, 1)
        loss_box_reg = sum_l  BOX_l / max(P_l, min_normalizer, 1)

    where ``FL_l`` is the sigmoid focal loss summed over the level's non-ignored anchors
    (label >= 0) and all classes, ``BOX_l`` the box loss summed over its positive anchors,
    and ``P_l`` the number of positive anchors at level l in the batch (the number of
    positive anchor-class targets, one class per anchor). This is the authors'
    ``FocalLossLayer::get_normalizer`` (VALID mode: ``max(valid_count, 100)``, then at
    least 1), one loss layer per level. The box loss uses the same normaliser (the
    authors' anchor-target layer that sets the smooth-L1 weights is not released).

    "The batch" is the batch of one process (the authors: 2 images per GPU, each GPU with
    its own normalisers, gradients averaged), so IMS_PER_BATCH / number of processes = 2
    reproduces their setting. The normaliser depends on the batch only (no running state),
    and is at least
    ``max(min_normalizer, 1)`` so a level without positives adds its (background-only)
    focal loss divided by that, never a division by zero.

    Args:
        anchors (list[Boxes]): per level, the (H_l*W_l*A) anchors.
        pred_logits (list[Tensor[N, H_l*W_l*A, K]]), pred_anchor_deltas (list[Tensor[N,
            H_l*W_l*A, 4]]): per level, as ``RetinaNet.losses`` receives them.
        gt_labels (list[Tensor[R]]), gt_boxes (list[Tensor[R, 4]]): per image, over all
            R = sum_l H_l*W_l*A anchors (``RetinaNet.label_anchors``): class in [0, K),
            K = background, -1 = ignored.
        num_classes, focal_loss_alpha, focal_loss_gamma, box2box_transform,
        box_reg_loss_type, smooth_l1_beta: RetinaNet's.
        min_normalizer (float): the minimum normaliser (authors: 100).

    Returns:
        dict: "loss_cls", "loss_box_reg" (scalar tensors).
    """
    if not min_normalizer >= 0:
        raise ValueError(f"per_level_normalized_losses: min_normalizer={min_normalizer} < 0")
    labels = torch.stack(gt_labels)  # (N, R)
    boxes = torch.stack(gt_boxes)  # (N, R, 4)
    sizes = [len(a) for a in anchors]
    if sum(sizes) != labels.shape[1]:
        raise ValueError(
            f"per_level_normalized_losses: {sum(sizes)} anchors over the levels, "
            f"{labels.shape[1]} labels per image"
        )
    loss_cls = pred_logits[0].new_zeros(())
    loss_box = pred_logits[0].new_zeros(())
    for anchors_l, logits_l, deltas_l, labels_l, boxes_l in zip(
        anchors, pred_logits, pred_anchor_deltas, labels.split(sizes, 1), boxes.split(sizes, 1)
    ):
        valid = labels_l >= 0
        pos = valid & (labels_l != num_classes)
        normalizer = max(float(pos.sum().item()), float(min_normalizer), 1.0)
        # One-hot over K + 1 classes, background column dropped: all-zero targets.
        target = F.one_hot(labels_l[valid], num_classes=num_classes + 1)[:, :-1]
        loss_cls = loss_cls + _sigmoid_focal_loss(
            logits_l[valid],
            target.to(logits_l.dtype),
            alpha=focal_loss_alpha,
            gamma=focal_loss_gamma,
            reduction="sum",
        ) / normalizer
        loss_box = loss_box + _dense_box_regression_loss(
            [anchors_l],
            box2box_transform,
            [deltas_l],
            list(boxes_l.unbind(0)),
            pos,
            box_reg_loss_type=box_reg_loss_type,
            smooth_l1_beta=smooth_l1_beta,
        ) / normalizer
    return {"loss_cls": loss_cls, "loss_box_reg": loss_box}
