"""Test-time augmentation merged by HAR-Net's suppression (soft-NMS, box voting) or WBF.

- :class:`DenseDetectorWithTTA` (also named ``HARRetinaNetWithTTA``): HARRetinaNet and
  Detectron2's dense detectors (RetinaNet, FCOS), for which Detectron2 has no TTA.
- :class:`GeneralizedRCNNWithHARNetTTA`: Detectron2's ``GeneralizedRCNNWithTTA`` (Faster /
  Mask R-CNN) with the views' candidates suppressed together by HAR-Net's post-processing.
- :func:`build_tta_model` picks the one for a model.
"""

import copy
import math
from typing import Dict, List

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from detectron2.data.detection_utils import read_image
from detectron2.data.transforms import ResizeShortestEdge
from detectron2.modeling import DatasetMapperTTA, GeneralizedRCNN, GeneralizedRCNNWithTTA
from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, Instances

from .layers.wbf import WBF_CONF_TYPES, weighted_boxes_fusion
from .modeling.any_detector import candidates_only, harnet_postprocess_from_cfg, suppression_holder

__all__ = [
    "DenseDetectorWithTTA",
    "HARRetinaNetWithTTA",
    "GeneralizedRCNNWithHARNetTTA",
    "build_tta_model",
    "TTA_MERGES",
]

# How the views' detections are merged (cfg.TEST.AUG.MERGE).
TTA_MERGES = ("suppress", "wbf")


def build_tta_model(cfg, model):
    """The TTA wrapper of ``model`` (``cfg.TEST.AUG``): :class:`GeneralizedRCNNWithHARNetTTA`
    for a ``GeneralizedRCNN``, :class:`DenseDetectorWithTTA` otherwise (HARRetinaNet,
    Detectron2's RetinaNet / FCOS)."""
    target = model.module if isinstance(model, DistributedDataParallel) else model
    if isinstance(target, GeneralizedRCNN):
        return GeneralizedRCNNWithHARNetTTA(cfg, target)
    return DenseDetectorWithTTA(cfg, target)


