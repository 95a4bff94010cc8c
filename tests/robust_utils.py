"""Helpers shared by the robustness tests (test_robust_data, test_faults): tiny configs,
tiny images and a tiny registered dataset."""
import json
import os

import numpy as np
from PIL import Image

from detectron2.config import get_cfg
from detectron2.modeling import META_ARCH_REGISTRY

import harnet


def has_harretinanet():
    return "HARRetinaNet" in META_ARCH_REGISTRY


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO, "configs", "HARNet")


def tiny_cfg(meta_arch="RetinaNet", num_classes=3, config_file="Base-HARNet.yaml"):
    """A CPU-sized config: R-18, 32-channel FPN, one tower conv, 32-px images.

    ``meta_arch="RetinaNet"`` is Detectron2's RetinaNet (its backbone builder);
    ``"HARRetinaNet"`` loads ``configs/HARNet/<config_file>`` (full hybrid by default).
    """
    cfg = get_cfg()
    harnet.add_harnet_config(cfg)
    if meta_arch == "HARRetinaNet":
        cfg.merge_from_file(os.path.join(CONFIG_DIR, config_file))
        h = cfg.MODEL.HARNET
        h.ALIGN.MID_CHANNELS = [32]
        h.ALIGN.NORM_GROUPS = 8
        h.CLGN.NUM_GROUPS = 8
        h.SPATIAL.CHANNELS = 8
        h.CHANNEL.HIDDEN = 8
    else:
        cfg.MODEL.META_ARCHITECTURE = meta_arch
        cfg.MODEL.BACKBONE.NAME = "build_retinanet_resnet_fpn_backbone"
        cfg.MODEL.RESNETS.OUT_FEATURES = ["res3", "res4", "res5"]
        cfg.MODEL.FPN.IN_FEATURES = ["res3", "res4", "res5"]
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = 16
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    cfg.MODEL.RETINANET.NUM_CONVS = 1
    cfg.MODEL.RETINANET.NUM_CLASSES = num_classes
    cfg.INPUT.MIN_SIZE_TRAIN = (32,)
    cfg.INPUT.MAX_SIZE_TRAIN = 1000
    cfg.INPUT.MIN_SIZE_TEST = 32
    cfg.INPUT.MAX_SIZE_TEST = 1000
    cfg.INPUT.RANDOM_FLIP = "none"
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.SOLVER.BASE_LR = 0.01
    cfg.DATALOADER.NUM_WORKERS = 0
    return cfg


def write_image(path, width, height, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    if mode in ("L", "P", "1"):
        arr = rng.integers(0, 256, (height, width), dtype=np.uint8)
        img = Image.fromarray(arr, mode="L").convert(mode)
    else:
        arr = rng.integers(0, 256, (height, width, len(mode)), dtype=np.uint8)
        img = Image.fromarray(arr[..., :3], mode="RGB").convert(mode) if mode != "RGB" else (
            Image.fromarray(arr, mode="RGB"))
    img.save(path)
    return path


def write_coco_dataset(root, n_images=4, size=(64, 48), num_classes=3, seed=0):
    """A tiny COCO-format dataset (JSON + PNGs) with one or two boxes per image."""
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = size
    images, annos = [], []
    for i in range(n_images):
        name = f"{i:03d}.png"
        write_image(os.path.join(root, "images", name), w, h, seed=seed + i)
        images.append({"id": i + 1, "file_name": name, "width": w, "height": h})
        for j in range(1 + i % 2):
            bw, bh = rng.uniform(8, w / 2), rng.uniform(8, h / 2)
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            annos.append({
                "id": len(annos) + 1, "image_id": i + 1, "category_id": int(rng.integers(1, num_classes + 1)),
                "bbox": [float(x), float(y), float(bw), float(bh)], "area": float(bw * bh), "iscrowd": 0,
            })
    cats = [{"id": c + 1, "name": f"c{c}"} for c in range(num_classes)]
    path = os.path.join(root, "annotations.json")
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": annos, "categories": cats}, f)
    return path, os.path.join(root, "images")
