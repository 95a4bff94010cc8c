#!/usr/bin/env python
"""Draw a checkpoint's detections and spatial attention masks as PNG files.

    # images, folders or globs
    python tools/visualize.py --config-file configs/HARNet/demo/har_R18_shapes_demo.yaml \\
        --input img1.jpg photos/ --output vis/ MODEL.WEIGHTS output/demo/model_final.pth
    # the first 8 images of a registered dataset (default: the config's first test set)
    python tools/visualize.py --config-file CFG.yaml --dataset harnet_shapes_val \\
        --max-images 8 --output vis/ MODEL.WEIGHTS model_final.pth

Writes <image>_detections.png (Detectron2's Visualizer, boxes scoring >= --score-thresh)
and <image>_attention.png (the image, then the mask of each pyramid level as a colour map:
blue = 0, red = 1) for each image. Works with yacs and LazyConfig (.py) configs; the
weights come from MODEL.WEIGHTS (yacs) or train.init_checkpoint (LazyConfig).

Only the drawn dataset must exist (none with --input). An image that cannot be read is
skipped; the others are drawn, the failures listed at the end, and the exit status is 1.
When the dataset names fewer (or more) classes than the model predicts, detections are
labelled by class index, with a warning.
"""
import sys

from harnet.engine.visualization import main

if __name__ == "__main__":
    sys.exit(main())
