"""The helpers shared by the tests (one home): tiny configs and inputs (ResNet-18, 32-channel
FPN, images of 32-128 px) so every variant builds and runs in well under a second on a CPU,
the dotted-key config setter, tiny image files and a tiny COCO-format dataset."""

import contextlib
import json
import os
import warnings

import numpy as np
import yaml
import torch
from PIL import Image

from detectron2.config import CfgNode, get_cfg
from detectron2.structures import Boxes, Instances

import harnet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO, "configs", "HARNet")
DEMO_YAML = os.path.join(CONFIG_DIR, "demo", "har_R18_shapes_demo.yaml")

SWITCHES = ("ALIGN", "CLGN", "SPATIAL", "CHANNEL")
# The project's own code: a warning raised from here on a user's main path is our bug.
OWN_CODE = (os.path.join(REPO, "projects") + os.sep, os.path.join(REPO, "tools") + os.sep,
            os.path.join(REPO, "train_net.py"))


@contextlib.contextmanager
def no_own_warnings():
    """Fails when a warning whose location is the project's own code is raised inside the
    block (every warning is recorded, whatever the pytest filters)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    own = [f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}" for w in caught
           if os.path.abspath(w.filename).startswith(OWN_CODE)]
    assert not own, "\n".join(own)


# The one tiny model of the tests: ResNet-18 with a 16-channel stem, 32-channel FPN, one
# conv per head tower, narrow attention blocks. Yaml so that tests of the train_net path can
# write it into a config file; tiny_cfg / make_tiny merge the same text.
TINY_MODEL_YAML = """
MODEL:
  DEVICE: "cpu"
  WEIGHTS: ""
  RESNETS: {DEPTH: 18, RES2_OUT_CHANNELS: 64, STEM_OUT_CHANNELS: 16}
  FPN: {OUT_CHANNELS: 32}
  RETINANET: {NUM_CONVS: 1, NUM_CLASSES: 3}
  HARNET:
    ALIGN: {MID_CHANNELS: [32], NORM_GROUPS: 8}
    CLGN: {NUM_GROUPS: 8}
    SPATIAL: {CHANNELS: 8}
    CHANNEL: {HIDDEN: 8}
"""


def _merge_tiny_model(cfg):
    tiny = CfgNode(yaml.safe_load(TINY_MODEL_YAML))
    if "HARNET" not in cfg.MODEL:
        del tiny.MODEL["HARNET"]
    cfg.merge_from_other_cfg(tiny)
    return cfg


def make_tiny(cfg):
    """Shrink a (HARNet or RetinaNet) config in place to the tiny model, keeping Detectron2's
    stem and 4-conv head towers (the tests that compare against Detectron2's RetinaNet use
    perturbed weights, with which the 1-conv towers regress boxes off the image), and with
    test-time settings under which a randomly initialised model still detects something."""
    _merge_tiny_model(cfg)
    cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = 64
    cfg.MODEL.RETINANET.NUM_CONVS = 4
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = 0.0
    cfg.MODEL.RETINANET.TOPK_CANDIDATES_TEST = 30
    cfg.TEST.DETECTIONS_PER_IMAGE = 20
    return cfg


def har_cfg(config_file="Base-HARNet.yaml", tiny=True, **switches):
    """A HARNet config from configs/HARNet; switches e.g. ALIGN=False set *.ENABLED."""
    cfg = get_cfg()
    harnet.add_harnet_config(cfg)
    cfg.merge_from_file(os.path.join(CONFIG_DIR, config_file))
    for name, value in switches.items():
        cfg.MODEL.HARNET[name].ENABLED = value
    if tiny:
        make_tiny(cfg)
    return cfg


def retinanet_cfg():
    """Detectron2's own RetinaNet (model-zoo Base-RetinaNet.yaml), tiny."""
    from detectron2 import model_zoo

    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file("Base-RetinaNet.yaml"))
    return make_tiny(cfg)


def all_off(cfg):
    for name in SWITCHES:
        cfg.MODEL.HARNET[name].ENABLED = False
    return cfg


