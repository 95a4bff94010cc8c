#!/usr/bin/env python
"""Benchmark HARNet's post-processing (soft-NMS, box voting) and test-time augmentation.

The code is ``harnet.devtools.benchmark_postprocess``; ``--help`` lists the options.
"""
from harnet.devtools.benchmark_postprocess import main

if __name__ == "__main__":
    main()
