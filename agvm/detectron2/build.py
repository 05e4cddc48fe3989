"""``build_agvm_optimizer(cfg, model)``: detectron2's parameter groups, tagged by AGVM module."""

from __future__ import annotations

import logging
from typing import Any, Dict, List

import torch
from detectron2.config import CfgNode
from detectron2.solver.build import get_default_optimizer_params

from timm.optim import Lamb, Lars


from ..core.modulator import SettingError
from ..core.optim import AGVM, MODULE_KEY
from ..solver import PMDLamb
from .checks import check_agvm_config
from .config import OPTIMIZERS, agvm_kwargs, setting_error
from .groups import _unwrap, group_parameters

__all__ = ["build_agvm_optimizer", "build_clip_fn", "agvm_param_groups", "tag_param_groups", "wrap_in_agvm"]

#: Optimizers with a layer-wise trust ratio (SOLVER.TRUST_RATIO_EXCLUDE_BIAS_NORM applies).
TRUST_RATIO_OPTIMIZERS = ("LARS", "LAMB", "PMD_LAMB")

logger = logging.getLogger(__name__)


def agvm_param_groups(cfg: CfgNode, model: torch.nn.Module) -> List[Dict[str, Any]]:
    """detectron2's default parameter groups (norm/bias weight decay, bias lr factor), each
    tagged with its AGVM module under ``"agvm_module"``, merged per (module, hyper-parameters).

    The tag is part of each group so that detectron2's own group merging (main branch) or any
    later merging cannot put two modules into one group. Groups come anchor module first.
    """
    modules = group_parameters(model, [tuple(r) for r in cfg.SOLVER.AGVM.GROUPS], cfg.SOLVER.AGVM.ANCHOR)
    d2_groups = get_default_optimizer_params(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
        weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
    )
    trust_ratio = cfg.SOLVER.OPTIMIZER in TRUST_RATIO_OPTIMIZERS
    exclude = trust_ratio and cfg.SOLVER.TRUST_RATIO_EXCLUDE_BIAS_NORM

    def adjust(p, name, hyper):
        if trust_ratio:
            # timm's Lars/Lamb adapt a group iff weight_decay != 0 or always_adapt
            excluded = exclude and p.ndim <= 1
            hyper["always_adapt"] = not excluded
            if excluded:
                hyper["weight_decay"] = 0.0

    return tag_param_groups(model, d2_groups, modules, adjust)


def tag_param_groups(model: torch.nn.Module, d2_groups, modules, adjust=None) -> List[Dict[str, Any]]:
    """``d2_groups`` (detectron2's parameter groups of ``model``) regrouped per (AGVM module,
    hyper-parameters), each tagged with its module under ``"agvm_module"``, anchor module first.

    ``modules``: :func:`group_parameters`'s ``{module: [parameters]}`` (parameters not in it,
    i.e. frozen ones, are left out). ``adjust(param, name, hyper)``: optional, may change the
    hyper-parameters of one parameter in place (``name``: its name in ``model``), e.g. a
    per-parameter lr factor; parameters whose hyper-parameters then differ get groups of their own."""
    module_of = {id(p): name for name, params in modules.items() for p in params}
    names = {id(p): n for n, p in _unwrap(model).named_parameters()}
    merged: Dict[tuple, Dict[str, Any]] = {}
    for group in d2_groups:
        for p in group["params"]:
            if id(p) not in module_of:  # frozen parameters are not optimised
                continue
            hyper = {k: v for k, v in group.items() if k != "params"}
            if adjust is not None:
                adjust(p, names[id(p)], hyper)
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
    Raises ValueError for a bad solver or SOLVER.AGVM key (:func:`check_agvm_config`; nothing
    is checked twice in a run), naming the key and value.
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
    elif name in ("LAMB", "PMD_LAMB"):
        kwargs = dict(
            lr=s.BASE_LR, betas=tuple(s.BETAS), eps=s.EPS, weight_decay=s.WEIGHT_DECAY,
            max_grad_norm=s.LAMB.MAX_GRAD_NORM or None, trust_clip=s.LAMB.TRUST_CLIP,
        )
        if name == "LAMB":
            optimizer = Lamb(groups, **kwargs)
        else:
            optimizer = PMDLamb(groups, decay_period=s.PMD.PERIOD, decay_factor=s.PMD.FACTOR, **kwargs)
    else:
        raise ValueError(f"SOLVER.OPTIMIZER={s.OPTIMIZER!r} is not one of {list(OPTIMIZERS)}")
    if not s.AGVM.ENABLED:
        return optimizer
    try:
        return wrap_in_agvm(optimizer, agvm_kwargs(cfg))
    except SettingError as e:
        raise setting_error(cfg, e) from None


def wrap_in_agvm(optimizer: torch.optim.Optimizer, kwargs: Dict[str, Any]) -> AGVM:
    """``optimizer`` (module-tagged groups) wrapped in :class:`agvm.AGVM` with the core
    arguments ``kwargs``; logs the modules and their sizes. Raises the core's SettingError."""
    wrapped = AGVM(optimizer, **kwargs)
    sizes = {m: sum(p.numel() for p in ps) for m, ps in wrapped.params_by_module().items()}
    logger.info(
        "AGVM modules (parameters): "
        + ", ".join(f"{m} ({n:,})" for m, n in sizes.items())
        + f"; {wrapped.modulator!r}"
    )
    return wrapped


def build_clip_fn(cfg: CfgNode):
    """The clipping function ``fn(params)`` of ``SOLVER.CLIP_GRADIENTS`` (the trainer applies
    it in ``ITER_RANGE``): detectron2's ``"value"`` (each element to
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
