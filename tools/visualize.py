#!/usr/bin/env python
"""Draw a checkpoint's detections and spatial attention masks, one PNG per image.

    python tools/visualize.py --config-file CFG.yaml --dataset harnet_shapes_val \\
        --max-images 8 --output vis/ MODEL.WEIGHTS model_final.pth

The code is ``harnet.engine.visualize_command``; ``--help`` lists the options.
"""
import sys

from harnet.engine.visualize_command import main

if __name__ == "__main__":
    sys.exit(main())
