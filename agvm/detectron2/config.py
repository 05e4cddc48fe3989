"""``add_agvm_config(cfg)``: the config keys of agvm, with their defaults and units."""

from __future__ import annotations

import inspect
from typing import Optional

from detectron2.config import CfgNode as CN

from ..core.modulator import GradientVarianceModulator
from ..solver.schedules import rescale_schedule

#: The core's defaults (α, τ, clamp, eps, anchor, measure_only): the config takes them from
#: there, so each default lives in one place (agvm.core.modulator).
_CORE = {k: p.default for k, p in inspect.signature(GradientVarianceModulator).parameters.items()
         if p.default is not inspect.Parameter.empty}

__all__ = ["add_agvm_config", "add_solver_config", "rescale_config", "OPTIMIZERS"]

#: Values accepted by ``SOLVER.OPTIMIZER``.
OPTIMIZERS = ("SGD", "AdamW", "LARS", "LAMB", "SAM", "PMD_LAMB")


def add_solver_config(cfg: CN) -> None:
    """Add the solver keys agvm's trainer understands besides SOLVER.AGVM.* (in place;
    idempotent): SOLVER.OPTIMIZER and each optimizer's settings, LR scaling, gradient
    accumulation, the clipping window, DDP fp16 compression, the non-finite policy."""
    if "OPTIMIZER" in cfg.SOLVER:
        return
    _C = cfg
    # Optimizer, one of OPTIMIZERS. Weight decay and the norm/bias groups are detectron2's
    # (SOLVER.WEIGHT_DECAY, WEIGHT_DECAY_NORM, WEIGHT_DECAY_BIAS, BIAS_LR_FACTOR).
    #   "SGD"       torch SGD: SOLVER.MOMENTUM, SOLVER.NESTEROV
    #   "AdamW"     torch AdamW: SOLVER.BETAS, SOLVER.EPS
    #   "LARS"      timm Lars (You et al. 2017): SOLVER.MOMENTUM, SOLVER.NESTEROV, SOLVER.LARS.*
    #   "LAMB"      timm Lamb (You et al. 2020): SOLVER.BETAS, SOLVER.EPS, SOLVER.LAMB.*
    #   "PMD_LAMB"  LAMB with periodic moment decay (Wang et al. 2020): SOLVER.LAMB.*, SOLVER.PMD.*
    #   "SAM"       SAM (Foret et al. 2021), two passes per step: SOLVER.SAM.*
    _C.SOLVER.OPTIMIZER = "SGD"
    _C.SOLVER.BETAS = (0.9, 0.999)  # AdamW / LAMB (β1, β2)
    _C.SOLVER.EPS = 1e-8  # AdamW / LAMB ε
    # LARS / LAMB / PMD_LAMB: exclude 1-D parameters (biases, norm weights) from the trust
    # ratio, the convention of the LARS/LAMB papers: they get no layer-wise adaptation and no
    # weight decay. False: every parameter is adapted (timm's always_adapt) with its group's decay.
    _C.SOLVER.TRUST_RATIO_EXCLUDE_BIAS_NORM = True
    _C.SOLVER.LARS = CN()
    _C.SOLVER.LARS.TRUST_COEFF = 0.001  # η of the trust ratio η·‖w‖/‖g + wd·w‖
    _C.SOLVER.LARS.EPS = 1e-8  # added to the trust ratio's denominator
    _C.SOLVER.LARS.TRUST_CLIP = False  # clip the trust ratio at 1 (LARC)
    _C.SOLVER.LAMB = CN()
    # LAMB's own global gradient-norm clipping (timm's default is 1.0, applied to the whole
    # model before the update); 0.0 = off. Use SOLVER.CLIP_GRADIENTS for ordinary clipping.
    _C.SOLVER.LAMB.MAX_GRAD_NORM = 0.0
    _C.SOLVER.LAMB.TRUST_CLIP = False  # clip the trust ratio at 1
    _C.SOLVER.PMD = CN()
    # PMD_LAMB: multiply both LAMB moments by FACTOR every PERIOD optimizer steps. The paper's
    # schedule is not public: these defaults are our assumption (see agvm.solver.pmd_lamb).
    _C.SOLVER.PMD.PERIOD = 100
    _C.SOLVER.PMD.FACTOR = 0.5
    _C.SOLVER.SAM = CN()
    _C.SOLVER.SAM.RHO = 0.05  # radius of the ascent step ρ·g/‖g‖ (L2, whole model)
    _C.SOLVER.SAM.BASE_OPTIMIZER = "SGD"  # the optimizer that steps at the SAM gradient: SGD or AdamW
    # Learning rate by a scaling rule: RULE "none" keeps SOLVER.BASE_LR; "linear" / "sqrt" set
    # BASE_LR = REFERENCE_LR scaled from REFERENCE_IMS_PER_BATCH to SOLVER.IMS_PER_BATCH.
    _C.SOLVER.LR_SCALING = CN()
    _C.SOLVER.LR_SCALING.RULE = "none"
    _C.SOLVER.LR_SCALING.REFERENCE_IMS_PER_BATCH = 16  # images per iteration
    _C.SOLVER.LR_SCALING.REFERENCE_LR = 0.02
    # SOLVER.WARMUP_METHOD also accepts "exp": factor WARMUP_FACTOR^(1 − t/WARMUP_ITERS), the
    # authors' release (with WARMUP_FACTOR 0.001).
    # Micro-batches per iteration per process (≥ 1). SOLVER.IMS_PER_BATCH stays the global batch;
    # each process's batch (IMS_PER_BATCH / world size) must be divisible by it.
    _C.SOLVER.GRAD_ACCUM_STEPS = 1
    # Gradient clipping (detectron2's SOLVER.CLIP_GRADIENTS.*) restricted to iterations
    # [start, end] (inclusive, 0-based). (-1, -1) = every iteration. The authors' release clips
    # the whole model's L2 norm to 1.0 only in [warm-up − 100, warm-up + 100].
    # CLIP_TYPE: "value" and "norm" keep detectron2's meaning ("norm" clips each parameter
    # tensor separately); "full_model" clips one norm over all parameters (the release's).
    _C.SOLVER.CLIP_GRADIENTS.ITER_RANGE = (-1, -1)
    # Under DDP, all-reduce gradients in fp16 on ordinary iterations (torch's fp16 compression
    # hook; with AGVM its comm hook does the same, and AGVM iterations stay in full precision).
    _C.SOLVER.DDP_FP16_COMPRESSION = False
    # Steps whose gradients hold a NaN/inf (with a finite loss) are skipped: no parameter,
    # optimizer-state or μ change, counted in nonfinite/skipped_steps. Training stops with an
    # error after this many consecutive skips (≥ 1). With AMP, the GradScaler skips them instead.
    _C.SOLVER.MAX_CONSECUTIVE_NONFINITE = 5



