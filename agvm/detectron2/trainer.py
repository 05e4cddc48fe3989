"""AGVMTrainer: detectron2's DefaultTrainer with the AGVM optimizer and its training step.

AGVM changes training only through μ. On an AGVM iteration (every τ-th from the start
iteration) of a single process, Φ = 1 − cos(G1, G2) per module is measured on two half-batches
and μ is updated; the step itself is the plain iteration's, so the parameters, BatchNorm running
statistics, loss normalisers and RNG afterwards are those of a run without AGVM (then scaled by
μ). Where the halves come from:

- ``SOLVER.GRAD_ACCUM_STEPS`` = k even: free. The plain iteration already runs k micro-batches;
  the first k/2 are half 1 and the last k/2 half 2 (a copy of the gradient is taken between
  them). Each micro-batch has its own BN batch statistics, as in plain accumulation.
- k odd (1 included): two extra passes before the plain one, each over half of the batch (in
  k micro-batches of half the size), inside :func:`agvm.core.preserved_state` (buffers, Python
  number attributes such as RetinaNet's ``loss_normalizer``, RNG put back) and a throw-away
  EventStorage (their losses are not logged). BN normalises each half with its own batch
  statistics: Φ is what 2-rank DDP without SyncBN would measure. Cost: about one extra plain
  iteration per AGVM iteration.

Under DDP the halves are ranks: the comm hook (:mod:`agvm.distributed`) measures them during
the ordinary backward, with no extra pass.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import random
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.data import build_detection_train_loader, get_detection_dataset_dicts
from detectron2.data.samplers import TrainingSampler
from detectron2.engine import DefaultTrainer, SimpleTrainer
from detectron2.engine.hooks import PeriodicWriter
from detectron2.engine.defaults import default_writers
from detectron2.utils import comm
from detectron2.utils.events import EventStorage, JSONWriter, TensorboardXWriter, get_event_storage

from torch.nn.parallel import DistributedDataParallel

from ..core.optim import AGVM, MODULE_KEY
from ..core.sandbox import preserved_state
from ..distributed import AGVMHookState, agvm_comm_hook
from ..solver import build_lr_scheduler
from .build import build_agvm_optimizer
from .checkpoint import SafeCheckpointer
from .checks import validate_config
from .engine import build_evaluator

__all__ = ["AGVMTrainer", "AGVMStepTrainer", "ResumableTrainingSampler", "Trainer", "install_agvm_hook", "split_batch"]

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ batch split
def split_batch(data: Sequence, accum_steps: int, halves: bool) -> List[Tuple[int, list]]:
    """The micro-batches of one iteration as ``(half, items)`` pairs.

    Without ``halves``: ``accum_steps`` equal chunks, all in half 0. With ``halves``: an even
    ``accum_steps`` alternates its chunks between half 0 and half 1; an odd one (1 included)
    cuts every chunk into two, the first part to half 0 and the second to half 1. All half-0
    pairs come first.

    Raises ValueError when ``len(data)`` is not divisible by ``accum_steps`` (and, with
    halves, by ``2 * accum_steps`` for odd ``accum_steps``).
    """
    n = len(data)
    if n % accum_steps:
        raise ValueError(
            f"the per-process batch ({n} images) is not divisible by SOLVER.GRAD_ACCUM_STEPS={accum_steps}"
        )
    size = n // accum_steps
    chunks = [list(data[i * size:(i + 1) * size]) for i in range(accum_steps)]
    if not halves:
        return [(0, c) for c in chunks]
    if accum_steps % 2 == 0:
        pairs = [(i % 2, c) for i, c in enumerate(chunks)]
    else:
        if size < 2 or size % 2:
            raise ValueError(
                f"AGVM splits each micro-batch of {size} images into two halves: the per-process batch "
                f"({n} images) / SOLVER.GRAD_ACCUM_STEPS ({accum_steps}) must be even and ≥ 2"
            )
        half = size // 2
        pairs = [(0, c[:half]) for c in chunks] + [(1, c[half:]) for c in chunks]
    return sorted(pairs, key=lambda hc: hc[0])


# ------------------------------------------------------------------------------ the step
class AGVMStepTrainer(SimpleTrainer):
    """The inner trainer (detectron2's ``SimpleTrainer`` seam) that runs AGVM's step.

    Args:
        model, data_loader, optimizer: as for ``SimpleTrainer``; ``optimizer`` may be a bare
            optimizer (AGVM disabled: plain steps, with accumulation and clipping support).
        accum_steps: micro-batches per iteration (``SOLVER.GRAD_ACCUM_STEPS``).
        clip: ``None`` or ``(clip_fn(params), (start, end))``: gradient clipping applied on
            iterations in [start, end] ((-1, -1) = always).
        amp: use CUDA autocast and a GradScaler (detectron2's AMPTrainer path); Φ is taken
            from unscaled gradients and an overflowed step does not update μ.
        sam_rho: run SAM (Foret et al., ICLR 2021) with this radius instead of a plain step:
            gradient g, ascend to w + ρ·g/‖g‖, gradient there, back to w, step with it. Under
            DDP the first pass does not synchronise; BN running statistics are updated by the
            first pass only. None (default): no SAM.
        max_nonfinite: steps whose gradient holds a NaN/inf are skipped (without AMP; with AMP
            the GradScaler skips them): no parameter, optimizer or μ change, counted in
            ``nonfinite/skipped_steps``; after this many in a row (default 5,
            ``SOLVER.MAX_CONSECUTIVE_NONFINITE``) training stops with ``FloatingPointError``.
            Under DDP the reduced gradients are bit-identical on every rank, so all ranks
            decide alike.
    """

    def __init__(self, model, data_loader, optimizer, accum_steps=1, clip=None, amp=False, grad_scaler=None,
                 sam_rho=None, max_nonfinite=5):
        super().__init__(model, data_loader, optimizer)
        if not (isinstance(max_nonfinite, int) and max_nonfinite >= 1):
            raise ValueError(f"max_nonfinite (SOLVER.MAX_CONSECUTIVE_NONFINITE) must be an integer ≥ 1, got {max_nonfinite!r}")
        self.max_nonfinite = max_nonfinite
        self.nonfinite_run = 0  # consecutive skipped steps
        self.nonfinite_total = 0  # skipped steps in the whole run
        self.sam_rho = sam_rho
        # set by AGVMTrainer under DDP: the comm hook supplies the halves (no batch split)
        self.hook_state = None
        self.accum_steps = accum_steps
        self.clip = clip
        self.amp = amp
        if amp and grad_scaler is None:
            grad_scaler = torch.amp.GradScaler("cuda")
        self.grad_scaler = grad_scaler
        # set on resume: the torch RNG state to put back after the next data fetch
        self.restore_torch_rng_after_next = None

    @property
    def agvm(self) -> Optional[AGVM]:
        return self.optimizer if isinstance(self.optimizer, AGVM) else None

    def _forward(self, items):
        if self.amp:
            with torch.autocast("cuda"):
                loss_dict = self.model(items)
        else:
            loss_dict = self.model(items)
        if isinstance(loss_dict, torch.Tensor):
            loss_dict = {"total_loss": loss_dict}
        return loss_dict

    def _backward(self, loss):
        if self.amp:
            self.grad_scaler.scale(loss).backward()
        else:
            loss.backward()

    def run_step(self):
        assert self.model.training, "[AGVMStepTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        if self.restore_torch_rng_after_next is not None:
            torch.set_rng_state(self.restore_torch_rng_after_next)
            self.restore_torch_rng_after_next = None
        iteration = self.iter
        if self.sam_rho is not None:
            self._sam_step(data, data_time, iteration)
            return
        agvm = self.agvm
        estimate = agvm is not None and agvm.should_estimate(iteration)
        k = self.accum_steps
        chunks = [items for _, items in split_batch(data, k, halves=False)]
        self.optimizer.zero_grad()
        out = None
        modulator_before = agvm.modulator.state_dict() if estimate else None
        if estimate and self.hook_state is None and k % 2 == 1:
            out = self._measure_halves(data, iteration)  # extra passes; the model left as it was
        if estimate and self.hook_state is not None:
            self.hook_state.estimate = True
            self.hook_state.grad_scale = 1.0 / self._loss_scale()
        # the plain iteration: k micro-batches, each loss divided by k
        totals: Dict[str, float] = {}
        no_sync = getattr(self.model, "no_sync", None)
        for index, items in enumerate(chunks):
            last = index == k - 1
            with no_sync() if (no_sync is not None and not last) else contextlib.nullcontext():
                loss_dict = self._forward(items)
                self._backward(sum(loss_dict.values()) / k)
            for name, v in loss_dict.items():
                totals[name] = totals.get(name, 0.0) + v.detach() / k
            if estimate and self.hook_state is None and k % 2 == 0 and index == k // 2 - 1:
                agvm.copy_first_half()
        if estimate and self.hook_state is None and k % 2 == 0:
            # each half's accumulated sum is half its mean gradient
            out = agvm.finish_accumulated(iteration, grad_scale=2.0 / self._loss_scale(), skip_if_nonfinite=self.amp)
        elif estimate and self.hook_state is not None:
            out = agvm.update_from_stats(iteration, self.hook_state.finish(), skip_if_nonfinite=self.amp)
        finite = self.amp or self._gradients_finite(iteration)
        if out is not None:
            if not finite:  # μ untouched: as if this estimate had not happened, counted as skipped
                agvm.modulator.load_state_dict(modulator_before)
                agvm.modulator.skip(iteration)
                out = {"phi": {m: float("nan") for m in agvm.modulator.modules}, "mu": dict(agvm.modulator.mu)}
            self._log_agvm(out)
        self._write_metrics(totals, data_time)
        if not finite:
            self.optimizer.zero_grad()
            return
        self._clip(iteration)
        if self.amp:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            self.optimizer.step()

    def _gradients_finite(self, iteration) -> bool:
        """Whether every gradient is finite; counts and logs skipped steps, and raises after
        ``max_nonfinite`` in a row."""
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        finite = not params or bool(torch.isfinite(torch.stack(torch._foreach_norm([p.grad for p in params]))).all())
        if finite:
            self.nonfinite_run = 0
        else:
            self.nonfinite_run += 1
            self.nonfinite_total += 1
            names = {p: n for n, p in _unwrap(self.model).named_parameters()}
            bad = [names.get(p, "?") for p in params if not bool(torch.isfinite(p.grad).all())]
            logger.warning(
                f"iteration {iteration}: non-finite gradient in {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; "
                f"step skipped ({self.nonfinite_run} in a row, {self.nonfinite_total} in total)"
            )
            if self.nonfinite_run >= self.max_nonfinite:
                raise FloatingPointError(
                    f"{self.nonfinite_run} consecutive iterations (the last {iteration}) had non-finite gradients, e.g. in "
                    f"{', '.join(bad[:5])}: stopping (SOLVER.MAX_CONSECUTIVE_NONFINITE={self.max_nonfinite}). No step was "
                    "taken on them, so the last checkpoint holds finite parameters; lower SOLVER.BASE_LR or enable "
                    "SOLVER.CLIP_GRADIENTS"
                )
        if comm.is_main_process():
            get_event_storage().put_scalar("nonfinite/skipped_steps", self.nonfinite_total, smoothing_hint=False)
        return finite

    def _loss_scale(self) -> float:
        return float(self.grad_scaler.get_scale()) if self.amp else 1.0

    def _measure_halves(self, data, iteration):
        """Φ from two extra half-batch passes (k micro-batches each), μ updated; the model's
        buffers and number attributes, the RNG and the event storage as they were before."""
        agvm = self.agvm
        pairs = split_batch(data, self.accum_steps, halves=True)
        per_half = len(pairs) // 2
        storage = get_event_storage()
        model = _unwrap(self.model)
        # each half starts from the iteration's state (as each rank of a 2-rank DDP run would);
        # the RNG runs on through both halves and is put back at the end
        with preserved_state(model), EventStorage(storage.iter):
            for half in (0, 1):
                with preserved_state(model, rng=False):
                    for _, items in pairs[half * per_half:(half + 1) * per_half]:
                        loss_dict = self._forward(items)
                        self._backward(sum(loss_dict.values()) / per_half)
                        del loss_dict
                if half == 0:
                    agvm.stash_first_half()
            out = agvm.finish_second_half(iteration, grad_scale=1.0 / self._loss_scale(), skip_if_nonfinite=self.amp)
        return out

    def _sam_step(self, data, data_time, iteration):
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.optimizer.zero_grad()
        no_sync = getattr(self.model, "no_sync", None)
        with no_sync() if no_sync is not None else contextlib.nullcontext():
            loss_dict = self._forward(data)
            sum(loss_dict.values()).backward()
        self._write_metrics(loss_dict, data_time)
        with torch.no_grad():
            grads = [p.grad for p in params if p.grad is not None]
            norm = torch.norm(torch.stack([g.norm() for g in grads])) if grads else torch.zeros(())
            scale = self.sam_rho / (float(norm) + 1e-12)
            shifts = {}
            for p in params:
                if p.grad is not None:
                    shifts[p] = p.grad * scale
                    p.add_(shifts[p])
        self.optimizer.zero_grad()
        with _frozen_bn_stats(self.model):
            sum(self._forward(data).values()).backward()
        with torch.no_grad():
            for p, e in shifts.items():
                p.sub_(e)
        self._clip(iteration)
        self.optimizer.step()

    def _log_agvm(self, out):
        """Put Φ, μ and the modulated lr of every module (and the skip count) into the storage."""
        if not comm.is_main_process():
            return
        agvm = self.agvm
        storage = get_event_storage()
        scalars = {}
        first_lr = {}
        for g in agvm.param_groups:
            first_lr.setdefault(g[MODULE_KEY], g["lr"])
        for m in agvm.modulator.modules:
            scalars[f"agvm/phi/{m}"] = out["phi"].get(m, float("nan"))
            scalars[f"agvm/mu/{m}"] = out["mu"][m]
            scalars[f"agvm/lr/{m}"] = first_lr[m] * out["mu"][m]
        scalars["agvm/skipped"] = agvm.modulator.skipped
        storage.put_scalars(smoothing_hint=False, **scalars)

    def _clip(self, iteration):
        if self.clip is None:
            return
        clip_fn, (lo, hi) = self.clip
        if (lo, hi) != (-1, -1) and not (lo <= iteration <= hi):
            return
        if self.amp:
            self.grad_scaler.unscale_(self.optimizer)
        clip_fn([p for g in self.optimizer.param_groups for p in g["params"]])

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self):
        ret = super().state_dict()
        ret["rng"] = _rng_state()
        ret["nonfinite_total"] = self.nonfinite_total
        if self.grad_scaler is not None:
            ret["grad_scaler"] = self.grad_scaler.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if "rng" in state_dict:
            _set_rng_state(state_dict["rng"])
        self.nonfinite_total = int(state_dict.get("nonfinite_total", 0))
        if self.grad_scaler is not None and "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])


@contextlib.contextmanager
def _frozen_bn_stats(model):
    """Batch-norm layers keep their running statistics (momentum 0) inside the block."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None) for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(bns, saved):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


def _unwrap(model):
    return model.module if isinstance(model, DistributedDataParallel) else model


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


# ------------------------------------------------------------------------------ data resume
class ResumableTrainingSampler(TrainingSampler):
    """detectron2's ``TrainingSampler`` that can skip its first ``skip`` indices (per rank),
    so that a resumed run reads the same images as an uninterrupted one."""

    skip = 0

    def __iter__(self):
        yield from itertools.islice(super().__iter__(), self.skip, None)


# ------------------------------------------------------------------------------ logging
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
    """detectron2's TensorboardXWriter, plus every ``agvm/*`` value put between two writes."""

    def write(self):
        backlog = _unsmoothed_backlog(get_event_storage(), self._last_write)
        for it in sorted(backlog):
            for key, value in backlog[it].items():
                self._writer.add_scalar(key, value, it)
        super().write()


# ------------------------------------------------------------------------------ trainers
class Trainer(DefaultTrainer):
    """detectron2's ``DefaultTrainer`` with the evaluator picked from the dataset's metadata."""

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_evaluator(cfg, dataset_name, output_folder)


class AGVMTrainer(Trainer):
    """The trainer of every project: AGVM optimizer (``build_agvm_optimizer``), the AGVM step
    (:class:`AGVMStepTrainer`), exact Φ/μ/lr logging, and exact resume (optimizer with μ, data
    position and RNG state). With ``SOLVER.AGVM.ENABLED`` False it trains like detectron2's
    DefaultTrainer, plus ``SOLVER.OPTIMIZER``, ``GRAD_ACCUM_STEPS`` and the clipping window.
    """

    def __init__(self, cfg):
        validate_config(cfg)
        with _cpu_capable_ddp():
            super().__init__(cfg)
        stock = self._trainer
        clip = None
        if cfg.SOLVER.CLIP_GRADIENTS.ENABLED:
            clip = (_clip_fn(cfg), tuple(cfg.SOLVER.CLIP_GRADIENTS.ITER_RANGE))
        step = AGVMStepTrainer(
            stock.model, [], stock.optimizer,
            accum_steps=cfg.SOLVER.GRAD_ACCUM_STEPS, clip=clip, amp=cfg.SOLVER.AMP.ENABLED,
            grad_scaler=getattr(stock, "grad_scaler", None),
            sam_rho=cfg.SOLVER.SAM.RHO if cfg.SOLVER.OPTIMIZER == "SAM" else None,
            max_nonfinite=cfg.SOLVER.MAX_CONSECUTIVE_NONFINITE,
        )
        step.data_loader = stock.data_loader
        _share_iterator(step, stock)
        self._trainer = step
        if isinstance(step.model, DistributedDataParallel):
            fp16 = cfg.SOLVER.DDP_FP16_COMPRESSION
            if isinstance(step.optimizer, AGVM):
                step.hook_state = install_agvm_hook(step.model, step.optimizer, compress_fp16=fp16)
            elif fp16:
                from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

                step.model.register_comm_hook(None, default_hooks.fp16_compress_hook)

    def build_hooks(self):
        # crash-safe checkpoints (atomic, finite-only, fallback on resume), metrics on disk first
        old = self.checkpointer
        self.checkpointer = SafeCheckpointer(old.model, self.cfg.OUTPUT_DIR, save_to_disk=old.save_to_disk,
                                             **old.checkpointables)
        hooks_ = super().build_hooks()
        self._periodic_writers = [h for h in hooks_ if isinstance(h, PeriodicWriter)]
        self.checkpointer.before_save = self._flush_metrics
        return hooks_

    def _flush_metrics(self):
        """Write every metric up to now (JSON and tensorboard), before a checkpoint is declared."""
        for w in [w for h in getattr(self, "_periodic_writers", []) for w in h._writers]:
            if isinstance(w, (JSONWriter, TensorboardXWriter)):
                w.write()
                if isinstance(w, TensorboardXWriter):
                    w._writer.flush()

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_agvm_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        return build_lr_scheduler(cfg, optimizer)

    @classmethod
    def build_train_loader(cls, cfg):
        if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
            return super().build_train_loader(cfg)
        dataset = get_detection_dataset_dicts(
            cfg.DATASETS.TRAIN,
            filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
            min_keypoints=cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON else 0,
            proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
        )
        return build_detection_train_loader(cfg, dataset=dataset, sampler=ResumableTrainingSampler(len(dataset)))

    def build_writers(self):
        writers = []
        for w in default_writers(self.cfg.OUTPUT_DIR, self.max_iter):
            if type(w) is JSONWriter:
                path = w._file_handle.name
                w.close()
                w = ExactJSONWriter(path)
            elif type(w) is TensorboardXWriter:
                log_dir = w._writer.log_dir
                w.close()
                w = ExactTensorboardWriter(log_dir)
            writers.append(w)
        return writers

    def state_dict(self):
        # detectron2 0.6's DefaultTrainer does not save its inner trainer (optimizer, μ, grad
        # scaler); main does. Save it either way.
        ret = super().state_dict()
        ret["_trainer"] = self._trainer.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])
        else:
            logger.warning("the checkpoint has no optimizer/AGVM state (written by a stock detectron2 0.6 trainer?)")

    def resume_or_load(self, resume=True):
        super().resume_or_load(resume=resume)
        if self.start_iter > 0 and comm.is_main_process():
            # rows past the checkpoint were logged by the killed run: the resumed run logs them again
            dropped = truncate_metrics(os.path.join(self.cfg.OUTPUT_DIR, "metrics.json"), self.start_iter)
            if dropped:
                logger.info(f"metrics.json: dropped {dropped} rows past the checkpoint (iteration ≥ {self.start_iter})")
            for hook in self._periodic_writers:  # tensorboard: discard the events past the checkpoint
                for i, w in enumerate(hook._writers):
                    if isinstance(w, TensorboardXWriter):
                        log_dir = w._writer.log_dir
                        w.close()
                        hook._writers[i] = ExactTensorboardWriter(log_dir, purge_step=self.start_iter)
        if self.start_iter > 0:
            sampler = _find_sampler(self._trainer.data_loader)
            if sampler is None:
                logger.warning("resuming with a sampler that cannot skip: the data order differs from an uninterrupted run")
                return
            per_rank = self.cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size()
            sampler.skip = self.start_iter * per_rank
            _share_iterator(self._trainer, None)
            # a fresh DataLoader iterator draws its base seed from torch's RNG on its first
            # next(), which the uninterrupted run did at iteration 0: undo that draw
            self._trainer.restore_torch_rng_after_next = torch.get_rng_state()


