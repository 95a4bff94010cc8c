"""Bad input data: unreadable files, unusual image modes, bad boxes, empty annotations, tiny
and extreme-aspect images. References: Detectron2's own read_image / DatasetMapper and PIL."""
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as d2utils
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from detectron2.structures import BoxMode
from detectron2.utils.events import EventStorage

from harnet.data.loaders import build_harnet_train_loader, filter_images_without_valid_boxes
from harnet.data.mapper import HARNetDatasetMapper, ImageReadError, read_image, sanitize_annotations
from harnet_model_utils import tiny_cfg, write_image

XYWH = BoxMode.XYWH_ABS


def _anno(bbox, cat=0, mode=XYWH, **kw):
    return dict(bbox=list(bbox), bbox_mode=mode, category_id=cat, **kw)


@pytest.fixture(scope="module")
def cfg():
    return tiny_cfg()


# ---------------------------------------------------------------- reading images


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_read_image_matches_detectron2_on_normal_images(tmp_path, ext):
    path = write_image(str(tmp_path / f"a.{ext}"), 40, 30)
    for fmt in ("BGR", "RGB", "L"):
        np.testing.assert_array_equal(read_image(path, fmt), d2utils.read_image(path, fmt))


@pytest.mark.parametrize("mode", ["L", "P", "LA", "RGBA", "CMYK", "1"])
def test_unusual_modes_convert_to_format(tmp_path, mode):
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
    img = rgb.convert(mode)
    if mode in ("RGBA", "LA"):
        img.putalpha(Image.fromarray(rng.integers(0, 256, (30, 40), dtype=np.uint8)))
    path = str(tmp_path / ("a.jpg" if mode == "CMYK" else "a.png"))
    img.save(path)
    out = read_image(path, "BGR")
    assert out.shape == (30, 40, 3) and out.dtype == np.uint8
    expected = np.asarray(Image.open(path).convert("RGB"))[:, :, ::-1]
    np.testing.assert_array_equal(out, expected)
    if mode in ("L", "LA", "1"):  # gray: three equal channels
        assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_16bit_grayscale_is_scaled_not_saturated(tmp_path):
    arr = (np.arange(30 * 40).reshape(30, 40) * 50).astype(np.uint16)  # 0 .. 59950
    path = str(tmp_path / "g16.png")
    Image.fromarray(arr).save(path)
    out = read_image(path, "RGB")
    np.testing.assert_array_equal(out[..., 0], np.round(arr / 257.0).astype(np.uint8))
    # Detectron2's reader saturates: most pixels become 255.
    assert (d2utils.read_image(path, "RGB") == 255).mean() > 0.9


def test_float_image_rejected_by_name(tmp_path):
    path = str(tmp_path / "float.tiff")
    Image.fromarray(np.random.rand(8, 8).astype(np.float32)).save(path)
    with pytest.raises(ImageReadError, match="float.tiff.*floating-point"):
        read_image(path, "BGR")


