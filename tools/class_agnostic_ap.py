#!/usr/bin/env python
"""COCO box AP of a run's detections with classes ignored: every detection and every
ground-truth box is given one category, so the AP measures finding and placing objects
only. Against the usual (per-class) AP it tells localisation from classification.

The code is ``harnet.commands.class_agnostic_ap``; ``--help`` lists the options.
"""
import sys

from harnet.commands.class_agnostic_ap import main

if __name__ == "__main__":
    sys.exit(main())
