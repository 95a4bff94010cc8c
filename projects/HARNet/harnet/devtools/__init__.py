"""The code of the development scripts in ``dev/`` (benchmarks, host-sync count, GPU check),
importable so that the scripts and the tests share it; ``dev/<name>.py`` runs ``main()``."""
import os
import platform

# The repository of this (editable) install: dev/, tests/ and train_net.py live there.
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.dirname(os.path.abspath(__file__))))))


def cpu_name():
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def device_name(device):
    """Human-readable name of ``device`` ("cpu" or "cuda[:i]"), with the core count."""
    import torch

    if str(device).startswith("cuda"):
        return f"GPU {torch.cuda.get_device_name(torch.device(device))}"
    return f"CPU {cpu_name()}, {len(os.sched_getaffinity(0))} cores, {torch.get_num_threads()} torch threads"
