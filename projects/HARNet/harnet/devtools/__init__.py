"""The code of the development scripts in ``dev/`` (benchmarks, host-sync count, GPU check),
importable so that the scripts and the tests share it; ``dev/<name>.py`` runs ``main()``."""
import os

# The repository of this (editable) install: dev/, tests/ and train_net.py live there.
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.dirname(os.path.abspath(__file__))))))
