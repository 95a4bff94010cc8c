#!/usr/bin/env python
"""Train and evaluate variants of one config under the same schedule over several seeds,
and print their COCO box AP (AP, AP50, AP75, APs, APm, APl; mean ± std over seeds) with the
paired difference to a baseline. Default: the CPU demo config, HAR-Net against the all-off
baseline (Detectron2's RetinaNet), seeds 0 1 2.

    python tools/compare_variants.py                          # output/compare/summary.md
    python tools/compare_variants.py --seeds 0 -- SOLVER.MAX_ITER 300   # '--' ends --seeds
    python tools/compare_variants.py --config-file configs/HARNet/demo/har_R18_shapes_demo.yaml \\
        --variants "HAR-Net" "spatial off@MODEL.HARNET.SPATIAL.ENABLED=False" \\
        "RetinaNet@MODEL.HARNET.ALIGN.ENABLED=False@MODEL.HARNET.CLGN.ENABLED=False@MODEL.HARNET.SPATIAL.ENABLED=False@MODEL.HARNET.CHANNEL.ENABLED=False"

Each run is a train_net.py process (its progress lines with ETA are shown) in
OUTPUT/<variant>/seed<N>; finished runs are reused, interrupted ones resume.
"""
import sys

from harnet.engine.compare import main

if __name__ == "__main__":
    sys.exit(main())
