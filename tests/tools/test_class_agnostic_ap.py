"""tools/class_agnostic_ap.py: AP with classes ignored, against pycocotools' own per-class
evaluation on hand-built cases."""
import pytest

from harnet_model_utils import pycocotools_box_ap

from harnet.commands import class_agnostic_ap as tool


def _gt():
    return {
        "images": [{"id": 1, "width": 100, "height": 100}, {"id": 2, "width": 100, "height": 100}],
        "categories": [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "area": 1600, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [60, 60, 30, 30], "area": 900, "iscrowd": 0},
            {"id": 3, "image_id": 2, "category_id": 2, "bbox": [20, 30, 50, 40], "area": 2000, "iscrowd": 0},
        ],
    }


def test_perfect_boxes_with_wrong_classes_are_found_class_agnostic():
    gt = _gt()
    # Every box exact, every class wrong: per-class AP 0, class-agnostic AP 100.
    dets = [{"image_id": a["image_id"], "category_id": 3 - a["category_id"], "bbox": a["bbox"],
             "score": 0.9} for a in gt["annotations"]]
    assert pycocotools_box_ap(gt, dets)["AP"] == pytest.approx(0.0)
    res = tool.class_agnostic_ap(gt, dets)
    assert res["AP"] == pytest.approx(100.0) and res["AP50"] == pytest.approx(100.0)
    assert gt["annotations"][0]["category_id"] == 1  # the caller's ground truth is untouched


def test_equals_single_class_evaluation_and_handles_no_detections():
    gt = _gt()
    dets = [{"image_id": 1, "category_id": 2, "bbox": [12, 10, 40, 40], "score": 0.8},
            {"image_id": 1, "category_id": 1, "bbox": [0, 0, 20, 20], "score": 0.7},
            {"image_id": 2, "category_id": 1, "bbox": [20, 35, 50, 40], "score": 0.6}]
    one = dict(gt, categories=[{"id": 1, "name": "x"}],
               annotations=[dict(a, category_id=1) for a in gt["annotations"]])
    expected = pycocotools_box_ap(one, [dict(d, category_id=1) for d in dets])["AP"]
    assert tool.class_agnostic_ap(gt, dets)["AP"] == pytest.approx(expected)
    assert 0 < expected < 100
    assert tool.class_agnostic_ap(gt, [])["AP"] == 0.0


def test_missing_files_are_named(tmp_path):
    with pytest.raises(SystemExit, match="detections file .*nope"):
        tool.main([str(tmp_path / "nope.json"), "--gt", str(tmp_path / "gt.json")])
