"""SAM's two-pass step for :class:`agvm.detectron2.AGVMStepTrainer` (``SOLVER.OPTIMIZER`` "SAM")."""

from __future__ import annotations

import contextlib
from typing import Dict

import torch

from ..core.split import split_batch

__all__ = ["frozen_bn_stats", "sam_step"]


def sam_step(trainer, data, data_time: float, iteration: int) -> None:
    """One SAM step (Foret et al., ICLR 2021) of ``trainer`` (an :class:`AGVMStepTrainer` with
    ``sam_rho``) over its ``accum_steps`` micro-batches: the ascent gradient accumulated over all of
    them (not synchronised under DDP), the step's gradient at the shifted point accumulated
    over the same micro-batches (BN statistics frozen; synchronised on the last one); the
    weights copied back from before the ascent; each gradient checked for non-finite
    values (either one non-finite skips the step, counted once)."""
    params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    k = trainer.accum_steps
    chunks = [items for _, items in split_batch(data, k, halves=False)]
    trainer.optimizer.zero_grad()
    no_sync = getattr(trainer.model, "no_sync", None)
    totals: Dict[str, float] = {}
    with no_sync() if no_sync is not None else contextlib.nullcontext():
        for items in chunks:
            loss_dict = trainer._forward(items)
            (sum(loss_dict.values()) / k).backward()
            for name, v in loss_dict.items():
                totals[name] = totals.get(name, 0.0) + v.detach() / k
    trainer._write_metrics(totals, data_time)
    # a non-finite ascent gradient gives no direction to ascend: skip the step (counted);
    # each rank's ascent gradient is its own, so the verdict is all-reduced under DDP
    if not trainer._gradients_finite(iteration, what="SAM ascent gradient", across_ranks=True, final=False):
        trainer.optimizer.zero_grad()
        return
    with torch.no_grad():
        shifted = [p for p in params if p.grad is not None]
        # put back by copy: w + e − e is not w in floating point, and under DDP a rank-local
        # residue would never be re-synchronised
        saved = [p.detach().clone() for p in shifted]
        # in float64: the squares of large finite float32 gradients would overflow
        norms = [torch.linalg.vector_norm(p.grad, dtype=torch.float64) for p in shifted]
        norm = float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0
        scale = trainer.sam_rho / (norm + 1e-12)
        for p in shifted:
            p.add_(p.grad * scale)
    trainer.optimizer.zero_grad()
    try:
        with frozen_bn_stats(trainer.model):
            for index, items in enumerate(chunks):
                last = index == k - 1
                with no_sync() if (no_sync is not None and not last) else contextlib.nullcontext():
                    (sum(trainer._forward(items).values()) / k).backward()
    finally:
        with torch.no_grad():
            for p, w in zip(shifted, saved):
                p.copy_(w)
    if not trainer._gradients_finite(iteration):
        trainer.optimizer.zero_grad()
        return
    trainer._clip(iteration)
    trainer.optimizer.step()


@contextlib.contextmanager
def frozen_bn_stats(model):
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
