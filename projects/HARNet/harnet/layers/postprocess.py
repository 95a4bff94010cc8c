"""Per-image suppression of detection candidates, shared by HARRetinaNet and its TTA.

CONTRACT (used by harnet.modeling.meta_arch and harnet.tta; keep the signature):

    suppress_detections(boxes, scores, classes, *, nms_type="hard", iou_threshold=0.5,
                        soft_nms_sigma=0.5, soft_nms_min_score=0.001, voting=False,
                        voting_iou=0.6, voting_scoring="max", max_detections=100,
                        min_score=0.0)
        -> (boxes Tensor[K,4], scores Tensor[K], classes Tensor[K] int64), sorted by
           decreasing score, K <= max_detections.

With nms_type="hard" and voting=False it must equal Detectron2 RetinaNet's
`batched_nms(boxes, scores, classes, iou_threshold)[:max_detections]` on any candidates;
soft-NMS and voting drop non-finite ones.
"""

import warnings
from typing import Tuple

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from ._box_ops import box_checks, check_category_indices, score_checks
from .box_voting import (
    batched_box_voting_scriptable,
    box_voting_eager,
    canonical_voting_scoring,
)
from .soft_nms import (
    SOFT_NMS_METHODS,
    batched_soft_nms_scriptable,
    check_soft_nms_inputs,
    soft_nms_eager,
)

__all__ = [
    "suppress_detections",
    "suppress_detections_scriptable",
    "suppression_args",
    "postprocess_params_from_cfg",
]


def suppress_detections(
    boxes: Tensor,
    scores: Tensor,
    classes: Tensor,
    *,
    nms_type: str = "hard",
    iou_threshold: float = 0.5,
    soft_nms_sigma: float = 0.5,
    soft_nms_min_score: float = 0.001,
    voting: bool = False,
    voting_iou: float = 0.6,
    voting_scoring: str = "max",
    max_detections: int = 100,
    min_score: float = 0.0,
) -> Tuple[Tensor, Tensor, Tensor]:
    """
    Suppresses duplicate detections of one image, per category: (soft-)NMS, then optional
    box voting, then the best ``max_detections``.

    Under ``torch.jit.trace`` (exporting a detector), it calls the TorchScript-compiled
    :func:`suppress_detections_scriptable` instead: the trace records a call to it, so the
    exported detector runs the greedy loop on images of any size (see ``harnet.export``).

    Args:
        boxes (Tensor[N, 4]): candidate boxes ``(x1, y1, x2, y2)``.
        scores (Tensor[N]): their scores (probabilities).
        classes (Tensor[N]): their integer categories.
        nms_type (str): ``"hard"`` (torchvision's ``batched_nms``, Detectron2's default),
            ``"linear"`` or ``"gaussian"`` soft-NMS (:func:`batched_soft_nms`).
        iou_threshold (float): IoU threshold of hard NMS and linear soft-NMS.
        soft_nms_sigma (float): Gaussian soft-NMS's sigma.
        soft_nms_min_score (float): soft-NMS drops boxes whose decayed score falls below it.
        voting (bool): refine the kept boxes by :func:`batched_box_voting` with the
            candidates.
        voting_iou (float): box voting's IoU threshold.
        voting_scoring (str): box voting's scoring rule (``"max"``, ``"keep"``, ``"avg"``,
            ``"unclaimed_top4"`` or its alias ``"caffe"``).
        max_detections (int): keep at most this many detections (the best scores).
        min_score (float): then drop detections scoring below it (0 keeps all; the
            authors' released test keeps scores >= 0.05).

    Returns:
        boxes (Tensor[K, 4]), scores (Tensor[K]), classes (Tensor[K] int64): the kept
        detections sorted by decreasing score, ``K <= max_detections``. With
        ``nms_type="hard"`` and no voting: exactly
        ``batched_nms(boxes, scores, classes, iou_threshold)[:max_detections]``, on any
        input. Soft-NMS and box voting first drop candidates with a non-finite score or
        box (one ``RuntimeWarning`` per process with their number), eager or scripted;
        hard NMS leaves them to Detectron2's ``detector_postprocess``, whose clipping and
        empty-box filter remove non-finite boxes (no host synchronisation added).
    """
    args = suppression_args(
        nms_type=nms_type, iou_threshold=iou_threshold, soft_nms_sigma=soft_nms_sigma,
        soft_nms_min_score=soft_nms_min_score, voting=voting, voting_iou=voting_iou,
        voting_scoring=voting_scoring, max_detections=max_detections, min_score=min_score,
    )  # fmt: skip
    if torch.jit.is_tracing():
        return scripted_suppress_detections()(boxes, scores, classes, *args)
    box_checks(boxes, values=False)  # shapes and dtypes (the values: below)
    score_checks(scores, boxes.shape[0], values=False)
    check_category_indices(classes, boxes.shape[0], "classes", "boxes")
    if nms_type != "hard" or voting:
        # Soft-NMS and voting weigh by the scores: checked inputs, and non-finite candidates
        # dropped (one host sync reads both; a second only when some are non-finite).
        # Hard NMS alone: Detectron2's batched_nms on any input, no sync added.
        finite = torch.isfinite(scores) & torch.isfinite(boxes).all(dim=1)
        safe_boxes = torch.where(finite[:, None], boxes, torch.zeros_like(boxes))
        safe_scores = torch.where(finite, scores, torch.zeros_like(scores))
        value_checks = box_checks(safe_boxes) + score_checks(safe_scores, boxes.shape[0])
        if voting and nms_type == "hard" and scores.numel():
            # (Soft-NMS checks the same for its own reason, below.)
            message = "scores must be non-negative for box voting (they weight the mean)"
            value_checks.append(((safe_scores >= 0).all(), message))
        (all_finite,) = check_soft_nms_inputs(
            safe_boxes, safe_scores, classes, nms_type, soft_nms_sigma, iou_threshold,
            soft_nms_min_score, value_checks, [finite.all()],
        )  # fmt: skip
        if not all_finite:
            boxes, scores, classes, dropped = drop_non_finite(boxes, scores, classes)
            _warn_dropped(dropped)
    return suppress_detections_scriptable(boxes, scores, classes, *args, eager=True)


