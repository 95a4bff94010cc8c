#!/usr/bin/env python
"""Install Detectron2 into the current Python environment, choosing the best mode available.

Run as a script with the target environment's interpreter (it must not import harnet,
which needs Detectron2):

    python tools/install_detectron2.py [--mode auto|existing|source|fallback]

Modes, tried in this order by ``auto``:
1. ``existing``: Detectron2 is already importable; nothing is installed.
2. ``source``: Detectron2's source, compiled (C++ ops; CUDA ops where a CUDA toolkit is
   found). The source is ``$HARNET_D2_SOURCE`` (a directory or ``.tar.gz`` of Detectron2's
   source tree, no network needed) or else GitHub at the tested commit ``D2_COMMIT``. A
   built wheel is cached (``$HARNET_CACHE``, default ``~/.cache/harnet``) per source archive
   and torch version, so a second environment from the same archive installs in seconds.
3. ``fallback``: the Python sources published on PyPI as ``pb1-detectron2==0.6`` (a 2022
   snapshot of Detectron2's main branch), installed without the extension build, plus
   HARNet's pure-Python ``detectron2._C`` (``harnet/d2_compat/_C_fallback.py``), with
   ``detectron2.export``'s caffe2 import made optional as upstream does.

The installed distribution's version names what was installed: ``0.6+g<commit>`` for a
source build whose commit is known (git checkout or ``git archive`` tarball), the PyPI
name ``pb1-detectron2`` for the fallback. ``python -m harnet.collect_env`` prints both.
"""
import argparse
import glob
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
SDIST_URL = (
    "https://files.pythonhosted.org/packages/60/26/"
    "48f5bbb7ee492696a21da23303daeecdfe3942c498a70d34108acf63b2bd/pb1-detectron2-0.6.tar.gz"
)
SDIST_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_info():
    """harnet/d2_compat/info.py (standard library only), loaded by path: this bootstrap
    runs before Detectron2, and so harnet, can be imported; it is the one script that does."""
    path = os.path.join(REPO, "projects", "HARNet", "harnet", "d2_compat", "info.py")
    spec = importlib.util.spec_from_file_location("harnet_d2_install_info", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_info = _load_info()
D2_COMMIT, FALLBACK_C = _info.D2_COMMIT, _info.FALLBACK_C
install_mode, fallback_outdated = _info.install_mode, _info.fallback_outdated
installed_version = _info.installed_version
source_commit, _git_commit, _tar_commit = _info.source_commit, _info.git_commit, _info.tar_commit


class SourceError(RuntimeError):
    """``HARNET_D2_SOURCE`` is missing or is not a Detectron2 source tree."""


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


def pip_reinstall(*args):
    """Install, replacing an installed distribution of the same name and version."""
    pip_install("--reinstall" if shutil.which("uv") else "--force-reinstall", *args)


def uninstall_other(dist):
    """Remove the distribution ``dist`` if installed: Detectron2's GitHub build
    ("detectron2") and the PyPI fallback ("pb1-detectron2") hold the same package."""
    from importlib import metadata

    try:
        metadata.version(dist)
    except metadata.PackageNotFoundError:
        return
    uv = shutil.which("uv")
    cmd = ([uv, "pip", "uninstall", "--python", sys.executable, dist] if uv
           else [sys.executable, "-m", "pip", "uninstall", "-y", dist])
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


# ------------------------------------------------------------------ source (compiled)


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _tree_root(folder):
    """The folder holding Detectron2's ``setup.py`` (the top, or its only subfolder)."""
    for cand in [folder] + sorted(glob.glob(os.path.join(folder, "*", ""))):
        if os.path.isfile(os.path.join(cand, "setup.py")) and os.path.isdir(
            os.path.join(cand, "detectron2", "layers", "csrc")
        ):
            return os.path.normpath(cand)
    return None


def _torch_tag():
    r = subprocess.run(
        [sys.executable, "-c",
         "import sys, torch; print(f'py{sys.version_info[0]}{sys.version_info[1]}-torch'"
         "+torch.__version__+'-cuda'+str(torch.version.cuda))"],
        capture_output=True, text=True, check=True,
    )
    return r.stdout.strip().replace("+", "_")


def _build_wheel(tree, commit, out_dir):
    """Build Detectron2's wheel from ``tree`` into ``out_dir`` with the environment's torch."""
    env = dict(os.environ)
    if commit:  # the installed version names the commit: 0.6+g<commit>
        env["D2_VERSION_SUFFIX"] = f"+g{commit}"
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps",
           "-w", out_dir, tree]
    log(" ".join(cmd) + "  (compiling Detectron2's ops: minutes)")
    subprocess.run(cmd, check=True, env=env)
    wheels = glob.glob(os.path.join(out_dir, "detectron2-*.whl"))
    if len(wheels) != 1:
        raise SourceError(f"building {tree} gave {wheels}, expected one detectron2 wheel")
    return wheels[0]


