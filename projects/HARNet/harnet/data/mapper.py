"""``HARNetDatasetMapper``: Detectron2's ``DatasetMapper`` that fails clearly and drops bad
boxes with a logged reason.

What Detectron2's ``DatasetMapper`` already does, and this mapper keeps:

- converts grayscale, palette, LA/RGBA and CMYK images to ``INPUT.FORMAT`` through PIL
  (alpha is dropped), applies the EXIF orientation;
- clips transformed boxes to the image and drops boxes narrower or lower than 1e-5 px
  (``filter_empty_instances``), *silently*;
- images without (non-crowd) annotations are removed before mapping when
  ``DATALOADER.FILTER_EMPTY_ANNOTATIONS`` (``get_detection_dataset_dicts`` logs the count);
  otherwise they train with empty ground truth, which RetinaNet supports (all anchors
  become background).

What this mapper adds:

- unreadable images raise an error that names the file: :class:`ImageReadError` (an
  ``OSError``) for corrupt or truncated files, ``FileNotFoundError`` with the path for
  missing ones (Detectron2 raises PIL's or iopath's message, which may not name it);
- 16-bit grayscale images (PIL modes ``I``/``I;16*``) are scaled to 8 bit instead of
  being saturated by PIL's conversion; float images (mode ``F``) are rejected by name;
- box annotations are checked in the original image, *before* augmentation (so that
  boxes cut by a random crop are not reported): non-finite, zero-area or inverted boxes
  are dropped, boxes extending outside the image are clipped, each with a warning naming
  the file and the counts; a malformed ``bbox`` or a ``category_id`` outside
  ``[0, num_classes)`` raises an error naming the file (an id equal to ``num_classes``
  would silently train as background in RetinaNet's loss);
- a training image whose annotations were all dropped trains with empty ground truth,
  with a warning. Skipping such images is done before mapping, by
  :func:`harnet.data.loaders.filter_images_without_valid_boxes` (when
  ``DATALOADER.FILTER_EMPTY_ANNOTATIONS``): a mapper that returns None relies on
  ``MapDataset``'s retry, which in Detectron2 0.6 calls ``random.sample`` on a set and
  fails on Python >= 3.11;
- an image that the resize makes empty (extreme aspect ratio) raises an error naming the
  file and both sizes.
"""

import copy
import errno
import logging

import numpy as np
import torch
from PIL import Image, ImageOps

from detectron2.config import configurable
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BoxMode
from detectron2.utils.file_io import PathManager

__all__ = ["HARNetDatasetMapper", "ImageReadError", "read_image", "sanitize_annotations"]

logger = logging.getLogger(__name__)

# Detectron2's filter_empty_instances threshold: boxes at most this wide or high are empty.
_MIN_BOX_SIDE = 1e-5
_HIGH_BIT_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


class ImageReadError(OSError):
    """An image file exists but cannot be decoded (corrupt, truncated, unsupported)."""


def _to_supported_mode(image, file_name):
    # PIL's convert("RGB"/"L") clips 16-bit values at 255, turning most of the image white.
    if image.mode in _HIGH_BIT_DEPTH_MODES:
        arr = np.asarray(image, dtype=np.float64) / 257.0  # 65535 -> 255
        return Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), mode="L")
    if image.mode == "F":
        raise ImageReadError(
            f"Image {file_name!r} has floating-point pixels (PIL mode 'F'), whose value range "
            "is not defined; convert it to an 8-bit image."
        )
    return image


def read_image(file_name, format=None):
    """Like :func:`detectron2.data.detection_utils.read_image`, with errors naming the file.

    Args:
        file_name (str): image path (any iopath ``PathManager`` path).
        format (str or None): ``INPUT.FORMAT``: "BGR", "RGB", "L", any PIL mode, or None.

    Returns:
        np.ndarray: HWC uint8 image in ``format`` (H, W, 3) or (H, W, 1) for "L".

    Raises:
        FileNotFoundError: the file does not exist (``.filename`` is ``file_name``).
        ImageReadError: the file cannot be decoded (corrupt, truncated, float pixels).
    """
    try:
        with PathManager.open(file_name, "rb") as f:
            image = Image.open(f)
            image = ImageOps.exif_transpose(image)
            image = _to_supported_mode(image, file_name)
            # convert_PIL_to_numpy decodes the pixels, so truncation errors surface here.
            return utils.convert_PIL_to_numpy(image, format)
    except FileNotFoundError as e:
        raise FileNotFoundError(
            errno.ENOENT, f"Image file not found: {file_name!r}", file_name
        ) from e
    except ImageReadError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageReadError(f"Cannot read image {file_name!r}: {type(e).__name__}: {e}") from e