def _corrupt(tmp_path, kind):
    path = tmp_path / f"{kind}.jpg"
    if kind == "garbage":
        path.write_bytes(b"this is not an image")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        full = write_image(str(tmp_path / "full.jpg"), 100, 80)
        data = open(full, "rb").read()
        path.write_bytes(data[: len(data) // 2])
    return str(path)


@pytest.mark.parametrize("kind", ["garbage", "empty", "truncated"])
def test_corrupt_image_error_names_file(tmp_path, cfg, kind):
    path = _corrupt(tmp_path, kind)
    # The independent reference: Detectron2's reader fails too (but not always naming it).
    with pytest.raises(Exception):
        d2utils.read_image(path, "BGR")
    with pytest.raises(ImageReadError, match=f"{kind}.jpg"):
        read_image(path, "BGR")
    mapper = HARNetDatasetMapper(cfg, is_train=True)
    with pytest.raises(OSError, match=f"{kind}.jpg"):
        mapper({"file_name": path, "annotations": []})


def test_missing_image_error_names_file(tmp_path, cfg):
    path = str(tmp_path / "nowhere" / "missing.png")
    with pytest.raises(FileNotFoundError, match="missing.png") as e:
        HARNetDatasetMapper(cfg, is_train=False)({"file_name": path})
    assert e.value.filename == path


# ---------------------------------------------------------------- boxes


def test_sanitize_annotations_cases():
    annos = [
        _anno([10, 10, 20, 20], cat=0),  # fine
        _anno([5, 5, 0, 10]),  # zero width
        _anno([5, 5, 10, -3]),  # negative height
        _anno([30, 30, 30, 30], mode=BoxMode.XYXY_ABS),  # a point
        _anno([float("nan"), 1, 3, 3]),  # non-finite
        _anno([1, 1, float("inf"), 3]),  # non-finite
        _anno([90, 50, 30, 30]),  # partly outside: clipped
        _anno([-10, -10, 30, 30]),  # partly outside: clipped
        _anno([200, 200, 5, 5]),  # entirely outside
        _anno([0, 0, 1000, 1000], iscrowd=1),  # crowd: left alone
    ]
    kept, counts = sanitize_annotations(annos, (80, 100), "img.png", num_classes=3)
    assert counts == {"non-finite": 2, "zero-area": 3, "outside": 1, "clipped": 2}
    assert len(kept) == 4
    assert kept[0]["bbox"] == [10, 10, 30, 30] and kept[0]["bbox_mode"] == BoxMode.XYXY_ABS
    assert kept[1]["bbox"] == [90, 50, 100, 80]
    assert kept[2]["bbox"] == [0, 0, 20, 20]
    assert kept[3] is annos[-1]
    assert annos[6]["bbox"] == [90, 50, 30, 30]  # input not modified


@pytest.mark.parametrize(
    "anno, match",
    [
        (_anno([1, 2, 3]), "bbox"),
        (_anno("abcd"), "bbox"),
        (_anno([1, 2, 3, 4], cat=3), "category_id 3"),
        (_anno([1, 2, 3, 4], cat=-1), "category_id -1"),
        (_anno([1, 2, 3, 4], mode=BoxMode.XYWHA_ABS), "bbox_mode"),
    ],
)
def test_malformed_annotation_error_names_file(anno, match):
    with pytest.raises(ValueError, match=rf"bad\.png.*{match}"):
        sanitize_annotations([anno], (80, 100), "bad.png", num_classes=3)


def test_mapper_logs_dropped_and_clipped_boxes(tmp_path, cfg, caplog):
    path = write_image(str(tmp_path / "boxes.png"), 100, 80)
    d = {
        "file_name": path, "height": 80, "width": 100,
        "annotations": [_anno([10, 10, 20, 20], 1), _anno([5, 5, 0, 10]), _anno([90, 50, 30, 30], 2),
                        _anno([float("nan"), 0, 1, 1])],
    }
    with caplog.at_level(logging.WARNING, logger="harnet.data.mapper"):
        out = HARNetDatasetMapper(cfg, is_train=True)(d)
    msg = caplog.text
    assert "boxes.png" in msg and "dropped 2 box(es) (1 non-finite, 1 zero-area)" in msg
    assert "clipped 1 box(es)" in msg
    inst = out["instances"]
    assert inst.gt_classes.tolist() == [1, 2]
    # Same result as Detectron2's mapper given only the valid, clipped boxes.
    ref = DatasetMapper(cfg, is_train=True)(dict(d, annotations=[
        _anno([10, 10, 30, 30], 1, BoxMode.XYXY_ABS), _anno([90, 50, 100, 80], 2, BoxMode.XYXY_ABS)]))
    torch.testing.assert_close(inst.gt_boxes.tensor, ref["instances"].gt_boxes.tensor)
    torch.testing.assert_close(out["image"], ref["image"])


def test_each_file_is_reported_once(tmp_path, cfg, caplog):
    path = write_image(str(tmp_path / "once.png"), 40, 40)
    d = {"file_name": path, "annotations": [_anno([1, 1, 10, 10]), _anno([1, 1, 0, 0])]}
    mapper = HARNetDatasetMapper(cfg, is_train=True)
    with caplog.at_level(logging.WARNING, logger="harnet.data.mapper"):
        for _ in range(3):
            mapper(d)
    assert caplog.text.count("once.png") == 1


# ---------------------------------------------------------------- empty images


def test_no_annotations_trains_with_empty_gt(tmp_path, cfg):
    path = write_image(str(tmp_path / "empty.png"), 40, 30)
    out = HARNetDatasetMapper(cfg, is_train=True)({"file_name": path, "annotations": []})
    assert len(out["instances"]) == 0


def test_all_boxes_invalid_trains_empty_in_mapper(tmp_path, cfg, caplog):
    path = write_image(str(tmp_path / "allbad.png"), 40, 30)
    d = {"file_name": path, "annotations": [_anno([1, 1, 0, 10]), _anno([100, 100, 5, 5])]}
    with caplog.at_level(logging.WARNING, logger="harnet.data.mapper"):
        out = HARNetDatasetMapper(cfg, is_train=True)(d)
    assert len(out["instances"]) == 0
    assert "allbad.png (40x30): dropped 2 box(es) (1 zero-area, 1 outside); no valid box" in caplog.text


def test_loader_filters_images_without_valid_boxes(tmp_path, cfg, caplog):
    good = write_image(str(tmp_path / "good.png"), 40, 30)
    bad = write_image(str(tmp_path / "allbad.png"), 40, 30, seed=1)
    dicts = [
        {"file_name": good, "height": 30, "width": 40, "image_id": 0, "annotations": [_anno([1, 1, 10, 10])]},
        {"file_name": bad, "height": 30, "width": 40, "image_id": 1,
         "annotations": [_anno([1, 1, 0, 10]), _anno([100, 100, 5, 5])]},
        {"file_name": bad, "height": 30, "width": 40, "image_id": 2, "annotations": []},
    ]
    name = "harnet_test_robust_allbad"
    if name in DatasetCatalog:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: dicts)
    MetadataCatalog.get(name).thing_classes = ["a", "b", "c"]
    c = cfg.clone()
    c.DATASETS.TRAIN = (name,)
    c.DATALOADER.FILTER_EMPTY_ANNOTATIONS = True
    with caplog.at_level(logging.INFO):
        loader = build_harnet_train_loader(c)
        batch = next(iter(loader))
    # Detectron2 removed the image without annotations, HARNet the one whose boxes are bad.
    assert "Removed 1 images with no usable annotations" in caplog.text
    assert "Removed 1 images whose box annotations are all invalid" in caplog.text
    assert "allbad.png" in caplog.text
    assert [b["image_id"] for b in batch] == [0, 0]
    # Without the filter all three images are used, two with empty ground truth.
    kept = filter_images_without_valid_boxes(dicts[:2])
    assert kept == dicts[:1]
    c.DATALOADER.FILTER_EMPTY_ANNOTATIONS = False
    c.SOLVER.IMS_PER_BATCH = 6
    batch = next(iter(build_harnet_train_loader(c)))
    assert sorted({b["image_id"] for b in batch}) == [0, 1, 2]
    assert all(len(b["instances"]) == 0 for b in batch if b["image_id"] != 0)


def test_loader_fails_early_on_malformed_annotation():
    dicts = [{"file_name": "x/broken.png", "annotations": [_anno([1, 2, 3, 4], cat=7)]}]
    with pytest.raises(ValueError, match="broken.png.*category_id 7"):
        filter_images_without_valid_boxes(dicts, num_classes=3)


# ---------------------------------------------------------------- sizes


def test_resize_to_empty_image_error_names_file(tmp_path, cfg):
    path = write_image(str(tmp_path / "sliver.png"), 3000, 1)  # 1 px high
    c = cfg.clone()
    c.INPUT.MIN_SIZE_TEST, c.INPUT.MAX_SIZE_TEST = 32, 40  # 32x96000 -> 0.01x40
    with pytest.raises(ValueError, match="sliver.png.*3000x1.*aspect ratio"):
        HARNetDatasetMapper(c, is_train=False)({"file_name": path})


def _model_cases(tmp_path):
    """Dataset dicts: tiny (20x20), extreme aspect (1000x40), grayscale, RGBA with no
    valid box."""
    gray = str(tmp_path / "gray.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 60), dtype=np.uint8)).save(gray)
    rgba = str(tmp_path / "rgba.png")
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (50, 60, 4), dtype=np.uint8)).save(rgba)
    return [
        {"file_name": write_image(str(tmp_path / "tiny.png"), 20, 20), "annotations": [_anno([2, 2, 10, 12])]},
        {"file_name": write_image(str(tmp_path / "wide.png"), 1000, 40),
         "annotations": [_anno([100, 5, 300, 30], 1), _anno([990, 0, 50, 50], 2)]},
        {"file_name": gray, "annotations": [_anno([5, 5, 20, 20], 2)]},
        {"file_name": rgba, "annotations": [_anno([5, 5, 0, 20], 2)]},  # all boxes invalid
    ]


