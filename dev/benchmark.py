#!/usr/bin/env python
"""Model-zoo benchmark: parameters, FLOPs, inference latency, training iteration time and
peak memory of several configs, each also as a ratio to a baseline measured in the same run.

The code is ``harnet.devtools.benchmark``; ``--help`` lists the options.
"""
from harnet.devtools.benchmark import main

if __name__ == "__main__":
    main()
