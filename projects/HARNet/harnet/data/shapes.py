"""The built-in synthetic detection dataset ("shapes"), as registered Detectron2 datasets.

``import harnet`` registers ``harnet_shapes_train`` (seed ``SEED``) and
``harnet_shapes_val`` (seed ``SEED + 1``) with the defaults of :class:`ShapesSpec`.
Registration is cheap: images are generated on the first ``DatasetCatalog.get(name)``,
deterministically from the spec, into a cache folder, as a real COCO-format dataset
(``annotations.json`` + ``images/*.jpg``) that is then read by Detectron2's own
``load_coco_json``; ``MetadataCatalog`` carries ``json_file`` so ``COCOEvaluator`` uses it.

Cache root, first match: the ``root`` argument / ``cfg.DATASETS.SHAPES.ROOT``, the
environment variable ``HARNET_DATASETS``, ``~/.cache/harnet/datasets``. Each spec gets its
own folder ``<root>/shapes_seed<S>_n<N>_<fingerprint>``, the fingerprint hashing every
spec field and the generator version, so different settings never share a folder.

Concurrency: generation runs under a file lock (``<folder>.lock``) and writes into a
temporary folder that is renamed into place when complete, so concurrent processes
(e.g. the ranks of a distributed job, even on file systems without working locks) end
up with one complete cache. Validation: ``MANIFEST.json`` records the spec fingerprint,
the SHA-1 of ``annotations.json`` and every image's size; a folder that fails the check
is reported (warning naming the file) and regenerated.

Custom sizes: ``register_shapes(name, root, seed=..., num_images=..., image_size=...)``, or
``register_shapes_from_cfg(cfg)`` to (re-)register the two built-in names from
``cfg.DATASETS.SHAPES`` (call it in the training script's setup, before building loaders).
"""

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from typing import Dict, List, Optional, Tuple

import cv2
from iopath.common.file_io import file_lock
from tqdm import tqdm

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from .shapes_render import CLASS_NAMES, ShapesSpec, render_image

__all__ = [
    "SHAPES_TRAIN",
    "SHAPES_VAL",
    "ShapesCacheError",
    "default_shapes_root",
    "shapes_cache_dir",
    "check_shapes_cache",
    "ensure_shapes",
    "register_shapes",
    "shapes_specs_from_cfg",
    "register_shapes_from_cfg",
    "register_default_shapes",
]

logger = logging.getLogger(__name__)

SHAPES_TRAIN = "harnet_shapes_train"
SHAPES_VAL = "harnet_shapes_val"
# Sizes of the built-in splits (cfg.DATASETS.SHAPES.NUM_TRAIN / NUM_VAL defaults).
DEFAULT_NUM_TRAIN = 1000
DEFAULT_NUM_VAL = 200
# Bump when rendering changes: it is part of every cache fingerprint.
GENERATOR_VERSION = 1
_ANNOTATIONS = "annotations.json"
_MANIFEST = "MANIFEST.json"
_IMAGES = "images"
_JPEG_QUALITY = 95


class ShapesCacheError(RuntimeError):
    """A shapes cache folder is missing, incomplete or corrupt (the message names the file)."""


def default_shapes_root() -> str:
    """``$HARNET_DATASETS`` if set, else ``~/.cache/harnet/datasets``."""
    root = os.environ.get("HARNET_DATASETS") or os.path.join("~", ".cache", "harnet", "datasets")
    return os.path.abspath(os.path.expanduser(root))


def _fingerprint(spec: ShapesSpec) -> str:
    payload = json.dumps({"generator": GENERATOR_VERSION, "spec": spec.to_dict()}, sort_keys=True)
    return hashlib.sha1(payload.encode()).hexdigest()[:12]