def add_agvm_config(cfg: CN) -> None:
    """Add agvm's keys to a detectron2 config (in place; idempotent): the solver keys of
    :func:`add_solver_config` (optimizers, accumulation, clipping window, ...), the keys of
    agvm's RetinaNet variant (MODEL.EFFECTIVE_BATCH.*, :mod:`agvm.detectron2.effective_batch`) and SOLVER.AGVM.*,
    the method's own (defaults from :class:`agvm.GradientVarianceModulator`)."""
    add_solver_config(cfg)
    from .effective_batch import add_effective_batch_config

    add_effective_batch_config(cfg)  # MODEL.EFFECTIVE_BATCH.*: the effective-batch experiment's RetinaNet
    if "AGVM" in cfg.SOLVER:
        return
    _C = cfg
    # SOLVER.AGVM.* become the core's arguments in one place, agvm.detectron2.agvm_kwargs(cfg)
    # (sentinels resolved there), and are validated by the core (messages name these keys).
    _C.SOLVER.AGVM = CN()
    # Modulate each module's learning rate by μ = sqrt(Φ_anchor / Φ_module) (the method).
    _C.SOLVER.AGVM.ENABLED = False
    # With ENABLED: estimate and log Φ every INTERVAL iterations but keep μ = 1 (the baseline
    # curves of the paper's Figure 1; the step is then identical to plain training).
    _C.SOLVER.AGVM.MEASURE_ONLY = _CORE["measure_only"]
    # α: momentum on μ, in [0, 1). Paper default 0.97 (results flat over [0.95, 0.98]).
    _C.SOLVER.AGVM.MOMENTUM = _CORE["momentum"]
    # τ: iterations between two estimates of Φ (≥ 1). Paper: 10 (5 above ~1K batch).
    _C.SOLVER.AGVM.INTERVAL = _CORE["interval"]
    # First iteration (0-based) with an estimate; -1 = SOLVER.WARMUP_ITERS + 100 (the release).
    _C.SOLVER.AGVM.START_ITER = -1
    # Last iteration that may estimate; -1 = never stop. After it the plain LR returns (μ = 1),
    # as in the authors' release (lr_update_stop_iter).
    _C.SOLVER.AGVM.STOP_ITER = -1
    # (lo, hi) bounds of the ratio Φ_anchor / Φ_module before the square root, 0 < lo ≤ hi;
    # () disables clamping. The release's (0.5, 10.0) gives μ_new ∈ [0.707, 3.16].
    _C.SOLVER.AGVM.CLAMP = tuple(_CORE["clamp"])
    # Added to both variances of the ratio.
    _C.SOLVER.AGVM.EPS = _CORE["eps"]
    # The module the others are aligned to (its μ is 1). Paper: "backbone" (best in ablation).
    _C.SOLVER.AGVM.ANCHOR = _CORE["anchor"]
    # Extra (module name, regex) rules, tried before the defaults of agvm.detectron2.groups;
    # e.g. [["box_predictor", "^roi_heads\\.box_predictor\\."]]. [] = automatic grouping.
    _C.SOLVER.AGVM.GROUPS = []
    # Cosine on Adam-preconditioned half-gradients: "auto" (for AdamW), "on" or "off".
    _C.SOLVER.AGVM.PRECONDITION = "auto"


