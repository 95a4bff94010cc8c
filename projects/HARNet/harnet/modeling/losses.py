"""RetinaNet losses normalised per pyramid level, as the authors' released network does
(``MODEL.HARNET.LOSS.NORMALIZER = "per_level"``)."""

import contextlib
from typing import Dict, List

import torch
from torch import Tensor

from detectron2.layers.losses import ciou_loss, diou_loss
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.structures import Boxes
from fvcore.nn import giou_loss, smooth_l1_loss

# fvcore's eager focal loss, not its TorchScript'ed twin ``sigmoid_focal_loss_jit`` that
# Detectron2's RetinaNet calls: TorchScript's profiling executor re-optimises a scripted
# function after its first calls in each process (symbolic autodiff), which changes the
# last bits of its gradient (5.96e-8 on a 5000x80 float32 input, AMD EPYC, torch 2.15), so
# a run resumed in a fresh process would differ from an uninterrupted one.
from fvcore.nn import sigmoid_focal_loss as _sigmoid_focal_loss

__all__ = ["LOSS_NORMALIZERS", "per_level_normalized_losses", "eager_retinanet_focal_loss"]

@contextlib.contextmanager
def eager_retinanet_focal_loss():
    """While active, Detectron2's ``RetinaNet.losses`` computes the focal loss with fvcore's
    eager ``sigmoid_focal_loss`` (the same formula) instead of the TorchScript'ed
    ``sigmoid_focal_loss_jit`` it imports, whose gradient changes in the last bits after the
    first calls of each process (see above). Used by ``HARRetinaNet`` for the "running"
    normaliser, which keeps Detectron2's ``losses``."""
    from detectron2.modeling.meta_arch import retinanet

    scripted = retinanet.sigmoid_focal_loss_jit
    retinanet.sigmoid_focal_loss_jit = _sigmoid_focal_loss
    try:
        yield
    finally:
        retinanet.sigmoid_focal_loss_jit = scripted


# Detectron2's IoU-type box losses, by MODEL.RETINANET.BBOX_REG_LOSS_TYPE.
_BOX_LOSSES = {"giou": giou_loss, "diou": diou_loss, "ciou": ciou_loss}

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
    # All levels at once, each anchor weighted by 1 / its level's normaliser: no host
    # synchronisation (no .item(), no boolean indexing), the same sums.
    valid = labels >= 0
    pos = valid & (labels != num_classes)
    logits = torch.cat(pred_logits, dim=1)  # (N, R, K)
    positives = torch.stack([p.sum() for p in pos.split(sizes, 1)]).to(logits.dtype)
    normalizer = positives.clamp(min=max(float(min_normalizer), 1.0))  # (L,)
    level = torch.cat(
        [torch.full((n,), i, dtype=torch.long, device=labels.device) for i, n in enumerate(sizes)]
    )
    weight = (1.0 / normalizer)[level]  # (R,)
    # One-hot targets by comparison (F.one_hot checks its range with a host sync on CPU):
    # background and ignored anchors get all-zero rows (ignored ones are weighted 0).
    classes = torch.arange(num_classes, device=labels.device)
    target = labels[..., None] == classes
    focal = _sigmoid_focal_loss(
        logits,
        target.to(logits.dtype),
        alpha=focal_loss_alpha,
        gamma=focal_loss_gamma,
        reduction="none",
    ).sum(-1)
    loss_cls = (torch.where(valid, focal, torch.zeros_like(focal)) * weight).sum()
    box = _per_anchor_box_loss(
        Boxes.cat(anchors).tensor,
        torch.cat(pred_anchor_deltas, dim=1),
        boxes,
        pos,
        box2box_transform,
        box_reg_loss_type,
        smooth_l1_beta,
    )
    return {"loss_cls": loss_cls, "loss_box_reg": (box * weight).sum()}


def _per_anchor_box_loss(
    anchors: Tensor,
    deltas: Tensor,
    gt_boxes: Tensor,
    pos: Tensor,
    box2box_transform: Box2BoxTransform,
    box_reg_loss_type: str,
    smooth_l1_beta: float,
) -> Tensor:
    """Detectron2's box-regression loss (``_dense_box_regression_loss``'s types) of each
    anchor, ``Tensor[N, R]``: 0 where ``pos`` is False.

    anchors: Tensor[R, 4]; deltas: Tensor[N, R, 4]; gt_boxes: Tensor[N, R, 4]; pos: Tensor[N, R].
    """
    expanded = anchors.expand_as(gt_boxes)
    # Non-positive anchors get their own box as the target (finite deltas; weighted 0).
    gt_boxes = torch.where(pos[..., None], gt_boxes, expanded)
    if box_reg_loss_type == "smooth_l1":
        gt_deltas = box2box_transform.get_deltas(expanded.reshape(-1, 4), gt_boxes.reshape(-1, 4))
        loss = smooth_l1_loss(
            deltas, gt_deltas.view_as(deltas), beta=smooth_l1_beta, reduction="none"
        ).sum(-1)
    elif box_reg_loss_type in _BOX_LOSSES:
        pred = box2box_transform.apply_deltas(deltas.reshape(-1, 4), expanded.reshape(-1, 4))
        loss = _BOX_LOSSES[box_reg_loss_type](pred, gt_boxes.reshape(-1, 4), reduction="none")
        loss = loss.view(pos.shape)
    else:
        raise ValueError(f"Invalid dense box regression loss type '{box_reg_loss_type}'")
    return torch.where(pos, loss, torch.zeros_like(loss))
