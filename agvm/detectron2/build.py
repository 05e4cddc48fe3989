"""``build_agvm_optimizer(cfg, model)``: detectron2's parameter groups, tagged by AGVM module."""

from __future__ import annotations

import logging
from typing import Any, Dict, List

import torch
from detectron2.config import CfgNode
from detectron2.solver.build import get_default_optimizer_params

from timm.optim import Lamb, Lars


from ..core.modulator import GradientVarianceModulator, SettingError
from ..core.optim import AGVM, MODULE_KEY
from ..solver import LR_SCALING_RULES, PMDLamb
from .config import OPTIMIZERS
from .groups import group_parameters

__all__ = ["build_agvm_optimizer", "agvm_kwargs", "agvm_param_groups", "agvm_start_iter", "check_agvm_config"]

#: Optimizers with a layer-wise trust ratio (SOLVER.TRUST_RATIO_EXCLUDE_BIAS_NORM applies).
TRUST_RATIO_OPTIMIZERS = ("LARS", "LAMB", "PMD_LAMB")

logger = logging.getLogger(__name__)


def agvm_start_iter(cfg: CfgNode) -> int:
    """``SOLVER.AGVM.START_ITER`` resolved: -1 means ``SOLVER.WARMUP_ITERS + 100``."""
    return agvm_kwargs(cfg)["start_iter"]


#: SOLVER.AGVM key of each argument of the core (GradientVarianceModulator / AGVM).
CONFIG_KEYS = {"anchor": "ANCHOR", "momentum": "MOMENTUM", "interval": "INTERVAL", "start_iter": "START_ITER",
               "stop_iter": "STOP_ITER", "clamp": "CLAMP", "eps": "EPS", "measure_only": "MEASURE_ONLY",
               "precondition": "PRECONDITION"}
_SENTINELS = {"START_ITER": " (or -1: SOLVER.WARMUP_ITERS + 100)", "STOP_ITER": " (or -1: never stop)",
              "CLAMP": " (() = no clamp)"}


def agvm_kwargs(cfg: CfgNode) -> Dict[str, Any]:
    """The core's keyword arguments (:class:`agvm.AGVM` and its modulator) from SOLVER.AGVM,
    with every config sentinel resolved here and nowhere else: START_ITER -1 → WARMUP_ITERS +
    100 (the release), STOP_ITER -1 → None, CLAMP () → None, PRECONDITION auto/on/off →
    "auto"/True/False. Validation of the values is the core's (:func:`check_agvm_config`)."""
    a = cfg.SOLVER.AGVM
    return {
        "anchor": a.ANCHOR,
        "momentum": a.MOMENTUM,
        "interval": a.INTERVAL,
        "start_iter": cfg.SOLVER.WARMUP_ITERS + 100 if a.START_ITER == -1 else a.START_ITER,
        "stop_iter": None if a.STOP_ITER == -1 else a.STOP_ITER,
        "clamp": tuple(a.CLAMP) or None,
        "eps": a.EPS,
        "measure_only": a.MEASURE_ONLY,
        "precondition": {"auto": "auto", "on": True, "off": False}.get(a.PRECONDITION, a.PRECONDITION),
    }