class DenseDetectorWithTTA(nn.Module):
    """
    A single-stage detector (:class:`HARRetinaNet`, or Detectron2's RetinaNet / FCOS with
    HAR-Net's post-processing) with test-time augmentation: the single-stage counterpart of
    Detectron2's :class:`GeneralizedRCNNWithTTA`, with the same interface (call it like the
    model in inference: a list of dataset dicts in, a list of ``{"instances": Instances}``
    out, in the original image resolution), so it works in ``inference_on_dataset``.

    For each image: the views of ``tta_mapper`` (by default Detectron2's
    :class:`DatasetMapperTTA`: every short side of ``cfg.TEST.AUG.MIN_SIZES`` with long
    side <= ``TEST.AUG.MAX_SIZE``, each also flipped when ``TEST.AUG.FLIP``) go through
    ``model.forward_candidates``; every view's candidates *before* suppression are mapped
    back to the original image (inverse resize / flip), optionally selected by size
    (``TEST.AUG.SIZE_SELECT``: down-scaled views give no box smaller than ``SMALL_AREA``,
    up-scaled ones none larger than ``LARGE_AREA``, relative to the plain test scale
    ``INPUT.MIN_SIZE_TEST``), and merged as ``TEST.AUG.MERGE`` says:

    - ``"suppress"`` (default): all views' candidates concatenated and suppressed once by
      ``model.suppress`` (the model's NMS / soft-NMS / voting / detections-per-image
      settings). So overlapping detections of different views are merged like those of
      one view, as the paper's double-scale testing does.
    - ``"wbf"``: each view's candidates suppressed by ``model.suppress`` on their own, then
      clipped to the image with empty boxes dropped (the model's detections on that view,
      in the original image), then fused across views by
      :func:`harnet.layers.weighted_boxes_fusion` (``TEST.AUG.WBF.*``: IoU threshold,
      skip threshold, score rule; every view weighs 1), best ``TEST.DETECTIONS_PER_IMAGE``.
    """

    def __init__(self, cfg, model, tta_mapper=None, batch_size: int = 3):
        """
        Args:
            cfg (CfgNode): a config with HARNet's keys (``harnet.add_harnet_config``).
            model (HARRetinaNet): the detector, or a DistributedDataParallel wrapping it;
                any model with ``forward_candidates(batched_inputs, do_postprocess)`` and
                ``suppress(instances)`` works. A Detectron2 ``DenseDetector`` gets them from
                :func:`harnet.modeling.apply_harnet_postprocess` with
                ``cfg.MODEL.HARNET.POSTPROCESS`` (in place; with the defaults its own
                output is unchanged).
            tta_mapper (callable): takes a dataset dict, returns the list of its augmented
                versions, each with a "transforms" field (original image -> view).
                Defaults to ``DatasetMapperTTA(cfg)``.
            batch_size (int): at most this many views (of the same size) run through the
                model together.
        """
        super().__init__()
        if isinstance(model, DistributedDataParallel):
            model = model.module
        if isinstance(model, DenseDetector):
            model = harnet_postprocess_from_cfg(model, cfg, always=True)
        if not all(callable(getattr(model, m, None)) for m in ("forward_candidates", "suppress")):
            raise TypeError(
                "DenseDetectorWithTTA needs a model with forward_candidates() and suppress() "
                f"(HARRetinaNet, Detectron2's RetinaNet / FCOS), got {type(model).__name__}; "
                "for R-CNNs use GeneralizedRCNNWithHARNetTTA (harnet.tta.build_tta_model)"
            )
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.cfg = cfg.clone()
        self.model = model
        self.tta_mapper = tta_mapper if tta_mapper is not None else DatasetMapperTTA(cfg)
        self.batch_size = int(batch_size)
        # Dense detectors other than RetinaNet (FCOS) have no input_format.
        self.input_format = getattr(model, "input_format", cfg.INPUT.FORMAT)

        self.select_by_size = _SizeSelection(cfg)
        self.merge = cfg.TEST.AUG.get("MERGE", "suppress")
        if self.merge not in TTA_MERGES:
            raise ValueError(f"cfg.TEST.AUG.MERGE must be one of {TTA_MERGES}, got {self.merge!r}")
        if self.merge == "wbf":
            self.wbf_params = _wbf_params_from_cfg(cfg)
            self.max_detections = int(cfg.TEST.DETECTIONS_PER_IMAGE)

    @torch.no_grad()
    def forward(self, batched_inputs: List[Dict]) -> List[Dict[str, Instances]]:
        """
        Args:
            batched_inputs: dataset dicts as in the model's inference ("image" CHW tensor,
                or "file_name" to read; "height"/"width" of the original image).

        Returns:
            list[dict]: per image, {"instances": Instances} in the original resolution.
        """
        return [
            self._inference_one_image(_read_input(x, self.input_format))
            for x in batched_inputs
        ]

    def _inference_one_image(self, input):
        height, width = int(input["height"]), int(input["width"])
        views = self.tta_mapper(input)
        transforms = [v.pop("transforms") for v in views]
        candidates = [None] * len(views)
        for batch in _size_batches(views, self.batch_size):
            outputs = self.model.forward_candidates([views[i] for i in batch], False)
            for i, out in zip(batch, outputs):
                candidates[i] = out
        boxes, scores, classes = [], [], []
        for view, tfm, cand in zip(views, transforms, candidates):
            view_boxes = self._to_original(cand.pred_boxes.tensor, tfm)
            keep = self.select_by_size(view_boxes, view["image"].shape[1:3], (height, width))
            boxes.append(view_boxes[keep])
            scores.append(cand.scores[keep])
            classes.append(cand.pred_classes[keep])
        if self.merge == "wbf":
            merged = self._fuse_views(boxes, scores, classes, (height, width))
        else:
            merged = self.model.suppress(
                Instances(
                    (height, width),
                    pred_boxes=Boxes(torch.cat(boxes)),
                    scores=torch.cat(scores),
                    pred_classes=torch.cat(classes),
                )
            )
        # As the model's own inference: clipping / empty-box removal after the merge.
        return {"instances": detector_postprocess(merged, height, width)}

    def _fuse_views(self, boxes, scores, classes, image_size) -> Instances:
        """Each view's detections as the model's inference makes them (suppression,
        clipping, empty boxes dropped), then weighted boxes fusion."""
        per_view = [
            detector_postprocess(
                self.model.suppress(
                    Instances(image_size, pred_boxes=Boxes(b), scores=s, pred_classes=c)
                ),
                *image_size,
            )
            for b, s, c in zip(boxes, scores, classes)
        ]
        device = boxes[0].device
        view_ids = [
            torch.full((len(d),), i, dtype=torch.long, device=device)
            for i, d in enumerate(per_view)
        ]
        fused_boxes, fused_scores, fused_classes = weighted_boxes_fusion(
            torch.cat([d.pred_boxes.tensor for d in per_view]),
            torch.cat([d.scores for d in per_view]),
            torch.cat([d.pred_classes for d in per_view]),
            torch.cat(view_ids),
            len(per_view),
            **self.wbf_params,
        )
        k = self.max_detections  # the fused scores are sorted in decreasing order
        return Instances(
            image_size,
            pred_boxes=Boxes(fused_boxes[:k]),
            scores=fused_scores[:k],
            pred_classes=fused_classes[:k],
        )

    @staticmethod
    def _to_original(boxes: torch.Tensor, tfm) -> torch.Tensor:
        """Boxes of a view (network-input resolution) in the original image's coordinates.

        DatasetMapperTTA's views (resize, horizontal flip) map each axis affinely: the map
        is read off probe points on the host (no tensor data) and applied on the boxes'
        device, with no round trip of the boxes. Other transforms go through Detectron2's
        ``apply_box`` on the host."""
        if boxes.numel() == 0:
            return boxes
        inverse = tfm.inverse()
        affine = _axis_affine(inverse)
        if affine is not None:
            (sx, tx), (sy, ty) = affine
            out = boxes * boxes.new_tensor([sx, sy, sx, sy]) + boxes.new_tensor([tx, ty, tx, ty])
            # A flipped axis swaps the roles of its two edges.
            return out[
                :, [2 if sx < 0 else 0, 3 if sy < 0 else 1, 0 if sx < 0 else 2, 1 if sy < 0 else 3]
            ]
        original = inverse.apply_box(boxes.detach().cpu().numpy())
        return torch.as_tensor(original, dtype=boxes.dtype).to(boxes.device)



