"""HAR-Net's post-processing on Detectron2's own detectors, built from Detectron2's model-zoo
configs (yacs and LazyConfig) with random weights, on rendered shapes images: hard NMS gives
the detector's own output bit for bit; soft-NMS / voting give suppress_detections of the
detector's own candidates."""

import copy

import pytest
import torch

from detectron2 import model_zoo
from detectron2.config import get_cfg, instantiate
from detectron2.data import DatasetCatalog
from detectron2.data.detection_utils import read_image
from detectron2.modeling import build_model
from detectron2.modeling.postprocessing import detector_postprocess

import harnet
from harnet.data.shapes import register_shapes
from harnet.layers import suppress_detections
from harnet.modeling import apply_harnet_postprocess
from harnet_model_utils import single_thread

_single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)

YAML = {
    "RetinaNet": "COCO-Detection/retinanet_R_50_FPN_1x.yaml",
    "Faster R-CNN": "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml",
    "Mask R-CNN": "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml",
}
NAMES = list(YAML) + ["FCOS (LazyConfig)"]


def _model(name):
    """A small random-weight model from the model-zoo config (5 classes; thresholds at 0 so
    that random weights give candidates; few proposals: CPU time)."""
    torch.manual_seed(0)
    if name.startswith("FCOS"):
        lazy = model_zoo.get_config("COCO-Detection/fcos_R_50_FPN_1x.py")
        lazy.model.num_classes = 5
        lazy.model.test_score_thresh = 0.0
        lazy.model.test_topk_candidates = 60
        lazy.model.backbone.bottom_up.freeze_at = 0
        try:
            model = instantiate(lazy.model)
        except ValueError as e:  # Detectron2 0.6's FCOSHead with GN (fixed upstream)
            if "must be divisible by num_groups" not in str(e):
                raise
            pytest.skip(f"this Detectron2's own FCOS config does not build: {e}")
    else:
        cfg = get_cfg()
        harnet.add_harnet_config(cfg)
        cfg.merge_from_file(model_zoo.get_config_file(YAML[name]))
        cfg.merge_from_list([
            "MODEL.DEVICE", "cpu", "MODEL.RETINANET.NUM_CLASSES", "5",
            "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0", "MODEL.RETINANET.TOPK_CANDIDATES_TEST", "60",
            "MODEL.ROI_HEADS.NUM_CLASSES", "5", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
            "MODEL.RPN.POST_NMS_TOPK_TEST", "40",
            # GroupNorm: random weights give moderate activations (frozen BN statistics of
            # an untrained model blow them up and saturate the R-CNN scores).
            "MODEL.RESNETS.NORM", "GN", "MODEL.FPN.NORM", "GN", "MODEL.ROI_BOX_HEAD.NORM", "GN",
        ])  # fmt: skip
        model = build_model(cfg)
    return model.eval()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    register_shapes("harnet_any_detector_test", str(tmp_path_factory.mktemp("shapes")),
                    num_images=2, image_size=(96, 128))  # fmt: skip
    dicts = DatasetCatalog.get("harnet_any_detector_test")
    return [
        {"image": torch.as_tensor(read_image(d["file_name"], "BGR").transpose(2, 0, 1).copy())}
        for d in dicts
    ]


@pytest.fixture(scope="module", params=NAMES)
def detector(request):
    return request.param, _model(request.param)


def _run(model, images):
    with torch.no_grad():
        return [o["instances"] for o in model(copy.deepcopy(images))]


def _fields(instances):
    out = [instances.pred_boxes.tensor, instances.scores, instances.pred_classes]
    return out + ([instances.pred_masks] if instances.has("pred_masks") else [])


def test_hard_nms_is_the_detectors_own_output(detector, images):
    name, model = detector
    expected = _run(model, images)
    patched = apply_harnet_postprocess(copy.deepcopy(model), nms_type="hard")
    assert type(patched).__name__.endswith("WithHARNetPostprocess") or name.endswith("R-CNN")
    got = _run(patched, images)
    for g, e in zip(got, expected):
        assert len(e) > 5
        for a, b in zip(_fields(g), _fields(e)):
            assert torch.equal(a, b), name


def _raw_candidates(model, images):
    """The model's inference results before Detectron2's detector_postprocess (which
    clips and drops empty boxes): DenseDetector.forward's and GeneralizedRCNN's steps."""
    with torch.no_grad():
        if hasattr(model, "roi_heads"):
            return model.inference(copy.deepcopy(images), do_postprocess=False)
        batch = model.preprocess_image(copy.deepcopy(images))
        features = model.backbone(batch.tensor)
        features = [features[f] for f in model.head_in_features]
        return model.forward_inference(batch, features, model.head(features))


