#!/usr/bin/env python
"""COCO box AP of a run's detections with classes ignored: every detection and every
ground-truth box is given one category, so the AP measures finding and placing objects
only. Against the usual (per-class) AP it tells localisation from classification.

    python tools/class_agnostic_ap.py output/demo --config-file configs/HARNet/demo/har_R18_shapes_demo.yaml
    python tools/class_agnostic_ap.py dets.json --gt annotations.json

RUN is a training / evaluation OUTPUT_DIR (its ``inference/coco_instances_results.json``,
written by Detectron2's COCOEvaluator) or such a JSON file. The ground truth is ``--gt``
(a COCO JSON), or the ``json_file`` of the config's first test dataset (``--config-file``
plus ``KEY VALUE`` overrides, the datasets registered as train_net.py does).
"""
import argparse
import contextlib
import io
import json
import os
import sys

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

__all__ = ["class_agnostic_ap"]

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # pycocotools' first six stats


def class_agnostic_ap(gt: dict, detections: list) -> dict:
    """COCO box AP (%) of ``detections`` against ``gt`` with every category merged into one.

    Args:
        gt (dict): a COCO ground-truth dataset (images, annotations, categories).
        detections (list[dict]): COCO results (image_id, category_id, bbox XYWH, score).

    Returns:
        dict: AP, AP50, AP75, APs, APm, APl (%), pycocotools' values (-100: no such boxes).
    """
    if not detections:  # pycocotools cannot load an empty result list
        return dict.fromkeys(METRICS, 0.0)
    gt = dict(gt, categories=[{"id": 1, "name": "object"}],
              annotations=[dict(a, category_id=1) for a in gt["annotations"]])
    detections = [dict(d, category_id=1) for d in detections]
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(detections), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return dict(zip(METRICS, (100 * v for v in ev.stats[:6])))


def _gt_path(args) -> str:
    if args.gt:
        return args.gt
    if not args.config_file:
        sys.exit("class_agnostic_ap: give --gt GT.json or --config-file CFG")
    from detectron2.data import MetadataCatalog

    from harnet.engine.defaults import argument_parser, build_config

    cfg = build_config(argument_parser().parse_args(["--config-file", args.config_file, *args.opts]))
    name = cfg.DATASETS.TEST[0]
    path = MetadataCatalog.get(name).get("json_file")
    if not path:
        sys.exit(f"class_agnostic_ap: test dataset {name!r} has no json_file; pass --gt")
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="OUTPUT_DIR of a run, or a COCO results JSON")
    p.add_argument("--gt", help="COCO ground-truth JSON")
    p.add_argument("--config-file", help="config whose first DATASETS.TEST is the ground truth")
    p.add_argument("opts", nargs="*", help="KEY VALUE overrides of the config")
    args = p.parse_args(argv)
    dets = args.run
    if os.path.isdir(dets):
        dets = os.path.join(dets, "inference", "coco_instances_results.json")
    gt_path = _gt_path(args)
    for path, what in ((dets, "detections"), (gt_path, "ground truth")):
        if not os.path.isfile(path):
            sys.exit(f"class_agnostic_ap: {what} file {path} does not exist")
    with open(gt_path) as f:
        gt = json.load(f)
    with open(dets) as f:
        res = class_agnostic_ap(gt, json.load(f))
    print("class-agnostic COCO box AP (%): " + ", ".join(f"{k} {v:.2f}" for k, v in res.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