@pytest.mark.parametrize("meta_arch", ["RetinaNet", "HARRetinaNet"])
def test_model_trains_and_infers_on_odd_images(tmp_path, meta_arch):
    cfg = tiny_cfg(meta_arch)
    cases = _model_cases(tmp_path)
    train_mapper = HARNetDatasetMapper(cfg, is_train=True)
    test_mapper = HARNetDatasetMapper(cfg, is_train=False)
    batch = [train_mapper(d) for d in cases]
    assert batch[0]["image"].shape[1:] == (32, 32)  # smaller than the P7 stride (128)
    assert len(batch[-1]["instances"]) == 0
    model = build_model(cfg)
    model.train()
    # (tiny, gray): two sizes padded together; wide; (rgba: empty gt, tiny)
    with EventStorage(0):
        for b in [[batch[0], batch[2]], batch[1:2], [batch[3], batch[0]]]:
            losses = model(b)
            total = sum(losses.values())
            assert torch.isfinite(total), (b[0]["file_name"], losses)
            total.backward()
    model.eval()
    with torch.no_grad():
        inputs = [test_mapper({"file_name": d["file_name"]}) for d in cases]
        outs = model(inputs)
    for d, o in zip(inputs, outs):
        inst = o["instances"]
        h, w = d["height"], d["width"]
        assert inst.image_size == (h, w)
        boxes = inst.pred_boxes.tensor
        assert torch.isfinite(boxes).all()
        assert (boxes[:, 0::2] <= w + 1e-3).all() and (boxes[:, 1::2] <= h + 1e-3).all()