def _candidates_model(model):
    """The same model with suppression off: its output is its candidates, by score."""
    plain = copy.deepcopy(model)
    if hasattr(plain, "roi_heads"):
        plain.roi_heads.box_predictor.test_nms_thresh = 1.0
        plain.roi_heads.box_predictor.test_topk_per_image = -1
    else:
        plain.test_nms_thresh = 1.0
        plain.max_detections_per_image = 100000
    return plain


@pytest.mark.parametrize("params", [
    dict(nms_type="gaussian"),
    dict(nms_type="linear", voting=True, voting_scoring="caffe", min_score=0.005),
], ids=["gaussian", "linear-voting-caffe"])  # fmt: skip
def test_soft_nms_and_voting_suppress_the_detectors_candidates(detector, images, params):
    name, model = detector
    got = _run(apply_harnet_postprocess(copy.deepcopy(model), **params), images)
    candidates = _raw_candidates(_candidates_model(model), images)
    box_predictor = getattr(getattr(model, "roi_heads", None), "box_predictor", model)
    for g, c, img in zip(got, candidates, images):
        boxes, scores, classes = suppress_detections(
            c.pred_boxes.tensor, c.scores, c.pred_classes, **params,
            iou_threshold=box_predictor.test_nms_thresh,
            max_detections=getattr(box_predictor, "test_topk_per_image", None)
            or model.max_detections_per_image,
        )  # fmt: skip
        plain = _run(model, [img])[0]  # hard NMS: soft-NMS / voting change the output
        assert len(plain) != len(g) or not torch.equal(plain.scores, g.scores)
        from detectron2.structures import Boxes, Instances

        ref = detector_postprocess(
            Instances(c.image_size, pred_boxes=Boxes(boxes), scores=scores, pred_classes=classes),
            *c.image_size,
        )
        for a, b in zip(_fields(g)[:3], _fields(ref)):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-4, msg=name)
        if g.has("pred_masks"):  # the mask head ran on the kept (voted) boxes
            assert g.pred_masks.shape[0] == len(g)


def test_from_config_keys_and_unsupported_models():
    from harnet.modeling.any_detector import harnet_postprocess_from_cfg

    cfg = get_cfg()
    harnet.add_harnet_config(cfg)
    cfg.merge_from_file(model_zoo.get_config_file(YAML["RetinaNet"]))
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    assert harnet_postprocess_from_cfg(model, cfg) is model  # defaults: untouched
    assert type(model).__name__ == "RetinaNet"
    cfg.MODEL.HARNET.POSTPROCESS.NMS_TYPE = "gaussian"
    cfg.MODEL.HARNET.POSTPROCESS.VOTING.ENABLED = True
    harnet_postprocess_from_cfg(model, cfg)
    assert type(model).__name__ == "RetinaNetWithHARNetPostprocess"
    assert model.harnet_postprocess["nms_type"] == "gaussian" and model.harnet_postprocess["voting"]
    with pytest.raises(ValueError, match="unknown arguments"):
        apply_harnet_postprocess(model, sigma=0.5)
    with pytest.raises(ValueError, match="nms_type must be one of"):
        apply_harnet_postprocess(model, nms_type="soft")
    with pytest.raises(TypeError, match="supports Detectron2's DenseDetector"):
        apply_harnet_postprocess(torch.nn.Linear(2, 2))


# --- TTA -----------------------------------------------------------------------------------
def _tta_cfg(name, min_sizes, flip):
    cfg = get_cfg()
    harnet.add_harnet_config(cfg)
    if name in YAML:
        cfg.merge_from_file(model_zoo.get_config_file(YAML[name]))
    # The test images are 96 x 112: a view at short side 96 is the image itself.
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 96, 1000
    cfg.TEST.AUG.MIN_SIZES, cfg.TEST.AUG.MAX_SIZE, cfg.TEST.AUG.FLIP = min_sizes, 1000, flip
    return cfg


@pytest.fixture(scope="module")
def tta_images(images):
    return [{"image": x["image"][:, :96, :112].clone()} for x in images]


def _with_params(model, params):
    return apply_harnet_postprocess(copy.deepcopy(model), **params) if params else model


TTA_PARAMS = [None, dict(nms_type="gaussian", voting=True, voting_scoring="caffe")]


