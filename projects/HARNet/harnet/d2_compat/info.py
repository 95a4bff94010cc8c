"""How Detectron2 is installed, and the commit HARNet tests (library side of
``tools/install_detectron2.py``).

Standard library only, and Detectron2 is never imported: the installer loads this file by
path before Detectron2 (and so harnet) can be imported; ``python -m harnet.collect_env`` and
the trainer (fast COCO evaluation or not) read it through ``harnet.d2_compat.info``.
"""

import importlib.util
import os
import subprocess
import tarfile

__all__ = ["D2_COMMIT", "FALLBACK_C", "install_mode", "fallback_outdated", "installed_version",
           "source_commit"]

# Upstream main, June 2026: the commit HARNet's CI builds and tests (README, install modes).
D2_COMMIT = "02b5c4e295e990042a714712c21dc79b731e8833"
# HARNet's pure-Python detectron2._C, which the fallback install copies into Detectron2.
FALLBACK_C = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_C_fallback.py")


def install_mode():
    """How Detectron2 is installed, without importing it: 'compiled' (its C++/CUDA ops
    built), 'fallback' (Python sources + HARNet's pure-Python ``detectron2._C``), 'no _C'
    or 'not installed'."""
    if importlib.util.find_spec("detectron2") is None:
        return "not installed"
    c = importlib.util.find_spec("detectron2._C")
    if c is None or c.origin is None:
        return "no _C"
    return "fallback" if c.origin.endswith(".py") else "compiled"


def fallback_outdated():
    """Whether the installed Detectron2 is an older HARNet fallback install: its ``_C.py``
    differs from ``_C_fallback.py`` or its ``detectron2.export`` still needs caffe2."""
    if install_mode() != "fallback":
        return False
    pkg = os.path.dirname(importlib.util.find_spec("detectron2").origin)
    try:
        with open(os.path.join(pkg, "_C.py")) as f, open(FALLBACK_C) as g:
            same_c = f.read() == g.read()
        with open(os.path.join(pkg, "export", "__init__.py")) as f:
            guarded = "patched by HARNet's installer" in f.read()
    except OSError:
        return True
    return not (same_c and guarded)


def installed_version():
    """``<distribution> <version>`` of the installed Detectron2, e.g. ``detectron2
    0.6+g02b5c4e...`` or ``pb1-detectron2 0.6``; None when none is installed."""
    from importlib import metadata

    for dist in ("detectron2", "pb1-detectron2"):
        try:
            return f"{dist} {metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            continue
    return None

def git_commit(folder):
    """The HEAD commit of a git checkout, or None."""
    try:
        r = subprocess.run(["git", "-C", folder, "rev-parse", "HEAD"], capture_output=True,
                           text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def tar_commit(archive):
    # `git archive` stores the commit in the pax global header's comment.
    with tarfile.open(archive) as tar:
        tar.next()
        commit = tar.pax_headers.get("comment", "")
    return commit if len(commit) == 40 and all(c in "0123456789abcdef" for c in commit) else None


def source_commit(path):
    """The commit of a local source (git checkout or ``git archive`` tarball), or None."""
    if os.path.isdir(path):
        return git_commit(path)
    try:
        return tar_commit(path)
    except (tarfile.TarError, OSError, EOFError):
        return None
