"""Real data: COCO itself and any COCO-format detection dataset.

COCO (Detectron2's builtin registration, nothing to call): ``import detectron2.data``
registers ``coco_2017_train``, ``coco_2017_val``, ... under ``$DETECTRON2_DATASETS``
(default ``./datasets``) with the layout::

    $DETECTRON2_DATASETS/coco/annotations/instances_{train,val}2017.json
    $DETECTRON2_DATASETS/coco/{train,val}2017/*.jpg

Use them as ``DATASETS.TRAIN=("coco_2017_train",)``. Detectron2 only notices a missing file
when the loader opens it; :func:`check_dataset_files` (the training script calls it for
``cfg.DATASETS.TRAIN + cfg.DATASETS.TEST``) fails early with the missing path.

Any other COCO-format dataset, in one call::

    from harnet.data import register_coco_format
    register_coco_format("my_train", "path/to/instances_train.json", "path/to/images")

then ``DATASETS.TRAIN=("my_train",)``; evaluation uses Detectron2's ``COCOEvaluator``.
"""

import os
from typing import Dict, Iterable, List, Optional

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

__all__ = ["register_coco_format", "check_dataset_files", "check_datasets_from_cfg"]

# Metadata attributes that Detectron2's registrations use for on-disk inputs.
_PATH_KEYS = (
    "json_file",
    "image_root",
    "dirname",
    "panoptic_root",
    "panoptic_json",
    "sem_seg_root",
)


def _require(path: str, what: str, name: str, is_dir: bool) -> None:
    ok = os.path.isdir(path) if is_dir else os.path.isfile(path)
    if not ok:
        kind = "folder" if is_dir else "file"
        state = "is not a " + kind if os.path.exists(path) else "does not exist"
        raise FileNotFoundError(f"dataset '{name}': {what} {kind} {path} {state}")


def _load_checked(name: str, json_file: str, image_root: str, check_images: bool) -> List[Dict]:
    # The files may have moved since registration.
    _require(json_file, "annotation", name, is_dir=False)
    _require(image_root, "image", name, is_dir=True)
    try:
        dicts = load_coco_json(json_file, image_root, name)
    except (ValueError, KeyError, TypeError, AssertionError) as e:
        # json.JSONDecodeError is a ValueError; a JSON without "images"/"annotations"/
        # "categories" raises KeyError inside pycocotools.
        raise ValueError(
            f"dataset '{name}': {json_file} is not a valid COCO-format instances file: {e!r}"
        ) from e
    if check_images:
        missing = [d["file_name"] for d in dicts if not os.path.isfile(d["file_name"])]
        if missing:
            raise FileNotFoundError(
                f"dataset '{name}': {len(missing)} of {len(dicts)} images listed in {json_file} "
                f"are missing under {image_root}, e.g. {missing[0]}"
            )
    return dicts


def register_coco_format(
    name: str,
    json_file: str,
    image_root: str,
    metadata: Optional[Dict] = None,
    check_images: bool = True,
) -> None:
    """Registers a COCO-format detection dataset like Detectron2's
    ``register_coco_instances`` (``load_coco_json`` loader, metadata ``json_file``,
    ``image_root``, ``evaluator_type="coco"``), checking its paths now and again on load.

    Args:
        name: dataset name for ``cfg.DATASETS.TRAIN/TEST``; must not be registered yet.
        json_file: COCO instances JSON ("images", "annotations", "categories"; boxes
            [x, y, w, h] in pixels; category ids need not be contiguous).
        image_root: folder that the JSON's ``file_name`` entries are relative to.
        metadata: extra MetadataCatalog fields (class names come from the JSON).
        check_images: on load, verify that every listed image exists (one ``stat`` each).

    Raises:
        FileNotFoundError: naming ``json_file`` / ``image_root`` if missing.
        ValueError: if ``name`` is already registered.
    """
    if name in DatasetCatalog.list():
        raise ValueError(f"dataset '{name}' is already registered")
    json_file = os.path.abspath(os.path.expanduser(os.fspath(json_file)))
    image_root = os.path.abspath(os.path.expanduser(os.fspath(image_root)))
    _require(json_file, "annotation", name, is_dir=False)
    _require(image_root, "image", name, is_dir=True)
    DatasetCatalog.register(name, lambda: _load_checked(name, json_file, image_root, check_images))
    MetadataCatalog.get(name).set(
        json_file=json_file, image_root=image_root, evaluator_type="coco", **(metadata or {})
    )


def check_dataset_files(names: Iterable[str]) -> None:
    """Raises ``FileNotFoundError`` naming the first missing file/folder of the registered
    datasets ``names`` (paths from their metadata: json_file, image_root, ...), and
    ``KeyError`` for a name that is not registered. Shapes datasets are skipped (they are
    generated on first use). For Detectron2's builtin datasets the message says where
    ``DETECTRON2_DATASETS`` points."""
    registered = set(DatasetCatalog.list())
    for name in names:
        if name not in registered:
            raise KeyError(
                f"dataset '{name}' is not registered; registered datasets include "
                f"harnet_shapes_train/val and Detectron2's builtins such as coco_2017_train "
                f"(register your own with harnet.data.register_coco_format)"
            )
        meta = MetadataCatalog.get(name)
        if hasattr(meta, "harnet_shapes"):
            continue
        for key in _PATH_KEYS:
            path = getattr(meta, key, None)
            if path is None or os.path.exists(path):
                continue
            msg = f"dataset '{name}': {key} {path} does not exist"
            # Detectron2's builtin registration joins its paths onto this root.
            builtin_root = os.getenv("DETECTRON2_DATASETS", "datasets")
            if os.path.normpath(path).startswith(os.path.normpath(builtin_root) + os.sep):
                root = os.environ.get("DETECTRON2_DATASETS")
                where = (
                    f"DETECTRON2_DATASETS={root}"
                    if root
                    else (
                        f"DETECTRON2_DATASETS is unset, so Detectron2 uses ./datasets relative to "
                        f"the working directory {os.getcwd()}"
                    )
                )
                msg += (
                    f" ({where}; builtin datasets such as COCO are expected under that root, "
                    "e.g. coco/annotations/instances_train2017.json and coco/train2017/)"
                )
            raise FileNotFoundError(msg)


def check_datasets_from_cfg(cfg) -> None:
    """:func:`check_dataset_files` for ``cfg.DATASETS.TRAIN`` and ``cfg.DATASETS.TEST``."""
    check_dataset_files(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))