SuppressionArgs = Tuple[str, float, float, float, bool, float, str, int, float]


def suppression_args(
    *,
    nms_type: str = "hard",
    iou_threshold: float = 0.5,
    soft_nms_sigma: float = 0.5,
    soft_nms_min_score: float = 0.001,
    voting: bool = False,
    voting_iou: float = 0.6,
    voting_scoring: str = "max",
    max_detections: int = 100,
    min_score: float = 0.0,
) -> SuppressionArgs:
    """:func:`suppress_detections`' keyword arguments (same defaults), checked, as the
    positional tail of :func:`suppress_detections_scriptable` (``voting_scoring``
    canonical): what a scripted or exported detector stores."""
    if nms_type not in SOFT_NMS_METHODS:
        raise ValueError(f"nms_type must be one of {SOFT_NMS_METHODS}, got {nms_type!r}")
    if voting:
        voting_scoring = canonical_voting_scoring(voting_scoring, "voting_scoring")
        if not 0 <= voting_iou <= 1:
            raise ValueError(f"voting_iou must be in [0, 1], got {voting_iou}")
    if int(max_detections) < 0:
        raise ValueError(f"max_detections must be >= 0, got {max_detections}")
    return (
        nms_type, float(iou_threshold), float(soft_nms_sigma), float(soft_nms_min_score),
        bool(voting), float(voting_iou), voting_scoring, int(max_detections), float(min_score),
    )  # fmt: skip


