"""The training data loader of :class:`agvm.AGVMTrainer`: detectron2's batches, resumable exactly.

:class:`ResumableTrainLoader` yields the per-rank batches of detectron2's stock training loader
(``build_detection_train_loader`` with its ``TrainingSampler``), built so that a run resumed at
iteration ``k`` reads exactly what an uninterrupted run reads from iteration ``k`` on.

How:

- **Indices.** The per-rank index stream is detectron2's ``TrainingSampler``'s (same seed,
  same order as stock).
- **Batches at the index level.** With ``ASPECT_RATIO_GROUPING`` the stream is grouped by
  orientation read from the dataset dicts' ``width``/``height`` (``bucket = 0 if w > h else 1``,
  a batch emitted when its bucket is full: what ``AspectRatioGroupedDataset`` does after
  mapping, so the same images in the same batches as stock, with any number of workers).
  Without grouping, consecutive chunks of the stream (stock's batches with 0 workers; stock
  with N workers batches each worker's strided share instead). On detectron2 main, stock
  hands each worker batch-sized chunks of the sampler, so its order with N > 0 workers depends
  on N; this loader keeps the 0-worker order on both routes.
- **Workers shard batches.** Worker ``w`` of ``N`` maps batches ``w, w+N, …``; torch's
  DataLoader returns them round-robin, so the order does not depend on ``N``.
- **Augmentation randomness per item.** Each item is mapped with the global torch (CPU),
  numpy and Python RNGs seeded from (loader seed, rank, the item's position in the rank's
  index stream, retry), inside a save/restore of those RNGs: the same augmentations with 0 or
  N workers and after a resume, and with 0 workers the main process's RNG (that the model
  uses) is untouched. The DataLoader has its own ``generator``: creating an iterator draws
  nothing from the global torch RNG.
- **Resume** = start at batch ``start_batch``: the grouping is replayed at the index level
  (cheap), nothing is mapped for the skipped batches. The loader's seed is part of the
  trainer's checkpoint (with detectron2's default ``SEED -1`` a resumed run would otherwise
  draw a new sampler seed).
- **A mapper returning None** (detectron2's ``MapDataset`` convention): another index is tried,
  chosen deterministically from (seed, rank, position, retry) among the images of the same
  orientation (grouping) or all images.

Guaranteed: the batches (image ids and order) and each item's augmentation depend only on
(seed, rank, world size, per-rank batch size, grouping, the dataset dicts), not on the number
of workers nor on where the run was interrupted. Not guaranteed: random flips/resizes equal
stock detectron2's draws (same images, same batches, different augmentation draws); a resume
at another world size or batch size continues the new configuration's stream from
``start_batch``, not the old one's.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import random
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.utils.data as torchdata
from detectron2.data.common import DatasetFromList
from detectron2.utils.serialize import PicklableWrapper

__all__ = ["ResumableTrainLoader", "index_batches"]

logger = logging.getLogger(__name__)


def _orientation(d: dict) -> int:
    """detectron2's aspect-ratio bucket of a dataset dict: 0 if w > h else 1. Without
    ``width``/``height`` keys: read from the image header (EXIF rotation applied, as
    ``detection_utils.read_image`` does)."""
    if "width" in d and "height" in d:
        w, h = d["width"], d["height"]
    else:
        from detectron2.utils.file_io import PathManager
        from PIL import Image

        with PathManager.open(d["file_name"], "rb") as f:
            image = Image.open(f)
            w, h = image.size
            if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                w, h = h, w
    return 0 if w > h else 1


def index_batches(indices: Iterator[int], batch_size: int, orientation: Optional[Sequence[int]]):
    """Group a per-rank index stream into batches of ``(position, index)`` pairs (position =
    place in the stream). ``orientation`` None: consecutive chunks; else detectron2's
    ``AspectRatioGroupedDataset`` rule on ``orientation[index]``."""
    if orientation is None:
        it = enumerate(indices)
        while True:
            batch = list(itertools.islice(it, batch_size))
            if len(batch) < batch_size:
                return
            yield batch
    buckets: List[List[Tuple[int, int]]] = [[], []]
    for pos, idx in enumerate(indices):
        bucket = buckets[orientation[idx]]
        bucket.append((pos, idx))
        if len(bucket) == batch_size:
            yield bucket[:]
            del bucket[:]


def _seed_words(*key: int) -> List[int]:
    return [int(x) for x in np.random.SeedSequence([int(k) & 0xFFFFFFFFFFFFFFFF for k in key]).generate_state(4)]


@contextlib.contextmanager
def _seeded_rngs(*key: int):
    """Global torch (CPU generator only: CUDA untouched), numpy and Python RNGs seeded from
    ``key`` inside the block; their previous states put back afterwards."""
    torch_state, np_state, py_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
    words = _seed_words(*key)
    torch.default_generator.manual_seed((words[0] << 32 | words[1]) & 0x7FFFFFFFFFFFFFFF)
    np.random.seed(words[2:4])
    random.seed(words[0] << 32 | words[3])
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        np.random.set_state(np_state)
        random.setstate(py_state)


def _identity(x):
    return x


class _BatchStream(torchdata.IterableDataset):
    """The mapped batches ``start, start+1, …`` of one rank; in a DataLoader worker, only the
    worker's share (batches ``start + w, start + w + N, …``)."""

    def __init__(self, loader: "ResumableTrainLoader", start: int):
        self.dataset = loader.dataset
        self.mapper = loader.mapper
        self.sampler = loader.sampler
        self.batch_size = loader.batch_size
        self.orientation = loader.orientation
        self.seed = loader.seed
        self.rank = loader.rank
        self.start = start

    def __iter__(self):
        info = torchdata.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        batches = index_batches(iter(self.sampler), self.batch_size, self.orientation)
        for number, batch in enumerate(batches):
            if number < self.start or (number - self.start) % workers != worker:
                continue
            yield [self._map(pos, idx) for pos, idx in batch]

    def _map(self, pos: int, idx: int):
        tried = [idx]
        for retry in itertools.count():
            with _seeded_rngs(self.seed, self.rank, pos, retry):
                out = self.mapper(self.dataset[idx])
            if out is not None:
                return out
            candidates = self._fallbacks(tried)
            if not candidates:
                raise RuntimeError(f"the train mapper returned None for every candidate of index {tried[0]}: {tried}")
            idx = random.Random(_seed_words(self.seed, self.rank, pos, retry, 1)[0]).choice(candidates)
            tried.append(idx)
            if retry >= 2:
                logger.warning(f"the train mapper failed for index {tried[0]} and {retry} replacements; trying {idx}")

    def _fallbacks(self, tried: List[int]) -> List[int]:
        bad = set(tried)
        n = len(self.dataset)
        if self.orientation is None:
            return [i for i in range(n) if i not in bad]
        want = self.orientation[tried[0]]
        return [i for i in range(n) if self.orientation[i] == want and i not in bad]