def sanitize_annotations(annotations, image_size, file_name, num_classes=None):
    """Check and repair box annotations of one image in its original resolution.

    Args:
        annotations (list[dict]): Detectron2 instance annotations (``bbox``, ``bbox_mode``,
            ``category_id``, optional ``iscrowd``); not modified.
        image_size (tuple[int, int] or None): (height, width) of the image as read; None
            skips the clipping (and the "outside" check).
        file_name (str): used in error messages.
        num_classes (int or None): if given, ``category_id`` must lie in [0, num_classes).

    Returns:
        tuple[list[dict], dict]: the kept annotations (copies; boxes as ``XYXY_ABS``,
        clipped to the image) and counts ``{"non-finite", "zero-area", "outside", "clipped"}``.
        Crowd annotations are kept unchanged.

    Raises:
        ValueError: a ``bbox`` that is not 4 numbers, an unsupported ``bbox_mode``, or a
            ``category_id`` outside [0, num_classes); the message names the file.
    """
    counts = {"non-finite": 0, "zero-area": 0, "outside": 0, "clipped": 0}
    kept = []
    for i, anno in enumerate(annotations):
        if anno.get("iscrowd", 0):
            kept.append(anno)
            continue
        cat = anno.get("category_id")
        if num_classes is not None and not (
            isinstance(cat, (int, np.integer)) and 0 <= cat < num_classes
        ):
            raise ValueError(
                f"{file_name}: annotation {i} has category_id {cat!r}, expected an int in "
                f"[0, {num_classes}) (MODEL.RETINANET.NUM_CLASSES)"
            )
        bbox = anno.get("bbox")
        try:
            box = np.asarray(bbox, dtype=np.float64)
        except (TypeError, ValueError):
            box = None
        if box is None or box.shape != (4,):
            raise ValueError(f"{file_name}: annotation {i} has bbox {bbox!r}, expected 4 numbers")
        mode = anno.get("bbox_mode", BoxMode.XYWH_ABS)
        if mode not in (BoxMode.XYXY_ABS, BoxMode.XYWH_ABS):
            raise ValueError(
                f"{file_name}: annotation {i} has bbox_mode {mode!r}; HARNet supports "
                "BoxMode.XYXY_ABS and BoxMode.XYWH_ABS"
            )
        if not np.isfinite(box).all():
            counts["non-finite"] += 1
            continue
        box = np.asarray(BoxMode.convert(box.tolist(), mode, BoxMode.XYXY_ABS))
        if box[2] - box[0] <= _MIN_BOX_SIDE or box[3] - box[1] <= _MIN_BOX_SIDE:
            counts["zero-area"] += 1
            continue
        if image_size is None:
            kept.append(dict(anno, bbox=box.tolist(), bbox_mode=BoxMode.XYXY_ABS))
            continue
        h, w = image_size
        clipped = np.clip(box, 0, [w, h, w, h])
        if clipped[2] - clipped[0] <= _MIN_BOX_SIDE or clipped[3] - clipped[1] <= _MIN_BOX_SIDE:
            counts["outside"] += 1
            continue
        if not np.array_equal(clipped, box):
            counts["clipped"] += 1
        anno = dict(anno, bbox=clipped.tolist(), bbox_mode=BoxMode.XYXY_ABS)
        kept.append(anno)
    return kept, counts


