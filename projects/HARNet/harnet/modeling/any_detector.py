"""HAR-Net's post-processing (soft-NMS, box voting, a score floor) on Detectron2's own
detectors: RetinaNet and FCOS (any ``DenseDetector``), Faster / Mask R-CNN (any
``GeneralizedRCNN`` whose ROI heads have one ``FastRCNNOutputLayers``).

Each detector keeps its own candidates, IoU threshold and number of detections; only the
suppression of the candidates changes: :func:`harnet.layers.suppress_detections` with the
``MODEL.HARNET.POSTPROCESS`` settings replaces the detector's ``batched_nms``.

- Dense detectors: the candidates of ``_decode_multi_level_predictions`` (score threshold,
  top-k per level), the detector's ``test_nms_thresh`` and ``max_detections_per_image``.
- R-CNNs: the candidates of Detectron2's ``fast_rcnn_inference_single_image`` (finite
  boxes, clipped, score threshold) before its NMS, the box predictor's ``test_nms_thresh``
  and ``test_topk_per_image``. The mask head then runs on the kept (voted) boxes, so each
  detection's mask is the one predicted for its box. ``box_predictor.inference`` returns
  ``None`` for the kept proposal indices (a voted box belongs to several proposals).

With ``nms_type="hard"`` and no voting the detections are the detector's own (tested bit
for bit). Installed on a built model by swapping its class (or its box predictor's) for a
subclass: weights, state dict and checkpoints are unchanged.
"""

import contextlib
import logging
from typing import Dict

import torch
from detectron2.modeling import GeneralizedRCNN
from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.modeling.roi_heads.fast_rcnn import (
    FastRCNNOutputLayers,
    fast_rcnn_inference_single_image,
)
from detectron2.structures import Boxes, Instances

from ..layers.postprocess import postprocess_params_from_cfg, suppress_detections

__all__ = [
    "apply_harnet_postprocess",
    "harnet_postprocess_from_cfg",
    "candidates_only",
    "suppression_holder",
    "harnet_postprocess_from_params",
    "postprocess_defaults",
]

# The keys of suppress_detections that HAR-Net's config sets; the IoU threshold of hard
# NMS and the number of detections stay the detector's own.
_KEYS = ("nms_type", "soft_nms_sigma", "soft_nms_min_score", "voting", "voting_iou",
         "voting_scoring", "min_score")  # fmt: skip
_DEFAULTS = dict(nms_type="hard", soft_nms_sigma=0.5, soft_nms_min_score=0.001, voting=False,
                 voting_iou=0.6, voting_scoring="max", min_score=0.0)  # fmt: skip


def _suppress(instances: Instances, params: Dict, iou_threshold: float, max_detections: int):
    boxes, scores, classes = suppress_detections(
        instances.pred_boxes.tensor, instances.scores, instances.pred_classes,
        iou_threshold=float(iou_threshold), max_detections=int(max_detections), **params,
    )  # fmt: skip
    return Instances(
        instances.image_size, pred_boxes=Boxes(boxes), scores=scores, pred_classes=classes
    )


@contextlib.contextmanager
def candidates_only(holder):
    """Within the context, the detector (or box predictor) ``holder`` patched by
    :func:`apply_harnet_postprocess` returns its candidates unsuppressed (for TTA, which
    suppresses all views' candidates together)."""
    holder._harnet_candidates_only = True
    try:
        yield
    finally:
        holder._harnet_candidates_only = False


