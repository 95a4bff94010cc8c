"""Training faults: atomic checkpoints, safe loading, and non-finite losses and weights.

What Detectron2 0.6 / fvcore already do, and what this module adds:

- fvcore's ``Checkpointer.save`` writes ``<name>.pth`` in place, then overwrites the
  ``last_checkpoint`` tag in place. A process killed during either write leaves a truncated
  file that ``--resume`` then tries to load (a re-saved name such as ``model_final``, or a
  half-written tag). :class:`AtomicDetectionCheckpointer` writes both to a temporary file in
  the same folder and ``os.replace``\\ s it (atomic on POSIX and Windows), so a kill leaves
  the previous checkpoint and tag intact.
- It refuses to save weights that are not finite (the last good checkpoint stays the
  latest one) and loads native ``.pth`` checkpoints with ``torch.load(weights_only=True)``
  explicitly (tensors, numbers, strings and containers only: no code runs while loading),
  with errors that name the file. Detectron2's ``.pkl`` model-zoo files (and ``.pyth``)
  are pickles, loaded by Detectron2's own code: only load such files from a trusted source.
- A resumed run should continue exactly like an uninterrupted one: Detectron2 0.6's
  ``DefaultTrainer`` checkpoints neither the optimizer state (``HARNetTrainer`` adds it)
  nor RetinaNet's running loss normaliser (:class:`LossNormalizerStateMixin` adds it).
- ``SimpleTrainer`` raises ``FloatingPointError("Loss became infinite or NaN at
  iteration=N ...")`` from its metrics writer, on the main process only, without naming the
  term; upstream Detectron2 may run that writer asynchronously, after the optimizer step.
  :class:`NonFiniteLossCheck` checks every process's loss terms right after the forward
  pass, before ``backward()`` and the step, and names the non-finite ones.
"""
import logging
import math
import os
import pickle
import re
import weakref

import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine.train_loop import AMPTrainer, HookBase, SimpleTrainer
from detectron2.utils import comm

__all__ = [
    "AtomicDetectionCheckpointer",
    "CorruptCheckpointError",
    "NonFiniteLossCheck",
    "GuardedSimpleTrainer",
    "GuardedAMPTrainer",
    "non_finite_parameters",
    "check_finite_losses",
    "LossNormalizerStateMixin",
    "remove_stale_temp_files",
]

logger = logging.getLogger(__name__)


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be read (truncated, corrupt, unsafe content)."""


class _AtomicFile:
    """File object writing ``<dir>/.<name>.tmp-<pid>``; ``close()`` after a successful write
    moves it onto ``path``; leaving the ``with`` block through an exception discards it."""

    def __init__(self, path, mode):
        self.path = path
        folder, base = os.path.split(path)
        self.tmp_path = os.path.join(folder, f".{base}.tmp-{os.getpid()}")
        self._f = open(self.tmp_path, mode)

    def __getattr__(self, name):
        if name == "_f":  # not yet opened
            raise AttributeError(name)
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.discard()

    def close(self):
        if self._f.closed:
            return
        self._f.flush()
        os.fsync(self._f.fileno())  # the data is on disk before the name points to it
        self._f.close()
        os.replace(self.tmp_path, self.path)

    def discard(self):
        self._f.close()
        if os.path.exists(self.tmp_path):
            os.remove(self.tmp_path)


class _AtomicWritePathManager:
    """Wraps an iopath ``PathManager``: ``open()`` for writing a local path is atomic;
    everything else is delegated."""

    def __init__(self, path_manager):
        self._pm = path_manager

    def __getattr__(self, name):
        return getattr(self._pm, name)

    def open(self, path, mode="r", **kwargs):
        local = "://" not in str(path)
        if local and any(c in mode for c in "wx") and not kwargs:
            return _AtomicFile(path, mode)
        return self._pm.open(path, mode, **kwargs)


def non_finite_parameters(model):
    """Names of the floating-point parameters of ``model`` that hold NaN or infinity.

    Returns:
        list[str]
    """
    return [
        name for name, p in model.named_parameters()
        if p.is_floating_point() and not bool(torch.isfinite(p).all())
    ]


class AtomicDetectionCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` whose saves are atomic and refuse non-finite weights, and
    whose native ``.pth`` loads use ``weights_only=True``.

    Same constructor as :class:`detectron2.checkpoint.DetectionCheckpointer`.
    """

    def __init__(self, model, save_dir="", *, save_to_disk=None, **checkpointables):
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self.path_manager = _AtomicWritePathManager(self.path_manager)
        if self.save_dir and self.save_to_disk:
            remove_stale_temp_files(self.save_dir)

    def save(self, name, **kwargs):
        """Like ``Checkpointer.save``; raises ``FloatingPointError`` (saving nothing) when a
        model parameter is not finite."""
        if self.save_dir and self.save_to_disk:
            bad = non_finite_parameters(self.model)
            if bad:
                last = self.get_checkpoint_file() if self.has_checkpoint() else "none"
                raise FloatingPointError(
                    f"Not saving checkpoint {name!r}: {len(bad)} parameter(s) hold NaN or "
                    f"infinity ({', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}). "
                    f"The last checkpoint is kept: {last}"
                )
        super().save(name, **kwargs)

    def _load_file(self, filename):
        if filename.endswith((".pkl", ".pyth")):
            # Pickle formats (Detectron2/Caffe2 model zoo, pycls): code may run while loading.
            try:
                return super()._load_file(filename)
            except Exception as e:
                raise CorruptCheckpointError(
                    f"Checkpoint {filename} cannot be read as a Detectron2 model-zoo pickle: "
                    f"{type(e).__name__}: {e}"
                ) from e
        _check_checkpoint_format(filename)
        try:
            loaded = torch.load(filename, map_location=torch.device("cpu"), weights_only=True)
        except pickle.UnpicklingError as e:
            if "Unsupported global" not in str(e):  # torch's wording for unsafe objects
                raise CorruptCheckpointError(
                    f"Checkpoint {filename} is corrupt (not a valid PyTorch pickle): {e}"
                ) from e
            raise CorruptCheckpointError(
                f"Checkpoint {filename} holds Python objects other than tensors, numbers, "
                "strings and containers, so it cannot be loaded with torch.load("
                f"weights_only=True): {e}"
            ) from e
        except Exception as e:  # torch raises anything from a damaged file (Key/IndexError...)
            raise CorruptCheckpointError(
                f"Checkpoint {filename} cannot be read (truncated or corrupt?): "
                f"{type(e).__name__}: {e}"
            ) from e
        if not isinstance(loaded, dict):
            raise CorruptCheckpointError(f"Checkpoint {filename} holds a {type(loaded).__name__}, "
                                         "expected a dict")
        return loaded if "model" in loaded else {"model": loaded}


