"""What a run writes into OUTPUT_DIR: HARNet's own log lines reach log.txt, and one training
at a time holds the folder (a killed run's lock does not block --resume)."""
from harnet_model_utils import REPO
import logging
import os
import signal
import subprocess
import sys
import time

import pytest

import harnet  # noqa: F401
from harnet.engine import argument_parser, main
from harnet.engine.defaults import build_config, lock_output_dir, setup
from harnet.engine.lock import LOCK_FILE, OutputDirInUseError, OutputDirLock

ROOT = REPO
DEMO_YAML = os.path.join(ROOT, "configs", "HARNet", "demo", "har_R18_shapes_demo.yaml")


def _args(out, *extra, flags=()):
    return argument_parser().parse_args(
        [*flags, "--config-file", DEMO_YAML, "OUTPUT_DIR", str(out), *extra])


def test_harnet_log_messages_reach_log_txt(tmp_path):
    # Before: only the "detectron2" and "fvcore" loggers were set up: HARNet's INFO lines
    # were lost and its warnings went to stderr without a timestamp, not to log.txt.
    setup(_args(tmp_path))
    logging.getLogger("harnet.engine.two_step").info("issue17 info probe")
    logging.getLogger("harnet.data.mapper").warning("issue17 warning probe")
    for h in logging.getLogger("harnet").handlers:
        h.flush()
    with open(tmp_path / "log.txt") as f:
        text = f.read()
    lines = [line for line in text.splitlines() if "issue17" in line]
    assert len(lines) == 2, text[-2000:]
    for line in lines:  # Detectron2's format: "[MM/DD HH:MM:SS name]: message"
        assert line.startswith("[") and "harnet." in line, line


# Another process that holds the lock, as a second training run would.
_HOLDER = """
import sys, time
from harnet.engine.lock import OutputDirLock
OutputDirLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def _hold(folder):
    p = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_second_run_into_a_held_output_dir_fails_naming_dir_and_holder(tmp_path):
    # Before: both runs trained and interleaved log.txt, metrics.json and checkpoints.
    out = tmp_path / "out"
    holder = _hold(out)
    try:
        with pytest.raises(OutputDirInUseError) as e:
            main(_args(out, "SOLVER.MAX_ITER", "2"))
        msg = str(e.value)
        assert str(out) in msg and f"pid {holder.pid}" in msg, msg
        # Nothing was written by the refused run.
        assert sorted(os.listdir(out)) == [LOCK_FILE]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The killed holder's lock file remains, but it no longer blocks (e.g. --resume).
    assert (out / LOCK_FILE).exists()
    cfg = build_config(_args(out, flags=["--resume"]))
    lock = lock_output_dir(cfg)
    try:
        assert lock is not None
        with pytest.raises(OutputDirInUseError):  # held by this process now
            OutputDirLock(str(out)).acquire()
    finally:
        lock.release()
    OutputDirLock(str(out)).acquire().release()


def test_lock_is_released_when_the_run_ends(tmp_path):
    with OutputDirLock(str(tmp_path)):
        pass
    start = time.time()
    with OutputDirLock(str(tmp_path)):
        assert time.time() - start < 5
