#!/usr/bin/env python
"""Train and evaluate variants of one config under the same schedule over several seeds,
and print their COCO box AP (AP, AP50, AP75, APs, APm, APl; mean ± std over seeds) with the
paired difference to a baseline. Default: the CPU demo config, HAR-Net against the all-off
baseline (Detectron2's RetinaNet), seeds 0 1 2.

The code is ``harnet.commands.compare_variants``; ``--help`` lists the options.
"""
import sys

from harnet.commands.compare_variants import main

if __name__ == "__main__":
    sys.exit(main())
