"""One training run per output folder: an advisory lock on ``OUTPUT_DIR/.harnet.lock``.

Two trainings into one ``OUTPUT_DIR`` would interleave ``log.txt`` and ``metrics.json`` and
overwrite each other's checkpoints. The training command takes an exclusive ``flock`` on
the lock file (main process) before it writes anything there and holds it until it ends.
The kernel releases a ``flock`` when its process exits, killed or not, so a lock file left
by a killed run never blocks a ``--resume``; the file only records who holds it, for the
error message. POSIX only (``fcntl``); elsewhere no lock is taken (with a warning).
"""
import datetime
import json
import logging
import os
import socket
import sys

__all__ = ["OutputDirLock", "OutputDirInUseError", "LOCK_FILE"]

LOCK_FILE = ".harnet.lock"
logger = logging.getLogger(__name__)

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


class OutputDirInUseError(RuntimeError):
    """Another live process holds the output folder's lock."""


class OutputDirLock:
    """Exclusive lock of an output folder for the lifetime of a run.

    Example::

        with OutputDirLock(cfg.OUTPUT_DIR):
            trainer.train()

    Raises (on enter / :meth:`acquire`):
        OutputDirInUseError: naming the folder and the holder (pid, host, start time,
            command) when another live process holds it.
    """

    def __init__(self, output_dir):
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, LOCK_FILE)
        self._fd = None

    def acquire(self):
        if fcntl is None:
            logger.warning(f"No fcntl on this platform: {self.output_dir} is not locked")
            return self
        os.makedirs(self.output_dir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(fd)
            os.close(fd)
            raise OutputDirInUseError(
                f"OUTPUT_DIR {self.output_dir} is in use by another training run ({holder}); "
                "wait for it to end, stop it, or choose another OUTPUT_DIR"
            ) from None
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        return self

    def release(self):
        if self._fd is not None:
            # The file stays (removing it would race with a waiting acquirer); its holder
            # line is cleared so that it does not name a finished run.
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _read_holder(fd):
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "holder unknown"
    return (f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}: "
            f"{info.get('command')}")
