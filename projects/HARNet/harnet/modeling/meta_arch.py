"""HARRetinaNet: Detectron2's RetinaNet with HAR-Net's hybrid attention."""

import copy
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, RetinaNet
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import get_event_storage

from ..config_checks import check_harnet_config
from .config_keys import HEAD_KEYS, naming_config_keys
from ..layers.postprocess import (
    postprocess_params_from_cfg,
    suppress_detections,
    suppress_detections_scriptable,
    suppression_args,
)
from .candidates import CANDIDATE_MODES, authors_level_candidates
from .head import HARRetinaNetHead
from .losses import LOSS_NORMALIZERS, eager_retinanet_focal_loss, per_level_normalized_losses

__all__ = ["HARRetinaNet"]


@META_ARCH_REGISTRY.register()
class HARRetinaNet(RetinaNet):
    """
    RetinaNet with HAR-Net's hybrid attention (aligned attention lives in the backbone,
    CLGN / spatial / channel attention in :class:`HARRetinaNetHead`).

    Anchors, matching, box coding, the focal / box losses and the per-level decoding are
    Detectron2's RetinaNet's. What differs:

    - training: one set of RetinaNet losses per predictor pair of the head, weighted by
      ``predictor_loss_weights`` (0.5 / 0.5 with the dual predictor); predictor B's losses
      are reported as ``loss_cls_channel`` and ``loss_box_reg_channel``;
    - inference: the predictors' logits and deltas are averaged (by the head), candidates
      decoded as in RetinaNet, then suppressed by
      :func:`harnet.layers.postprocess.suppress_detections` with ``postprocess_params``
      (hard NMS equals RetinaNet's ``batched_nms``).

    With HARNet's four switches off (and hard NMS) it is Detectron2's RetinaNet: same
    parameters, losses and detections.

    Two switches follow the authors' released recipe instead (MODEL.HARNET.LOSS /
    CANDIDATES): ``loss_normalizer="per_level"`` normalises each level's losses by its own
    number of positives (:func:`per_level_normalized_losses`), and
    ``candidate_mode="authors"`` selects each level's candidates after clipping and a
    minimum-size filter (:func:`authors_level_candidates`).
    """

    @configurable
    def __init__(
        self,
        *,
        predictor_loss_weights: Sequence[float] = (1.0,),
        postprocess_params: Optional[Dict] = None,
        loss_normalizer: str = "running",
        loss_min_normalizer: float = 100.0,
        candidate_mode: str = "detectron2",
        candidate_min_size: float = 8.0,
        **kwargs,
    ):
        """
        Args:
            predictor_loss_weights (list[float]): loss weight of each predictor pair of the
                head, in the order of ``head.forward_predictors`` (A, then B).
            postprocess_params (dict or None): keyword arguments of
                :func:`suppress_detections`; None = hard NMS with ``test_nms_thresh`` and
                ``max_detections_per_image`` (RetinaNet's own post-processing).
            loss_normalizer (str): "running" (RetinaNet's) or "per_level" (the authors').
            loss_min_normalizer (float): minimum per-level normaliser (authors: 100).
            candidate_mode (str): "detectron2" or "authors" (clip, minimum size, then top-k).
            candidate_min_size (float): minimum box side of "authors" candidates, in
                original-image pixels.
            kwargs: the arguments of Detectron2's :class:`RetinaNet`.
        """
        super().__init__(**kwargs)
        weights = [float(w) for w in predictor_loss_weights]
        num_predictors = getattr(self.head, "num_predictors", 1)
        if len(weights) != num_predictors:
            raise ValueError(
                f"HARRetinaNet: predictor_loss_weights {weights} has {len(weights)} values, the "
                f"head has {num_predictors} predictor pair(s)"
            )
        if any(not math.isfinite(w) or w < 0 for w in weights):
            raise ValueError(f"HARRetinaNet: predictor_loss_weights must be >= 0, got {weights}")
        self.predictor_loss_weights = tuple(weights)
        if postprocess_params is None:
            postprocess_params = dict(
                nms_type="hard",
                iou_threshold=self.test_nms_thresh,
                max_detections=self.max_detections_per_image,
            )
        self.postprocess_params = dict(postprocess_params)
        _check_choice("loss_normalizer", loss_normalizer, LOSS_NORMALIZERS, "LOSS.NORMALIZER")
        _check_non_negative("loss_min_normalizer", loss_min_normalizer, "LOSS.PER_LEVEL_MIN")
        _check_choice("candidate_mode", candidate_mode, CANDIDATE_MODES, "CANDIDATES.MODE")
        _check_non_negative("candidate_min_size", candidate_min_size, "CANDIDATES.MIN_SIZE")
        self.loss_normalizer_mode = loss_normalizer
        self.loss_min_normalizer = float(loss_min_normalizer)
        self.candidate_mode = candidate_mode
        self.candidate_min_size = float(candidate_min_size)

    @classmethod
    def from_config(cls, cfg):
        check_harnet_config(cfg)  # element types inside lists, before any module is built
        ret = super().from_config(cfg)
        feature_shapes = [
            ret["backbone"].output_shape()[f] for f in cfg.MODEL.RETINANET.IN_FEATURES
        ]
        with naming_config_keys(HEAD_KEYS):
            ret["head"] = HARRetinaNetHead(cfg, feature_shapes)
        channel = cfg.MODEL.HARNET.CHANNEL
        dual = channel.ENABLED and channel.DUAL_PREDICTOR
        ret["predictor_loss_weights"] = list(channel.LOSS_WEIGHTS) if dual else [1.0]
        ret["postprocess_params"] = postprocess_params_from_cfg(cfg)
        har = cfg.MODEL.HARNET
        ret.update(
            loss_normalizer=har.LOSS.NORMALIZER,
            loss_min_normalizer=har.LOSS.PER_LEVEL_MIN,
            candidate_mode=har.CANDIDATES.MODE,
            candidate_min_size=har.CANDIDATES.MIN_SIZE,
        )
        return ret

    # ---------------------------------------------------------------- shared steps
    def _features(self, batched_inputs):
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        return images, [features[f] for f in self.head_in_features]

    def _head_predictions(self, features: List[Tensor]):
        # Any RetinaNet-style head works; HARRetinaNetHead gives one output per predictor.
        if hasattr(self.head, "forward_predictors"):
            return self.head.forward_predictors(features)["predictions"]
        return [self.head(features)]

    # ---------------------------------------------------------------- training
    def forward(self, batched_inputs: List[Dict[str, Tensor]]):
        """
        Args:
            batched_inputs: as :meth:`RetinaNet.forward` (a list of dicts with "image", and
                "instances" in training, optionally "height"/"width").

        Returns:
            training: dict of losses; inference: list of {"instances": Instances}.
        """
        if torch.jit.is_scripting():  # (inference only; see __prepare_scriptable__)
            return self._scripted_inference(batched_inputs)
        if not self.training:
            # One inference path for both candidate modes: the candidates, `suppress`, then
            # Detectron2's detector_postprocess. (DenseDetector.forward_inference does not
            # pass each image's original size on, which the authors' minimum size needs.)
            candidates = self.forward_candidates(batched_inputs, do_postprocess=False)
            results = []
            for inp, cand in zip(batched_inputs, candidates):
                height = inp.get("height", cand.image_size[0])
                width = inp.get("width", cand.image_size[1])
                instances = detector_postprocess(self.suppress(cand), height, width)
                results.append({"instances": instances})
            return results
        if "instances" not in batched_inputs[0]:
            raise ValueError("HARRetinaNet: 'instances' annotations are missing in training")
        images, features = self._features(batched_inputs)
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        predictions = self._head_predictions(features)
        return self.forward_training(images, features, predictions, gt_instances)

    def forward_training(self, images, features, predictions, gt_instances):
        """
        Args:
            predictions: list over the head's predictor pairs of [logits, deltas] (per-level
                lists as RetinaNetHead returns them).

        Returns:
            dict[str, Tensor]: RetinaNet's losses of predictor A (``loss_cls``,
            ``loss_box_reg``) and, with a second predictor, ``loss_cls_channel`` and
            ``loss_box_reg_channel``, each multiplied by its predictor's loss weight.
        """
        if len(predictions) != len(self.predictor_loss_weights):
            raise ValueError(
                f"HARRetinaNet: the head gave {len(predictions)} predictor outputs, "
                f"predictor_loss_weights has {len(self.predictor_loss_weights)}"
            )
        anchors = self.anchor_generator(features)
        gt_labels, gt_boxes = self.label_anchors(anchors, gt_instances)
        # RetinaNet.losses updates the EMA of the number of positive anchors on each call;
        # every predictor must see the normaliser of a single update per iteration.
        ema_before = self.__dict__.get("loss_normalizer")
        losses = {}
        for i, (weight, pred) in enumerate(zip(self.predictor_loss_weights, predictions)):
            if i > 0 and self.loss_normalizer_mode == "running":
                if ema_before is None:
                    del self.loss_normalizer
                else:
                    self.loss_normalizer = ema_before
            pred_logits, pred_deltas = self._transpose_dense_predictions(
                pred, [self.num_classes, 4]
            )
            suffix = "" if i == 0 else ("_channel" if i == 1 else f"_{i}")
            for name, value in self._predictor_losses(
                anchors, pred_logits, gt_labels, pred_deltas, gt_boxes
            ).items():
                losses[name + suffix] = value * weight
        return losses

    def _predictor_losses(self, anchors, pred_logits, gt_labels, pred_deltas, gt_boxes):
        if self.loss_normalizer_mode == "running":
            with eager_retinanet_focal_loss():  # bit-exact resume (harnet.modeling.losses)
                return self.losses(anchors, pred_logits, gt_labels, pred_deltas, gt_boxes)
        labels = torch.stack(gt_labels)
        num_pos = ((labels >= 0) & (labels != self.num_classes)).sum().item()
        get_event_storage().put_scalar("num_pos_anchors", num_pos / len(gt_labels))
        return per_level_normalized_losses(
            anchors,
            pred_logits,
            gt_labels,
            pred_deltas,
            gt_boxes,
            num_classes=self.num_classes,
            focal_loss_alpha=self.focal_loss_alpha,
            focal_loss_gamma=self.focal_loss_gamma,
            box2box_transform=self.box2box_transform,
            box_reg_loss_type=self.box_reg_loss_type,
            smooth_l1_beta=self.smooth_l1_beta,
            min_normalizer=self.loss_min_normalizer,
        )

    # ---------------------------------------------------------------- inference
    def inference_single_image(self, anchors, box_cls, box_delta, image_size):
        """RetinaNet's decoding followed by :meth:`suppress` (see
        :meth:`RetinaNet.inference_single_image` for the arguments)."""
        return self.suppress(
            self._decode_multi_level_predictions(
                anchors,
                box_cls,
                box_delta,
                self.test_score_thresh,
                self.test_topk_candidates,
                image_size,
            )
        )

    def suppress(self, instances: Instances) -> Instances:
        """
        Args:
            instances (Instances): candidates of one image (pred_boxes, scores, pred_classes).

        Returns:
            Instances: the detections kept by :func:`suppress_detections` with
            ``self.postprocess_params`` (same image_size), sorted by decreasing score.
        """
        boxes, scores, classes = suppress_detections(
            instances.pred_boxes.tensor,
            instances.scores,
            instances.pred_classes,
            **self.postprocess_params,
        )
        return Instances(
            instances.image_size, pred_boxes=Boxes(boxes), scores=scores, pred_classes=classes
        )

    def forward_candidates(
        self, batched_inputs: List[Dict[str, Tensor]], do_postprocess: bool = True
    ) -> List[Instances]:
        """
        The detection candidates of each image before suppression: per level, the top
        ``test_topk_candidates`` (anchor, class) pairs scoring above ``test_score_thresh``,
        decoded (``candidate_mode="authors"``: :func:`authors_level_candidates`, clipped
        boxes at least ``candidate_min_size`` original-image pixels wide and high); all
        levels concatenated.

        Args:
            batched_inputs: as in inference (dicts with "image", optional "height"/"width").
            do_postprocess (bool): rescale to the output resolution ("height"/"width" of the
                input dict) like :func:`detector_postprocess` (which also clips boxes and drops
                empty ones); False keeps the network-input resolution.

        Returns:
            list[Instances]: per image, fields pred_boxes, scores, pred_classes.
        """
        images, features = self._features(batched_inputs)
        predictions = self.head(features)
        pred_logits, pred_deltas = self._transpose_dense_predictions(
            predictions, [self.num_classes, 4]
        )
        anchors = self.anchor_generator(features)
        results = []
        for i, image_size in enumerate(images.image_sizes):
            height = batched_inputs[i].get("height", image_size[0])
            width = batched_inputs[i].get("width", image_size[1])
            scores = [x[i].sigmoid() for x in pred_logits]
            deltas = [x[i] for x in pred_deltas]
            candidates = self._image_candidates(anchors, scores, deltas, image_size, height, width)
            if do_postprocess:
                candidates = detector_postprocess(candidates, height, width)
            results.append(candidates)
        return results

    def _image_candidates(
        self,
        anchors: List[Boxes],
        scores: List[Tensor],
        deltas: List[Tensor],
        image_size: Tuple[int, int],
        height: int,
        width: int,
    ) -> Instances:
        """One image's candidates (see :meth:`forward_candidates`); ``height``/``width``:
        its output size, which the authors' minimum box size is measured in."""
        if self.candidate_mode == "authors":
            # MIN_SIZE original-image pixels at this image's resize scale, per axis.
            min_size = (
                self.candidate_min_size * image_size[1] / width,
                self.candidate_min_size * image_size[0] / height,
            )
            return self._authors_candidates(anchors, scores, deltas, image_size, min_size)
        return self._decode_multi_level_predictions(
            anchors, scores, deltas, self.test_score_thresh, self.test_topk_candidates,
            image_size,
        )  # fmt: skip

    def _authors_candidates(
        self,
        anchors: List[Boxes],
        scores: List[Tensor],
        deltas: List[Tensor],
        image_size: Tuple[int, int],
        min_size: Tuple[float, float],
    ) -> Instances:
        boxes: List[Tensor] = []
        level_scores: List[Tensor] = []
        classes: List[Tensor] = []
        for a, s, d in zip(anchors, scores, deltas):
            b, ls, c = authors_level_candidates(
                a.tensor,
                s,
                d,
                self.box2box_transform,
                image_size,
                min_size,
                self.test_score_thresh,
                self.test_topk_candidates,
            )
            boxes.append(b)
            level_scores.append(ls)
            classes.append(c)
        result = Instances(image_size)
        result.pred_boxes = Boxes(torch.cat(boxes))
        result.scores = torch.cat(level_scores)
        result.pred_classes = torch.cat(classes)
        return result

    # ---------------------------------------------------------------- scripting
    def __prepare_scriptable__(self) -> "HARRetinaNet":
        """What ``torch.jit.script`` (e.g. ``detectron2.export.scripting_with_instances``)
        compiles: a copy in eval mode (this model is left as it is) with
        ``postprocess_params`` frozen as the typed arguments of
        :func:`suppress_detections_scriptable` (soft-NMS and voting run as PyTorch ops).
        The scripted forward is inference only and returns what the eager one does."""
        if self.training:
            raise ValueError("HARRetinaNet: script the model in eval mode (model.eval())")
        scripted = copy.deepcopy(self)
        # The head's towers are created now, not during torch.jit.script's traversal: that
        # memoises modules by id(), and Detectron2's FPN / ResNet __prepare_scriptable__
        # (deep copies) free modules whose ids a module created later can reuse, which then
        # resolves to the wrong module (seen: a head tower typed as the FPN).
        scripted.head = scripted.head.__prepare_scriptable__()
        scripted._scripted_postprocess = suppression_args(**self.postprocess_params)
        return scripted

    def _scripted_inference(
        self, batched_inputs: List[Dict[str, Tensor]]
    ) -> List[Dict[str, Instances]]:
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        features = [features[f] for f in self.head_in_features]
        pred_logits, pred_deltas = self._transpose_dense_predictions(
            self.head(features), [self.num_classes, 4]
        )
        anchors = self.anchor_generator(features)
        results: List[Dict[str, Instances]] = []
        for i, image_size in enumerate(images.image_sizes):
            inp = batched_inputs[i]
            height = int(inp["height"]) if "height" in inp else image_size[0]
            width = int(inp["width"]) if "width" in inp else image_size[1]
            scores = [x[i].sigmoid() for x in pred_logits]
            deltas = [x[i] for x in pred_deltas]
            candidates = self._image_candidates(anchors, scores, deltas, image_size, height, width)
            pp = self._scripted_postprocess
            boxes, kept_scores, classes = suppress_detections_scriptable(
                candidates.pred_boxes.tensor, candidates.scores, candidates.pred_classes,
                pp[0], pp[1], pp[2], pp[3], pp[4], pp[5], pp[6], pp[7], pp[8],
            )  # fmt: skip
            # detector_postprocess's box steps (it is not scriptable): rescale to the
            # output size, clip, drop empty boxes.
            out_boxes = Boxes(boxes)
            out_boxes.scale(width / image_size[1], height / image_size[0])
            out_boxes.clip((height, width))
            keep = out_boxes.nonempty()
            detections = Instances((height, width))
            detections.pred_boxes = out_boxes[keep]
            detections.scores = kept_scores[keep]
            detections.pred_classes = classes[keep]
            results.append({"instances": detections})
        return results

    @torch.no_grad()
    def attention_maps(self, batched_inputs: List[Dict[str, Tensor]]) -> List[List[Tensor]]:
        """
        The spatial attention masks, for visualisation.

        Args:
            batched_inputs: as in inference (dicts with "image").

        Returns:
            list (per image) of list (per head level, P3 first) of Tensor[H_l, W_l] in (0, 1):
            the mask of the level, cropped to the image's own extent (batch padding removed),
            i.e. ``H_l = ceil(h / stride_l)`` for an input image of height h.
        """
        if not getattr(self.head, "use_spatial", False):
            raise RuntimeError(
                "attention_maps needs spatial attention (MODEL.HARNET.SPATIAL.ENABLED=True)"
            )
        images, features = self._features(batched_inputs)
        masks = self.head.spatial_masks(features)
        shapes = self.backbone.output_shape()
        strides = [shapes[f].stride for f in self.head_in_features]
        out = []
        for i, (h, w) in enumerate(images.image_sizes):
            out.append(
                [m[i, 0, : math.ceil(h / s), : math.ceil(w / s)] for m, s in zip(masks, strides)]
            )
        return out


def _check_choice(name, value, choices, key):
    if value not in choices:
        raise ValueError(
            f"HARRetinaNet: {name}={value!r} is unknown (MODEL.HARNET.{key}); use one of {choices}"
        )


def _check_non_negative(name, value, key):
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(
            f"HARRetinaNet: {name}={value} must be finite and >= 0 (MODEL.HARNET.{key})"
        )
