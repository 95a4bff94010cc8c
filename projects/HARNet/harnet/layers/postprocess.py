"""Per-image suppression of detection candidates, shared by HARRetinaNet and its TTA.

CONTRACT (used by harnet.modeling.meta_arch and harnet.tta; keep the signature):

    suppress_detections(boxes, scores, classes, *, nms_type="hard", iou_threshold=0.5,
                        soft_nms_sigma=0.5, soft_nms_min_score=0.001, voting=False,
                        voting_iou=0.6, voting_scoring="max", max_detections=100)
        -> (boxes Tensor[K,4], scores Tensor[K], classes Tensor[K] int64), sorted by
           decreasing score, K <= max_detections.

With nms_type="hard" and voting=False it must equal Detectron2 RetinaNet's
`batched_nms(boxes, scores, classes, iou_threshold)[:max_detections]`.
"""
from torchvision.ops import batched_nms


def suppress_detections(
    boxes, scores, classes, *, nms_type="hard", iou_threshold=0.5, soft_nms_sigma=0.5,
    soft_nms_min_score=0.001, voting=False, voting_iou=0.6, voting_scoring="max",
    max_detections=100,
):
    # TEMPORARY until the inference issue lands: hard NMS only.
    if nms_type != "hard" or voting:
        raise NotImplementedError(f"nms_type={nms_type!r}, voting={voting} not implemented yet")
    keep = batched_nms(boxes, scores, classes, iou_threshold)[:max_detections]
    return boxes[keep], scores[keep], classes[keep]


def postprocess_params_from_cfg(cfg):
    """Keyword arguments of :func:`suppress_detections` from a Detectron2 config.

    CONTRACT: HARRetinaNet.from_config stores this dict and passes it to
    suppress_detections; the inference issue extends it with its config keys.
    """
    return dict(
        nms_type="hard",
        iou_threshold=cfg.MODEL.RETINANET.NMS_THRESH_TEST,
        max_detections=cfg.TEST.DETECTIONS_PER_IMAGE,
    )
