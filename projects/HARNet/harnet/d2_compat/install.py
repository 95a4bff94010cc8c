"""Install Detectron2 into the current Python environment, choosing the best mode available.

Run as a script with the target environment's interpreter (it must not import harnet,
which needs Detectron2):

    python projects/HARNet/harnet/d2_compat/install.py [--mode auto|existing|source|fallback]

Modes, tried in this order by ``auto``:
1. ``existing``: Detectron2 is already importable; nothing is installed.
2. ``source``: Detectron2's GitHub source at a pinned commit, compiled ops included
   (needs GitHub access and a compiler; CUDA ops when a CUDA toolkit is present).
3. ``fallback``: the Python sources published on PyPI as ``pb1-detectron2==0.6`` (a 2022
   snapshot of Detectron2's main branch), installed without the extension build, plus
   HARNet's pure-Python ``detectron2._C`` (see ``_C_fallback.py``).
"""
import argparse
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request

D2_REPO = "https://github.com/facebookresearch/detectron2.git"
D2_COMMIT = "2dde706855d87baa9760fbcd0bdb6004a3937204"
SDIST_URL = (
    "https://files.pythonhosted.org/packages/60/26/"
    "48f5bbb7ee492696a21da23303daeecdfe3942c498a70d34108acf63b2bd/pb1-detectron2-0.6.tar.gz"
)
SDIST_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
HERE = os.path.dirname(os.path.abspath(__file__))
FALLBACK_C = os.path.join(HERE, "_C_fallback.py")


def log(msg):
    print(f"[harnet-install] {msg}", flush=True)


def detectron2_importable():
    # A subprocess, so a broken partial install does not poison this interpreter.
    r = subprocess.run(
        [sys.executable, "-c", "import detectron2, detectron2.modeling"],
        capture_output=True, text=True,
    )
    return r.returncode == 0


def pip_install(*args):
    # uv when present (much faster for large wheels), else pip.
    uv = shutil.which("uv")
    if uv:
        cmd = [uv, "pip", "install", "--python", sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "pip", "install", *args]
    log(" ".join(cmd))
    subprocess.run(cmd, check=True)


def github_reachable(timeout=10):
    try:
        r = subprocess.run(
            ["git", "ls-remote", D2_REPO, "HEAD"], capture_output=True, timeout=timeout,
            env={**os.environ, "GIT_TERMINAL_PROMPT": "0"},
        )
        return r.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def install_source():
    # --no-build-isolation: the extension build must see the torch already installed.
    pip_install("--no-build-isolation", f"git+{D2_REPO}@{D2_COMMIT}")


def _download_sdist(dst):
    path = os.path.join(dst, os.path.basename(SDIST_URL))
    log(f"downloading {SDIST_URL}")
    urllib.request.urlretrieve(SDIST_URL, path)
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    if digest != SDIST_SHA256:
        raise RuntimeError(f"{path}: sha256 {digest} != expected {SDIST_SHA256}")
    return path


def install_fallback():
    with tempfile.TemporaryDirectory(prefix="harnet-d2-") as tmp:
        sdist = _download_sdist(tmp)
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        src = os.path.join(tmp, "pb1-detectron2-0.6")
        setup_py = os.path.join(src, "setup.py")
        text = open(setup_py).read()
        # Skip the C++/CUDA extension (its sources are not in the sdist), relax the pin
        # black==21.4b2 (does not install on current Pythons), and ship the model-zoo
        # configs: the sdist has them inside the package, where setup.py's glob (which
        # expects a top-level configs/ folder) does not look.
        for old, new in (
            ("ext_modules=get_extensions(),", "ext_modules=[],"),
            ('"black==21.4b2",', '"black",'),
            (
                'package_data={"detectron2.model_zoo": get_model_zoo_configs()},',
                'package_data={"detectron2.model_zoo": ["configs/**/*.yaml", "configs/**/*.py"]},',
            ),
        ):
            if old not in text:
                raise RuntimeError(f"unexpected {setup_py}: {old!r} not found")
            text = text.replace(old, new)
        open(setup_py, "w").write(text)
        shutil.copyfile(FALLBACK_C, os.path.join(src, "detectron2", "_C.py"))
        # A regular (non-editable) install: the temporary source folder goes away.
        pip_install("--no-build-isolation", "--no-deps", src)


def install_mode():
    """'compiled', 'fallback' or None (not importable), without importing detectron2."""
    spec = importlib.util.find_spec("detectron2")
    if spec is None:
        return None
    c = importlib.util.find_spec("detectron2._C")
    if c is None or c.origin is None:
        return "missing-_C"
    return "fallback" if c.origin.endswith(".py") else "compiled"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", default="auto", choices=["auto", "existing", "source", "fallback"])
    args = ap.parse_args(argv)

    if args.mode in ("auto", "existing") and detectron2_importable():
        log(f"Detectron2 already importable (mode: {install_mode()}); nothing to do")
        return 0
    if args.mode == "existing":
        log("Detectron2 is not importable in this environment")
        return 1
    if args.mode == "source" or (args.mode == "auto" and github_reachable()):
        try:
            install_source()
        except subprocess.CalledProcessError:
            if args.mode == "source":
                raise
            log("source install failed; using the PyPI fallback")
            install_fallback()
    else:
        if args.mode == "auto":
            log("GitHub not reachable: installing the PyPI fallback pb1-detectron2==0.6")
        install_fallback()
    if not detectron2_importable():
        log("Detectron2 still not importable after install")
        return 1
    log(f"Detectron2 installed (mode: {install_mode()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
