"""Pictures of a detector's output, one PNG per image: the ground truth (when the record
has annotations) beside the detections, both drawn by Detectron2's ``Visualizer`` on the
image upscaled to a readable size, and below them HAR-Net's spatial attention masks (one
colour-mapped overlay per pyramid level).

The command line is ``tools/visualize.py``; the demo (``tools/run_demo.sh``) uses it.
"""
import glob
import logging
import os
from typing import Dict, Iterable, List, Optional, Sequence

import cv2
import numpy as np
import torch
from detectron2.data import DatasetCatalog, Metadata, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.utils.colormap import colormap
from detectron2.utils.visualizer import ColorMode, Visualizer
from torchvision.ops import box_iou
from tqdm import tqdm

__all__ = [
    "overlay_mask",
    "mask_to_image",
    "attention_panel",
    "draw_detections",
    "draw_ground_truth",
    "merge_coincident_labels",
    "place_label",
    "display_scale",
    "compose",
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


def _label(image: np.ndarray, text: str, font_scale: float = 0.4) -> np.ndarray:
    """``image`` under a white bar with ``text`` (18 px high at the default font scale)."""
    height = int(round(45 * font_scale))
    bar = np.full((height, image.shape[1], 3), 255, np.uint8)
    thickness = 1 if font_scale < 0.6 else 2
    cv2.putText(bar, text, (3, int(round(height * 0.72))), cv2.FONT_HERSHEY_SIMPLEX, font_scale,
                (0, 0, 0), thickness, cv2.LINE_AA)
    return np.concatenate([bar, image], axis=0)


def _row(panels: Sequence[np.ndarray], sep: int = 4) -> np.ndarray:
    """Panels side by side (top-aligned, white-padded to the tallest), ``sep`` px apart."""
    height = max(p.shape[0] for p in panels)
    out = []
    for i, p in enumerate(panels):
        if i:
            out.append(np.full((height, sep, 3), 255, np.uint8))
        pad = np.full((height - p.shape[0], p.shape[1], 3), 255, np.uint8)
        out.append(np.concatenate([p, pad], axis=0))
    return np.concatenate(out, axis=1)


def _column(panels: Sequence[np.ndarray], sep: int = 4) -> np.ndarray:
    """Panels one under the other (left-aligned, white-padded to the widest)."""
    width = max(p.shape[1] for p in panels)
    out = []
    for i, p in enumerate(panels):
        if i:
            out.append(np.full((sep, width, 3), 255, np.uint8))
        pad = np.full((p.shape[0], width - p.shape[1], 3), 255, np.uint8)
        out.append(np.concatenate([p, pad], axis=1))
    return np.concatenate(out, axis=0)


def attention_panel(
    image: np.ndarray, masks: Sequence[torch.Tensor], strides: Sequence[int],
    level_names: Sequence[str], input_hw, alpha: float = 0.5, columns: Optional[int] = None,
    font_scale: float = 0.4,
) -> np.ndarray:
    """The image, then one mask overlay per level, each under a bar naming the level, its
    stride and the mask's min/max; in rows of ``columns`` panels, 4 px apart.

    Args:
        image (ndarray[H, W, 3] uint8): RGB image (the original, or it resized: the masks
            are resampled onto it).
        masks (list[Tensor[H_l, W_l]]): one mask per level (see :func:`mask_to_image`).
        strides, level_names: per level.
        input_hw: (h, w) of the network input.
        columns (int or None): panels per row (None: all in one row).
        font_scale (float): of the labels (0.4: an 18 px bar).

    Returns:
        ndarray uint8 RGB.
    """
    panels = [_label(image, "image", font_scale)]
    for mask, stride, name in zip(masks, strides, level_names):
        m = mask_to_image(mask, stride, input_hw, image.shape[:2])
        text = f"{name} s{stride} [{float(mask.min()):.2f},{float(mask.max()):.2f}]"
        panels.append(_label(overlay_mask(image, m, alpha), text, font_scale))
    columns = columns or len(panels)
    return _column([_row(panels[i : i + columns]) for i in range(0, len(panels), columns)])


def display_scale(image_hw, long_side: int = 480) -> float:
    """The upscaling factor (>= 1) that brings the image's long side to ``long_side`` px."""
    return max(1.0, long_side / max(image_hw))


def merge_coincident_labels(boxes: np.ndarray, labels: Sequence[str], iou_thresh: float = 0.9
                            ) -> List[str]:
    """Labels of boxes that lie on one another, merged into the first box's label.

    A sigmoid detector often reports one object under two classes with nearly the same box;
    drawn separately, their labels land on the same spot and neither can be read. Greedily
    in the given order (the caller sorts by score), each box not yet taken takes every later
    box with IoU >= ``iou_thresh``: its label becomes "a 58% | b 35%", theirs "" (the boxes
    themselves are still drawn).

    Args:
        boxes (ndarray[N, 4] float): XYXY.
        labels (list[str]): N labels.
        iou_thresh (float): IoU from which two boxes count as one.

    Returns:
        list[str]: N labels, "" for the boxes whose label was merged into another's.
    """
    xyxy = torch.as_tensor(boxes, dtype=torch.float64).reshape(-1, 4)
    iou = box_iou(xyxy, xyxy)
    out, taken = list(labels), [False] * len(labels)
    for i in range(len(labels)):
        if taken[i]:
            continue
        group = [j for j in range(i + 1, len(labels)) if not taken[j] and iou[i, j] >= iou_thresh]
        for j in group:
            taken[j] = True
            out[j] = ""
        out[i] = " | ".join([labels[i]] + [labels[j] for j in group])
    return out


def _overlap_area(a: Sequence[float], b: Sequence[float]) -> float:
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def place_label(rect: Sequence[float], placed: Sequence[Sequence[float]], width: float,
                height: float):
    """The shift that moves a label into the picture and off the labels drawn before it.

    Detectron2 puts a box's label at the box's corner; near the right border it is cut
    off, and labels of overlapping boxes (one object occluding another) land on each other.
    The label is first shifted left (or right) just enough to lie inside ``[0, width]``,
    then down or up by whole label heights (0, +1, -1, +2, -2, ..., as far as the picture
    reaches) to the first place inside ``[0, height]`` that overlaps no rectangle of
    ``placed``; if every place overlaps, to the one with the least overlapping area (the
    nearest of equals).

    Args:
        rect (x0, y0, x1, y1): the label's rectangle, y downward (image coordinates).
        placed (list of (x0, y0, x1, y1)): rectangles of the labels already drawn.
        width, height (float): the picture's size, same units.

    Returns:
        (dx, dy): the shift to add to the label's position.
    """
    x0, y0, x1, y1 = (float(v) for v in rect)
    dx = max(min(0.0, width - x1), -x0)  # the left edge wins for labels wider than the image
    step = max(y1 - y0, 1e-6)
    steps = [0] + [s * k for k in range(1, int(height / step) + 2) for s in (1, -1)]
    best = None
    for k in steps:
        dy = max(min(k * step, height - y1), -y0)  # inside the picture (top edge wins)
        moved = (x0 + dx, y0 + dy, x1 + dx, y1 + dy)
        area = sum(_overlap_area(moved, p) for p in placed)
        if area == 0.0:
            return dx, dy
        if best is None or area < best[0]:
            best = (area, dy)
    return dx, best[1]


class _ClassColourVisualizer(Visualizer):
    """Detectron2's ``Visualizer`` with ``ColorMode.SEGMENTATION``'s per-class colours
    drawn as they are: the stock one jitters each instance's colour (by up to 0.5 in RGB),
    and a class must look the same in the ground truth and in the detections. Labels of
    coincident boxes are merged (:func:`merge_coincident_labels`) so that each stays legible,
    and every label is moved inside the picture and off the labels drawn before it
    (:func:`place_label`); a merged label wider than the picture gets one line per class."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.label_rects: List[List[float]] = []  # (x0, y0, x1, y1) of each drawn label

    def _jitter(self, color):
        return tuple(color)

    def overlay_instances(self, *, boxes=None, labels=None, **kwargs):
        if boxes is not None and labels is not None and len(labels) > 1:
            array = boxes.tensor.numpy() if hasattr(boxes, "tensor") else np.asarray(boxes)
            labels = merge_coincident_labels(array, labels)
        return super().overlay_instances(boxes=boxes, labels=labels, **kwargs)

    def draw_text(self, text, *args, **kwargs):
        if not text:  # a label merged into another box's
            return self.output
        output = super().draw_text(text, *args, **kwargs)
        artist = output.ax.texts[-1]
        rect = self._extent(artist)
        if rect[2] - rect[0] > output.width and " | " in text:
            # A merged label wider than the picture: one class per line.
            artist.set_text(text.replace(" | ", "\n"))
            rect = self._extent(artist)
        dx, dy = place_label(rect, self.label_rects, output.width, output.height)
        x, y = artist.get_position()
        artist.set_position((x + dx, y + dy))
        self.label_rects.append([rect[0] + dx, rect[1] + dy, rect[2] + dx, rect[3] + dy])
        return output

    def _extent(self, artist) -> List[float]:
        """The text's rectangle with its background box, in image coordinates (y down)."""
        box = artist.get_window_extent(renderer=self.output.canvas.get_renderer())
        # The label's dark background reaches "pad" points beyond the glyphs.
        pad = 0.7 * self.output.dpi / 72.0
        corners = self.output.ax.transData.inverted().transform(
            [[box.x0 - pad, box.y0 - pad], [box.x1 + pad, box.y1 + pad]]
        )
        (xa, ya), (xb, yb) = corners
        return [min(xa, xb), min(ya, yb), max(xa, xb), max(ya, yb)]


def _visualizer(image: np.ndarray, metadata, scale: float, font_px: float) -> Visualizer:
    # Colour by class (ColorMode.SEGMENTATION with one colour per class), so that the ground
    # truth and the detections of a class look alike; the label font is set in output
    # pixels (Detectron2's default, from the image size, is ~5 px on a 160 px image).
    names = metadata.get("thing_classes", None) if metadata is not None else None
    palette = [tuple(int(c) for c in rgb) for rgb in colormap(rgb=True, maximum=255)]
    colored = Metadata(name="__harnet_vis", thing_colors=palette * 4)
    if names is not None:
        colored.thing_classes = list(names)
    vis = _ClassColourVisualizer(image, colored, scale=scale, instance_mode=ColorMode.SEGMENTATION)
    vis._default_font_size = font_px / scale
    return vis


def draw_detections(
    image: np.ndarray, instances, metadata, score_thresh: float = 0.3, scale: float = 1.0,
    font_px: float = 22.0,
) -> np.ndarray:
    """Detectron2's ``Visualizer`` drawing of the detections scoring >= ``score_thresh``,
    coloured by class and labelled "<class> <score>%".

    Args:
        image (ndarray[H, W, 3] uint8): RGB image, in the detections' resolution.
        instances (Instances): pred_boxes, scores, pred_classes (on any device).
        metadata: the dataset's Metadata (class names) or None (class indices).
        scale (float): the drawing is ``scale`` times the image's size.
        font_px (float): label height (px of the drawing) on large boxes; small boxes get
            0.6 of it (Detectron2's rule).

    Returns:
        ndarray[round(H * scale), round(W * scale), 3] uint8 RGB.
    """
    instances = instances.to("cpu")
    instances = instances[instances.scores >= score_thresh]
    instances = instances[instances.scores.argsort(descending=True)]  # merged labels: best first
    vis = _visualizer(image, metadata, scale, font_px)
    return vis.draw_instance_predictions(instances).get_image()


def draw_ground_truth(
    image: np.ndarray, record: Dict, metadata, scale: float = 1.0, font_px: float = 22.0,
) -> np.ndarray:
    """Detectron2's ``Visualizer.draw_dataset_dict`` drawing of a record's annotated boxes
    (masks and keypoints left out, as the detections have none), coloured like
    :func:`draw_detections`.

    Args:
        image (ndarray[H, W, 3] uint8): RGB image, in the record's resolution.
        record (dict): a Detectron2 dataset record with ``annotations``.
        metadata, scale, font_px: as in :func:`draw_detections`.

    Returns:
        ndarray[round(H * scale), round(W * scale), 3] uint8 RGB.
    """
    keep = ("bbox", "bbox_mode", "category_id", "iscrowd")
    annos = [{k: a[k] for k in keep if k in a} for a in record.get("annotations", [])]
    vis = _visualizer(image, metadata, scale, font_px)
    return vis.draw_dataset_dict({"annotations": annos}).get_image()


def compose(
    detections: np.ndarray, ground_truth: Optional[np.ndarray] = None,
    attention: Optional[np.ndarray] = None, det_title: str = "detections",
    gt_title: str = "ground truth",
) -> np.ndarray:
    """One picture: ``ground_truth`` (if given) beside ``detections``, each under a title
    bar, and ``attention`` (if given) below them.

    Returns:
        ndarray uint8 RGB.
    """
    top = [_label(detections, det_title, 0.6)]
    if ground_truth is not None:
        top.insert(0, _label(ground_truth, gt_title, 0.6))
    rows = [_row(top, sep=8)]
    if attention is not None:
        rows.append(attention)
    return _column(rows, sep=8)


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
    long_side: int = 480,
) -> List[str]:
    """Run ``model`` on ``records`` and write one ``<name>_vis.png`` per record into
    ``output_dir``: the ground truth (records with ``annotations``) beside the detections,
    upscaled to ``long_side`` px, and below them the image with each level's spatial
    attention mask (when the model has spatial attention).

    Args:
        model: a Detectron2 detector (eval mode is set here); attention masks need
            :meth:`HARRetinaNet.attention_maps`.
        mapper (callable): record -> model input dict (e.g. the test ``DatasetMapper``).
        records (list[dict]): Detectron2 dataset records (``file_name`` at least).
        output_dir (str): created if needed.
        metadata: Metadata for class names (default: class indices).
        score_thresh (float): detections drawn from this score.
        max_images (int or None): at most this many records (the first ones).
        errors (list or None): if given, an image that cannot be read or mapped (OSError,
            ValueError) is appended as ``(file_name, message)`` and the others are still
            drawn; else the error is raised.
        long_side (int): the drawings' long side in px (images are upscaled, never shrunk).

    Returns:
        list[str]: the written files.
    """
    os.makedirs(output_dir, exist_ok=True)
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
            scale = display_scale(image.shape[:2], long_side)
            out = model([inputs])[0]["instances"].to("cpu")
            shown = int((out.scores >= score_thresh).sum())
            det = draw_detections(image, out, metadata, score_thresh, scale)
            gt = None
            if "annotations" in record:
                gt = draw_ground_truth(image, record, metadata, scale)
            attention = None
            if has_attention:
                masks = model.attention_maps([inputs])[0]
                width = det.shape[1] * 2 + 8 if gt is not None else det.shape[1]
                # Image + one panel per level in rows of 3, together as wide as the row above.
                k = (width - 8) / (3 * image.shape[1])
                big = cv2.resize(image, (round(image.shape[1] * k), round(image.shape[0] * k)))
                attention = attention_panel(big, masks, strides, names, inputs["image"].shape[-2:],
                                            columns=3, font_scale=0.5)
            picture = compose(
                det, gt, attention,
                det_title=f"detections, score >= {score_thresh:g}: {shown}",
                gt_title=f"ground truth: {len(record.get('annotations', []))} objects",
            )
            path = os.path.join(output_dir, f"{stem}_vis.png")
            cv2.imwrite(path, picture[:, :, ::-1])
            written.append(path)
    finally:
        model.train(was_training)
    return written
