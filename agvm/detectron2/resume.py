"""Exact resume: each rank's RNG state (:class:`RankRNG`), the data iterator.

The data position is the train loader's (:class:`agvm.detectron2.loader.ResumableTrainLoader`,
started at the resumed iteration's batch).
"""

from __future__ import annotations

import logging
import random
import warnings
from typing import Optional

import numpy as np
import torch
from detectron2.engine import SimpleTrainer  # noqa: F401  (the type set_data_iterator takes)
from detectron2.utils import comm

__all__ = ["RankRNG", "set_data_iterator"]

logger = logging.getLogger(__name__)


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


class RankRNG:
    """This rank's RNG states (torch CPU and CUDA, numpy, Python), saved by every rank beside
    each checkpoint (:attr:`agvm.detectron2.checkpoint.SafeCheckpointer.per_rank`) and restored by
    every rank from its own file on resume.

    Guaranteed: after a resume at the same world size every rank continues its own random
    stream, as in the uninterrupted run (RPN/RoI sampling and any other draw of the model).
    A resume at another world size restores the ranks that have a file and warns; a rank
    without one (a new rank, a checkpoint written by rank 0 alone, an older checkpoint) keeps
    the fresh stream it was seeded with (``SEED + rank``) and warns: it never takes rank 0's
    stream. Rank 0 without a file keeps the RNG state stored inside the checkpoint itself
    (rank 0's, put back by the step trainer's ``load_state_dict``).
    """

    def state_dict(self) -> dict:
        return {"rank": comm.get_rank(), "world_size": comm.get_world_size(), "rng": _rng_state()}

    def load_state_dict(self, state: Optional[dict], checkpoint: str) -> None:
        rank, world = comm.get_rank(), comm.get_world_size()
        if state is not None and state.get("rank") == rank:
            _set_rng_state(state["rng"])
            if state.get("world_size") != world and rank == 0:
                _warn(f"{checkpoint} was written by {state.get('world_size')} ranks and is resumed on {world}: the ranks "
                      "that have a saved RNG state continue it, the others start fresh streams; the run is not an "
                      "exact continuation")
            return
        if rank == 0:
            logger.info(f"rank 0: no per-rank RNG file for {checkpoint}; the RNG state stored in the checkpoint "
                        "(rank 0's), if any, applies")
            return
        _warn(f"rank {rank}: no saved RNG state for this rank beside {checkpoint} (written at another world size, by "
              "rank 0 alone, or by an older version): this rank keeps its own fresh RNG stream (not rank 0's); "
              "its random draws differ from the uninterrupted run's")


def _warn(message: str) -> None:
    logger.warning(message)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def set_data_iterator(step: SimpleTrainer, iterator) -> None:
    """Make ``step`` read its batches from ``iterator``: the attribute on detectron2 0.6, the
    object behind the read-only ``_data_loader_iter`` property on detectron2 main."""
    if isinstance(getattr(type(step), "_data_loader_iter", None), property):
        step._data_loader_iter_obj = iterator
    else:
        step._data_loader_iter = iterator