def shapes_cache_dir(spec: ShapesSpec, root: Optional[str] = None) -> str:
    """The folder holding the dataset of ``spec`` under ``root`` (default: see module doc)."""
    root = os.path.abspath(os.path.expanduser(root)) if root else default_shapes_root()
    return os.path.join(root, f"shapes_seed{spec.seed}_n{spec.num_images}_{_fingerprint(spec)}")


def _image_name(spec: ShapesSpec, index: int) -> str:
    return f"{index + 1:06d}.{spec.image_format}"


def _sha1_file(path: str) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------- generation
def _generate(spec: ShapesSpec, out_dir: str, show_progress: Optional[bool] = None) -> None:
    """Writes the whole dataset of ``spec`` into the (new) folder ``out_dir``."""
    image_dir = os.path.join(out_dir, _IMAGES)
    os.makedirs(image_dir)
    if show_progress is None:
        show_progress = spec.num_images >= 200
    params = [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY] if spec.image_format == "jpg" else []
    images: List[Dict] = []
    annotations: List[Dict] = []
    sizes: List[int] = []
    start = time.perf_counter()
    for index in tqdm(
        range(spec.num_images),
        desc="harnet shapes",
        unit="img",
        disable=not show_progress,
        mininterval=0.5,
    ):
        image, anns = render_image(spec, index)
        name = _image_name(spec, index)
        ok, encoded = cv2.imencode("." + spec.image_format, image, params)
        if not ok:
            raise RuntimeError(f"cv2 could not encode {name} as {spec.image_format}")
        data = encoded.tobytes()
        with open(os.path.join(image_dir, name), "wb") as f:
            f.write(data)
        sizes.append(len(data))
        image_id = index + 1
        images.append(
            {"id": image_id, "file_name": name, "height": image.shape[0], "width": image.shape[1]}
        )
        for ann in anns:
            annotations.append(
                {"id": len(annotations) + 1, "image_id": image_id, "iscrowd": 0, **ann}
            )
    fingerprint = _fingerprint(spec)
    coco = {
        "info": {
            "description": "HARNet built-in synthetic shapes dataset",
            "version": str(GENERATOR_VERSION),
            "harnet_shapes": {"fingerprint": fingerprint, "spec": spec.to_dict()},
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": i + 1, "name": name, "supercategory": "shape"}
            for i, name in enumerate(CLASS_NAMES)
        ],
    }
    json_path = os.path.join(out_dir, _ANNOTATIONS)
    with open(json_path, "w") as f:
        json.dump(coco, f, separators=(",", ":"))
    manifest = {
        "format": "harnet_shapes",
        "generator_version": GENERATOR_VERSION,
        "fingerprint": fingerprint,
        "spec": spec.to_dict(),
        "annotations_sha1": _sha1_file(json_path),
        "image_bytes": sizes,
    }
    # Written last: its presence marks a complete folder.
    with open(os.path.join(out_dir, _MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
    elapsed = time.perf_counter() - start
    logger.info(
        f"Generated {spec.num_images} shapes images ({len(annotations)} objects) in "
        f"{elapsed:.1f} s ({spec.num_images / max(elapsed, 1e-9):.0f} img/s) into {out_dir}"
    )


def check_shapes_cache(cache_dir: str, spec: Optional[ShapesSpec] = None) -> None:
    """Raises :class:`ShapesCacheError` naming the offending file unless ``cache_dir`` holds
    a complete dataset (of ``spec``, when given). Images are checked by size, the JSON by
    SHA-1; neither is decoded."""
    manifest_path = os.path.join(cache_dir, _MANIFEST)
    if not os.path.isfile(manifest_path):
        raise ShapesCacheError(f"{manifest_path} is missing (incomplete shapes dataset)")
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
        fingerprint, sizes = manifest["fingerprint"], manifest["image_bytes"]
        json_sha1, spec_dict = manifest["annotations_sha1"], manifest["spec"]
    except (ValueError, KeyError, TypeError) as e:
        raise ShapesCacheError(f"{manifest_path} is corrupt: {e!r}") from e
    if spec is not None:
        if fingerprint != _fingerprint(spec):
            raise ShapesCacheError(
                f"{manifest_path} was generated for another spec/generator version "
                f"(fingerprint {fingerprint}, expected {_fingerprint(spec)})"
            )
    else:
        try:
            spec = ShapesSpec(**spec_dict)
        except (TypeError, ValueError) as e:
            raise ShapesCacheError(f"{manifest_path} has an invalid spec: {e}") from e
    json_path = os.path.join(cache_dir, _ANNOTATIONS)
    if not os.path.isfile(json_path):
        raise ShapesCacheError(f"{json_path} is missing")
    if _sha1_file(json_path) != json_sha1:
        raise ShapesCacheError(f"{json_path} is corrupt (SHA-1 differs from {manifest_path})")
    if len(sizes) != spec.num_images:
        raise ShapesCacheError(
            f"{manifest_path} lists {len(sizes)} images, expected {spec.num_images}"
        )
    for index, size in enumerate(sizes):
        path = os.path.join(cache_dir, _IMAGES, _image_name(spec, index))
        try:
            actual = os.path.getsize(path)
        except OSError:
            raise ShapesCacheError(f"{path} is missing")
        if actual != size:
            raise ShapesCacheError(f"{path} is corrupt ({actual} bytes, expected {size})")


def _is_valid(cache_dir: str, spec: ShapesSpec) -> Optional[str]:
    """None if valid, else the reason."""
    try:
        check_shapes_cache(cache_dir, spec)
    except ShapesCacheError as e:
        return str(e)
    return None


def _place(tmp_dir: str, cache_dir: str, spec: ShapesSpec) -> None:
    """Atomically moves the finished ``tmp_dir`` to ``cache_dir``; if another process got
    there first with a valid dataset (identical, by determinism), keeps that one."""
    try:
        os.rename(tmp_dir, cache_dir)
        return
    except OSError as e:
        reason = _is_valid(cache_dir, spec)
        if reason is not None:
            raise ShapesCacheError(
                f"cannot move the generated dataset {tmp_dir} to {cache_dir} ({e}), "
                f"and the folder there is not a valid dataset: {reason}"
            ) from e
    shutil.rmtree(tmp_dir, ignore_errors=True)


def ensure_shapes(spec: ShapesSpec, root: Optional[str] = None) -> Tuple[str, str]:
    """Generates the dataset of ``spec`` under ``root`` unless a valid copy is there.

    Returns:
        (json_file, image_root) of the COCO-format dataset.
    """
    cache_dir = shapes_cache_dir(spec, root)
    json_file, image_root = os.path.join(cache_dir, _ANNOTATIONS), os.path.join(cache_dir, _IMAGES)
    if _is_valid(cache_dir, spec) is None:
        return json_file, image_root
    parent = os.path.dirname(cache_dir)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise ShapesCacheError(
            f"cannot create the shapes cache root {parent} ({e}); set HARNET_DATASETS or "
            "cfg.DATASETS.SHAPES.ROOT to a writable folder"
        ) from e
    with file_lock(cache_dir):
        reason = _is_valid(cache_dir, spec)
        if reason is None:  # generated by another process while we waited
            return json_file, image_root
        if os.path.exists(cache_dir):
            logger.warning(f"Invalid shapes cache ({reason}); regenerating {cache_dir}")
            trash = f"{cache_dir}.invalid-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.rename(cache_dir, trash)
            shutil.rmtree(trash, ignore_errors=True)
        tmp_dir = os.path.join(
            parent, f".tmp-{os.path.basename(cache_dir)}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        )
        try:
            _generate(spec, tmp_dir)
            _place(tmp_dir, cache_dir, spec)
        finally:
            if os.path.exists(tmp_dir):
                shutil.rmtree(tmp_dir, ignore_errors=True)
    return json_file, image_root


# ---------------------------------------------------------------------------- registration
def _load(name: str, spec: ShapesSpec, root: Optional[str]) -> List[Dict]:
    json_file, image_root = ensure_shapes(spec, root)
    return load_coco_json(json_file, image_root, name)


def register_shapes(name: str, root: Optional[str] = None, **spec_kwargs) -> ShapesSpec:
    """Registers a shapes dataset ``name`` in DatasetCatalog/MetadataCatalog (cheap: the
    images are generated on the first ``DatasetCatalog.get(name)``).

    Args:
        name: dataset name. An existing *shapes* dataset of that name is replaced; any
            other existing dataset of that name is an error.
        root: cache root (default: ``$HARNET_DATASETS`` or ``~/.cache/harnet/datasets``),
            resolved now.
        spec_kwargs: :class:`ShapesSpec` fields (seed, num_images, image_size, ...).

    Returns:
        the validated spec.
    """
    spec = ShapesSpec(**spec_kwargs)
    if name in DatasetCatalog.list():
        if not hasattr(MetadataCatalog.get(name), "harnet_shapes"):
            raise ValueError(f"dataset '{name}' is already registered and is not a shapes dataset")
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    root = os.path.abspath(os.path.expanduser(root)) if root else default_shapes_root()
    cache_dir = shapes_cache_dir(spec, root)
    DatasetCatalog.register(name, lambda: _load(name, spec, root))
    MetadataCatalog.get(name).set(
        thing_classes=list(CLASS_NAMES),
        thing_dataset_id_to_contiguous_id={i + 1: i for i in range(len(CLASS_NAMES))},
        json_file=os.path.join(cache_dir, _ANNOTATIONS),
        image_root=os.path.join(cache_dir, _IMAGES),
        evaluator_type="coco",
        harnet_shapes=spec.to_dict(),
    )
    return spec


def shapes_specs_from_cfg(cfg) -> Dict[str, ShapesSpec]:
    """``{harnet_shapes_train: spec, harnet_shapes_val: spec}`` from ``cfg.DATASETS.SHAPES``."""
    c = cfg.DATASETS.SHAPES
    common = dict(
        image_size=tuple(c.IMAGE_SIZE),
        object_size=tuple(c.OBJECT_SIZE),
        max_object_fraction=c.MAX_OBJECT_FRACTION,
        objects_per_image=tuple(c.OBJECTS_PER_IMAGE),
        distractors_per_image=tuple(c.DISTRACTORS_PER_IMAGE),
        class_weights=tuple(c.CLASS_WEIGHTS),
        min_visible_fraction=c.MIN_VISIBLE_FRACTION,
        occlusion_prob=c.OCCLUSION_PROB,
        image_format=c.IMAGE_FORMAT,
    )
    return {
        SHAPES_TRAIN: ShapesSpec(seed=c.SEED, num_images=c.NUM_TRAIN, **common),
        SHAPES_VAL: ShapesSpec(seed=c.SEED + 1, num_images=c.NUM_VAL, **common),
    }


def register_shapes_from_cfg(cfg) -> List[str]:
    """(Re-)registers ``harnet_shapes_train`` / ``harnet_shapes_val`` with the settings of
    ``cfg.DATASETS.SHAPES`` (see ``harnet.config``); returns the names."""
    root = cfg.DATASETS.SHAPES.ROOT or None
    specs = shapes_specs_from_cfg(cfg)
    for name, spec in specs.items():
        register_shapes(name, root, **vars(spec))
    return list(specs)


def register_default_shapes() -> None:
    """Registers the two built-in names with :class:`ShapesSpec` defaults (done on import)."""
    seed = ShapesSpec.seed
    register_shapes(SHAPES_TRAIN, seed=seed, num_images=DEFAULT_NUM_TRAIN)
    register_shapes(SHAPES_VAL, seed=seed + 1, num_images=DEFAULT_NUM_VAL)