HARRetinaNetWithTTA = DenseDetectorWithTTA  # the name HARRetinaNet's users know


class GeneralizedRCNNWithHARNetTTA(GeneralizedRCNNWithTTA):
    """
    Detectron2's :class:`GeneralizedRCNNWithTTA` (Faster / Mask R-CNN; same views, same
    mask averaging over the views) with the boxes merged as in :class:`DenseDetectorWithTTA`:
    every view's candidates (the box predictor's per-class boxes above the score threshold,
    before suppression) are mapped back to the original image, optionally selected by size
    (``TEST.AUG.SIZE_SELECT``), and suppressed once by the box predictor's HAR-Net
    post-processing (``MODEL.HARNET.POSTPROCESS``, installed by
    :func:`harnet.modeling.apply_harnet_postprocess` when the model has none; the IoU
    threshold and number of detections stay the predictor's). Detectron2's own TTA instead
    suppresses each view, then the union once more, which applies soft-NMS twice. The mask
    head then runs on the merged boxes in every view. Views run in batches of one size.
    """

    def __init__(self, cfg, model, tta_mapper=None, batch_size: int = 3):
        if isinstance(model, DistributedDataParallel):
            model = model.module
        super().__init__(cfg, model, tta_mapper, batch_size)
        merge = cfg.TEST.AUG.get("MERGE", "suppress")
        if merge != "suppress":
            raise ValueError(
                f"cfg.TEST.AUG.MERGE={merge!r}: R-CNN TTA merges by suppression only "
                "(\"suppress\"); \"wbf\" is for single-stage detectors"
            )
        harnet_postprocess_from_cfg(model, cfg, always=True)
        self.predictor = suppression_holder(model)
        self.select_by_size = _SizeSelection(cfg)

    @torch.no_grad()
    def __call__(self, batched_inputs):
        """As ``GeneralizedRCNNWithTTA.__call__``: a list of dataset dicts in, a list of
        ``{"instances": Instances}`` out, in the original image resolution."""
        inputs = [_read_input(x, self.model.input_format) for x in batched_inputs]
        return super().__call__(inputs)

    def _batch_inference(self, batched_inputs, detected_instances=None):
        outputs = [None] * len(batched_inputs)
        for batch in _size_batches(batched_inputs, self.batch_size):
            given = None if detected_instances is None else [detected_instances[i] for i in batch]
            results = self.model.inference(
                [batched_inputs[i] for i in batch], given, do_postprocess=False
            )
            for i, r in zip(batch, results):
                outputs[i] = r
        return outputs

    def _get_augmented_boxes(self, augmented_inputs, tfms):
        with candidates_only(self.predictor):
            outputs = self._batch_inference(augmented_inputs)
        boxes, scores, classes = [], [], []
        for view, output, tfm in zip(augmented_inputs, outputs, tfms):
            view_boxes = DenseDetectorWithTTA._to_original(output.pred_boxes.tensor, tfm)
            orig_hw = (int(view["height"]), int(view["width"]))
            keep = self.select_by_size(view_boxes, view["image"].shape[1:3], orig_hw)
            boxes.append(view_boxes[keep])
            scores.append(output.scores[keep])
            classes.append(output.pred_classes[keep])
        return torch.cat(boxes), torch.cat(scores), torch.cat(classes)

    def _merge_detections(self, all_boxes, all_scores, all_classes, shape_hw):
        merged = self.predictor.suppress(
            Instances(shape_hw, pred_boxes=Boxes(all_boxes), scores=all_scores,
                      pred_classes=all_classes)  # fmt: skip
        )
        # As the model's own inference: clipped, empty boxes dropped (the mask head then
        # runs on what is left).
        return detector_postprocess(merged, *shape_hw)


