"""``SafeCheckpointer``: detectron2's checkpointer, made crash-safe.

- **Atomic writes.** A checkpoint is written to ``<name>.pth.tmp``, flushed and fsync'ed, then
  renamed; ``last_checkpoint`` likewise. A crash or a full disk never leaves a truncated file
  under a checkpoint's final name, and ``last_checkpoint`` only ever names a complete file.
- **Never poisoned.** A checkpoint whose parameters or optimizer state hold a non-finite value
  is refused (``FloatingPointError``), so ``last_checkpoint`` keeps naming the last good one.
- **Logs first.** ``before_save`` (set by :class:`agvm.AGVMTrainer`: flush the metrics writers)
  runs before the file is written, so every row up to a checkpoint is on disk before that
  checkpoint is declared; a resumed run then drops the rows past it (see the trainer).
- **Fallback on resume.** When the newest checkpoint cannot be read (truncated, corrupt), the
  next newest intact one is loaded, with a warning naming the bad file.
- **Per-rank state.** The checkpoint file is written by rank 0 only. With ``per_rank`` set (an
  object with ``state_dict()`` and ``load_state_dict(state_or_None, checkpoint_path)``; the
  trainer sets :class:`agvm.detectron2.resume.RankRNG`, and installs detectron2's
  ``PeriodicCheckpointer`` on the ranks other than 0 too), every rank that calls ``save`` also
  writes its own small file next to the checkpoint (``<name>.rank<r>.state``, atomically;
  rank 0 before it writes the checkpoint, the other ranks at the same time, unsynchronised: a
  job killed in that instant can leave a checkpoint without some ranks' files), and on resume
  every rank reads its file for the checkpoint actually loaded (after a fallback too). No collective is involved: a ``save`` called
  on rank 0 only (e.g. ``BestCheckpointer``) writes rank 0's file only, and the other ranks then
  resume without theirs (they say so). A rank's files of checkpoints that no longer exist are
  removed on its next save.
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from typing import Any, Callable, Dict, List, Optional

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils import comm

__all__ = ["SafeCheckpointer", "nonfinite_entries", "rank_state_file"]


def rank_state_file(checkpoint: str, rank: int) -> str:
    """The per-rank state file of ``checkpoint`` (``.../model_0000099.pth``) for ``rank``:
    ``.../model_0000099.rank<rank>.state`` (not ``.pth``: never taken for a checkpoint)."""
    base = checkpoint[:-4] if checkpoint.endswith(".pth") else checkpoint
    return f"{base}.rank{rank}.state"


def nonfinite_entries(obj: Any, prefix: str = "", limit: int = 5) -> List[str]:
    """Names (dotted paths) of up to ``limit`` floating tensors in ``obj`` (nested dicts, lists)
    that hold a NaN or infinity."""
    found: List[str] = []

    def visit(o, path):
        if len(found) >= limit:
            return
        if isinstance(o, torch.Tensor):
            if o.is_floating_point() and not bool(torch.isfinite(o).all()):
                found.append(path)
        elif isinstance(o, dict):
            for k, v in o.items():
                visit(v, f"{path}.{k}" if path else str(k))
        elif isinstance(o, (list, tuple)):
            for i, v in enumerate(o):
                visit(v, f"{path}.{i}" if path else str(i))

    visit(obj, prefix)
    return found


def _iteration_of(path: str) -> float:
    name = os.path.basename(path)
    m = re.fullmatch(r"model_(\d+)\.pth", name)
    if m:
        return int(m.group(1))
    return float("inf") if name == "model_final.pth" else -1


def _atomic_write(path: str, write: Callable) -> None:
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class SafeCheckpointer(DetectionCheckpointer):
    """:class:`detectron2.checkpoint.DetectionCheckpointer` with atomic, finite-only writes and
    a resume that falls back to the newest intact checkpoint (see the module docstring).
    ``before_save``: a callable run before each save (default None)."""

    before_save: Optional[Callable[[], None]] = None
    #: state saved per rank beside each checkpoint (see the module docstring); None: none
    per_rank: Any = None
    #: the checkpoint file the last ``resume_or_load`` actually loaded (None: none)
    loaded_checkpoint: Optional[str] = None

    def __init__(self, model, save_dir: str = "", *, per_rank: Any = None,
                 before_save: Optional[Callable[[], None]] = None, **kwargs: Any) -> None:
        super().__init__(model, save_dir, **kwargs)
        self.per_rank = per_rank
        self.before_save = before_save

    def save(self, name: str, **kwargs: Any) -> None:
        if self.save_dir and self.per_rank is not None:
            self._save_rank_state(name)
        if not self.save_dir or not self.save_to_disk:
            return
        if self.before_save is not None:
            self.before_save()
        data: Dict[str, Any] = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        bad = nonfinite_entries(data)
        if bad:
            raise FloatingPointError(
                f"refusing to write checkpoint {name}.pth: non-finite values in {', '.join(bad)}; "
                f"the last good checkpoint stays {self.get_checkpoint_file() or '(none)'}"
            )
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        _atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def _save_rank_state(self, name: str) -> None:
        rank = comm.get_rank()
        os.makedirs(self.save_dir, exist_ok=True)
        path = rank_state_file(os.path.join(self.save_dir, f"{name}.pth"), rank)
        state = self.per_rank.state_dict()
        _atomic_write(path, lambda f: torch.save(state, f))
        # this rank's files of checkpoints deleted since (PeriodicCheckpointer's max_to_keep)
        suffix = f".rank{rank}.state"
        for file in os.listdir(self.save_dir):
            if file.endswith(suffix) and file != os.path.basename(path):
                if not os.path.exists(os.path.join(self.save_dir, file[: -len(suffix)] + ".pth")):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(os.path.join(self.save_dir, file))

    def _load_rank_state(self, checkpoint: str) -> None:
        path = rank_state_file(checkpoint, comm.get_rank())
        state = None
        if os.path.isfile(path):
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # a file of another format or a damaged one: say so, go on without
                self.logger.warning(f"cannot read {path} ({type(e).__name__}: {e})")
        self.per_rank.load_state_dict(state, checkpoint)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        path = os.path.join(self.save_dir, "last_checkpoint")
        _atomic_write(path, lambda f: f.write(last_filename_basename.encode()))

    def resume_or_load(self, path: str, *, resume: bool = True) -> Dict[str, Any]:
        if not (resume and self.has_checkpoint()):
            return super().resume_or_load(path, resume=resume)
        tagged = self.get_checkpoint_file()
        others = sorted((f for f in self.get_all_checkpoint_files() if os.path.abspath(f) != os.path.abspath(tagged)),
                        key=_iteration_of, reverse=True)
        errors = []
        for candidate in [tagged] + others:
            if not os.path.isfile(candidate):
                errors.append(f"{candidate}: missing")
                continue
            try:
                loaded = self.load(candidate)
            except Exception as e:  # truncated / corrupt file: try the next newest
                if hasattr(self, "_parsed_url_during_load"):  # detectron2 main: reset after a failed load
                    self._parsed_url_during_load = None
                errors.append(f"{candidate}: {type(e).__name__}: {e}")
                self.logger.warning(f"cannot resume from {candidate} ({type(e).__name__}: {e}); trying an older checkpoint")
                continue
            if errors:
                message = f"resumed from {candidate}; skipped unreadable checkpoint(s): {'; '.join(errors)}"
                self.logger.warning(message)
                warnings.warn(message, RuntimeWarning, stacklevel=2)
            self.loaded_checkpoint = candidate
            if self.per_rank is not None:
                self._load_rank_state(candidate)
            return loaded
        raise RuntimeError("no readable checkpoint to resume from in " + self.save_dir + ": " + "; ".join(errors))
