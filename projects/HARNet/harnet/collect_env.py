"""Print the environment HARNet runs in, in the spirit of Detectron2's ``collect_env``.

    python -m harnet.collect_env          # short table
    python -m harnet.collect_env --full   # plus Detectron2's own collect_env table
"""
import argparse
import importlib.util
import platform
import sys

from tabulate import tabulate


def detectron2_install_mode():
    """How Detectron2 is installed: 'compiled' (C++/CUDA ops built), 'fallback' (Python
    sources + HARNet's pure-Python ``detectron2._C``), 'no _C' or 'not installed'."""
    if importlib.util.find_spec("detectron2") is None:
        return "not installed"
    spec = importlib.util.find_spec("detectron2._C")
    if spec is None or spec.origin is None:
        return "no _C"
    return "fallback" if spec.origin.endswith(".py") else "compiled"


def collect_env_info():
    import torch
    import torchvision

    rows = [
        ("sys.platform", sys.platform),
        ("Python", sys.version.replace("\n", " ")),
        ("machine", platform.machine()),
        ("torch", f"{torch.__version__} @ {torch.__file__.rsplit('/', 2)[0]}"),
        ("torch CUDA build", torch.version.cuda or "none"),
        ("CUDA available", torch.cuda.is_available()),
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            rows.append((f"GPU {i}", torch.cuda.get_device_name(i)))
    rows.append(("torchvision", f"{torchvision.__version__} @ {torchvision.__file__.rsplit('/', 2)[0]}"))
    try:
        import detectron2

        rows.append(("detectron2", f"{detectron2.__version__} @ {detectron2.__file__.rsplit('/', 2)[0]}"))
    except ImportError as e:  # still print the rest: this is a diagnostic tool
        rows.append(("detectron2", f"import failed: {e}"))
    rows.append(("detectron2 install mode", detectron2_install_mode()))
    for name in ("fvcore", "iopath", "pycocotools", "cv2", "numpy", "PIL"):
        try:
            mod = __import__(name)
            rows.append((name, getattr(mod, "__version__", "unknown")))
        except ImportError:
            rows.append((name, "not installed"))
    try:
        import harnet

        rows.append(("harnet", f"{harnet.__version__} @ {harnet.__file__.rsplit('/', 1)[0]}"))
    except ImportError as e:
        rows.append(("harnet", f"import failed: {e}"))
    rows.append(("torch threads", torch.get_num_threads()))
    return tabulate(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Print HARNet's environment.")
    ap.add_argument("--full", action="store_true", help="also print Detectron2's collect_env")
    args = ap.parse_args(argv)
    print(collect_env_info())
    if args.full:
        from detectron2.utils.collect_env import collect_env_info as d2_info

        print(d2_info())


if __name__ == "__main__":
    main()