class _DenseDetectorSuppression:
    """Mixin before a ``DenseDetector`` subclass (RetinaNet, FCOS); gives it the interface
    of :class:`HARRetinaNet` that TTA uses: ``forward_candidates`` and ``suppress``."""

    _harnet_candidates_only = False

    def inference_single_image(self, anchors, box_cls, box_delta, image_size):
        pred = self._decode_multi_level_predictions(
            anchors, box_cls, box_delta, self.test_score_thresh, self.test_topk_candidates,
            image_size,
        )  # fmt: skip
        return pred if self._harnet_candidates_only else self.suppress(pred)

    def suppress(self, instances: Instances) -> Instances:
        """The detections kept from one image's candidates (same image_size), by score."""
        return _suppress(
            instances, self.harnet_postprocess, self.test_nms_thresh, self.max_detections_per_image
        )

    def forward_candidates(self, batched_inputs, do_postprocess: bool = True):
        """Each image's candidates before suppression (``DenseDetector.forward``'s steps
        with the suppression left out): in the network-input resolution, or with
        ``do_postprocess`` rescaled to "height"/"width" by ``detector_postprocess``."""
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        features = [features[f] for f in self.head_in_features]
        with candidates_only(self):
            results = self.forward_inference(images, features, self.head(features))
        if not do_postprocess:
            return results
        return [
            detector_postprocess(r, x.get("height", size[0]), x.get("width", size[1]))
            for r, x, size in zip(results, batched_inputs, images.image_sizes)
        ]


class _BoxPredictorSuppression:
    """Mixin before ``FastRCNNOutputLayers`` (Faster / Mask R-CNN's box predictor)."""

    _harnet_candidates_only = False

    def inference(self, predictions, proposals):
        boxes = self.predict_boxes(predictions, proposals)
        scores = self.predict_probs(predictions, proposals)
        results = []
        for b, s, proposal in zip(boxes, scores, proposals):
            # Detectron2's candidates: NMS at IoU 1 suppresses nothing, -1 keeps them all.
            candidates, _ = fast_rcnn_inference_single_image(
                b, s, proposal.image_size, self.test_score_thresh, 1.0, -1
            )
            results.append(candidates if self._harnet_candidates_only else self.suppress(candidates))
        return results, [None] * len(results)

    def suppress(self, instances: Instances) -> Instances:
        """The detections kept from one image's candidates (same image_size), by score."""
        k = self.test_topk_per_image
        return _suppress(instances, self.harnet_postprocess, self.test_nms_thresh,
                         k if k >= 0 else len(instances))  # fmt: skip


_SUBCLASSES = {}


def _with_mixin(obj, mixin):
    """Swaps ``obj``'s class for ``(mixin, type(obj))`` (one cached subclass per class,
    a module attribute, so that pickling finds it)."""
    cls = type(obj)
    if issubclass(cls, mixin):
        return
    key = (mixin, cls)
    if key not in _SUBCLASSES:
        name = f"{cls.__name__}WithHARNetPostprocess"
        sub = type(name, (mixin, cls), {"__module__": __name__})
        _SUBCLASSES[key] = globals()[name] = sub
    obj.__class__ = _SUBCLASSES[key]


def apply_harnet_postprocess(model, **params):
    """
    Makes a built Detectron2 detector suppress its candidates with
    :func:`harnet.layers.suppress_detections` (in place; returns ``model``).

    Args:
        model: a ``DenseDetector`` (RetinaNet, FCOS) or a ``GeneralizedRCNN`` with a
            single ``FastRCNNOutputLayers`` box predictor (Faster / Mask R-CNN), or one of
            those wrapped in ``DistributedDataParallel``.
        params: keyword arguments of :func:`suppress_detections` among ``nms_type``,
            ``soft_nms_sigma``, ``soft_nms_min_score``, ``voting``, ``voting_iou``,
            ``voting_scoring``, ``min_score`` (defaults as there); the IoU threshold and
            the number of detections are the detector's own.

    Raises:
        TypeError: for a detector this does not support (e.g. HARRetinaNet, which has
            ``MODEL.HARNET.POSTPROCESS`` built in, or Cascade R-CNN).
        ValueError: for an unknown keyword.
    """
    unknown = sorted(set(params) - set(_KEYS))
    if unknown:
        raise ValueError(f"apply_harnet_postprocess: unknown arguments {unknown}; takes {_KEYS}")
    settings = dict(_DEFAULTS, **params)
    target = getattr(model, "module", model)
    from .meta_arch import HARRetinaNet  # (a circular import at module level)

    if isinstance(target, HARRetinaNet):
        raise TypeError("HARRetinaNet has HAR-Net's post-processing built in "
                        "(MODEL.HARNET.POSTPROCESS); apply_harnet_postprocess is for "
                        "Detectron2's own detectors")  # fmt: skip
    if isinstance(target, DenseDetector):
        holder, mixin = target, _DenseDetectorSuppression
    elif isinstance(target, GeneralizedRCNN) and isinstance(
        getattr(target.roi_heads, "box_predictor", None), FastRCNNOutputLayers
    ):
        holder, mixin = target.roi_heads.box_predictor, _BoxPredictorSuppression
    else:
        raise TypeError(
            f"apply_harnet_postprocess supports Detectron2's DenseDetector (RetinaNet, FCOS) "
            f"and GeneralizedRCNN with one FastRCNNOutputLayers box predictor (Faster / Mask "
            f"R-CNN); got {type(target).__name__}"
        )
    # Validated now, as suppress_detections validates its arguments (on an empty input).
    suppress_detections(torch.zeros((0, 4)), torch.zeros(0), torch.zeros(0, dtype=torch.long),
                        **settings)  # fmt: skip
    holder.harnet_postprocess = settings
    _with_mixin(holder, mixin)
    return model