def make_inputs(with_instances=True, sizes=((96, 128), (40, 52)), output_sizes=None):
    """Two images of different sizes (the batch pads to 128x128, so P7 is 1x1 and the small
    image covers a corner of it), each with two boxes."""
    g = torch.Generator().manual_seed(1)
    inputs = []
    for i, (h, w) in enumerate(sizes):
        d = {"image": torch.rand(3, h, w, generator=g) * 255}
        if output_sizes is not None:
            d["height"], d["width"] = output_sizes[i]
        if with_instances:
            boxes = torch.tensor(
                [[2.0, 3.0, w * 0.6, h * 0.7], [w * 0.3, h * 0.2, w - 1.0, h - 2.0]]
            )
            d["instances"] = Instances(
                (h, w), gt_boxes=Boxes(boxes), gt_classes=torch.tensor([i % 3, 2])
            )
        inputs.append(d)
    return inputs


def perturb_(model, scale=0.05, seed=0):
    """Add noise to every parameter (in place; buffers such as frozen-BN statistics are left
    alone) so that outputs are not those of the symmetric initialisation: relative to the
    tensor's spread, or absolute for constant-initialised ones (biases, norms, the aligned
    blocks' zero offsets). Returns the model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            spread = p.std().item() if p.numel() > 1 else 0.0
            p.add_(torch.randn(p.shape, generator=g) * scale * (spread if spread > 0 else 1.0))
    return model


def instances_equal(a, b, exact=True, atol=1e-5):
    if len(a) != len(b):
        return False
    pairs = [
        (a.pred_boxes.tensor, b.pred_boxes.tensor),
        (a.scores, b.scores),
        (a.pred_classes, b.pred_classes),
    ]
    if exact:
        return all(torch.equal(x, y) for x, y in pairs)
    return all(torch.allclose(x.float(), y.float(), atol=atol, rtol=1e-5) for x, y in pairs)


def single_thread():
    """Generator for a module-scoped fixture: the tiny models here run several times faster
    on one intra-op thread than on two (thread synchronisation dominates their small
    convolutions, badly so on a busy machine); restores the previous setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def set_keys(cfg, **changes):
    """A clone of ``cfg`` with dotted keys set: ``set_keys(cfg, **{"MODEL.RETINANET.NORM": "GN"})``."""
    cfg = cfg.clone()
    cfg.defrost()
    for key, value in changes.items():
        node = cfg
        *path, leaf = key.split(".")
        for p in path:
            node = node[p]
        node[leaf] = value
    return cfg


def tiny_cfg(meta_arch="RetinaNet", num_classes=3, config_file="Base-HARNet.yaml"):
    """A CPU-sized config: R-18, 32-channel FPN, one tower conv, 32-px images.

    ``meta_arch="RetinaNet"`` is Detectron2's RetinaNet (its backbone builder);
    ``"HARRetinaNet"`` loads ``configs/HARNet/<config_file>`` (full hybrid by default).
    """
    cfg = get_cfg()
    harnet.add_harnet_config(cfg)
    if meta_arch == "HARRetinaNet":
        cfg.merge_from_file(os.path.join(CONFIG_DIR, config_file))
    else:
        cfg.MODEL.META_ARCHITECTURE = meta_arch
        cfg.MODEL.BACKBONE.NAME = "build_retinanet_resnet_fpn_backbone"
        cfg.MODEL.RESNETS.OUT_FEATURES = ["res3", "res4", "res5"]
        cfg.MODEL.FPN.IN_FEATURES = ["res3", "res4", "res5"]
    _merge_tiny_model(cfg)
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


def write_coco(folder, images, categories, json_name="annotations.json", image_dir="images"):
    """Write a COCO-format dataset: each image file and one JSON (the one COCO writer).

    Args:
        folder: where ``json_name`` and ``image_dir/`` go.
        images: list of ``(file_name, HxWx3 uint8 array or None, [(xywh, category_id), ...])``;
            ``None`` writes no file (an image entry whose file is missing), size (64, 48).
        categories: list of ``(id, name)``.

    Returns:
        (json path, image folder), as strings.
    """
    folder = str(folder)
    root = os.path.join(folder, image_dir)
    os.makedirs(root, exist_ok=True)
    entries, annotations = [], []
    for i, (name, pixels, boxes) in enumerate(images):
        h, w = pixels.shape[:2] if pixels is not None else (48, 64)
        if pixels is not None:
            Image.fromarray(np.ascontiguousarray(pixels)).save(os.path.join(root, name))
        entries.append({"id": i + 1, "file_name": name, "width": int(w), "height": int(h)})
        for (x, y, bw, bh), cat in boxes:
            annotations.append({
                "id": len(annotations) + 1, "image_id": i + 1, "category_id": int(cat),
                "bbox": [float(x), float(y), float(bw), float(bh)], "area": float(bw * bh),
                "iscrowd": 0,
            })  # fmt: skip
    path = os.path.join(folder, json_name)
    with open(path, "w") as f:
        json.dump(
            {
                "images": entries,
                "annotations": annotations,
                "categories": [{"id": c, "name": n} for c, n in categories],
            },
            f,
        )
    return path, root