def _cache_dir():
    return os.environ.get("HARNET_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "harnet")


def install_local_source(path):
    """Compile and install Detectron2 from a local source tree or ``.tar.gz`` of one.

    Raises:
        SourceError: ``path`` does not exist or holds no Detectron2 source tree.
    """
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise SourceError(f"HARNET_D2_SOURCE={path}: no such file or directory")
    with tempfile.TemporaryDirectory(prefix="harnet-d2-src-") as tmp:
        cache = None
        if os.path.isdir(path):
            tree, commit = _tree_root(path), _git_commit(path)
            if tree is None:
                raise SourceError(f"HARNET_D2_SOURCE={path}: not a Detectron2 source tree "
                                  "(no setup.py next to detectron2/layers/csrc)")
        else:
            try:
                commit = _tar_commit(path)
                with tarfile.open(path) as tar:
                    tar.extractall(tmp, filter="data")
            except (tarfile.TarError, OSError, EOFError) as e:
                raise SourceError(f"HARNET_D2_SOURCE={path}: not a readable .tar.gz "
                                  f"({type(e).__name__}: {e})") from e
            tree = _tree_root(tmp)
            if tree is None:
                raise SourceError(f"HARNET_D2_SOURCE={path}: the archive holds no Detectron2 "
                                  "source tree (no setup.py next to detectron2/layers/csrc)")
            # An archive does not change under the same hash: cache its wheel.
            cache = os.path.join(_cache_dir(), "wheels", f"{_sha256(path)[:16]}-{_torch_tag()}")
        wheels = glob.glob(os.path.join(cache, "detectron2-*.whl")) if cache else []
        if wheels:
            log(f"using the cached build {wheels[0]}")
            wheel = wheels[0]
        else:
            wheel = _build_wheel(tree, commit, os.path.join(tmp, "wheel"))
            if cache:
                os.makedirs(cache, exist_ok=True)
                shutil.copy(wheel, cache)
        uninstall_other("pb1-detectron2")
        pip_reinstall("--no-deps", wheel)


def install_git_source():
    # --no-build-isolation: the extension build must see the torch already installed.
    uninstall_other("pb1-detectron2")
    pip_reinstall("--no-build-isolation", "--no-deps", f"git+{D2_REPO}@{D2_COMMIT}")


# ------------------------------------------------------------------ fallback (PyPI)


def _download_sdist(dst):
    path = os.path.join(dst, os.path.basename(SDIST_URL))
    log(f"downloading {SDIST_URL}")
    urllib.request.urlretrieve(SDIST_URL, path)
    digest = _sha256(path)
    if digest != SDIST_SHA256:
        raise RuntimeError(f"{path}: sha256 {digest} != expected {SDIST_SHA256}")
    return path


def _patch(path, replacements):
    text = open(path).read()
    for old, new in replacements:
        if old not in text:
            raise RuntimeError(f"unexpected {path}: {old!r} not found")
        text = text.replace(old, new)
    open(path, "w").write(text)


# Upstream's detectron2/export/__init__.py since 2022: caffe2 is optional, so TracingAdapter,
# scripting_with_instances and detectron2.utils.analysis import without it.
_EXPORT_GUARD = """try:
    from caffe2.proto import caffe2_pb2 as _tmp
    from caffe2.python import core

    # caffe2 is optional (as in upstream Detectron2; patched by HARNet's installer)
except ImportError:
    pass
else:
    from .api import *
"""


def install_fallback():
    with tempfile.TemporaryDirectory(prefix="harnet-d2-") as tmp:
        sdist = _download_sdist(tmp)
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        src = os.path.join(tmp, "pb1-detectron2-0.6")
        # Skip the C++/CUDA extension (its sources are not in the sdist), relax the pin
        # black==21.4b2 (does not install on current Pythons), and ship the model-zoo
        # configs: the sdist has them inside the package, where setup.py's glob (which
        # expects a top-level configs/ folder) does not look.
        _patch(os.path.join(src, "setup.py"), (
            ("ext_modules=get_extensions(),", "ext_modules=[],"),
            ('"black==21.4b2",', '"black",'),
            (
                'package_data={"detectron2.model_zoo": get_model_zoo_configs()},',
                'package_data={"detectron2.model_zoo": ["configs/**/*.yaml", "configs/**/*.py"]},',
            ),
        ))
        _patch(os.path.join(src, "detectron2", "export", "__init__.py"),
               (("from .api import *\n", _EXPORT_GUARD),))
        shutil.copyfile(FALLBACK_C, os.path.join(src, "detectron2", "_C.py"))
        # A regular (non-editable) install: the temporary source folder goes away.
        uninstall_other("detectron2")
        pip_reinstall("--no-build-isolation", "--no-deps", src)


# ------------------------------------------------------------------ driver


def _plan(mode, local_source):
    """What to do: 'nothing', 'local' (HARNET_D2_SOURCE), 'git', 'git-or-fallback',
    'fallback' or 'missing' (mode existing, nothing importable)."""
    if local_source and mode in ("auto", "source"):
        commit = source_commit(os.path.abspath(os.path.expanduser(local_source)))
        installed = installed_version() or ""
        if install_mode() == "compiled" and commit and installed.endswith(f"+g{commit}"):
            return "nothing"
        return "local"
    if mode == "fallback":
        return "fallback"
    if mode == "source":
        return "git"
    if fallback_outdated() and mode == "auto":
        return "fallback"  # our own older fallback install: refresh its patches
    if detectron2_importable():
        return "nothing"
    if mode == "existing":
        return "missing"
    return "git-or-fallback" if github_reachable() else "fallback"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", default="auto", choices=["auto", "existing", "source", "fallback"])
    args = ap.parse_args(argv)
    local_source = os.environ.get("HARNET_D2_SOURCE", "")
    plan = _plan(args.mode, local_source)
    if plan == "nothing":
        log(f"Detectron2 already installed ({installed_version()}, mode: {install_mode()}); "
            "nothing to do")
        return 0
    if plan == "missing":
        log("Detectron2 is not importable in this environment")
        return 1
    try:
        if plan == "local":
            install_local_source(local_source)
        elif plan == "git":
            install_git_source()
        elif plan == "git-or-fallback":
            try:
                install_git_source()
            except subprocess.CalledProcessError:
                log("source install failed; using the PyPI fallback")
                install_fallback()
        else:
            log("installing the PyPI fallback pb1-detectron2==0.6 (GitHub not reachable, "
                "or asked for, or refreshing HARNet's patches of an older fallback install)")
            install_fallback()
    except SourceError as e:
        log(f"error: {e}")
        return 2
    if not detectron2_importable():
        log("Detectron2 still not importable after install")
        return 1
    log(f"Detectron2 installed ({installed_version()}, mode: {install_mode()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
