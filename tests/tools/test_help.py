"""Every user command in tools/ answers --help with its usage and exit status 0, without
setting anything up or starting work."""
import os
import subprocess
import sys

from harnet_model_utils import REPO

TOOLS = os.path.join(REPO, "tools")
PYTHON_TOOLS = sorted(f for f in os.listdir(TOOLS) if f.endswith(".py"))
SHELL_TOOLS = sorted(f for f in os.listdir(TOOLS) if f.endswith(".sh"))


def test_every_tool_answers_help():
    assert {"visualize.py", "export_model.py", "run_demo.sh", "setup_env.sh"} <= set(
        PYTHON_TOOLS + SHELL_TOOLS)
    # All at once: each Python command imports torch and Detectron2 (seconds each).
    procs = {name: subprocess.Popen([sys.executable, os.path.join(TOOLS, name), "--help"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in PYTHON_TOOLS}
    procs.update({name: subprocess.Popen(["bash", os.path.join(TOOLS, name), "--help"],
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         text=True)
                  for name in SHELL_TOOLS})
    for name, p in procs.items():
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, (name, err[-2000:])
        assert ("usage" in out.lower() or name in out) and len(out.splitlines()) >= 2, (name, out)
        assert "[setup]" not in out + err, (name, "--help must not set anything up")