def _check_checkpoint_format(filename):
    """Raise ``CorruptCheckpointError`` naming ``filename`` unless it starts like a file
    of ``torch.save``: a zip archive (``PK\\x03\\x04``, the default since PyTorch 1.6) or
    a pickle (protocol >= 2 starts with ``\\x80``, the legacy format)."""
    with open(filename, "rb") as f:
        head = f.read(8)
    if not head:
        raise CorruptCheckpointError(f"Checkpoint {filename} is empty (0 bytes)")
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise CorruptCheckpointError(
            f"Checkpoint {filename} is not a PyTorch checkpoint: it is neither a zip archive "
            f"nor a pickle (it starts with {head!r})"
        )


_TMP_NAME = re.compile(r"^\.(?P<base>.+)\.tmp-(?P<pid>\d+)$")


def remove_stale_temp_files(folder):
    """Remove the temporary files (``.<name>.tmp-<pid>``) that :class:`_AtomicFile` leaves
    when its process is killed during a save, in ``folder``; files of live processes (a
    save in progress) are kept.

    Returns:
        list[str]: the removed paths.
    """
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        m = _TMP_NAME.match(name)
        if m is None or _pid_alive(int(m.group("pid"))):
            continue
        path = os.path.join(folder, name)
        try:
            size = os.path.getsize(path)
            os.remove(path)
        except OSError:
            continue
        removed.append(path)
        logger.warning(
            f"Removed {path} ({size} bytes): a partial write of {m.group('base')} by process "
            f"{m.group('pid')}, which no longer runs"
        )
    return removed


def _pid_alive(pid):
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, another user's
    return True


def check_finite_losses(loss_dict, iteration):
    """Raise ``FloatingPointError`` naming the iteration and the non-finite loss terms.

    One host-device synchronisation when every term is finite (the usual case).

    Args:
        loss_dict (dict[str, Tensor]): scalar losses.
        iteration (int): the current iteration, for the message.
    """
    if not loss_dict:
        return
    terms = torch.stack([v.detach().float().reshape(()) for v in loss_dict.values()])
    if bool(torch.isfinite(terms).all()):
        return
    values = dict(zip(loss_dict, terms.tolist()))
    bad = [k for k, v in values.items() if not math.isfinite(v)]
    rank = f" on rank {comm.get_rank()}" if comm.get_world_size() > 1 else ""
    raise FloatingPointError(
        f"Loss became infinite or NaN at iteration={iteration}{rank}: "
        + ", ".join(f"{k}={values[k]}" for k in bad)
        + f" (all terms: {values}). Training stopped before the optimizer step; "
        "checkpoints saved so far are unaffected (resume with --resume, perhaps with a "
        "lower SOLVER.BASE_LR or gradient clipping)."
    )


