"""Learning-rate scaling rules and the exponential warm-up of the authors' release.

* :func:`scale_lr`: the learning rate for a batch size from a reference (batch, lr) pair,
  by the linear rule (Goyal et al. 2017; MegDet) or the square-root rule.
* :func:`rescale_schedule`: every iteration count of a schedule scaled to a new length
  (``--max-iter``: a short run of any config with one flag).
* :func:`exp_warmup`: fvcore's ``ExponentialParamScheduler`` inside a
  ``CompositeParamScheduler``: during the first ``warmup_length`` of training the factor is
  ``r ** (1 − t / T)`` (r = ``warmup_factor``, T = warm-up iterations), exactly the reference
  release's exponential warm-up, then the main schedule.
"""

from __future__ import annotations

import math

from fvcore.common.param_scheduler import (
    CompositeParamScheduler,
    ExponentialParamScheduler,
    ParamScheduler,
)

__all__ = ["LR_SCALING_RULES", "build_lr_scheduler", "exp_warmup", "rescale_schedule", "scale_lr"]

#: Values accepted by ``SOLVER.LR_SCALING.RULE``.
LR_SCALING_RULES = ("none", "linear", "sqrt")


def scale_lr(reference_lr: float, reference_batch: int, batch: int, rule: str = "linear") -> float:
    """The learning rate for ``batch`` images per iteration.

    Args:
        reference_lr: the learning rate known to work at ``reference_batch`` (e.g. 0.02 at 16).
        reference_batch: its batch size (images per iteration, > 0).
        batch: the batch size to scale to (> 0).
        rule: ``"linear"`` (lr · batch / reference_batch), ``"sqrt"``
            (lr · sqrt(batch / reference_batch)) or ``"none"`` (reference_lr unchanged).

    Example: ``scale_lr(0.02, 16, 256, "linear") == 0.32``; ``scale_lr(0.02, 16, 256, "sqrt") == 0.08``.
    """
    if rule not in LR_SCALING_RULES:
        raise ValueError(f"SOLVER.LR_SCALING.RULE={rule!r} is not one of {list(LR_SCALING_RULES)}")
    if reference_batch <= 0 or batch <= 0:
        raise ValueError(f"batch sizes must be > 0, got reference {reference_batch} and batch {batch}")
    if rule == "none":
        return reference_lr
    ratio = batch / reference_batch
    return reference_lr * (ratio if rule == "linear" else math.sqrt(ratio))


def rescale_schedule(max_iter: int, new_max_iter: int, steps=(), warmup_iters: int = 0, agvm_start: int = -1,
                     agvm_stop: int = -1, agvm_interval: int = 1, clip_range=(-1, -1), eval_period: int = 0,
                     checkpoint_period: int = 0) -> dict:
    """Every iteration count of a schedule (iterations) scaled by ``new_max_iter / max_iter``, so
    that the run keeps its shape at another length. Counts are rounded, kept ≥ 1, and kept
    valid: LR steps strictly inside (0, new_max_iter) and increasing (steps that collapse are
    dropped), warm-up and the first AGVM estimate below the new length. Sentinels stay:
    ``agvm_start`` -1 (the release's warm-up + 100) is resolved first, then scaled;
    ``agvm_stop`` -1, a clip range starting below 0, ``eval_period``/``checkpoint_period`` ≤ 0
    are kept as they are.

    Returns ``{"max_iter", "steps", "warmup_iters", "agvm_start", "agvm_stop", "agvm_interval",
    "clip_range", "eval_period", "checkpoint_period"}``. Raises ValueError for a length < 1.
    """
    if int(max_iter) < 1 or int(new_max_iter) < 1:
        raise ValueError(f"iteration counts must be ≥ 1, got max_iter={max_iter!r} and new_max_iter={new_max_iter!r}")
    n, f = int(new_max_iter), int(new_max_iter) / int(max_iter)

    def scaled(x, lo=1, hi=None):
        v = max(lo, int(round(x * f)))
        return v if hi is None else min(v, hi)

    new_steps = []
    for x in steps:
        v = scaled(x, hi=n - 1)
        if 0 < v < n and (not new_steps or v > new_steps[-1]):
            new_steps.append(v)
    warmup = scaled(warmup_iters, hi=n - 1) if warmup_iters > 0 else warmup_iters  # a warm-up stays one
    start = warmup_iters + 100 if agvm_start == -1 else agvm_start
    return {
        "max_iter": n,
        "steps": tuple(new_steps),
        "warmup_iters": warmup,
        "agvm_start": scaled(start, lo=0, hi=n - 1),
        "agvm_stop": agvm_stop if agvm_stop < 0 else scaled(agvm_stop, lo=0),
        "agvm_interval": scaled(agvm_interval),
        "clip_range": tuple(clip_range) if clip_range[0] < 0 else (scaled(clip_range[0], lo=0), scaled(clip_range[1], lo=0)),
        "eval_period": eval_period if eval_period <= 0 else scaled(eval_period),
        "checkpoint_period": checkpoint_period if checkpoint_period <= 0 else scaled(checkpoint_period),
    }