def _params_from_cfg(cfg) -> Dict:
    """The ``apply_harnet_postprocess`` keywords of ``cfg.MODEL.HARNET.POSTPROCESS``
    (the defaults for a config without HAR-Net's keys)."""
    params = postprocess_params_from_cfg(cfg)
    return {k: params.get(k, v) for k, v in _DEFAULTS.items()}


def suppression_holder(model):
    """The module of a patched Detectron2 detector that holds ``suppress`` and the
    candidates switch: the detector (dense) or its box predictor (R-CNN); None when
    ``model`` is not patched by :func:`apply_harnet_postprocess`."""
    target = getattr(model, "module", model)
    for holder in (target, getattr(getattr(target, "roi_heads", None), "box_predictor", None)):
        if isinstance(holder, (_DenseDetectorSuppression, _BoxPredictorSuppression)):
            return holder
    return None


def harnet_postprocess_from_cfg(model, cfg, always: bool = False):
    """:func:`apply_harnet_postprocess` with ``cfg.MODEL.HARNET.POSTPROCESS`` on a
    Detectron2 detector when those keys differ from their defaults (hard NMS, no voting,
    no score floor: the detector unchanged) or ``always`` (TTA needs the candidates);
    ``model`` itself otherwise, when it is patched already, and for HARRetinaNet (which
    reads them itself)."""
    if cfg.MODEL.META_ARCHITECTURE == "HARRetinaNet" or ("HARNET" not in cfg.MODEL and not always):
        return model
    return harnet_postprocess_from_params(
        model, _params_from_cfg(cfg), "MODEL.HARNET.POSTPROCESS", always
    )


def harnet_postprocess_from_params(model, params: Dict, source: str, always: bool = False):
    """:func:`apply_harnet_postprocess` with ``params`` when they change the detector's
    output (or ``always``), logged as coming from ``source`` (a config key); ``model``
    itself otherwise, when it is patched already, and for HARRetinaNet."""
    from .meta_arch import HARRetinaNet

    if isinstance(getattr(model, "module", model), HARRetinaNet) or suppression_holder(model):
        return model
    params = dict(_DEFAULTS, **params)
    unchanged = params["nms_type"] == "hard" and not params["voting"] and not params["min_score"]
    if unchanged and not always:
        return model
    logging.getLogger(__name__).info(
        f"{type(getattr(model, 'module', model)).__name__}: HAR-Net post-processing "
        f"({source}) {params}"
    )
    try:
        return apply_harnet_postprocess(model, **params)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def postprocess_defaults() -> Dict:
    """The keywords of :func:`apply_harnet_postprocess` and their defaults (those of
    ``MODEL.HARNET.POSTPROCESS``)."""
    return dict(_DEFAULTS)
