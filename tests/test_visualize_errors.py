"""tools/visualize.py on bad input: a folder with a corrupt image (the others are drawn, the
failure is listed, exit status 1), a dataset with fewer class names than the model
(labels by class index, the mismatch named), and a config whose training/test datasets
do not exist here (not needed to draw given images)."""
import logging
import os

import cv2
import numpy as np
import pytest

import harnet  # noqa: F401
from harnet.engine.visualization import main as vis_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
    assert names == ["a_attention.png", "a_detections.png", "c_attention.png",
                     "c_detections.png"], names
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
    assert len(os.listdir(out)) == 4
    assert any("6 class names" in m and "predicts 9" in m for m in messages), messages


def test_missing_dataset_to_draw_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="coco_2017_val"):
        vis_main(["--config-file", DEMO_YAML, "--dataset", "coco_2017_val",
                  "--output", str(tmp_path / "vis")] + OPTS)