def exp_warmup(scheduler: ParamScheduler, warmup_factor: float, warmup_length: float) -> ParamScheduler:
    """``scheduler`` preceded by an exponential warm-up of ``warmup_length`` (a fraction of
    training in (0, 1)) from ``warmup_factor`` (in (0, 1]) to 1: factor r^(1 − t/T).

    The main schedule keeps the global time axis ("fixed" scaling), as detectron2's
    ``WarmupParamScheduler`` does; its value during warm-up is not multiplied in, which is
    exact for schedules that start at 1 (step and cosine schedules do).
    """
    if not (0.0 < warmup_factor <= 1.0):
        raise ValueError(f"SOLVER.WARMUP_FACTOR={warmup_factor!r} must be in (0, 1] for the exp warm-up")
    if not (0.0 < warmup_length < 1.0):
        raise ValueError(f"the warm-up must be a fraction of training in (0, 1), got {warmup_length!r}")
    warmup = ExponentialParamScheduler(start_value=warmup_factor, decay=1.0 / warmup_factor)
    return CompositeParamScheduler(
        [warmup, scheduler],
        lengths=[warmup_length, 1.0 - warmup_length],
        interval_scaling=["rescaled", "fixed"],
    )


def build_lr_scheduler(cfg, optimizer):
    """detectron2's ``build_lr_scheduler``, plus ``SOLVER.WARMUP_METHOD: "exp"``.

    For "linear"/"constant" warm-up this is detectron2's own function. For "exp" the main
    schedule (``WarmupMultiStepLR`` or ``WarmupCosineLR``, as detectron2 defines them) is
    preceded by :func:`exp_warmup` over ``SOLVER.WARMUP_ITERS`` from ``SOLVER.WARMUP_FACTOR``.
    """
    from detectron2.solver import LRMultiplier
    from detectron2.solver import build_lr_scheduler as d2_build_lr_scheduler
    from fvcore.common.param_scheduler import CosineParamScheduler, MultiStepParamScheduler

    s = cfg.SOLVER
    if s.WARMUP_METHOD != "exp":
        return d2_build_lr_scheduler(cfg, optimizer)
    if s.LR_SCHEDULER_NAME == "WarmupMultiStepLR":
        steps = [x for x in s.STEPS if x <= s.MAX_ITER]
        main = MultiStepParamScheduler(
            values=[s.GAMMA ** k for k in range(len(steps) + 1)], milestones=steps, num_updates=s.MAX_ITER
        )
    elif s.LR_SCHEDULER_NAME == "WarmupCosineLR":
        main = CosineParamScheduler(1, 0)
    else:
        raise ValueError(
            f"SOLVER.WARMUP_METHOD='exp' supports SOLVER.LR_SCHEDULER_NAME 'WarmupMultiStepLR' or "
            f"'WarmupCosineLR', got {s.LR_SCHEDULER_NAME!r}"
        )
    sched = exp_warmup(main, s.WARMUP_FACTOR, s.WARMUP_ITERS / s.MAX_ITER)
    return LRMultiplier(optimizer, multiplier=sched, max_iter=s.MAX_ITER)
