"""Train/test data loaders that use :class:`HARNetDatasetMapper` and drop images whose box
annotations are all invalid *before* mapping.

Detectron2's ``get_detection_dataset_dicts(filter_empty=True)`` removes images without
non-crowd annotations; :func:`filter_images_without_valid_boxes` also removes images whose
boxes are all non-finite, zero-area or outside the image, and fails at loader-build time
(before the first iteration) on malformed annotations, naming the file.
"""
import functools
import logging

from detectron2.data import build_detection_test_loader, get_detection_dataset_dicts
from detectron2.data.samplers import RepeatFactorTrainingSampler, TrainingSampler
from detectron2.utils import comm

from .mapper import HARNetDatasetMapper, sanitize_annotations
from .samplers import ResumableTrainLoader

__all__ = ["filter_images_without_valid_boxes", "build_harnet_train_loader",
           "build_harnet_test_loader"]

logger = logging.getLogger(__name__)


def filter_images_without_valid_boxes(dataset_dicts, num_classes=None, max_names=10):
    """Drop images whose non-crowd box annotations are all invalid; log how many and which.

    Args:
        dataset_dicts (list[dict]): Detectron2 dataset dicts. ``height``/``width``, when
            present, enable the "outside the image" check.
        num_classes (int or None): if given, every ``category_id`` is checked.
        max_names (int): at most this many file names in the log line.

    Returns:
        list[dict]: the kept dicts (unchanged objects, same order).

    Raises:
        ValueError: a malformed annotation (see :func:`sanitize_annotations`), naming the file.
    """
    kept, removed = [], []
    for d in dataset_dicts:
        annos = d.get("annotations")
        if annos is None:
            kept.append(d)
            continue
        size = (d["height"], d["width"]) if "height" in d and "width" in d else None
        valid, _ = sanitize_annotations(annos, size, d.get("file_name", "?"), num_classes)
        if any(not a.get("iscrowd", 0) for a in valid):
            kept.append(d)
        else:
            removed.append(d.get("file_name", "?"))
    if removed:
        names = ", ".join(removed[:max_names]) + (", ..." if len(removed) > max_names else "")
        logger.warning(
            f"Removed {len(removed)} images whose box annotations are all invalid (non-finite, "
            f"zero-area or outside the image): {names}. {len(kept)} images left."
        )
    return kept


def _sampler_factory(cfg, dataset):
    """``make_sampler(seed=...)`` for ``cfg.DATALOADER.SAMPLER_TRAIN`` (Detectron2's samplers)."""
    name = cfg.DATALOADER.SAMPLER_TRAIN
    if name == "TrainingSampler":
        return functools.partial(TrainingSampler, len(dataset))
    if name == "RepeatFactorTrainingSampler":
        factors = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(
            dataset, cfg.DATALOADER.REPEAT_THRESHOLD
        )
        return functools.partial(RepeatFactorTrainingSampler, factors)
    raise ValueError(
        f"DATALOADER.SAMPLER_TRAIN={name!r}: HARNet's training loader supports "
        "'TrainingSampler' and 'RepeatFactorTrainingSampler'"
    )


def build_harnet_train_loader(cfg, mapper=None):
    """Detectron2's training data (dataset dicts, sampler, batching, aspect-ratio grouping)
    with :class:`HARNetDatasetMapper`, :func:`filter_images_without_valid_boxes` (when
    ``cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS``), and batches that are a function of
    (``cfg.SEED``, iteration): see :class:`harnet.data.samplers.ResumableTrainLoader`
    (set its ``start_iter`` to resume).

    Args:
        cfg (CfgNode): a Detectron2/HARNet config. ``SEED < 0``: a random seed shared by
            all processes (the trainer keeps it in its checkpoints).
        mapper (callable or None): defaults to ``HARNetDatasetMapper(cfg, is_train=True)``.

    Returns:
        ResumableTrainLoader: infinite iterable of this process's ``list[dict]`` batches.
    """
    filter_empty = cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
    dataset = get_detection_dataset_dicts(
        cfg.DATASETS.TRAIN,
        filter_empty=filter_empty,
        min_keypoints=cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON else 0,
        proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
    )
    if filter_empty:
        dataset = filter_images_without_valid_boxes(dataset, cfg.MODEL.RETINANET.NUM_CLASSES)
        if not dataset:
            raise ValueError(f"No training image with a valid box in {tuple(cfg.DATASETS.TRAIN)}")
    if mapper is None:
        mapper = HARNetDatasetMapper(cfg, is_train=True)
    seed = cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()
    return ResumableTrainLoader(
        dataset, mapper, _sampler_factory(cfg, dataset), cfg.SOLVER.IMS_PER_BATCH, seed,
        aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
    )


def build_harnet_test_loader(cfg, dataset_name, mapper=None):
    """``build_detection_test_loader`` with :class:`HARNetDatasetMapper` (errors that name
    unreadable files).

    Returns:
        DataLoader: batch size 1, like Detectron2's test loader.
    """
    if mapper is None:
        mapper = HARNetDatasetMapper(cfg, is_train=False)
    return build_detection_test_loader(cfg, dataset_name, mapper=mapper)
