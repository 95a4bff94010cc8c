"""Print the environment HARNet runs in, in the spirit of Detectron2's ``collect_env``.

    python -m harnet.collect_env          # short table
    python -m harnet.collect_env --full   # plus Detectron2's own collect_env table
"""
import argparse
import platform
import sys

from tabulate import tabulate

from harnet.d2_compat.info import D2_COMMIT, install_mode as detectron2_install_mode
from harnet.d2_compat.info import installed_version


def _describe_distribution(dist):
    """``<name> <version>``, with what the version says: the source commit of a compiled
    build (``0.6+g<commit>``, tested when it is ``D2_COMMIT``), or the PyPI snapshot."""
    if dist is None:
        return "not found"
    name, version = dist.split(" ", 1)
    if name == "pb1-detectron2":
        return f"{dist} (PyPI snapshot of Detectron2 main, 2022)"
    if "+g" in version:
        commit = version.split("+g", 1)[1]
        tested = "the commit HARNet's CI tests" if commit == D2_COMMIT else "untested commit"
        return f"{dist} (source commit {commit}: {tested})"
    return f"{dist} (source commit unknown)"


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
    rows.append(("detectron2 distribution", _describe_distribution(installed_version())))
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
