"""tools/visualize.py: one readable picture per image (ground truth beside the detections
for a dataset, detections alone for --input images); on bad input: a folder with a
corrupt image (the others are drawn, the failure is listed, exit status 1), a dataset with
fewer class names than the model (labels by class index, the mismatch named), and a
config whose training/test datasets do not exist here (not needed to draw given images)."""
from harnet_model_utils import REPO
import json
import logging
import os

import cv2
import numpy as np
import pytest

import harnet  # noqa: F401
from harnet.engine.visualize_command import main as vis_main

ROOT = REPO


DEMO_YAML = os.path.join(ROOT, "configs", "HARNet", "demo", "har_R18_shapes_demo.yaml")
# An untrained small model on 64 px inputs; every candidate drawn.
OPTS = ["MODEL.WEIGHTS", "", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
        "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0", "MODEL.RETINANET.TOPK_CANDIDATES_TEST", "50",
        "TEST.DETECTIONS_PER_IMAGE", "30"]


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.RandomState(0)
    for name in ("a.png", "c.png"):
        cv2.imwrite(str(folder / name), rng.randint(0, 255, (48, 64, 3)).astype(np.uint8))
    (folder / "b.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return folder


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _run(argv):
    rec = _Records()
    log = logging.getLogger("harnet.engine.visualization")
    log.addHandler(rec)
    try:
        return vis_main(argv), rec.messages
    finally:
        log.removeHandler(rec)


def test_folder_with_a_corrupt_image(tmp_path, images):
    # Before: stopped at b.jpg (c.png never drawn), with a traceback.
    out = tmp_path / "vis"
    status, messages = _run(["--config-file", DEMO_YAML, "--input", str(images),
                             "--output", str(out), "--score-thresh", "0.0"] + OPTS)
    assert status == 1
    names = sorted(os.listdir(out))
    assert names == ["a_vis.png", "c_vis.png"], names
    # 48x64 images drawn 7.5x (480 px long side), no ground truth (plain images): one
    # panel wide; the attention rows below.
    pic = cv2.imread(str(out / "a_vis.png"))
    assert pic.shape[1] == 480 and pic.shape[0] > 27 + 360 + 8, pic.shape
    summary = [m for m in messages if "could not be drawn" in m]
    assert len(summary) == 1 and str(images / "b.jpg") in summary[0], messages


def test_fewer_class_names_than_model_classes_and_unused_datasets(tmp_path, images):
    # The demo's test set names 6 classes; the model predicts 9. Before: IndexError in
    # Detectron2's Visualizer. The config's datasets (COCO, not here) are not needed to
    # draw given images; before: FileNotFoundError for coco_2017_train.
    os.remove(images / "b.jpg")
    out = tmp_path / "vis"
    status, messages = _run(["--config-file", DEMO_YAML, "--input", str(images),
                             "--output", str(out), "--score-thresh", "0.0"] + OPTS
                            + ["MODEL.RETINANET.NUM_CLASSES", "9",
                               "DATASETS.TRAIN", "('coco_2017_train',)",
                               "DATASETS.TEST", "('harnet_shapes_val',)"])
    assert status == 0
    assert sorted(os.listdir(out)) == ["a_vis.png", "c_vis.png"]
    assert any("6 class names" in m and "predicts 9" in m for m in messages), messages


def test_missing_dataset_to_draw_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="coco_2017_val"):
        vis_main(["--config-file", DEMO_YAML, "--dataset", "coco_2017_val",
                  "--output", str(tmp_path / "vis")] + OPTS)


def test_dataset_pictures_show_ground_truth_beside_detections(tmp_path, images):
    # A COCO-format dataset of one 48x64 image with one box (x 16-40, y 8-32, class
    # "thing"). --score-thresh 1.0: no detection is drawn, so the right panel is the plain
    # upscaled image and the left one differs from it exactly at the ground-truth box.
    ann = {"images": [{"id": 1, "file_name": "a.png", "height": 48, "width": 64}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [16, 8, 24, 24],
                            "area": 576, "iscrowd": 0}],
           "categories": [{"id": 1, "name": "thing"}]}
    json_file = tmp_path / "ann.json"
    json_file.write_text(json.dumps(ann))
    out = tmp_path / "vis"
    status, _ = _run(["--config-file", DEMO_YAML, "--register-coco", "_vis_test", str(json_file),
                      str(images), "--dataset", "_vis_test", "--output", str(out),
                      "--score-thresh", "1.0", "--long-side", "384"] + OPTS
                     + ["MODEL.RETINANET.NUM_CLASSES", "1"])
    assert status == 0 and os.listdir(out) == ["a_vis.png"]
    pic = cv2.imread(str(out / "a_vis.png")).astype(int)
    scale, bar, w = 6, 27, 384  # 64 px -> 384 px; 27 px title bars
    assert pic.shape[1] == 2 * w + 8 and pic.shape[0] > bar + 288, pic.shape
    left, right = pic[bar:bar + 288, :w], pic[bar:bar + 288, w + 8:2 * w + 8]
    diff = np.abs(left - right).max(axis=2)
    # The box's top edge (y = 8 -> 48 px) differs; far from the box and its label, equal.
    assert diff[48, 28 * scale] > 30
    assert diff[260:, :60].max() == 0 and diff[:30, 300:].max() == 0