def _read_input(dataset_dict, input_format):
    """A shallow copy of ``dataset_dict`` with "image" (read from "file_name" when absent,
    as a CHW uint8 tensor) and "height"/"width" (the image's when absent)."""
    ret = copy.copy(dataset_dict)
    if "image" not in ret:
        image = read_image(ret.pop("file_name"), input_format)
        ret["image"] = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
    if "height" not in ret or "width" not in ret:
        ret["height"], ret["width"] = ret["image"].shape[1:3]
    return ret


def _size_batches(views, batch_size: int) -> List[List[int]]:
    """Indices of the views run together: at most ``batch_size``, all of one image size
    (a batch pads its images to the largest, so mixing scales would run the small view at
    the large one's cost, and make its candidates depend on the batch)."""
    by_size = {}
    for i, view in enumerate(views):
        by_size.setdefault(tuple(view["image"].shape[-2:]), []).append(i)
    return [
        same[start : start + batch_size]
        for same in by_size.values()
        for start in range(0, len(same), batch_size)
    ]


class _SizeSelection:
    """Detectron-style size-dependent selection of a view's boxes (``TEST.AUG.SIZE_SELECT``):
    down-scaled views keep boxes of area >= SMALL_AREA, up-scaled ones <= LARGE_AREA; all
    boxes when disabled or at the plain test scale (``INPUT.MIN_SIZE_TEST``)."""

    def __init__(self, cfg):
        select = cfg.TEST.AUG.get("SIZE_SELECT", None)
        self.enabled = bool(select is not None and select.ENABLED)
        if self.enabled:
            small, large = float(select.SMALL_AREA), float(select.LARGE_AREA)
            if not 0 <= small <= large:
                raise ValueError(
                    "cfg.TEST.AUG.SIZE_SELECT.SMALL_AREA and LARGE_AREA must satisfy "
                    f"0 <= SMALL_AREA <= LARGE_AREA, got {small} and {large}"
                )
            self.small_area, self.large_area = small, large
        self.test_min_size = cfg.INPUT.MIN_SIZE_TEST
        self.test_max_size = cfg.INPUT.MAX_SIZE_TEST

    def __call__(self, boxes, view_hw, orig_hw):
        """A boolean mask or ``slice(None)`` over ``boxes`` (original-image coordinates)."""
        if not self.enabled or boxes.numel() == 0:
            return slice(None)
        if self.test_min_size > 0:
            test_hw = ResizeShortestEdge.get_output_shape(
                orig_hw[0], orig_hw[1], self.test_min_size, self.test_max_size
            )
        else:
            test_hw = orig_hw
        view_short, test_short = min(view_hw), min(test_hw)
        if view_short == test_short:
            return slice(None)
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        if view_short > test_short:  # up-scaled view: good at small objects only
            return area <= self.large_area
        return area >= self.small_area  # down-scaled view: good at large objects only