class ResumableTrainLoader:
    """An iterable of per-rank training batches (lists of mapped dicts); see the module docstring.

    Args:
        dataset_dicts: detectron2 dataset dicts (``get_detection_dataset_dicts``).
        mapper: the train mapper (e.g. ``DatasetMapper(cfg, True)``); picklable for workers.
        sampler: a ``detectron2.data.samplers.TrainingSampler`` built in this process (its seed,
            rank and world size fix the index stream).
        batch_size: images per rank and iteration.
        aspect_ratio_grouping: detectron2's ``DATALOADER.ASPECT_RATIO_GROUPING``.
        num_workers: DataLoader worker processes (0: map in this process).

    Attributes: ``start_batch`` (the first batch the next iterator yields; set on resume),
    ``seed`` (the sampler's and the augmentations' seed; in :meth:`state_dict`).
    Iterators are lazy: nothing starts (no worker) before the first ``next()``.
    """

    def __init__(self, dataset_dicts: list, mapper: Callable, sampler, batch_size: int, *,
                 aspect_ratio_grouping: bool, num_workers: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        self.orientation = np.asarray([_orientation(d) for d in dataset_dicts], dtype=np.int8) \
            if aspect_ratio_grouping else None
        self.dataset = DatasetFromList(dataset_dicts, copy=False)
        self.mapper = PicklableWrapper(mapper)
        self.sampler = sampler
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.start_batch = 0

    @property
    def seed(self) -> int:
        return int(self.sampler._seed)

    @property
    def rank(self) -> int:
        return int(self.sampler._rank)

    @property
    def world_size(self) -> int:
        return int(self.sampler._world_size)

    def state_dict(self) -> dict:
        """What a resume needs besides the iteration: the seed, and the layout it applies to."""
        return {"seed": self.seed, "world_size": self.world_size, "batch_size": self.batch_size,
                "grouping": self.orientation is not None}

    def load_state_dict(self, state: dict) -> None:
        """Take the checkpoint's seed (warning when the world size, per-rank batch or grouping
        differ: the data order then continues the new layout's stream, not the old one's)."""
        self.sampler._seed = int(state["seed"])
        mine = self.state_dict()
        changed = [f"{k} {state[k]} → {mine[k]}" for k in ("world_size", "batch_size", "grouping")
                   if k in state and state[k] != mine[k]]
        if changed:
            logger.warning("the train loader's layout changed since the checkpoint (" + ", ".join(changed)
                           + "): the data order after the resume is not the uninterrupted run's")

    def __iter__(self):
        stream = _BatchStream(self, self.start_batch)
        loader = torchdata.DataLoader(
            stream, batch_size=None, collate_fn=_identity, num_workers=self.num_workers,
            generator=torch.Generator(),  # the iterator's base seed: not from the global RNG
        )
        yield from loader
