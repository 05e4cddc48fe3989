"""metrics.json and tensorboard writers that keep every AGVM update and survive a kill."""

from __future__ import annotations

import json
import math
import os
from typing import Dict

from detectron2.utils.events import JSONWriter, TensorboardXWriter, get_event_storage

__all__ = ["ExactJSONWriter", "ExactTensorboardWriter", "truncate_metrics"]


EXACT_PREFIX = "agvm/"


def _unsmoothed_backlog(storage, last_write: int):
    """``{iteration: {key: value}}`` of the unsmoothed ``agvm/*`` scalars put after
    ``last_write`` that the stock writers would drop (every entry but each key's latest,
    which they write themselves)."""
    backlog: Dict[int, Dict[str, float]] = {}
    for key, history in storage.histories().items():
        if not key.startswith(EXACT_PREFIX) or storage.smoothing_hints().get(key, True):
            continue
        values = history.values()  # fvcore's own list, oldest first: no copy
        # newest first (the latest excluded), stopping at the last write: O(new entries)
        i = len(values) - 2
        while i >= 0 and values[i][1] > last_write:
            value, it = values[i]
            backlog.setdefault(int(it), {})[key] = value
            i -= 1
    return backlog


def _strict(value):
    """A JSON-safe scalar: non-finite floats become None (``null``)."""
    value = float(value)
    return value if math.isfinite(value) else None


class ExactJSONWriter(JSONWriter):
    """detectron2's JSONWriter, plus every ``agvm/*`` value put between two writes (detectron2
    writes only the latest per key), so Φ, μ and lr of every AGVM update reach metrics.json;
    one row per iteration, in iteration order, strict JSON (NaN/inf written as ``null``),
    flushed and fsync'ed at every write."""

    def write(self):
        storage = get_event_storage()
        rows = _unsmoothed_backlog(storage, self._last_write)
        for key, (value, it) in storage.latest_with_smoothing_hint(self._window_size).items():
            if it > self._last_write:
                rows.setdefault(int(it), {})[key] = value
        for it in sorted(rows):
            row = {k: _strict(v) for k, v in rows[it].items()}
            row["iteration"] = it
            self._file_handle.write(json.dumps(row, sort_keys=True, allow_nan=False) + "\n")
        if rows:
            self._last_write = max(rows)
        self._file_handle.flush()
        try:
            os.fsync(self._file_handle.fileno())
        except (AttributeError, OSError):
            pass


def truncate_metrics(path: str, start_iter: int) -> int:
    """Drop the rows of ``iteration`` ≥ ``start_iter`` (and unreadable, half-written lines) from
    a metrics.json, in place (writers holding it open in append mode keep appending at the new
    end). Returns the number of lines dropped."""
    if not os.path.exists(path):
        return 0
    with open(path, "r+") as f:
        lines = f.read().splitlines()
        keep = []
        for line in lines:
            try:
                if json.loads(line)["iteration"] < start_iter:
                    keep.append(line)
            except (ValueError, KeyError, TypeError):
                continue
        f.seek(0)
        f.write("".join(line + "\n" for line in keep))
        f.truncate()
        f.flush()
        os.fsync(f.fileno())
    return len(lines) - len(keep)


class ExactTensorboardWriter(TensorboardXWriter):
    """detectron2's TensorboardXWriter, plus every ``agvm/*`` value put between two writes;
    :meth:`flush` puts the events on disk, :meth:`purge_from` drops those of a killed run."""

    def __init__(self, log_dir: str, window_size: int = 20, **kwargs):
        super().__init__(log_dir, window_size, **kwargs)
        self.log_dir = log_dir

    def flush(self):
        """Write the pending events to the event file."""
        self._writer.flush()

    def purge_from(self, step: int):
        """Reopen the event file so that tensorboard discards the events at ``step`` and later
        (a resumed run logs them again)."""
        from torch.utils.tensorboard import SummaryWriter

        self.close()
        self._writer = SummaryWriter(self.log_dir, purge_step=step)

    def write(self):
        backlog = _unsmoothed_backlog(get_event_storage(), self._last_write)
        for it in sorted(backlog):
            for key, value in backlog[it].items():
                self._writer.add_scalar(key, value, it)
        super().write()
