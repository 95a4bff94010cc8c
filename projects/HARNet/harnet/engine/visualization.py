"""Pictures of a detector's output: detections (Detectron2's ``Visualizer``) and HAR-Net's
spatial attention masks (one colour-mapped overlay per pyramid level), written as PNG.

Used by ``tools/visualize.py`` and by the demo (``tools/run_demo.sh``).
"""
import glob
import logging
import os
from typing import Dict, Iterable, List, Optional, Sequence

import cv2
import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.utils.visualizer import Visualizer
from tqdm import tqdm

__all__ = [
    "overlay_mask",
    "mask_to_image",
    "attention_panel",
    "draw_detections",
    "image_inputs",
    "dataset_inputs",
    "visualize",
]

logger = logging.getLogger(__name__)
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def overlay_mask(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a [0, 1] mask, colour-mapped (JET: blue = 0, red = 1), over an image.

    Args:
        image (ndarray[H, W, 3] uint8): RGB image.
        mask (ndarray[H, W] float): values in [0, 1] (clipped), same size as the image.
        alpha (float): weight of the colour map.

    Returns:
        ndarray[H, W, 3] uint8: RGB.
    """
    if mask.shape != image.shape[:2]:
        raise ValueError(f"overlay_mask: mask shape {mask.shape} != image shape {image.shape[:2]}")
    heat = cv2.applyColorMap(
        np.round(np.clip(mask, 0.0, 1.0) * 255).astype(np.uint8), cv2.COLORMAP_JET
    )[:, :, ::-1]
    return np.round(image * (1 - alpha) + heat * alpha).astype(np.uint8)


def mask_to_image(mask: torch.Tensor, stride: int, input_hw, output_hw) -> np.ndarray:
    """Resample one level's mask onto the original image.

    Args:
        mask (Tensor[H_l, W_l]): the mask on the level's grid, covering the network input
            (``H_l = ceil(h / stride)``, as :meth:`HARRetinaNet.attention_maps` gives it).
        stride (int): the level's stride in network-input pixels.
        input_hw (tuple[int, int]): (h, w) of the network input (the resized image).
        output_hw (tuple[int, int]): (H, W) of the original image.

    Returns:
        ndarray[H, W] float32 in [0, 1].
    """
    m = mask.detach().float().cpu().numpy()
    h, w = input_hw
    # Each cell covers stride x stride input pixels; the last row/column may hang over.
    up = cv2.resize(m, (m.shape[1] * stride, m.shape[0] * stride), interpolation=cv2.INTER_LINEAR)
    up = up[:h, :w]
    return cv2.resize(up, (output_hw[1], output_hw[0]), interpolation=cv2.INTER_LINEAR)


def _label(image: np.ndarray, text: str) -> np.ndarray:
    bar = np.full((18, image.shape[1], 3), 255, np.uint8)
    cv2.putText(bar, text, (3, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([bar, image], axis=0)


def attention_panel(
    image: np.ndarray, masks: Sequence[torch.Tensor], strides: Sequence[int],
    level_names: Sequence[str], input_hw, alpha: float = 0.5,
) -> np.ndarray:
    """A strip: the image, then one mask overlay per level, each labelled with the level,
    its stride and the mask's min/max.

    Args:
        image (ndarray[H, W, 3] uint8): RGB original image.
        masks (list[Tensor[H_l, W_l]]): one mask per level (see :func:`mask_to_image`).
        strides, level_names: per level.
        input_hw: (h, w) of the network input.

    Returns:
        ndarray uint8 RGB.
    """
    panels = [_label(image, "image")]
    for mask, stride, name in zip(masks, strides, level_names):
        m = mask_to_image(mask, stride, input_hw, image.shape[:2])
        text = f"{name} s{stride} [{float(mask.min()):.2f},{float(mask.max()):.2f}]"
        panels.append(_label(overlay_mask(image, m, alpha), text))
    sep = np.full((panels[0].shape[0], 4, 3), 255, np.uint8)
    out = [panels[0]]
    for p in panels[1:]:
        out += [sep, p]
    return np.concatenate(out, axis=1)


def draw_detections(image: np.ndarray, instances, metadata, score_thresh: float = 0.3) -> np.ndarray:
    """Detectron2's ``Visualizer`` drawing of the detections scoring >= ``score_thresh``.

    Args:
        image (ndarray[H, W, 3] uint8): RGB image, in the detections' resolution.
        instances (Instances): pred_boxes, scores, pred_classes (on any device).
        metadata: the dataset's Metadata (class names).

    Returns:
        ndarray uint8 RGB.
    """
    instances = instances.to("cpu")
    instances = instances[instances.scores >= score_thresh]
    vis = Visualizer(image, metadata)
    return vis.draw_instance_predictions(instances).get_image()


def _mapped(mapper, record: Dict) -> Dict:
    record = dict(record)
    record.pop("annotations", None)
    inputs = mapper(record)
    if "height" not in inputs:
        # Detectron2's mapper keeps the record's keys; a bare file needs its size.
        h, w = utils.read_image(record["file_name"]).shape[:2]
        inputs["height"], inputs["width"] = h, w
    return inputs


def image_inputs(paths: Iterable[str]) -> List[Dict]:
    """Records ``{"file_name": ...}`` for image files, folders (their images) and globs.

    Raises:
        FileNotFoundError: naming an input that matches no image.
    """
    records = []
    for p in paths:
        if os.path.isdir(p):
            files = sorted(
                f for f in glob.glob(os.path.join(p, "*")) if f.lower().endswith(_IMAGE_EXTENSIONS)
            )
        else:
            files = sorted(glob.glob(os.path.expanduser(p)))
        if not files:
            raise FileNotFoundError(f"--input {p!r}: no image file found")
        records += [{"file_name": f} for f in files]
    return records


def dataset_inputs(name: str) -> List[Dict]:
    """The records of a registered dataset (``DatasetCatalog.get(name)``).

    Raises:
        KeyError: naming ``name`` and the registered datasets, if it is not registered.
    """
    if name not in DatasetCatalog.list():
        raise KeyError(f"dataset {name!r} is not registered (registered: {DatasetCatalog.list()})")
    return DatasetCatalog.get(name)


def class_names_for(model, metadata, source="the dataset"):
    """The metadata to label ``model``'s classes with: ``metadata`` when its
    ``thing_classes`` has one name per class of the model, else (with a warning naming
    both counts) an empty one, so that detections are labelled by class index (Detectron2's
    ``Visualizer`` would fail on a class index beyond the names)."""
    names = getattr(metadata, "thing_classes", None) if metadata is not None else None
    num_classes = getattr(model, "num_classes", None)
    if names is None or num_classes is None or len(names) == num_classes:
        return metadata
    logger.warning(
        f"{source} has {len(names)} class names but the model predicts {num_classes} "
        "classes: detections are labelled by class index"
    )
    return MetadataCatalog.get("__harnet_class_index_labels")


@torch.no_grad()
def visualize(
    model, mapper, records: Sequence[Dict], output_dir: str, metadata=None,
    score_thresh: float = 0.3, max_images: Optional[int] = None, errors: Optional[list] = None,
) -> List[str]:
    """Run ``model`` on ``records`` and write ``<name>_detections.png`` and (when the model
    has spatial attention) ``<name>_attention.png`` for each into ``output_dir``.

    Args:
        model: a Detectron2 detector (eval mode is set here); attention masks need
            :meth:`HARRetinaNet.attention_maps`.
        mapper (callable): record -> model input dict (e.g. the test ``DatasetMapper``).
        records (list[dict]): Detectron2 dataset records (``file_name`` at least).
        output_dir (str): created if needed.
        metadata: Metadata for class names (default: empty).
        score_thresh (float): detections drawn from this score.
        max_images (int or None): at most this many records (the first ones).
        errors (list or None): if given, an image that cannot be read or mapped (OSError,
            ValueError) is appended as ``(file_name, message)`` and the others are still
            drawn; else the error is raised.

    Returns:
        list[str]: the written files.
    """
    os.makedirs(output_dir, exist_ok=True)
    metadata = metadata if metadata is not None else MetadataCatalog.get("__unused")
    was_training = model.training
    model.eval()
    records = list(records)[: max_images if max_images else None]
    has_attention = hasattr(model, "attention_maps") and getattr(model.head, "use_spatial", False)
    if not has_attention:
        logger.warning("The model has no spatial attention: only detections are drawn")
    else:
        shapes = model.backbone.output_shape()
        strides = [shapes[f].stride for f in model.head_in_features]
        names = [f.upper() for f in model.head_in_features]
    written = []
    try:
        for record in tqdm(records, desc="visualize", unit="img"):
            try:
                inputs = _mapped(mapper, record)
                image = utils.read_image(record["file_name"], format="RGB")
            except (OSError, ValueError) as e:
                if errors is None:
                    raise
                errors.append((record["file_name"], f"{type(e).__name__}: {e}"))
                logger.warning(f"Skipped {record['file_name']}: {type(e).__name__}: {e}")
                continue
            stem = os.path.splitext(os.path.basename(record["file_name"]))[0]
            out = model([inputs])[0]["instances"]
            det = draw_detections(image, out, metadata, score_thresh)
            path = os.path.join(output_dir, f"{stem}_detections.png")
            cv2.imwrite(path, det[:, :, ::-1])
            written.append(path)
            if has_attention:
                masks = model.attention_maps([inputs])[0]
                panel = attention_panel(image, masks, strides, names, inputs["image"].shape[-2:])
                path = os.path.join(output_dir, f"{stem}_attention.png")
                cv2.imwrite(path, panel[:, :, ::-1])
                written.append(path)
    finally:
        model.train(was_training)
    return written


def argument_parser():
    import argparse

    p = argparse.ArgumentParser(description=__doc__ or "visualize")
    p.add_argument("--config-file", required=True, metavar="FILE")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--input", nargs="+", default=[], help="image files, folders or globs")
    src.add_argument("--dataset", default="", help="a registered dataset (default: the config's first test set)")
    p.add_argument("--output", required=True, help="folder for the PNG files")
    p.add_argument("--max-images", type=int, default=8, help="at most this many images (0: all)")
    p.add_argument("--score-thresh", type=float, default=0.3, help="draw detections from this score")
    p.add_argument(
        "--register-coco", nargs=3, action="append", default=[], metavar=("NAME", "JSON", "IMAGE_ROOT"),
        help="register a COCO-format dataset under NAME (repeatable)",
    )
    p.add_argument("opts", nargs=argparse.REMAINDER, default=None, help="config overrides")
    return p


def main(argv=None):
    """Command line of ``tools/visualize.py``; returns 0, or 1 when an image could not be
    drawn (the others are drawn; the failures are listed at the end)."""
    from detectron2.config import CfgNode, instantiate
    from detectron2.utils.logger import setup_logger

    from ..data import check_dataset_files
    from ..data.mapper import HARNetDatasetMapper
    from .defaults import build_config
    from .faults import AtomicDetectionCheckpointer
    from .lazy_trainer import LazyConfigTrainer
    from .trainer import HARNetTrainer

    args = argument_parser().parse_args(argv)
    args.two_step = False
    setup_logger(name="harnet")
    setup_logger()
    # Only the dataset that is drawn must exist (none for --input).
    cfg = build_config(args, purpose="draw")
    if isinstance(cfg, CfgNode):
        test_sets = list(cfg.DATASETS.TEST)
    else:
        names = cfg.dataloader.test.dataset.names
        test_sets = [names] if isinstance(names, str) else list(names)
    if args.input:
        records = image_inputs(args.input)
        source = test_sets[0] if test_sets else None
    else:
        source = args.dataset or (test_sets[0] if test_sets else "")
        if not source:
            raise ValueError("give --input images or --dataset NAME (the config has no test set)")
        check_dataset_files([source])
        records = dataset_inputs(source)
    if isinstance(cfg, CfgNode):
        model = HARNetTrainer.build_model(cfg)
        weights = cfg.MODEL.WEIGHTS
        mapper = HARNetDatasetMapper(cfg, is_train=False)
    else:
        model = LazyConfigTrainer.build_model(cfg)
        weights = cfg.train.init_checkpoint
        mapper = instantiate(cfg.dataloader.test.mapper)
    if not weights:
        logger.warning("No weights given (MODEL.WEIGHTS / train.init_checkpoint): drawing an untrained model")
    AtomicDetectionCheckpointer(model).load(weights)
    metadata = MetadataCatalog.get(source) if source else None
    metadata = class_names_for(model, metadata, f"dataset {source!r}")
    errors = []
    written = visualize(
        model, mapper, records, args.output, metadata=metadata, score_thresh=args.score_thresh,
        max_images=args.max_images or None, errors=errors,
    )
    logger.info(f"Wrote {len(written)} PNG files to {args.output}")
    if errors:
        logger.error(
            f"{len(errors)} image(s) could not be drawn:\n"
            + "\n".join(f"  {name}: {msg}" for name, msg in errors)
        )
        return 1
    return 0