def suppress_detections_scriptable(
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
    eager: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    """:func:`suppress_detections` without argument checks (``voting_scoring`` canonical):
    TorchScript-compatible, the same detections (soft-NMS / voting: non-finite candidates
    dropped silently). ``eager=True`` (not scripted) lets
    soft-NMS run numba's compiled loop on CPU, and soft-NMS and box voting their Triton
    kernels on CUDA tensors; otherwise PyTorch ops only (what exports use)."""
    if not eager and (nms_type != "hard" or voting):  # (eager: the caller did)
        boxes, scores, classes, _ = drop_non_finite(boxes, scores, classes)
    if nms_type == "hard":
        # float32 for torchvision's kernel (no half-precision CPU nms; one dtype for both).
        keep = batched_nms(boxes.float(), scores.float(), classes, iou_threshold)
        new_scores = scores[keep]
    elif eager and not torch.jit.is_scripting():
        keep, new_scores = soft_nms_eager(
            boxes, scores, classes, nms_type, soft_nms_sigma, iou_threshold, soft_nms_min_score
        )
    else:
        keep, new_scores = batched_soft_nms_scriptable(
            boxes, scores, classes, nms_type, soft_nms_sigma, iou_threshold, soft_nms_min_score
        )
    kept_boxes, kept_classes = boxes[keep], classes[keep]
    if voting:
        # Vote with all kept boxes: the new scores can change which ones make the top K.
        if eager and not torch.jit.is_scripting():
            kept_boxes, new_scores = box_voting_eager(
                kept_boxes, new_scores, kept_classes, boxes, scores, classes, voting_iou,
                voting_scoring,
            )  # fmt: skip
        else:
            kept_boxes, new_scores = batched_box_voting_scriptable(
                kept_boxes, new_scores, kept_classes, boxes, scores, classes, voting_iou,
                voting_scoring,
            )  # fmt: skip
    return _best_detections(
        kept_boxes,
        new_scores,
        kept_classes,
        voting and voting_scoring != "keep",
        max_detections,
        min_score,
    )


def drop_non_finite(
    boxes: Tensor, scores: Tensor, classes: Tensor
) -> Tuple[Tensor, Tensor, Tensor, int]:
    """The candidates whose score and four coordinates are finite, and how many were
    dropped. A diverged model's NaN / inf never becomes a detection, nor a finite box by
    way of a weighted mean; the inputs themselves when all are finite (one host sync)."""
    finite = torch.isfinite(scores) & torch.isfinite(boxes).all(dim=1)
    if bool(finite.all()):
        return boxes, scores, classes, 0
    keep = torch.nonzero(finite).squeeze(1)
    return boxes[keep], scores[keep], classes[keep], int(finite.shape[0] - keep.shape[0])


_warned_non_finite = False


def _warn_dropped(count: int) -> None:
    """Once per process: a model that outputs NaN / inf says so, without flooding the log."""
    global _warned_non_finite
    if not _warned_non_finite:
        _warned_non_finite = True
        warnings.warn(
            f"suppress_detections: dropped {count} candidate(s) with a non-finite score or "
            "box (NaN/inf; a diverged model?); they are dropped silently from now on in this "
            "process",
            RuntimeWarning,
            stacklevel=3,
        )


_scripted = None


def scripted_suppress_detections():
    """:func:`suppress_detections_scriptable` compiled by ``torch.jit.script`` (once)."""
    global _scripted
    if _scripted is None:
        with warnings.catch_warnings():  # torch >= 2.10 marks TorchScript deprecated
            warnings.simplefilter("ignore", FutureWarning)
            _scripted = torch.jit.script(suppress_detections_scriptable)
    return _scripted


def _best_detections(
    boxes: Tensor,
    scores: Tensor,
    classes: Tensor,
    resort: bool,
    max_detections: int,
    min_score: float,
) -> Tuple[Tensor, Tensor, Tensor]:
    """The best ``max_detections`` (re-sorted by score after voting changed scores), then
    those scoring at least ``min_score`` (if > 0)."""
    if resort:
        scores, order = torch.sort(scores, descending=True, stable=True)
        boxes, classes = boxes[order], classes[order]
    boxes, scores, classes = (
        boxes[:max_detections],
        scores[:max_detections],
        classes[:max_detections],
    )
    if min_score > 0:
        above = scores >= min_score
        boxes, scores, classes = boxes[above], scores[above], classes[above]
    return boxes, scores, classes.long()


def postprocess_params_from_cfg(cfg) -> dict:
    """Keyword arguments of :func:`suppress_detections` from a Detectron2 config.

    CONTRACT: HARRetinaNet.from_config stores this dict and passes it to
    suppress_detections.

    Reads ``cfg.MODEL.HARNET.POSTPROCESS`` (see ``harnet.config``), the IoU threshold of
    hard NMS / linear soft-NMS from ``MODEL.RETINANET.NMS_THRESH_TEST`` and the number of
    detections from ``TEST.DETECTIONS_PER_IMAGE``. A config without
    ``MODEL.HARNET.POSTPROCESS`` gets Detectron2's RetinaNet post-processing (hard NMS).
    Invalid values raise ``ValueError`` naming the key.
    """
    nms_thresh = float(cfg.MODEL.RETINANET.NMS_THRESH_TEST)
    _check(0 <= nms_thresh <= 1, "MODEL.RETINANET.NMS_THRESH_TEST", "in [0, 1]", nms_thresh)
    detections = cfg.TEST.DETECTIONS_PER_IMAGE
    _check(
        isinstance(detections, int) and detections > 0,
        "TEST.DETECTIONS_PER_IMAGE",
        "a positive integer",
        detections,
    )
    params = dict(nms_type="hard", iou_threshold=nms_thresh, max_detections=detections)
    harnet = cfg.MODEL.get("HARNET", None)
    pp = harnet.get("POSTPROCESS", None) if harnet is not None else None
    if pp is None:
        return params

    key = "MODEL.HARNET.POSTPROCESS."
    _check(
        pp.NMS_TYPE in SOFT_NMS_METHODS, key + "NMS_TYPE", f"one of {SOFT_NMS_METHODS}", pp.NMS_TYPE
    )
    _check(
        _is_number(pp.SOFT_NMS_SIGMA) and pp.SOFT_NMS_SIGMA > 0,
        key + "SOFT_NMS_SIGMA",
        "> 0",
        pp.SOFT_NMS_SIGMA,
    )
    _check(
        _is_number(pp.SOFT_NMS_MIN_SCORE) and 0 <= pp.SOFT_NMS_MIN_SCORE < 1,
        key + "SOFT_NMS_MIN_SCORE",
        "in [0, 1)",
        pp.SOFT_NMS_MIN_SCORE,
    )
    _check(
        _is_number(pp.MIN_SCORE) and 0 <= pp.MIN_SCORE < 1,
        key + "MIN_SCORE",
        "in [0, 1)",
        pp.MIN_SCORE,
    )
    _check(
        isinstance(pp.VOTING.ENABLED, bool),
        key + "VOTING.ENABLED",
        "True or False",
        pp.VOTING.ENABLED,
    )
    _check(
        _is_number(pp.VOTING.IOU_THRESH) and 0 <= pp.VOTING.IOU_THRESH <= 1,
        key + "VOTING.IOU_THRESH",
        "in [0, 1]",
        pp.VOTING.IOU_THRESH,
    )
    canonical_voting_scoring(pp.VOTING.SCORING, "cfg." + key + "VOTING.SCORING")
    params.update(
        nms_type=pp.NMS_TYPE,
        soft_nms_sigma=float(pp.SOFT_NMS_SIGMA),
        soft_nms_min_score=float(pp.SOFT_NMS_MIN_SCORE),
        voting=pp.VOTING.ENABLED,
        voting_iou=float(pp.VOTING.IOU_THRESH),
        voting_scoring=pp.VOTING.SCORING,
        min_score=float(pp.MIN_SCORE),
    )
    return params


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x


def _check(ok: bool, key: str, expected: str, value) -> None:
    if not ok:
        raise ValueError(f"cfg.{key} must be {expected}, got {value!r}")