def check_agvm_config(cfg: CfgNode) -> None:
    """Reject bad agvm keys before anything is built; each error names the key and value."""
    s = cfg.SOLVER
    if s.OPTIMIZER not in OPTIMIZERS:
        raise ValueError(f"SOLVER.OPTIMIZER={s.OPTIMIZER!r} is not one of {list(OPTIMIZERS)}")
    if not (isinstance(s.GRAD_ACCUM_STEPS, int) and s.GRAD_ACCUM_STEPS >= 1):
        raise ValueError(f"SOLVER.GRAD_ACCUM_STEPS={s.GRAD_ACCUM_STEPS!r} must be an integer ≥ 1")
    if s.OPTIMIZER == "SAM":
        if s.SAM.BASE_OPTIMIZER not in ("SGD", "AdamW"):
            raise ValueError(f"SOLVER.SAM.BASE_OPTIMIZER={s.SAM.BASE_OPTIMIZER!r} must be 'SGD' or 'AdamW'")
        if not s.SAM.RHO > 0:
            raise ValueError(f"SOLVER.SAM.RHO={s.SAM.RHO!r} must be > 0")
        if s.AGVM.ENABLED:
            raise ValueError(
                "SOLVER.OPTIMIZER='SAM' cannot be combined with SOLVER.AGVM.ENABLED=True: SAM's gradient is "
                "taken at a perturbed point shared by both half-batches, so AGVM's two half-batch estimates "
                "would not be independent. Use SGD or AdamW with AGVM."
            )
        if s.AMP.ENABLED:
            raise ValueError("SOLVER.OPTIMIZER='SAM' does not support SOLVER.AMP.ENABLED=True")
    if s.LR_SCALING.RULE not in LR_SCALING_RULES:
        raise ValueError(f"SOLVER.LR_SCALING.RULE={s.LR_SCALING.RULE!r} is not one of {list(LR_SCALING_RULES)}")
    if s.WARMUP_METHOD not in ("linear", "constant", "exp"):
        raise ValueError(f"SOLVER.WARMUP_METHOD={s.WARMUP_METHOD!r} must be 'linear', 'constant' or 'exp'")
    if s.CLIP_GRADIENTS.CLIP_TYPE not in ("value", "norm", "full_model"):
        raise ValueError(
            f"SOLVER.CLIP_GRADIENTS.CLIP_TYPE={s.CLIP_GRADIENTS.CLIP_TYPE!r} must be 'value', 'norm' (per parameter, "
            "detectron2's meaning) or 'full_model' (one norm over the whole model)"
        )
    rng = tuple(s.CLIP_GRADIENTS.ITER_RANGE)
    if len(rng) != 2 or (rng != (-1, -1) and not (0 <= rng[0] <= rng[1])):
        raise ValueError(
            f"SOLVER.CLIP_GRADIENTS.ITER_RANGE={rng!r} must be (-1, -1) (always) or (start, end) with 0 ≤ start ≤ end"
        )
    a = s.AGVM
    if not a.ENABLED:
        return
    if a.PRECONDITION not in ("auto", "on", "off"):
        raise ValueError(f"SOLVER.AGVM.PRECONDITION={a.PRECONDITION!r} must be 'auto', 'on' or 'off'")
    kwargs = agvm_kwargs(cfg)
    kwargs.pop("precondition")
    try:  # the core validates its own arguments; the message is given the config key here
        GradientVarianceModulator([a.ANCHOR], **kwargs)
    except SettingError as e:
        key = CONFIG_KEYS[e.name]
        raise ValueError(f"SOLVER.AGVM.{key}={a[key]!r} {e.rule}{_SENTINELS.get(key, '')}") from None
    if cfg.SOLVER.AMP.ENABLED and not cfg.MODEL.DEVICE.startswith("cuda"):
        raise ValueError(f"SOLVER.AMP.ENABLED=True needs a CUDA device, got MODEL.DEVICE={cfg.MODEL.DEVICE!r}")


