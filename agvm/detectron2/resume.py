"""Exact resume: RNG states, the data position (a sampler that skips), the data iterator."""

from __future__ import annotations

import itertools
import random
from typing import Optional

import numpy as np
import torch
from detectron2.data.samplers import TrainingSampler
from detectron2.engine import SimpleTrainer

__all__ = ["ResumableTrainingSampler", "set_data_iterator"]


def _rng_state() -> dict:
    """torch / numpy / Python RNG states, as types ``torch.load(weights_only=True)`` accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class ResumableTrainingSampler(TrainingSampler):
    """detectron2's ``TrainingSampler`` that can skip its first ``skip`` indices (per rank),
    so that a resumed run reads the same images as an uninterrupted one."""

    skip = 0

    def __iter__(self):
        yield from itertools.islice(super().__iter__(), self.skip, None)


def _share_iterator(step: SimpleTrainer, stock: Optional[SimpleTrainer]) -> None:
    """Give ``step`` ``stock``'s data iterator (or a fresh one), on detectron2 0.6 (attribute)
    and on main (lazy ``_data_loader_iter_obj``)."""
    if hasattr(type(step), "_data_loader_iter") and isinstance(type(step)._data_loader_iter, property):
        step._data_loader_iter_obj = getattr(stock, "_data_loader_iter_obj", None) if stock else None
    elif stock is not None:
        step._data_loader_iter = stock._data_loader_iter
    else:
        step._data_loader_iter = iter(step.data_loader)


def set_data_iterator(step: SimpleTrainer, iterator) -> None:
    """Make ``step`` read its batches from ``iterator``: the attribute on detectron2 0.6, the
    object behind the read-only ``_data_loader_iter`` property on detectron2 main."""
    if isinstance(getattr(type(step), "_data_loader_iter", None), property):
        step._data_loader_iter_obj = iterator
    else:
        step._data_loader_iter = iterator


def _find_sampler(loader, depth: int = 6) -> Optional[ResumableTrainingSampler]:
    """The ResumableTrainingSampler inside a detectron2 train loader, if any."""
    seen, frontier = set(), [loader]
    for _ in range(depth):
        nxt = []
        for obj in frontier:
            if isinstance(obj, ResumableTrainingSampler):
                return obj
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            for attr in ("dataset", "sampler", "_sampler", "batch_sampler"):
                child = getattr(obj, attr, None)
                if child is not None:
                    nxt.append(child)
        frontier = nxt
    return None
