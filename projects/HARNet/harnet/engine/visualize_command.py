"""The ``tools/visualize.py`` command (argument parser and ``main``), importable.
Draw a checkpoint's detections and spatial attention masks, one PNG per image.

    # images, folders or globs
    python tools/visualize.py --config-file configs/HARNet/demo/har_R18_shapes_demo.yaml \\
        --input img1.jpg photos/ --output vis/ MODEL.WEIGHTS output/demo/model_final.pth
    # the first 8 images of a registered dataset (default: the config's first test set)
    python tools/visualize.py --config-file CFG.yaml --dataset harnet_shapes_val \\
        --max-images 8 --output vis/ MODEL.WEIGHTS model_final.pth

Writes <image>_vis.png for each image: with --dataset, the ground truth (the record's
annotated boxes) beside the detections scoring >= --score-thresh, both drawn by
Detectron2's Visualizer on the image upscaled to --long-side px and coloured by class;
with --input (no annotations) the detections alone. Below them: the image and the spatial
attention mask of each pyramid level as a colour map (blue = 0, red = 1). Works with yacs
and LazyConfig (.py) configs; the weights come from MODEL.WEIGHTS (yacs) or
train.init_checkpoint (LazyConfig).

Only the drawn dataset must exist (none with --input). An image that cannot be read is
skipped; the others are drawn, the failures listed at the end, and the exit status is 1.
When the dataset names fewer (or more) classes than the model predicts, detections are
labelled by class index, with a warning.
"""
import argparse
import logging
import sys

from detectron2.config import CfgNode, instantiate
from detectron2.data import MetadataCatalog
from detectron2.utils.logger import setup_logger

from harnet.data import check_dataset_files
from harnet.data.mapper import HARNetDatasetMapper
from harnet.engine.defaults import build_config
from harnet.engine.faults import AtomicDetectionCheckpointer
from harnet.engine.lazy_trainer import LazyConfigTrainer
from harnet.engine.trainer import HARNetTrainer
from harnet.engine.visualization import class_names_for, dataset_inputs, image_inputs, visualize

# Messages go to the library's logger, so that one handler sees the whole run.
logger = logging.getLogger("harnet.engine.visualization")


def argument_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, metavar="FILE")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--input", nargs="+", default=[], help="image files, folders or globs")
    src.add_argument("--dataset", default="", help="a registered dataset (default: the config's first test set)")
    p.add_argument("--output", required=True, help="folder for the PNG files")
    p.add_argument("--max-images", type=int, default=8, help="at most this many images (0: all)")
    p.add_argument("--score-thresh", type=float, default=0.3, help="draw detections from this score")
    p.add_argument("--long-side", type=int, default=480,
                   help="upscale images to this many px on the long side before drawing (default 480)")
    p.add_argument(
        "--register-coco", nargs=3, action="append", default=[], metavar=("NAME", "JSON", "IMAGE_ROOT"),
        help="register a COCO-format dataset under NAME (repeatable)",
    )
    p.add_argument("opts", nargs=argparse.REMAINDER, default=None, help="config overrides")
    return p


def main(argv=None):
    """Returns 0, or 1 when an image could not be drawn (the others are drawn; the failures
    are listed at the end)."""
    args = argument_parser().parse_args(argv)
    if args.long_side < 1:
        raise ValueError(f"--long-side must be >= 1, got {args.long_side}")
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
        max_images=args.max_images or None, errors=errors, long_side=args.long_side,
    )
    logger.info(f"Wrote {len(written)} PNG files to {args.output}")
    if errors:
        logger.error(
            f"{len(errors)} image(s) could not be drawn:\n"
            + "\n".join(f"  {name}: {msg}" for name, msg in errors)
        )
        return 1
    return 0
