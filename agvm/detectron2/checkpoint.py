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
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Any, Callable, Dict, List, Optional

import torch
from detectron2.checkpoint import DetectionCheckpointer

__all__ = ["SafeCheckpointer", "nonfinite_entries"]


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

    def save(self, name: str, **kwargs: Any) -> None:
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
            return loaded
        raise RuntimeError("no readable checkpoint to resume from in " + self.save_dir + ": " + "; ".join(errors))
