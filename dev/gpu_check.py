#!/usr/bin/env python
"""GPU readiness check of HARNet: one command, one JSON and one markdown table.

The code is ``harnet.devtools.gpu_check``; ``--help`` lists the options.
"""
import sys

from harnet.devtools.gpu_check import main

if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