@pytest.mark.parametrize("params", TTA_PARAMS, ids=["detectron2", "gaussian-voting-caffe"])
def test_tta_one_view_at_the_test_size_is_the_plain_model(detector, tta_images, params):
    name, model = detector
    model = _with_params(model, params)
    tta = harnet.build_tta_model(_tta_cfg(name, (96,), False), copy.deepcopy(model))
    assert type(tta).__name__ == (
        "GeneralizedRCNNWithHARNetTTA" if name.endswith("R-CNN") else "DenseDetectorWithTTA"
    )
    for image in tta_images:  # one image per batch: the same padding in both
        expected = _run(model, [image])[0]
        got = tta(copy.deepcopy([image]))[0]["instances"]
        assert len(expected) > 5 and got.image_size == expected.image_size
        for a, b in zip(_fields(got), _fields(expected)):
            assert torch.equal(a, b), name


def test_tta_merges_every_views_candidates_by_one_suppression(detector, tta_images):
    # Reference: each view of Detectron2's DatasetMapperTTA through the detector with its
    # suppression turned off (Detectron2's own code), boxes mapped back by Detectron2's
    # inverse transforms, all views' candidates suppressed once.
    from detectron2.modeling import DatasetMapperTTA
    from detectron2.structures import Boxes, Instances

    name, model = detector
    params = dict(nms_type="gaussian", voting=True)
    cfg = _tta_cfg(name, (96, 144), True)
    tta = harnet.build_tta_model(cfg, _with_params(model, params))
    box_predictor = getattr(getattr(model, "roi_heads", None), "box_predictor", model)
    iou = box_predictor.test_nms_thresh
    k = getattr(box_predictor, "test_topk_per_image", None) or model.max_detections_per_image
    image = tta_images[0]
    views = DatasetMapperTTA(cfg)(dict(image, height=96, width=112))
    assert len(views) == 4
    reference = _candidates_model(model)
    if hasattr(reference, "roi_heads"):
        reference.roi_heads.mask_on = False  # boxes only (CPU time)
    boxes, scores, classes = [], [], []
    for view in views:
        tfm = view.pop("transforms")
        c = _raw_candidates(reference, [view])[0]
        boxes.append(torch.as_tensor(tfm.inverse().apply_box(c.pred_boxes.tensor.numpy())))
        scores.append(c.scores)
        classes.append(c.pred_classes)
    b, s, c = suppress_detections(torch.cat(boxes), torch.cat(scores), torch.cat(classes),
                                  iou_threshold=iou, max_detections=k, **params)  # fmt: skip
    ref = detector_postprocess(
        Instances((96, 112), pred_boxes=Boxes(b), scores=s, pred_classes=c), 96, 112
    )
    got = tta(copy.deepcopy([image]))[0]["instances"]
    assert len(got) == len(ref) > 5
    torch.testing.assert_close(got.pred_boxes.tensor, ref.pred_boxes.tensor, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(got.scores, ref.scores, rtol=1e-5, atol=1e-6)
    assert torch.equal(got.pred_classes, ref.pred_classes)
    if got.has("pred_masks"):  # Detectron2's mask averaging over the views, on these boxes
        assert got.pred_masks.shape == (len(got), 96, 112)
    plain = _run(_with_params(model, params), [image])[0]
    assert len(plain) != len(got) or not torch.equal(plain.scores, got.scores)


def test_tta_of_unsupported_merges_and_models_raise(tta_images):
    model = _model("Faster R-CNN")
    cfg = _tta_cfg("Faster R-CNN", (96,), False)
    cfg.TEST.AUG.MERGE = "wbf"
    with pytest.raises(ValueError, match="TEST.AUG.MERGE='wbf'"):
        harnet.build_tta_model(cfg, model)
    with pytest.raises(TypeError, match="forward_candidates"):
        harnet.DenseDetectorWithTTA(cfg, torch.nn.Linear(2, 2))


@pytest.mark.parametrize("name", ["Mask R-CNN", "RetinaNet"])
def test_tta_without_candidates_gives_empty_detections(name, tta_images):
    model = _model(name)
    if hasattr(model, "roi_heads"):
        model.roi_heads.box_predictor.test_score_thresh = 1.1  # no score passes
    else:
        model.test_score_thresh = 1.1
    tta = harnet.build_tta_model(_tta_cfg(name, (96, 144), True), model)
    out = tta(copy.deepcopy(tta_images[:1]))[0]["instances"]
    assert len(out) == 0 and out.image_size == (96, 112)
    assert out.pred_boxes.tensor.shape == (0, 4)
    if name == "Mask R-CNN":
        assert out.pred_masks.shape == (0, 96, 112)
