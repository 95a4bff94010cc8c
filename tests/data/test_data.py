"""harnet.data: the built-in shapes dataset and COCO-format registration.

Validity is checked with pycocotools and Detectron2's own loader/evaluator, not with the
generator's code; statistics are computed over rendered images.
"""

import contextlib
import io
import json
import logging
import multiprocessing
import os
import threading

import cv2
import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

import harnet  # noqa: F401  (registers the datasets)
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOEvaluator
from detectron2.structures import Boxes, BoxMode, Instances
from harnet_model_utils import write_coco
from harnet.data import (
    SHAPES_CLASSES,
    SHAPES_TRAIN,
    SHAPES_VAL,
    ShapesCacheError,
    ShapesSpec,
    check_dataset_files,
    check_shapes_cache,
    ensure_shapes,
    register_coco_format,
    register_default_shapes,
    register_shapes,
    register_shapes_from_cfg,
    shapes_cache_dir,
)
from harnet.data import shapes as shapes_mod
from harnet.data.shapes_render import render_image

N = 8  # images per generated test set


def _read_tree(folder):
    """{relative path: bytes} of every file under folder."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            path = os.path.join(dirpath, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, folder)] = fh.read()
    return out


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    spec = ShapesSpec(seed=3, num_images=N)
    root = str(tmp_path_factory.mktemp("shapes"))
    json_file, image_root = ensure_shapes(spec, root)
    return spec, root, json_file, image_root


def test_spec_rejects_bad_values_by_name():
    with pytest.raises(ValueError, match="seed"):
        ShapesSpec(seed=-1)
    with pytest.raises(ValueError, match="image_size"):
        ShapesSpec(image_size=(300, 200))
    with pytest.raises(ValueError, match="class_weights"):
        ShapesSpec(class_weights=(1.0, 2.0))
    with pytest.raises(ValueError, match="image_format"):
        ShapesSpec(image_format="gif")
    with pytest.raises(ValueError, match="object_size"):
        ShapesSpec(object_size=(2, 10))


def test_determinism_same_seed_identical_bytes(small_set, tmp_path):
    spec, root, _, _ = small_set
    again = ensure_shapes(spec, str(tmp_path / "again"))[0]
    first = _read_tree(shapes_cache_dir(spec, root))
    second = _read_tree(os.path.dirname(again))
    assert len(first) == N + 2  # images + annotations.json + MANIFEST.json
    assert first == second

    other = ShapesSpec(seed=4, num_images=N)
    third = _read_tree(os.path.dirname(ensure_shapes(other, str(tmp_path / "other"))[0]))
    assert third["annotations.json"] != first["annotations.json"]
    names = [k for k in first if k.startswith("images")]
    assert all(first[k] != third[k] for k in names)


def test_coco_format_valid_with_pycocotools(small_set):
    _, _, json_file, image_root = small_set
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(json_file)
    cat_ids = set(coco.getCatIds())
    assert [coco.cats[i]["name"] for i in sorted(cat_ids)] == list(SHAPES_CLASSES)
    assert len(coco.getImgIds()) == N
    ann_ids = [a["id"] for a in coco.dataset["annotations"]]
    assert len(ann_ids) == len(set(ann_ids))
    for img_id, img in coco.imgs.items():
        decoded = cv2.imread(os.path.join(image_root, img["file_name"]))
        assert decoded.shape[:2] == (img["height"], img["width"])
        anns = coco.imgToAnns[img_id]
        assert anns, "every image has at least one object"
        for a in anns:
            x, y, w, h = a["bbox"]
            assert a["category_id"] in cat_ids and a["iscrowd"] == 0
            assert w > 0 and h > 0 and x >= 0 and y >= 0
            assert x + w <= img["width"] and y + h <= img["height"]
            # area = visible pixel count: inside the box, and not a sliver of it
            assert 0.1 * w * h <= a["area"] <= w * h


def test_boxes_and_area_match_rendered_pixels(monkeypatch):
    """Black background, white object, no clutter: the box must be the tight box of the
    pixels >= 128 (coverage >= 0.5) and the area their count, including objects cut by
    the image border."""
    from harnet.data import shapes_render

    monkeypatch.setattr(
        shapes_render, "_background", lambda rng, h, w: np.zeros((h, w, 3), np.float32)
    )
    monkeypatch.setattr(
        shapes_render, "_fill", lambda rng, color, h, w: np.full((h, w, 3), 255, np.float32)
    )
    spec = ShapesSpec(
        seed=2,
        num_images=40,
        image_size=(96, 128),
        object_size=(8, 90),
        objects_per_image=(1, 1),
        distractors_per_image=(0, 0),
    )
    truncated = 0
    for i in range(spec.num_images):
        image, (ann,) = render_image(spec, i)
        ys, xs = np.nonzero(image[..., 0] >= 128)
        tight = [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert ann["bbox"] == tight and ann["area"] == len(xs)
        truncated += ann["visible_fraction"] < 1
    assert truncated > 0


def test_ground_truth_as_predictions_gives_ap_100(small_set, tmp_path):
    """Detectron2's COCOEvaluator (pycocotools) accepts the JSON: the ground truth itself,
    fed as detections, scores AP 100 at every scale with objects."""
    spec, root, json_file, image_root = small_set
    name = "harnet_test_shapes_eval"
    register_shapes(name, root, **vars(spec))
    try:
        dicts = DatasetCatalog.get(name)
        evaluator = COCOEvaluator(name, output_dir=str(tmp_path), use_fast_impl=False)
        evaluator.reset()
        for d in dicts:
            inst = Instances((d["height"], d["width"]))
            boxes = [
                BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS)
                for a in d["annotations"]
            ]
            inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
            inst.scores = torch.ones(len(boxes))
            inst.pred_classes = torch.tensor([a["category_id"] for a in d["annotations"]])
            evaluator.process([{"image_id": d["image_id"]}], [{"instances": inst}])
        with contextlib.redirect_stdout(io.StringIO()):
            results = evaluator.evaluate()["bbox"]
        assert results["AP"] == pytest.approx(100.0)
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_statistics_scales_imbalance_occlusion():
    """Default spec over 100 rendered images: scattered scales ~8..300 px, all COCO size
    buckets, varied aspect ratios, long-tailed classes, overlapping boxes."""
    spec = ShapesSpec(seed=11, num_images=100)
    boxes, classes, visible, overlapping_images = [], [], [], 0
    for i in range(spec.num_images):
        _, anns = render_image(spec, i)
        b = np.array([a["bbox"] for a in anns], dtype=np.float64)
        boxes.append(b)
        classes += [a["category_id"] for a in anns]
        visible += [a["visible_fraction"] for a in anns]
        xyxy = np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], 1)
        iw = np.minimum(xyxy[:, None, 2], xyxy[None, :, 2]) - np.maximum(
            xyxy[:, None, 0], xyxy[None, :, 0]
        )
        ih = np.minimum(xyxy[:, None, 3], xyxy[None, :, 3]) - np.maximum(
            xyxy[:, None, 1], xyxy[None, :, 1]
        )
        inter = (iw > 0) & (ih > 0)
        np.fill_diagonal(inter, False)
        overlapping_images += bool(inter.any())
    boxes = np.concatenate(boxes)
    longer = boxes[:, 2:].max(1)
    assert longer.min() <= 10 and longer.max() >= 250
    sqrt_area = np.sqrt(boxes[:, 2] * boxes[:, 3])
    for lo, hi in ((0, 32), (32, 96), (96, 1e9)):  # COCO small / medium / large
        assert ((sqrt_area >= lo) & (sqrt_area < hi)).mean() > 0.15
    aspect = boxes[:, 2] / boxes[:, 3]
    assert aspect.min() < 0.4 and aspect.max() > 2.5
    counts = np.bincount(classes, minlength=len(SHAPES_CLASSES) + 1)[1:]
    assert counts.min() > 0 and counts[0] > 4 * counts[-1]
    assert overlapping_images > 0.5 * spec.num_images
    visible = np.array(visible)
    assert visible.min() >= spec.min_visible_fraction and (visible < 0.9).mean() > 0.05


def test_builtin_names_registered_cheaply_and_load_from_cfg(tmp_path):
    assert {SHAPES_TRAIN, SHAPES_VAL} <= set(DatasetCatalog.list())
    assert MetadataCatalog.get(SHAPES_TRAIN).thing_classes == list(SHAPES_CLASSES)
    cfg = get_cfg()
    harnet.add_harnet_config(cfg)
    cfg.DATASETS.SHAPES.ROOT = str(tmp_path)
    cfg.DATASETS.SHAPES.NUM_TRAIN, cfg.DATASETS.SHAPES.NUM_VAL = 6, 4
    cfg.DATASETS.SHAPES.IMAGE_SIZE = (128, 160)
    cfg.DATASETS.SHAPES.OBJECT_SIZE = (8, 100)
    try:
        assert register_shapes_from_cfg(cfg) == [SHAPES_TRAIN, SHAPES_VAL]
        assert os.listdir(tmp_path) == []  # registration generates nothing
        train, val = DatasetCatalog.get(SHAPES_TRAIN), DatasetCatalog.get(SHAPES_VAL)
        assert len(train) == 6 and len(val) == 4
        assert {d["file_name"] for d in train}.isdisjoint({d["file_name"] for d in val})
        for d in train:
            assert 128 <= d["height"] <= 160 and 128 <= d["width"] <= 160
            assert d["annotations"] and os.path.isfile(d["file_name"])
            for a in d["annotations"]:
                assert a["bbox_mode"] == BoxMode.XYWH_ABS and 0 <= a["category_id"] < 6
        meta = MetadataCatalog.get(SHAPES_TRAIN)
        assert meta.evaluator_type == "coco" and os.path.isfile(meta.json_file)
        check_dataset_files([SHAPES_TRAIN, SHAPES_VAL])
    finally:
        register_default_shapes()
    assert MetadataCatalog.get(SHAPES_TRAIN).harnet_shapes["num_images"] == 1000


def test_register_shapes_refuses_to_replace_other_datasets():
    with pytest.raises(ValueError, match="coco_2017_val"):
        register_shapes("coco_2017_val")


@pytest.mark.parametrize("with_lock", [True, False])
def test_concurrent_generation_yields_one_valid_cache(tmp_path, monkeypatch, with_lock):
    """Two workers at once: with the file lock one waits for the other; without it (file
    systems without working locks) both generate and the atomic rename keeps one."""
    if not with_lock:
        monkeypatch.setattr(shapes_mod, "file_lock", lambda path: contextlib.nullcontext())
    spec = ShapesSpec(seed=5, num_images=6, image_size=(96, 128), object_size=(8, 64))
    root = str(tmp_path)
    barrier, results, errors, generated = threading.Barrier(2), [], [], []
    generate = shapes_mod._generate
    monkeypatch.setattr(shapes_mod, "_generate", lambda *a: generated.append(1) or generate(*a))

    def work():
        try:
            barrier.wait()
            results.append(ensure_shapes(spec, root))
        except Exception as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert results[0] == results[1]
    assert len(generated) == (1 if with_lock else 2)
    cache = shapes_cache_dir(spec, root)
    check_shapes_cache(cache, spec)
    assert [p for p in os.listdir(root) if not p.endswith(".lock")] == [os.path.basename(cache)]


def _ensure_in_child(spec, root, queue):
    queue.put(("result", ensure_shapes(spec, root)))


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_concurrent_generation_in_two_processes(tmp_path, monkeypatch):
    ctx = multiprocessing.get_context("fork")  # children inherit the imports: no start-up cost
    queue = ctx.Queue()
    generate = shapes_mod._generate
    monkeypatch.setattr(
        shapes_mod, "_generate", lambda *a: queue.put(("generated", None)) or generate(*a)
    )
    spec = ShapesSpec(seed=6, num_images=6, image_size=(96, 128), object_size=(8, 64))
    procs = [
        ctx.Process(target=_ensure_in_child, args=(spec, str(tmp_path), queue)) for _ in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    messages = [queue.get(timeout=10) for _ in range(3)]
    assert sorted(kind for kind, _ in messages) == ["generated", "result", "result"]
    results = [value for kind, value in messages if kind == "result"]
    assert results[0] == results[1]
    check_shapes_cache(shapes_cache_dir(spec, str(tmp_path)), spec)
    assert [p for p in os.listdir(tmp_path) if not p.endswith(".lock")] == [
        os.path.basename(shapes_cache_dir(spec, str(tmp_path)))
    ]


def test_corrupt_cache_detected_and_regenerated(tmp_path, caplog):
    spec = ShapesSpec(seed=3, num_images=N)
    root = str(tmp_path)
    json_file, image_root = ensure_shapes(spec, root)
    cache = os.path.dirname(json_file)
    reference = _read_tree(cache)

    with open(json_file, "r+b") as f:  # truncated JSON
        f.truncate(100)
    with pytest.raises(ShapesCacheError, match=json_file):
        check_shapes_cache(cache, spec)
    with caplog.at_level(logging.WARNING, logger="harnet.data.shapes"):
        ensure_shapes(spec, root)
    assert json_file in caplog.text
    assert _read_tree(cache) == reference

    image = os.path.join(image_root, sorted(os.listdir(image_root))[2])
    os.remove(image)
    with pytest.raises(ShapesCacheError, match=image):
        check_shapes_cache(cache, spec)
    with open(os.path.join(cache, "MANIFEST.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(ShapesCacheError, match="MANIFEST.json"):
        check_shapes_cache(cache, spec)
    ensure_shapes(spec, root)
    assert _read_tree(cache) == reference
    with pytest.raises(ShapesCacheError, match="another spec"):
        check_shapes_cache(cache, ShapesSpec(seed=3, num_images=N, occlusion_prob=0.1))


def _write_tiny_coco(folder):
    """3 images, non-contiguous category ids, written by the test itself."""
    rng = np.random.default_rng(0)
    images = [
        (
            f"im{i}.png",
            rng.integers(0, 255, (40, 60, 3), dtype=np.uint8),
            [((5.0 * k, 4.0, 12.0, 9.0), (3, 7)[k % 2]) for k in range(i + 1)],
        )
        for i in range(3)
    ]
    return write_coco(
        folder, images, [(3, "cat"), (7, "dog")], json_name="instances.json", image_dir="imgs"
    )


def test_register_coco_format_roundtrip_and_errors(tmp_path):
    json_file, image_root = _write_tiny_coco(tmp_path)
    name = "harnet_test_tiny_coco"
    try:
        register_coco_format(name, json_file, image_root)
        dicts = DatasetCatalog.get(name)
        assert [len(d["annotations"]) for d in dicts] == [1, 2, 3]
        assert {a["category_id"] for d in dicts for a in d["annotations"]} == {0, 1}
        meta = MetadataCatalog.get(name)
        assert meta.thing_classes == ["cat", "dog"] and meta.evaluator_type == "coco"
        assert meta.thing_dataset_id_to_contiguous_id == {3: 0, 7: 1}
        check_dataset_files([name])
        with pytest.raises(ValueError, match="already registered"):
            register_coco_format(name, json_file, image_root)

        os.remove(os.path.join(image_root, "im1.png"))
        with pytest.raises(FileNotFoundError, match="im1.png"):
            DatasetCatalog.get(name)
        with open(json_file, "w") as f:
            f.write('{"images": [')
        with pytest.raises(ValueError, match="instances.json"):
            DatasetCatalog.get(name)
        os.remove(json_file)
        with pytest.raises(FileNotFoundError, match="instances.json"):
            check_dataset_files([name])
    finally:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)

    missing = str(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        register_coco_format("harnet_test_missing", missing, image_root)
    other_json = tmp_path / "other.json"
    other_json.write_text("{}")
    with pytest.raises(FileNotFoundError, match="no_images"):
        register_coco_format("harnet_test_missing", str(other_json), str(tmp_path / "no_images"))
    assert "harnet_test_missing" not in DatasetCatalog.list()


def test_check_dataset_files_names_missing_builtin_and_unknown():
    json_file = MetadataCatalog.get("coco_2017_val").json_file
    if os.path.exists(json_file):
        pytest.skip("COCO is installed here")
    with pytest.raises(FileNotFoundError, match="instances_val2017.json.*DETECTRON2_DATASETS"):
        check_dataset_files(["coco_2017_val"])
    with pytest.raises(KeyError, match="no_such_dataset"):
        check_dataset_files(["no_such_dataset"])
