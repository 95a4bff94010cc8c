#!/usr/bin/env python
"""Draw a checkpoint's detections and spatial attention masks, one PNG per image.

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
import sys

from harnet.engine.visualize_command import main

if __name__ == "__main__":
    sys.exit(main())