def install_agvm_hook(ddp: DistributedDataParallel, agvm: AGVM, compress_fp16: bool = False) -> AGVMHookState:
    """Register :func:`agvm.distributed.agvm_comm_hook` on ``ddp`` for ``agvm``'s modules
    (``compress_fp16``: fp16 all-reduce on ordinary iterations; default False). With
    ``agvm.precondition`` the hook measures Φ on Adam-preconditioned half means, as the
    authors' release does for AdamW."""
    module_of = {p: m for m, ps in agvm.params_by_module().items() for p in ps}
    state = AGVMHookState(
        module_of, agvm.modulator.modules, compress_fp16=compress_fp16,
        precondition=agvm.preconditioner() if agvm.precondition else None,
    )
    ddp.register_comm_hook(state, agvm_comm_hook)
    logger.info(
        f"AGVM comm hook installed: halves of {state.n_a} and {state.n_b} ranks"
        + ("; Φ on Adam-preconditioned gradients" if agvm.precondition else "")
    )
    return state


@contextlib.contextmanager
def _cpu_capable_ddp():
    """detectron2's ``create_ddp_model`` passes ``device_ids=[local_rank]``, which DDP rejects
    for CPU modules: inside this block CPU models get ``device_ids=None``."""
    import detectron2.engine.defaults as defaults

    original = defaults.create_ddp_model

    def create_ddp_model(model, **kwargs):
        if comm.get_world_size() > 1 and next(model.parameters()).device.type == "cpu":
            kwargs["device_ids"] = None
        return original(model, **kwargs)

    defaults.create_ddp_model = create_ddp_model
    try:
        yield
    finally:
        defaults.create_ddp_model = original


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