def _wbf_params_from_cfg(cfg) -> dict:
    """Keyword arguments of :func:`weighted_boxes_fusion` from ``cfg.TEST.AUG.WBF`` (the
    paper's defaults where the config has no such node); bad values name the key."""
    wbf = cfg.TEST.AUG.get("WBF", None)
    iou = float(wbf.IOU_THRESH) if wbf is not None else 0.55
    skip = float(wbf.SKIP_THRESH) if wbf is not None else 0.0
    conf_type = wbf.CONF_TYPE if wbf is not None else "avg"
    if not 0.0 <= iou <= 1.0:
        raise ValueError(f"cfg.TEST.AUG.WBF.IOU_THRESH must be in [0, 1], got {iou}")
    if not math.isfinite(skip):
        raise ValueError(f"cfg.TEST.AUG.WBF.SKIP_THRESH must be a finite number, got {skip}")
    if conf_type not in WBF_CONF_TYPES:
        raise ValueError(
            f"cfg.TEST.AUG.WBF.CONF_TYPE must be one of {WBF_CONF_TYPES}, got {conf_type!r}"
        )
    return dict(iou_threshold=iou, skip_threshold=skip, conf_type=conf_type)


def _axis_affine(tfm):
    """``((sx, tx), (sy, ty))`` when ``tfm.apply_coords`` maps ``(x, y)`` to
    ``(sx * x + tx, sy * y + ty)`` with ``sx, sy != 0`` (resizes, flips and compositions
    of them), checked on probe points; else None."""
    # apply_coords may work in place (ResizeTransform does): a fresh array each call.
    probes = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [7.0, 13.0], [-5.0, 3.0]])
    try:
        mapped = np.asarray(tfm.apply_coords(probes.copy()), dtype=np.float64)
    except Exception:  # a transform without a coordinate map: the generic path
        return None
    if mapped.shape != probes.shape:
        return None
    shift = mapped[0]
    scale = np.array([mapped[1, 0] - shift[0], mapped[2, 1] - shift[1]])
    expected = probes * scale + shift
    if np.all(scale != 0) and np.allclose(mapped, expected, rtol=1e-9, atol=1e-9):
        return (float(scale[0]), float(shift[0])), (float(scale[1]), float(shift[1]))
    return None
