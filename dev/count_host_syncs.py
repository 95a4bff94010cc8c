#!/usr/bin/env python
"""Count the host-device synchronisations of a training step and of inference, on any
device (the CPU included): every op that would make the host wait for a CUDA stream.

The code is ``harnet.devtools.count_host_syncs``; ``--help`` lists the options.
"""
from harnet.devtools.count_host_syncs import main

if __name__ == "__main__":
    main()