class HARNetDatasetMapper(DatasetMapper):
    """Detectron2's ``DatasetMapper`` with checked image reading and box sanitising.

    Accepts every argument of :class:`detectron2.data.DatasetMapper`, plus:

    Args:
        num_classes (int or None): check ``category_id`` against it (training only).
        max_warnings (int): at most this many per-image warnings per mapper (each file is
            reported once); later ones are logged at DEBUG level.
    """

    @configurable
    def __init__(self, is_train, *, num_classes=None, max_warnings=20, **kwargs):
        super().__init__(is_train, **kwargs)
        self.num_classes = num_classes
        self.max_warnings = max_warnings
        self._reported = set()

    @classmethod
    def from_config(cls, cfg, is_train=True):
        ret = super().from_config(cfg, is_train)
        ret["num_classes"] = cfg.MODEL.RETINANET.NUM_CLASSES
        return ret

    def _warn(self, file_name, msg):
        if file_name in self._reported:
            return
        self._reported.add(file_name)
        n = len(self._reported)
        if n <= self.max_warnings:
            if n == self.max_warnings:
                msg += " (further such warnings of this mapper are logged at DEBUG level)"
            logger.warning(msg)
        else:
            logger.debug(msg)

    def _sanitize(self, dataset_dict, image_shape):
        file_name = dataset_dict.get("file_name", "<no file_name>")
        annos, counts = sanitize_annotations(
            dataset_dict["annotations"], image_shape, file_name, self.num_classes
        )
        dataset_dict["annotations"] = annos
        dropped = counts["non-finite"] + counts["zero-area"] + counts["outside"]
        if dropped or counts["clipped"]:
            h, w = image_shape
            reasons = ", ".join(f"{v} {k}" for k, v in counts.items() if v and k != "clipped")
            parts = []
            if dropped:
                parts.append(f"dropped {dropped} box(es) ({reasons})")
            if counts["clipped"]:
                parts.append(f"clipped {counts['clipped']} box(es) extending outside the image")
            if not any(not a.get("iscrowd", 0) for a in annos):
                parts.append("no valid box left: trains as an image without objects")
            self._warn(file_name, f"{file_name} ({w}x{h}): " + "; ".join(parts))

    def __call__(self, dataset_dict):
        """
        Args:
            dataset_dict (dict): one image in Detectron2's dataset format.

        Returns:
            dict: the model's input dict: ``image`` (uint8 Tensor[C, H, W]), ``height``,
            ``width`` and, when training, ``instances`` (``gt_boxes``, ``gt_classes``).
        """
        # DatasetMapper.__call__ reads the image with detection_utils.read_image and has no
        # hook before augmentation, so its steps are composed here around the checked read
        # and the sanitising; its box handling (_transform_annotations) is inherited.
        # RetinaNet uses neither semantic segmentation nor precomputed proposals.
        if self.proposal_topk is not None or "sem_seg_file_name" in dataset_dict:
            raise ValueError(
                f"{dataset_dict.get('file_name')}: HARNetDatasetMapper maps boxes only "
                "(no proposals, no sem_seg_file_name); use Detectron2's DatasetMapper"
            )
        dataset_dict = copy.deepcopy(dataset_dict)
        file_name = dataset_dict["file_name"]
        image = read_image(file_name, format=self.image_format)
        utils.check_image_size(dataset_dict, image)
        orig_hw = image.shape[:2]
        if self.is_train and "annotations" in dataset_dict:
            self._sanitize(dataset_dict, orig_hw)
        image, transforms = self._augment(image, file_name)
        image_shape = image.shape[:2]
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if not self.is_train:
            dataset_dict.pop("annotations", None)
            return dataset_dict
        if "annotations" in dataset_dict:
            self._transform_annotations(dataset_dict, transforms, image_shape)
        return dataset_dict

    def _augment(self, image, file_name):
        """``self.augmentations`` applied to ``image``; an error naming the file when the
        result would be empty (extreme aspect ratios)."""
        h, w = image.shape[:2]
        too_extreme = (
            f"{file_name}: the image of size {w}x{h} (WxH) cannot be augmented by "
            f"{self.augmentations}; its aspect ratio may be too extreme for "
            "INPUT.MIN_SIZE_*/MAX_SIZE_*"
        )
        aug_input = T.AugInput(image)
        try:
            transforms = self.augmentations(aug_input)
        except (ValueError, ZeroDivisionError) as e:  # PIL: "height and width must be > 0"
            raise ValueError(f"{too_extreme} ({type(e).__name__}: {e})") from e
        if min(aug_input.image.shape[:2]) < 1:
            shape = aug_input.image.shape
            raise ValueError(f"{too_extreme} (result: {shape[1]}x{shape[0]})")
        return aug_input.image, transforms
