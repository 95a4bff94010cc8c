"""Detectron2 install modes (tools/install_detectron2.py) and what each installed version
offers: a bad HARNET_D2_SOURCE is an error naming it; collect_env names the version; both
versions import detectron2.export (upstream guards its caffe2 import, the fallback install
patches 0.6 the same way)."""
from harnet_model_utils import REPO
import io
import os
import subprocess
import sys
import tarfile

import pytest

from harnet.collect_env import _describe_distribution
from harnet.d2_compat import info as install

INSTALL = os.path.join(REPO, "tools", "install_detectron2.py")


def _run_install(env_source, *args):
    # A copy of the environment where the source is the only change; nothing gets installed
    # because every case fails before the build.
    env = dict(os.environ, HARNET_D2_SOURCE=str(env_source))
    return subprocess.run([sys.executable, INSTALL, *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_missing_source_path_is_named(tmp_path):
    missing = tmp_path / "no" / "detectron2"
    r = _run_install(missing)
    assert r.returncode == 2
    assert f"HARNET_D2_SOURCE={missing}: no such file or directory" in r.stdout


def test_folder_without_detectron2_tree_is_named(tmp_path):
    (tmp_path / "setup.py").write_text("# not detectron2\n")
    r = _run_install(tmp_path, "--mode", "source")
    assert r.returncode == 2
    assert f"HARNET_D2_SOURCE={tmp_path}: not a Detectron2 source tree" in r.stdout


def test_corrupt_archive_is_named(tmp_path):
    bad = tmp_path / "detectron2.tar.gz"
    bad.write_bytes(b"\x1f\x8b not really gzip")
    r = _run_install(bad)
    assert r.returncode == 2
    assert f"HARNET_D2_SOURCE={bad}: not a readable .tar.gz" in r.stdout


def test_archive_without_tree_is_named(tmp_path):
    archive = tmp_path / "other.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        data = b"print('hi')\n"
        info = tarfile.TarInfo("other/setup.py")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    r = _run_install(archive)
    assert r.returncode == 2
    assert "the archive holds no Detectron2 source tree" in r.stdout


def test_setup_env_names_missing_source(tmp_path):
    root = REPO
    missing = tmp_path / "d2.tar.gz"
    r = subprocess.run(["bash", os.path.join(root, "tools", "setup_env.sh")], capture_output=True,
                       text=True, env=dict(os.environ, HARNET_D2_SOURCE=str(missing),
                                           HARNET_VENV=str(tmp_path / "venv")), timeout=60)
    assert r.returncode == 2
    assert f"HARNET_D2_SOURCE={missing}: no such file or directory" in r.stderr
    assert not (tmp_path / "venv").exists()  # failed before creating anything


def test_git_archive_commit_is_read_from_the_pax_header(tmp_path):
    # `git archive` writes the commit as the pax global header's comment.
    commit = "02b5c4e295e990042a714712c21dc79b731e8833"
    archive = tmp_path / "d2.tar.gz"
    with tarfile.open(archive, "w:gz", format=tarfile.PAX_FORMAT,
                      pax_headers={"comment": commit}) as tar:
        tar.addfile(tarfile.TarInfo("detectron2/"))
    assert install.source_commit(str(archive)) == commit
    assert install.source_commit(str(tmp_path)) is None  # a folder that is no git checkout


def test_distribution_description_names_version_and_commit():
    assert "PyPI snapshot" in _describe_distribution("pb1-detectron2 0.6")
    tested = _describe_distribution(f"detectron2 0.6+g{install.D2_COMMIT}")
    assert f"source commit {install.D2_COMMIT}: the commit HARNet's CI tests" in tested
    assert "untested commit" in _describe_distribution("detectron2 0.6+g" + "a" * 40)
    assert "commit unknown" in _describe_distribution("detectron2 0.6")


def test_installed_version_matches_install_mode():
    dist = install.installed_version()
    mode = install.install_mode()
    assert dist is not None
    # The fallback is the PyPI snapshot; a compiled install is Detectron2's own distribution.
    assert dist.startswith("pb1-detectron2 ") == (mode == "fallback"), (dist, mode)


def test_detectron2_export_and_analysis_import():
    # Upstream guards caffe2 in detectron2.export; the fallback install patches 0.6 alike.
    r = subprocess.run(
        [sys.executable, "-c",
         "from detectron2.export import TracingAdapter, scripting_with_instances; "
         "from detectron2.utils.analysis import FlopCountAnalysis; print('ok')"],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().endswith("ok")