def _clip_fn(cfg):
    """The clipping of ``SOLVER.CLIP_GRADIENTS``: detectron2's ``"value"`` (each element to
    ±CLIP_VALUE) and ``"norm"`` (each parameter tensor separately to L-NORM_TYPE norm ≤
    CLIP_VALUE), plus ``"full_model"`` (one norm over all parameters together, the authors'
    release and Mask2Former's name for it)."""
    c = cfg.SOLVER.CLIP_GRADIENTS
    if c.CLIP_TYPE == "value":
        return lambda params: torch.nn.utils.clip_grad_value_(params, c.CLIP_VALUE)
    if c.CLIP_TYPE == "norm":
        def per_parameter(params):
            for p in params:
                if p.grad is not None:
                    torch.nn.utils.clip_grad_norm_(p, c.CLIP_VALUE, c.NORM_TYPE)
        return per_parameter
    if c.CLIP_TYPE == "full_model":
        return lambda params: torch.nn.utils.clip_grad_norm_(params, c.CLIP_VALUE, c.NORM_TYPE)
    raise ValueError(
        f"SOLVER.CLIP_GRADIENTS.CLIP_TYPE={c.CLIP_TYPE!r} must be 'value', 'norm' (per parameter, detectron2's "
        "meaning) or 'full_model' (one norm over the whole model)"
    )