#: ``--max-iter``: config key -> the field of :func:`agvm.solver.rescale_schedule`'s result.
_RESCALED = {"SOLVER.MAX_ITER": "max_iter", "SOLVER.STEPS": "steps", "SOLVER.WARMUP_ITERS": "warmup_iters",
             "SOLVER.AGVM.START_ITER": "agvm_start", "SOLVER.AGVM.STOP_ITER": "agvm_stop",
             "SOLVER.AGVM.INTERVAL": "agvm_interval", "SOLVER.CLIP_GRADIENTS.ITER_RANGE": "clip_range",
             "TEST.EVAL_PERIOD": "eval_period", "SOLVER.CHECKPOINT_PERIOD": "checkpoint_period"}


def rescale_config(cfg: CN, max_iter: Optional[int]) -> list:
    """``--max-iter``: rescale every iteration count of the (unfrozen) ``cfg`` to ``max_iter``
    iterations (:func:`agvm.solver.rescale_schedule`; None = unchanged). Returns the changes as
    ``["KEY old → new", ...]``. Raises ValueError for ``max_iter`` < 1."""
    if max_iter is None:
        return []
    if max_iter < 1:
        raise ValueError(f"--max-iter {max_iter}: the number of iterations must be ≥ 1")
    s = cfg.SOLVER
    new = rescale_schedule(s.MAX_ITER, max_iter, s.STEPS, s.WARMUP_ITERS, s.AGVM.START_ITER, s.AGVM.STOP_ITER,
                           s.AGVM.INTERVAL, s.CLIP_GRADIENTS.ITER_RANGE, cfg.TEST.EVAL_PERIOD, s.CHECKPOINT_PERIOD)
    changes = []
    for key, field in _RESCALED.items():
        node, name = cfg, key.split(".")
        for part in name[:-1]:
            node = node[part]
        old = node[name[-1]]
        value = type(old)(new[field]) if isinstance(old, (list, tuple)) else new[field]
        if old != value:
            changes.append(f"{key} {old} → {value}")
        node[name[-1]] = value
    return changes