class _LossCheckHook:
    """Forward hook of the trained model: checks the loss dict it returns in training mode.
    Holds the trainer weakly (the trainer holds the model, which holds this hook)."""

    def __init__(self, trainer):
        self.trainer = weakref.ref(trainer)

    def __call__(self, module, inputs, output):
        trainer = self.trainer()
        if trainer is None or not module.training:
            return
        if isinstance(output, torch.Tensor):  # SimpleTrainer accepts a bare total loss too
            output = {"total_loss": output}
        if isinstance(output, dict):
            check_finite_losses(output, trainer.iter)


class NonFiniteLossCheck:
    """Mixin for Detectron2's ``SimpleTrainer`` / ``AMPTrainer``: every process checks its
    own loss terms with :func:`check_finite_losses` as soon as the model returns them.

    Why a forward hook on the model (Detectron2's documented place to act on the losses)
    rather than the metrics writer: Detectron2's own check runs in ``write_metrics`` on the
    main process only and names no term, and upstream Detectron2 can write metrics
    asynchronously (``async_write_metrics=True``: a worker thread, after which the optimizer
    step has already run). The hook runs in the training thread of every process, before
    ``backward()`` and the optimizer step, with either Detectron2 version. Forward hooks that
    a user registers later on the same model run after the check.
    """

    def __init__(self, model, *args, **kwargs):
        super().__init__(model, *args, **kwargs)
        self._loss_check = model.register_forward_hook(_LossCheckHook(self))


class GuardedSimpleTrainer(NonFiniteLossCheck, SimpleTrainer):
    """``SimpleTrainer`` with :class:`NonFiniteLossCheck`."""


class GuardedAMPTrainer(NonFiniteLossCheck, AMPTrainer):
    """``AMPTrainer`` with :class:`NonFiniteLossCheck`. Under AMP the loss is checked in
    full precision; non-finite *gradients* are handled by the grad scaler as usual."""


class _GatherLossNormalizers(HookBase):
    """After every step of a multi-process run, all ranks' ``loss_normalizer`` values
    (each rank keeps its own running mean), so that a checkpoint, written by rank 0 alone,
    holds every rank's. First among the hooks on every rank: the same collective order."""

    def after_step(self):
        self.trainer._gather_loss_normalizers()


class LossNormalizerStateMixin:
    """Mixin for a ``DefaultTrainer`` subclass (first among the bases): the checkpointed
    trainer state also holds the model's ``loss_normalizer``, one per process, so that a
    resumed run continues exactly like an uninterrupted one.

    RetinaNet's ``loss_normalizer`` (the running mean of the number of foreground anchors
    that normalises the losses, momentum 0.9) is a plain attribute outside the model's state
    dict: Detectron2 restarts it at its initial value (100) on resume. Each process updates
    its own from its own images, so a checkpoint of rank 0's value alone would give every
    rank rank 0's on resume (measured: 0.0048 max weight difference after 16 iterations on
    2 CPU processes, ``dev/check_resume.py --procs 2``; 0 with every rank's).
    """

    _loss_normalizers = None  # every rank's, gathered after each step (multi-process)

    def _unwrapped_model(self):
        model = self._trainer.model
        return getattr(model, "module", model)  # DistributedDataParallel

    def _own_loss_normalizer(self):
        value = getattr(self._unwrapped_model(), "loss_normalizer", None)
        return float(value) if isinstance(value, (int, float)) else None

    def _gather_loss_normalizers(self):
        self._loss_normalizers = comm.all_gather(self._own_loss_normalizer())

    def register_hooks(self, hooks):
        # (Here rather than in build_hooks, which subclasses such as LazyConfigTrainer
        # replace.) Once, before the first hooks, on every rank.
        if comm.get_world_size() > 1 and not getattr(self, "_gathers_normalizers", False):
            self._gathers_normalizers = True
            hooks = [_GatherLossNormalizers()] + list(hooks)
        super().register_hooks(hooks)

    def state_dict(self):
        ret = super().state_dict()
        own = self._own_loss_normalizer()
        if own is not None:
            ret["loss_normalizer"] = own
            gathered = self._loss_normalizers
            if gathered is not None and len(gathered) == comm.get_world_size() > 1:
                ret["loss_normalizers"] = list(gathered)  # index: rank
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        per_rank = state_dict.get("loss_normalizers")
        if per_rank is not None and len(per_rank) == comm.get_world_size():
            self._unwrapped_model().loss_normalizer = per_rank[comm.get_rank()]
        elif "loss_normalizer" in state_dict:
            if comm.get_world_size() > 1:
                logging.getLogger(__name__).warning(
                    "The checkpoint holds the loss normaliser of "
                    f"{len(per_rank) if per_rank else 1} process(es), this run has "
                    f"{comm.get_world_size()}: every process resumes with rank 0's"
                )
            self._unwrapped_model().loss_normalizer = state_dict["loss_normalizer"]
