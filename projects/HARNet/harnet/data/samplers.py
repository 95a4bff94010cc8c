"""A training loader whose data are a function of (seed, iteration): exact ``--resume``.

Detectron2's training loader restarts its sampler's stream at the first item when a run
resumes, and the augmentations draw from the process's global random state: a resumed run
sees other images, other flips and other resizes than the uninterrupted run it continues.

:class:`ResumableTrainLoader` keeps Detectron2's samplers (``TrainingSampler``,
``RepeatFactorTrainingSampler``: their infinite, rank-sharded index stream for a fixed
seed) and makes everything after them a function of the position in that stream:

- it starts the stream at iteration ``start_iter``; with aspect-ratio grouping the two
  buckets' contents at that iteration are recomputed from the dataset dicts' ``width`` and
  ``height`` (no image is read) and fed first, so batch ``k`` is the same whether the run
  was interrupted or not;
- item ``j`` of rank ``r`` (global position ``j * world_size + r``) is mapped with
  ``random``, ``numpy.random`` and ``torch`` seeded from ``(seed, global position)``, then
  the previous random states are restored;
- with ``num_workers > 0`` the stream is dealt to the DataLoader workers one item at a
  time, and the DataLoader returns the workers' items round-robin: stream order.

Assumes a mapper that returns an item for every input (HARNet's does; images without a
valid box are removed before mapping): an item the mapper drops (``None``) is skipped,
which still gives the same batches on every run from scratch but not after a resume that
crosses it (a warning says so).
"""
import itertools
import logging
import random
from contextlib import contextmanager

import numpy as np
import torch
import torch.utils.data as torchdata
from detectron2.utils import comm

__all__ = ["ResumableTrainLoader", "item_seed"]

logger = logging.getLogger(__name__)


def item_seed(seed, position):
    """The 32-bit seed of the augmentations of the item at global stream ``position``.

    Args:
        seed (int): the run's data seed (>= 0).
        position (int): position in the global (all-rank) index stream (>= 0).
    """
    return int(np.random.SeedSequence([int(seed), int(position)]).generate_state(1)[0])


@contextmanager
def _seeded(seed):
    # Seed the three global generators augmentations use; restore them afterwards so that
    # the loader (num_workers=0 runs it in the training process) leaves no trace.
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


def _identity(x):
    return x


class _Batcher:
    """Groups items into batches of ``batch_size``, one bucket per key (aspect ratio group:
    landscape vs portrait, as Detectron2's ``AspectRatioGroupedDataset``; one key when
    grouping is off). The same code replays a run's first batches and makes its batches."""

    def __init__(self, batch_size, buckets=None):
        self.batch_size = batch_size
        self.buckets = buckets if buckets is not None else {}

    def add(self, key, item):
        """Returns the completed batch (list) or None."""
        bucket = self.buckets.setdefault(key, [])
        bucket.append(item)
        if len(bucket) == self.batch_size:
            self.buckets[key] = []
            return bucket
        return None


class _MappedStream(torchdata.IterableDataset):
    """Maps the items ``first`` then this rank's sampler stream from position ``start``, as
    ``(position, index, mapped)``, each with its own seed; in a DataLoader worker only
    every ``num_workers``-th item, starting at the worker's id (picklable for workers)."""

    def __init__(self, loader, sampler, first, start):
        self.dataset, self.mapper, self.seed = loader.dataset, loader.mapper, loader.seed
        self.rank, self.world_size = loader.rank, loader.world_size
        # Built in the training process: it holds the rank (a DataLoader worker started
        # with "spawn" has no process group to ask).
        self.sampler = sampler
        self.first, self.start = first, start

    def __iter__(self):
        rest = itertools.islice(enumerate(self.sampler), self.start, None)
        items = itertools.chain(self.first, rest)
        info = torchdata.get_worker_info()
        if info is not None and info.num_workers > 1:
            items = itertools.islice(items, info.id, None, info.num_workers)
        for j, index in items:
            with _seeded(item_seed(self.seed, j * self.world_size + self.rank)):
                out = self.mapper(self.dataset[index])
            yield j, index, out


class ResumableTrainLoader:
    """Infinite training loader (``list[dict]`` batches of this rank) that can start at any
    iteration and then yields exactly the batches an uninterrupted run would.

    Args:
        dataset (list[dict]): Detectron2 dataset dicts (with ``width``/``height`` when
            ``aspect_ratio_grouping``).
        mapper (callable): dataset dict -> model input dict.
        make_sampler (callable): ``make_sampler(seed=seed)`` -> a Detectron2 training
            sampler whose iteration is this rank's infinite index stream for that seed.
        total_batch_size (int): images per iteration over all ranks.
        seed (int): the data seed (same on every rank).
        aspect_ratio_grouping (bool): batch landscape and portrait images separately.
        num_workers (int): DataLoader worker processes.

    Attributes:
        start_iter (int): the iteration of the first batch; set it (e.g. after loading a
            checkpoint) before the iteration starts.
        seed (int): may be replaced (e.g. by a checkpoint's) before the iteration starts.
    """

    def __init__(self, dataset, mapper, make_sampler, total_batch_size, seed, *,
                 aspect_ratio_grouping=True, num_workers=0):
        world = comm.get_world_size()
        if total_batch_size <= 0 or total_batch_size % world:
            raise ValueError(
                f"SOLVER.IMS_PER_BATCH={total_batch_size} must be a positive multiple of the "
                f"number of processes ({world})"
            )
        self.dataset, self.mapper, self.make_sampler = dataset, mapper, make_sampler
        self.batch_size = total_batch_size // world
        self.seed = int(seed)
        self.aspect_ratio_grouping = aspect_ratio_grouping
        self.num_workers = num_workers
        self.start_iter = 0
        self.rank, self.world_size = comm.get_rank(), world

    def _key(self, index, mapped=None):
        if not self.aspect_ratio_grouping:
            return 0
        d = self.dataset[index]
        if "width" not in d or "height" not in d:
            if mapped is None:
                raise ValueError(
                    f"{d.get('file_name', 'a dataset dict')} has no 'width'/'height': resuming "
                    "with DATALOADER.ASPECT_RATIO_GROUPING needs them in the dataset dicts"
                )
            d = mapped
        return 0 if d["width"] > d["height"] else 1

    def _replay(self, sampler):
        """The buckets' contents (``(position, index)`` pairs) when batch ``start_iter - 1``
        was completed, and the stream position after it; no image is read."""
        batcher, done, j = _Batcher(self.batch_size), 0, 0
        stream = iter(sampler)
        while done < self.start_iter:
            index = next(stream)
            if batcher.add(self._key(index), (j, index)) is not None:
                done += 1
            j += 1
        return [item for bucket in batcher.buckets.values() for item in bucket], j

    def __iter__(self):
        sampler = self.make_sampler(seed=self.seed)
        first, start = self._replay(sampler)
        loader = torchdata.DataLoader(
            _MappedStream(self, sampler, first, start), batch_size=None, num_workers=self.num_workers,
            collate_fn=_identity,
        )
        batcher = _Batcher(self.batch_size)
        warned = False
        for j, index, item in loader:
            if item is None:
                if not warned:
                    logger.warning(
                        f"The mapper dropped the item at stream position {j}: dropped items "
                        "are skipped, and a resumed run may then differ from an "
                        "uninterrupted one"
                    )
                    warned = True
                continue
            batch = batcher.add(self._key(index, item), item)
            if batch is not None:
                yield batch
