"""``add_agvm_config(cfg)``: the config keys of agvm, with their defaults and units."""

from __future__ import annotations

from detectron2.config import CfgNode as CN

__all__ = ["add_agvm_config", "OPTIMIZERS"]

#: Values accepted by ``SOLVER.OPTIMIZER``.
OPTIMIZERS = ("SGD", "AdamW")


def add_agvm_config(cfg: CN) -> None:
    """Add agvm's keys to a detectron2 config (in place). Idempotent."""
    if "AGVM" in cfg.SOLVER:
        return
    _C = cfg
    # Optimizer: "SGD" (momentum SOLVER.MOMENTUM, nesterov SOLVER.NESTEROV) or "AdamW"
    # (SOLVER.BETAS, SOLVER.EPS). Weight decay and the norm/bias groups are detectron2's
    # (SOLVER.WEIGHT_DECAY, WEIGHT_DECAY_NORM, WEIGHT_DECAY_BIAS, BIAS_LR_FACTOR).
    _C.SOLVER.OPTIMIZER = "SGD"
    _C.SOLVER.BETAS = (0.9, 0.999)  # AdamW (β1, β2)
    _C.SOLVER.EPS = 1e-8  # AdamW ε
    # Micro-batches per iteration per process (≥ 1). SOLVER.IMS_PER_BATCH stays the global batch;
    # each process's batch (IMS_PER_BATCH / world size) must be divisible by it.
    _C.SOLVER.GRAD_ACCUM_STEPS = 1
    # Gradient clipping (detectron2's SOLVER.CLIP_GRADIENTS.*) restricted to iterations
    # [start, end] (inclusive, 0-based). (-1, -1) = every iteration. The authors' release clips
    # (L2 norm, max 1.0) only in [warm-up − 100, warm-up + 100].
    _C.SOLVER.CLIP_GRADIENTS.ITER_RANGE = (-1, -1)

    _C.SOLVER.AGVM = CN()
    # Modulate each module's learning rate by μ = sqrt(Φ_anchor / Φ_module) (the method).
    _C.SOLVER.AGVM.ENABLED = False
    # With ENABLED: estimate and log Φ every INTERVAL iterations but keep μ = 1 (the baseline
    # curves of the paper's Figure 1; the step is then identical to plain training).
    _C.SOLVER.AGVM.MEASURE_ONLY = False
    # α: momentum on μ, in [0, 1). Paper default 0.97 (results flat over [0.95, 0.98]).
    _C.SOLVER.AGVM.MOMENTUM = 0.97
    # τ: iterations between two estimates of Φ (≥ 1). Paper: 10 (5 above ~1K batch).
    _C.SOLVER.AGVM.INTERVAL = 10
    # First iteration (0-based) with an estimate; -1 = SOLVER.WARMUP_ITERS + 100 (the release).
    _C.SOLVER.AGVM.START_ITER = -1
    # Last iteration that may estimate; -1 = never stop. The last μ stays in force afterwards.
    _C.SOLVER.AGVM.STOP_ITER = -1
    # (lo, hi) bounds of the ratio Φ_anchor / Φ_module before the square root, 0 < lo ≤ hi;
    # () disables clamping. The release's (0.5, 10.0) gives μ_new ∈ [0.707, 3.16].
    _C.SOLVER.AGVM.CLAMP = (0.5, 10.0)
    # Added to both variances of the ratio.
    _C.SOLVER.AGVM.EPS = 1e-6
    # The module the others are aligned to (its μ is 1). Paper: "backbone" (best in ablation).
    _C.SOLVER.AGVM.ANCHOR = "backbone"
    # Extra (module name, regex) rules, tried before the defaults of agvm.detectron2.groups;
    # e.g. [["box_predictor", "^roi_heads\\.box_predictor\\."]]. [] = automatic grouping.
    _C.SOLVER.AGVM.GROUPS = []
    # Cosine on Adam-preconditioned half-gradients: "auto" (for AdamW), "on" or "off".
    _C.SOLVER.AGVM.PRECONDITION = "auto"