def write_coco_dataset(root, n_images=4, size=(64, 48), num_classes=3, seed=0):
    """A tiny COCO-format dataset (JSON + PNGs of noise) with one or two boxes per image."""
    rng = np.random.default_rng(seed)
    w, h = size
    images = []
    for i in range(n_images):
        pixels = np.random.default_rng(seed + i).integers(0, 256, (h, w, 3), dtype=np.uint8)
        boxes = []
        for _ in range(1 + i % 2):
            bw, bh = rng.uniform(8, w / 2), rng.uniform(8, h / 2)
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            boxes.append(((x, y, bw, bh), int(rng.integers(1, num_classes + 1))))
        images.append((f"{i:03d}.png", pixels, boxes))
    return write_coco(root, images, [(c + 1, f"c{c}") for c in range(num_classes)])


def losses_of(models, inputs):
    """Each model's training losses on (a copy of) the same inputs, in an EventStorage."""
    import copy

    from detectron2.utils.events import EventStorage

    losses = []
    for m in models:
        m.train()
        with EventStorage():
            losses.append(m(copy.deepcopy(inputs)))
    return losses


COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def iou_by_definition(a, b):
    """IoU of two XYXY boxes (sequences of 4 numbers), written from the definition: the
    slow reference for the tensor ops; 0 for an empty union."""
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(
        0.0, min(a[3], b[3]) - max(a[1], b[1])
    )
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def pycocotools_box_ap(gt, detections):
    """COCO box AP (%) by pycocotools itself, the reference for our evaluations.

    Args:
        gt: a COCO ground-truth JSON path or dataset dict.
        detections: a COCO results JSON path or list of result dicts (non-empty).

    Returns:
        dict: COCO_METRICS -> value (%), NaN where pycocotools reports -1 (no such boxes).
    """
    import contextlib
    import io
    import math

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        if isinstance(gt, dict):
            coco = COCO()
            coco.dataset = gt
            coco.createIndex()
        else:
            coco = COCO(gt)
        ev = COCOeval(coco, coco.loadRes(detections), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return dict(zip(COCO_METRICS, (100 * s if s >= 0 else math.nan for s in ev.stats[:6])))


def tiny_opts(data_root, out, max_iter=4):
    """Overrides that shrink the demo config to a few seconds of CPU."""
    return [
        "OUTPUT_DIR", out,
        "DATASETS.SHAPES.ROOT", data_root,
        "DATASETS.SHAPES.NUM_TRAIN", "4",
        "DATASETS.SHAPES.NUM_VAL", "3",
        "DATASETS.SHAPES.IMAGE_SIZE", "(64, 64)",
        "DATASETS.SHAPES.OBJECT_SIZE", "(8.0, 40.0)",
        "DATASETS.SHAPES.OBJECTS_PER_IMAGE", "(2, 4)",
        "INPUT.MIN_SIZE_TRAIN", "(64,)",
        "INPUT.MAX_SIZE_TRAIN", "64",
        "INPUT.MIN_SIZE_TEST", "64",
        "INPUT.MAX_SIZE_TEST", "64",
        "SOLVER.IMS_PER_BATCH", "2",
        "SOLVER.MAX_ITER", str(max_iter),
        "SOLVER.STEPS", "()",
        "SOLVER.WARMUP_ITERS", "0",
        "SOLVER.CHECKPOINT_PERIOD", "2",
        "DATALOADER.NUM_WORKERS", "0",
        # An almost untrained model: keep every candidate so that AP is a number.
        "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0",
        "MODEL.RETINANET.TOPK_CANDIDATES_TEST", "50",
        "TEST.DETECTIONS_PER_IMAGE", "20",
    ]
