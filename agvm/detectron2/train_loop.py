"""The step of :class:`agvm.AGVMTrainer`: detectron2's ``SimpleTrainer`` seam (one iteration).

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
  number attributes such as RetinaNet's ``loss_normalizer``, the model's own generators and the
  global RNG put back; containers changed in place reported) and a throw-away
  EventStorage (their losses are not logged). BN normalises each half with its own batch
  statistics: Φ is what 2-rank DDP without SyncBN would measure. Cost: about one extra plain
  iteration per AGVM iteration.

Under DDP the halves are ranks: the comm hook (:mod:`agvm.distributed`) measures them during
the ordinary backward, with no extra pass.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Dict, Optional

import torch
from detectron2.engine import SimpleTrainer
from detectron2.utils import comm
from detectron2.utils.events import EventStorage, get_event_storage
from torch.nn.parallel import DistributedDataParallel

from ..core.optim import AGVM, MODULE_KEY
from ..core.sandbox import preserved_rng, preserved_state
from ..core.split import estimate_line, split_batch
from .resume import _rng_state, _set_rng_state
from .sam import sam_step

__all__ = ["AGVMStepTrainer", "estimate_line", "split_batch"]

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ the step
class AGVMStepTrainer(SimpleTrainer):
    """The inner trainer (detectron2's ``SimpleTrainer`` seam) that runs AGVM's step.

    Args:
        model, data_loader, optimizer: as for ``SimpleTrainer``; ``optimizer`` may be a bare
            optimizer (AGVM disabled: plain steps, with accumulation and clipping support).
        accum_steps: micro-batches per iteration (``SOLVER.GRAD_ACCUM_STEPS``).
        clip: ``None`` or ``(clip_fn(params), (start, end))``: gradient clipping applied on
            iterations in [start, end] ((-1, -1) = always).
        amp: use autocast and a GradScaler (detectron2's AMPTrainer path) on the device of the
            model's parameters (autocast's default dtype there: float16 on CUDA, bfloat16 on
            CPU; ``grad_scaler`` None: a ``torch.amp.GradScaler`` for that device). Φ is taken
            from unscaled gradients. An estimate iteration whose step the GradScaler skips
            (an inf/NaN in the half passes or in the plain pass; detected by the scale going
            down in ``update()``) leaves μ unchanged: the modulator is put back to its state
            before the iteration and the estimate is recorded as skipped
            (``modulator.skip``: Φ NaN, counted in ``agvm/skipped``), as a skipped
            non-finite step without AMP is. (The config still requires CUDA for AMP.)
        sam_rho: run SAM (Foret et al., ICLR 2021) with this radius instead of a plain step:
            gradient g, ascend to w + ρ·g/‖g‖ (‖g‖ summed in float64), gradient there, back to
            w, step with it. The weights are put back by copy (saved before the ascent), so
            they are bit for bit those before the ascent: under DDP each rank ascends along
            its own unsynchronised gradient, and ranks stay bit-identical. Under DDP the first
            pass does not synchronise; BN running statistics are updated by the first pass
            only. A non-finite ascent gradient (no direction to ascend) skips the step and
            counts as a non-finite step (under DDP the verdict is all-reduced, so every rank
            skips alike); a non-finite gradient at the shifted point skips it too. None
            (default): no SAM.
        max_nonfinite: steps whose gradient holds a NaN/inf are skipped (without AMP; with AMP
            the GradScaler skips them): no parameter, optimizer or μ change, counted in
            ``nonfinite/skipped_steps``; after this many in a row (default 5,
            ``SOLVER.MAX_CONSECUTIVE_NONFINITE``) training stops with ``FloatingPointError``.
            Under DDP the reduced gradients are bit-identical on every rank, so all ranks
            decide alike. Both counters (``nonfinite_run``, in a row, and
            ``nonfinite_total``) are in :meth:`state_dict`: a resumed run stops where the
            uninterrupted one would.
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
        # autocast and the GradScaler follow the parameters' device (CUDA by default)
        first = next(iter(_unwrap(model).parameters()), None)
        self.amp_device = first.device.type if first is not None else "cuda"
        if amp and grad_scaler is None:
            grad_scaler = torch.amp.GradScaler(self.amp_device)
        self.grad_scaler = grad_scaler

    @property
    def agvm(self) -> Optional[AGVM]:
        return self.optimizer if isinstance(self.optimizer, AGVM) else None

    def _forward(self, items):
        if self.amp:
            with torch.autocast(self.amp_device):
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
        iteration = self.iter
        if self.sam_rho is not None:
            self._sam_step(data, data_time, iteration)
            return
        agvm = self.agvm
        k = self.accum_steps
        # where this iteration's two half-batch gradients come from, if it estimates Φ
        halves = None
        if agvm is not None and agvm.should_estimate(iteration):
            halves = "ranks" if self.hook_state is not None else ("micro_batches" if k % 2 == 0 else "extra_passes")
        chunks = [items for _, items in split_batch(data, k, halves=False)]
        self.optimizer.zero_grad()
        out = None
        modulator_before = agvm.modulator.state_dict() if halves else None
        if halves == "extra_passes":
            out = self._measure_halves(data, iteration)  # the model left as it was
        elif halves == "ranks":
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
            if halves == "micro_batches" and index == k // 2 - 1:
                agvm.copy_first_half()
        if halves == "micro_batches":
            # each half's accumulated sum is half its mean gradient
            out = agvm.finish_accumulated(iteration, grad_scale=2.0 / self._loss_scale(), skip_if_nonfinite=self.amp)
        elif halves == "ranks":
            out = agvm.update_from_stats(iteration, self.hook_state.finish(), skip_if_nonfinite=self.amp)
        finite = self.amp or self._gradients_finite(iteration)
        self._write_metrics(totals, data_time)
        if finite:
            self._clip(iteration)
            if self.amp:
                scale = self._loss_scale()
                self.grad_scaler.step(self.optimizer)
                self.grad_scaler.update()
                # the GradScaler lowers its scale (backoff_factor < 1) exactly when it found an
                # inf/NaN and skipped the step
                finite = self._loss_scale() >= scale
            else:
                self.optimizer.step()
        if out is not None:
            if not finite:  # μ untouched: as if this estimate had not happened, counted as skipped
                agvm.modulator.load_state_dict(modulator_before)
                agvm.modulator.skip(iteration)
                out = {"phi": {m: float("nan") for m in agvm.modulator.modules}, "mu": dict(agvm.modulator.mu)}
            self._log_agvm(out)
        if not finite:
            self.optimizer.zero_grad()

    def _gradients_finite(self, iteration, what="gradient", across_ranks=False, final=True) -> bool:
        """Whether every gradient is finite; counts and logs skipped steps, and raises after
        ``max_nonfinite`` in a row.

        ``across_ranks``: the gradients are this rank's own (not reduced by DDP): under DDP the
        verdict is all-reduced (any rank non-finite → non-finite on all), so every rank
        decides alike. ``final``: this check decides the step (a finite verdict ends a run of
        skipped steps); False for a check that another check of the same step follows (SAM's
        ascent gradient), where only a non-finite verdict counts."""
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        # the max-abs norm: NaN/inf propagate, and large finite gradients cannot overflow (an L2
        # norm squares them and overflows float32 from ~1e19 on: a false alarm)
        norms = torch._foreach_norm([p.grad for p in params], float("inf")) if params else []
        finite = not params or bool(torch.isfinite(torch.stack(norms)).all())
        locally_finite = finite
        if across_ranks and isinstance(self.model, DistributedDataParallel) and comm.get_world_size() > 1:
            import torch.distributed as dist

            # on the gradients' device: NCCL has no CPU tensors
            device = params[0].grad.device if params else next(self.model.parameters()).device
            flag = torch.tensor([0.0 if finite else 1.0], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.model.process_group)
            finite = bool(flag.item() == 0.0)
        if finite:
            if final:
                self.nonfinite_run = 0
        else:
            self.nonfinite_run += 1
            self.nonfinite_total += 1
            names = {p: n for n, p in _unwrap(self.model).named_parameters()}
            bad = [names.get(p, "?") for p in params if not bool(torch.isfinite(p.grad).all())]
            where = f"in {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}" if not locally_finite else "on another rank"
            logger.warning(
                f"iteration {iteration}: non-finite {what} {where}; "
                f"step skipped ({self.nonfinite_run} in a row, {self.nonfinite_total} in total)"
            )
            if self.nonfinite_run >= self.max_nonfinite:
                raise FloatingPointError(
                    f"{self.nonfinite_run} consecutive iterations (the last {iteration}) had non-finite gradients, the last "
                    f"a {what} {where}: stopping (SOLVER.MAX_CONSECUTIVE_NONFINITE={self.max_nonfinite}). No step was "
                    "taken on them, so the last checkpoint holds finite parameters; lower SOLVER.BASE_LR or enable "
                    "SOLVER.CLIP_GRADIENTS"
                )
        if comm.is_main_process() and (final or not finite):
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
        with preserved_rng(), EventStorage(storage.iter):
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
        sam_step(self, data, data_time, iteration)

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
        logger.info(estimate_line(storage.iter, out["phi"], out["mu"], agvm.modulator.anchor, agvm.modulator.measure_only))

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
        ret["nonfinite_run"] = self.nonfinite_run  # skipped steps in a row (MAX_CONSECUTIVE_NONFINITE)
        if self.grad_scaler is not None:
            ret["grad_scaler"] = self.grad_scaler.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        # "rng" is the state of the rank that wrote the checkpoint (rank 0): only rank 0 takes it.
        # Every rank's own state comes from its file beside the checkpoint (resume.RankRNG).
        if "rng" in state_dict and comm.get_rank() == 0:
            _set_rng_state(state_dict["rng"])
        self.nonfinite_total = int(state_dict.get("nonfinite_total", 0))
        self.nonfinite_run = int(state_dict.get("nonfinite_run", 0))
        if self.grad_scaler is not None and "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])


def _unwrap(model):
    return model.module if isinstance(model, DistributedDataParallel) else model