def agvm_param_groups(cfg: CfgNode, model: torch.nn.Module) -> List[Dict[str, Any]]:
    """detectron2's default parameter groups (norm/bias weight decay, bias lr factor), each
    tagged with its AGVM module under ``"agvm_module"``, merged per (module, hyper-parameters).

    The tag is part of each group so that detectron2's own group merging (main branch) or any
    later merging cannot put two modules into one group. Groups come anchor module first.
    """
    modules = group_parameters(model, [tuple(r) for r in cfg.SOLVER.AGVM.GROUPS], cfg.SOLVER.AGVM.ANCHOR)
    module_of = {id(p): name for name, params in modules.items() for p in params}
    d2_groups = get_default_optimizer_params(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
        weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
    )
    trust_ratio = cfg.SOLVER.OPTIMIZER in TRUST_RATIO_OPTIMIZERS
    exclude = trust_ratio and cfg.SOLVER.TRUST_RATIO_EXCLUDE_BIAS_NORM
    merged: Dict[tuple, Dict[str, Any]] = {}
    for group in d2_groups:
        for p in group["params"]:
            if id(p) not in module_of:  # frozen parameters are not optimised
                continue
            hyper = {k: v for k, v in group.items() if k != "params"}
            if trust_ratio:
                # timm's Lars/Lamb adapt a group iff weight_decay != 0 or always_adapt
                excluded = exclude and p.ndim <= 1
                hyper["always_adapt"] = not excluded
                if excluded:
                    hyper["weight_decay"] = 0.0
            module = module_of[id(p)]
            key = (module,) + tuple(sorted((k, _hashable(v)) for k, v in hyper.items()))
            if key not in merged:
                merged[key] = {**hyper, MODULE_KEY: module, "params": []}
            merged[key]["params"].append(p)
    order = {name: i for i, name in enumerate(modules)}
    return sorted(merged.values(), key=lambda g: order[g[MODULE_KEY]])


def _hashable(v):
    return tuple(v) if isinstance(v, list) else v


def build_agvm_optimizer(cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer of ``cfg`` over ``model``, wrapped in :class:`agvm.AGVM` when
    ``SOLVER.AGVM.ENABLED``; the bare (module-tagged) optimizer otherwise.

    ``SOLVER.OPTIMIZER`` (see ``add_agvm_config``): SGD and AdamW from torch; LARS and LAMB
    from timm; PMD_LAMB (:class:`agvm.solver.PMDLamb`); SAM returns its base optimizer (the
    trainer runs SAM's two passes). SOLVER.BASE_LR and SOLVER.WEIGHT_DECAY for all. Gradient
    clipping is applied by the trainer (it knows the iteration, for CLIP_GRADIENTS.ITER_RANGE).
    """
    check_agvm_config(cfg)
    groups = agvm_param_groups(cfg, model)
    s = cfg.SOLVER
    name = s.SAM.BASE_OPTIMIZER if s.OPTIMIZER == "SAM" else s.OPTIMIZER
    if name == "SGD":
        optimizer = torch.optim.SGD(
            groups, lr=s.BASE_LR, momentum=s.MOMENTUM, nesterov=s.NESTEROV, weight_decay=s.WEIGHT_DECAY
        )
    elif name == "AdamW":
        optimizer = torch.optim.AdamW(
            groups, lr=s.BASE_LR, betas=tuple(s.BETAS), eps=s.EPS, weight_decay=s.WEIGHT_DECAY
        )
    elif name == "LARS":
        optimizer = Lars(
            groups, lr=s.BASE_LR, momentum=s.MOMENTUM, nesterov=s.NESTEROV, weight_decay=s.WEIGHT_DECAY,
            trust_coeff=s.LARS.TRUST_COEFF, eps=s.LARS.EPS, trust_clip=s.LARS.TRUST_CLIP,
        )
    else:  # LAMB / PMD_LAMB (check_agvm_config rejected anything else)
        kwargs = dict(
            lr=s.BASE_LR, betas=tuple(s.BETAS), eps=s.EPS, weight_decay=s.WEIGHT_DECAY,
            max_grad_norm=s.LAMB.MAX_GRAD_NORM or None, trust_clip=s.LAMB.TRUST_CLIP,
        )
        if name == "LAMB":
            optimizer = Lamb(groups, **kwargs)
        else:
            optimizer = PMDLamb(groups, decay_period=s.PMD.PERIOD, decay_factor=s.PMD.FACTOR, **kwargs)
    if not s.AGVM.ENABLED:
        return optimizer
    wrapped = AGVM(optimizer, **agvm_kwargs(cfg))
    sizes = {m: sum(p.numel() for p in ps) for m, ps in wrapped.params_by_module().items()}
    logger.info(
        "AGVM modules (parameters): "
        + ", ".join(f"{m} ({n:,})" for m, n in sizes.items())
        + f"; {wrapped.modulator!r}"
    )
    return wrapped

