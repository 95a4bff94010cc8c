"""The repository as a user clones it: nothing tracked points outside it, no script or test
loads another by file path, the README stays short and links each page of docs/ once."""
import os
import re
import subprocess

import pytest

from harnet_model_utils import REPO


def _git(*args):
    try:
        return subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True,
                              check=False)
    except FileNotFoundError:
        pytest.skip("git is not installed")


def _tracked():
    r = _git("ls-files")
    if r.returncode != 0:
        pytest.skip("not a git checkout")
    return r.stdout.split()


def _grep(pattern):
    _tracked()
    r = _git("grep", "-nE", pattern)
    assert r.returncode in (0, 1), r.stderr  # 1: no match
    return r.stdout


def test_nothing_tracked_points_outside_the_repository():
    assert _grep(r"\.\./shared|reference [0-9]|[Ii]ssue [0-9]+") == ""


def test_no_module_is_loaded_by_file_path():
    hits = _grep(r"spec_from_file_location|sys\.path\.(insert|append)|load_tool\(")
    # This file names the patterns it looks for; the installer is the bootstrap that runs
    # before Detectron2, and so harnet, can be imported (it reads harnet/d2_compat/info.py).
    allowed = ("tests/tools/test_repository.py:", "tools/install_detectron2.py:")
    hits = [h for h in hits.splitlines() if not h.startswith(allowed)]
    assert hits == []


def test_readme_is_short_and_links_each_doc_once():
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    assert len(readme.splitlines()) <= 200
    docs = [p for p in _tracked() if p.startswith("docs/") and p.endswith(".md")]
    assert docs
    for page in docs:
        assert len(re.findall(r"\]\(" + re.escape(page) + r"\)", readme)) == 1, page
    # The first COCO training command comes early.
    first = next(i for i, line in enumerate(readme.splitlines())
                 if "train_net.py" in line and "har_R_50_FPN" in line)
    assert first < 80
