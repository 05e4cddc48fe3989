"""agvm's config keys: one map (:data:`KEYS`) from which everything about them is derived.

Each :class:`Key` gives the config key, its default, what it means (one line, with its unit),
the argument of the core (:class:`agvm.AGVM` / :class:`agvm.GradientVarianceModulator`) it
becomes, the values it accepts and what a special value means. From the map come
:func:`add_solver_config` and :func:`add_agvm_config` (the keys and defaults), :func:`agvm_kwargs`
(the core's arguments), the validation messages (:func:`config_key`), the ``--help`` epilog
(:func:`help_lines`) and the configuration reference in ``docs/config.md``
(:func:`key_table`, ``python -m agvm.detectron2.config``). Adding a hyperparameter of the
method = its core argument + one entry here.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from detectron2.config import CfgNode as CN

from ..core.modulator import GradientVarianceModulator
from ..solver.schedules import LR_SCALING_RULES, rescale_schedule

__all__ = ["KEYS", "OPTIMIZERS", "Key", "add_agvm_config", "add_solver_config", "agvm_kwargs", "agvm_start_iter",
           "check_choices", "config_key", "default_config", "help_lines", "setting_error", "value_of", "key_table", "rescale_config"]

#: Values accepted by ``SOLVER.OPTIMIZER``.
OPTIMIZERS = ("SGD", "AdamW", "LARS", "LAMB", "SAM", "PMD_LAMB")

#: The core's defaults (α, τ, clamp, eps, anchor, measure_only): each lives in agvm.core.modulator.
_CORE = {k: p.default for k, p in inspect.signature(GradientVarianceModulator).parameters.items()
         if p.default is not inspect.Parameter.empty}


@dataclass(frozen=True)
class Key:
    """One config key of agvm.

    Attributes:
        name: the full key, e.g. ``"SOLVER.AGVM.MOMENTUM"``.
        default: its default value.
        meaning: one line: what it is, its unit, where it comes from.
        arg: the core argument it becomes (:func:`agvm_kwargs`), or None (a trainer setting).
        choices: the accepted values, when they are a fixed set (checked by ``validate_config``).
        special: what a special value means, appended to error messages, e.g. ``"-1: never stop"``.
        to_arg: ``(value, cfg) -> argument`` resolving the special value; default: the value.
    """

    name: str
    default: Any
    meaning: str
    arg: Optional[str] = None
    choices: Tuple = ()
    special: str = ""
    to_arg: Optional[Callable[[Any, CN], Any]] = None


KEYS: Tuple[Key, ...] = (
    # ---------------------------------------------------------------- solver (add_solver_config)
    Key("SOLVER.OPTIMIZER", "SGD", "optimizer: SGD, AdamW (torch), LARS, LAMB (timm), PMD_LAMB (LAMB with periodic "
        "moment decay), SAM (two passes per step); weight decay and norm/bias groups are detectron2's",
        choices=OPTIMIZERS),
    Key("SOLVER.BETAS", (0.9, 0.999), "AdamW / LAMB (β1, β2)"),
    Key("SOLVER.EPS", 1e-8, "AdamW / LAMB ε"),
    Key("SOLVER.TRUST_RATIO_EXCLUDE_BIAS_NORM", True, "LARS / LAMB / PMD_LAMB: 1-D parameters (biases, norm weights) "
        "get no trust ratio and no weight decay (the papers' convention); False: every parameter is adapted"),
    Key("SOLVER.LARS.TRUST_COEFF", 0.001, "LARS: η of the trust ratio η·‖w‖/‖g + wd·w‖"),
    Key("SOLVER.LARS.EPS", 1e-8, "LARS: added to the trust ratio's denominator"),
    Key("SOLVER.LARS.TRUST_CLIP", False, "LARS: clip the trust ratio at 1 (LARC)"),
    Key("SOLVER.LAMB.MAX_GRAD_NORM", 0.0, "LAMB: its own global gradient-norm clipping before the update; 0.0 = off "
        "(timm's default is 1.0; use SOLVER.CLIP_GRADIENTS for ordinary clipping)"),
    Key("SOLVER.LAMB.TRUST_CLIP", False, "LAMB: clip the trust ratio at 1"),
    Key("SOLVER.PMD.PERIOD", 100, "PMD_LAMB: optimizer steps between two moment decays (our assumption: the paper's "
        "schedule is not public)"),
    Key("SOLVER.PMD.FACTOR", 0.5, "PMD_LAMB: factor applied to both LAMB moments at each decay"),
    Key("SOLVER.SAM.RHO", 0.05, "SAM: radius ρ of the ascent step ρ·g/‖g‖ (L2 over the whole model)"),
    Key("SOLVER.SAM.BASE_OPTIMIZER", "SGD", "SAM: the optimizer that steps at the SAM gradient",
        choices=("SGD", "AdamW")),
    Key("SOLVER.LR_SCALING.RULE", "none", "learning rate by a scaling rule: none keeps SOLVER.BASE_LR; linear / sqrt "
        "set BASE_LR = REFERENCE_LR scaled from REFERENCE_IMS_PER_BATCH to SOLVER.IMS_PER_BATCH",
        choices=LR_SCALING_RULES),
    Key("SOLVER.LR_SCALING.REFERENCE_IMS_PER_BATCH", 16, "the scaling rule's reference batch (images per iteration)"),
    Key("SOLVER.LR_SCALING.REFERENCE_LR", 0.02, "the scaling rule's learning rate at the reference batch"),
    Key("SOLVER.GRAD_ACCUM_STEPS", 1, "micro-batches per iteration per process (≥ 1); SOLVER.IMS_PER_BATCH stays the "
        "global batch and each process's share must be divisible by it"),
    Key("SOLVER.CLIP_GRADIENTS.ITER_RANGE", (-1, -1), "gradient clipping (detectron2's SOLVER.CLIP_GRADIENTS, plus "
        "CLIP_TYPE 'full_model': one norm over all parameters) only in iterations [start, end], inclusive, 0-based; "
        "(-1, -1) = every iteration (the release clips in [warm-up − 100, warm-up + 100])"),
    Key("SOLVER.DDP_FP16_COMPRESSION", False, "under DDP, all-reduce gradients in fp16 on ordinary iterations (AGVM "
        "iterations stay in full precision)"),
    Key("SOLVER.MAX_CONSECUTIVE_NONFINITE", 5, "steps whose gradients hold a NaN/inf are skipped (no parameter, "
        "optimizer-state or μ change); training stops after this many in a row (≥ 1); with AMP the GradScaler skips"),
    # ---------------------------------------------------------------- the method (add_agvm_config)
    Key("SOLVER.AGVM.ENABLED", False, "modulate each module's learning rate by μ = sqrt(Φ_anchor / Φ_module)"),
    Key("SOLVER.AGVM.MEASURE_ONLY", _CORE["measure_only"], "with ENABLED: estimate and log Φ every INTERVAL iterations "
        "but keep μ = 1 (the step is plain training's; the paper's Figure 1 curves)", arg="measure_only"),
    Key("SOLVER.AGVM.MOMENTUM", _CORE["momentum"], "α, the momentum on μ, in [0, 1); paper: 0.97 (flat over "
        "[0.95, 0.98])", arg="momentum"),
    Key("SOLVER.AGVM.INTERVAL", _CORE["interval"], "τ, iterations between two estimates of Φ (≥ 1); paper: 10 (5 "
        "above ~1K batch)", arg="interval"),
    Key("SOLVER.AGVM.START_ITER", -1, "first iteration (0-based) with an estimate", arg="start_iter",
        special="-1: SOLVER.WARMUP_ITERS + 100, the release",
        to_arg=lambda v, cfg: cfg.SOLVER.WARMUP_ITERS + 100 if v == -1 else v),
    Key("SOLVER.AGVM.STOP_ITER", -1, "last iteration that may estimate; after it μ = 1 (the release's "
        "lr_update_stop_iter)", arg="stop_iter", special="-1: never stop",
        to_arg=lambda v, cfg: None if v == -1 else v),
    Key("SOLVER.AGVM.CLAMP", tuple(_CORE["clamp"]), "(lo, hi) bounds of Φ_anchor / Φ_module before the square root, "
        "0 < lo ≤ hi; the release's (0.5, 10.0) gives μ_new in [0.707, 3.16]", arg="clamp",
        special="(): no clamp", to_arg=lambda v, cfg: tuple(v) or None),
    Key("SOLVER.AGVM.EPS", _CORE["eps"], "added to both variances of the ratio", arg="eps"),
    Key("SOLVER.AGVM.ANCHOR", _CORE["anchor"], "the module the others are aligned to (its μ is 1); paper: backbone "
        "(best in its ablation)", arg="anchor"),
    Key("SOLVER.AGVM.GROUPS", [], "extra [module name, regex] rules tried before agvm.detectron2.groups' defaults, "
        "e.g. [[\"box_predictor\", \"^roi_heads\\\\.box_predictor\\\\.\"]]; [] = automatic grouping"),
    Key("SOLVER.AGVM.PRECONDITION", "auto", "Φ from Adam-preconditioned half-gradients: auto (for AdamW), on or off",
        arg="precondition", choices=("auto", "on", "off"),
        to_arg=lambda v, cfg: {"auto": "auto", "on": True, "off": False}.get(v, v)),
)

_BY_NAME: Dict[str, Key] = {k.name: k for k in KEYS}
_BY_ARG: Dict[str, Key] = {k.arg: k for k in KEYS if k.arg}


def _add(cfg: CN, keys) -> None:
    for key in keys:
        *path, leaf = key.name.split(".")
        node = cfg
        for part in path:
            if part not in node:
                node[part] = CN()
            node = node[part]
        if leaf not in node:
            node[leaf] = list(key.default) if isinstance(key.default, list) else key.default


def add_solver_config(cfg: CN) -> None:
    """Add the solver keys agvm's trainer understands besides SOLVER.AGVM.* (the ``SOLVER.*``
    entries of :data:`KEYS` outside SOLVER.AGVM) with their defaults; in place, idempotent
    (a key already there keeps its value)."""
    _add(cfg, (k for k in KEYS if not k.name.startswith("SOLVER.AGVM.")))


def add_agvm_config(cfg: CN) -> None:
    """Add every key of :data:`KEYS` (the solver keys of :func:`add_solver_config` and
    SOLVER.AGVM.*) with its default; in place, idempotent. Adds no ``MODEL.*`` key."""
    _add(cfg, KEYS)


def default_config() -> CN:
    """detectron2's default config with every key of :data:`KEYS` added (a new, unfrozen node)."""
    from detectron2.config import get_cfg

    cfg = get_cfg()
    add_agvm_config(cfg)
    return cfg


def config_key(arg: str) -> Key:
    """The :class:`Key` of the core argument ``arg`` (e.g. "momentum" → SOLVER.AGVM.MOMENTUM)."""
    return _BY_ARG[arg]


def value_of(cfg: CN, name: str) -> Any:
    """The value of the dotted key ``name`` in ``cfg``."""
    node = cfg
    for part in name.split("."):
        node = node[part]
    return node


def agvm_kwargs(cfg: CN) -> Dict[str, Any]:
    """The core's keyword arguments (:class:`agvm.AGVM` and its modulator) from ``cfg``: one per
    :data:`KEYS` entry with an ``arg``, special values resolved (START_ITER -1 → WARMUP_ITERS +
    100, STOP_ITER -1 → None, CLAMP () → None, PRECONDITION on/off → True/False)."""
    out = {}
    for key in KEYS:
        if key.arg:
            value = value_of(cfg, key.name)
            out[key.arg] = key.to_arg(value, cfg) if key.to_arg else value
    return out


def setting_error(cfg: CN, error) -> ValueError:
    """The core's :class:`agvm.core.modulator.SettingError` about argument ``error.name``,
    re-worded for the config: ``KEY=value`` (as written in ``cfg``), the rule, and what the
    key's special value means."""
    key = config_key(error.name)
    special = f" (or {key.special})" if key.special else ""
    return ValueError(f"{key.name}={value_of(cfg, key.name)!r} {error.rule}{special}")


def check_choices(cfg: CN) -> None:
    """Every key of :data:`KEYS` with ``choices`` holds one of them (SOLVER.AGVM.* only with AGVM
    enabled). Raises ValueError naming the key, the value and the accepted values."""
    for key in KEYS:
        if key.choices and (cfg.SOLVER.AGVM.ENABLED or not key.name.startswith("SOLVER.AGVM.")):
            value = value_of(cfg, key.name)
            if value not in key.choices:
                raise ValueError(f"{key.name}={value!r} is not one of {list(key.choices)}")


def agvm_start_iter(cfg: CN) -> int:
    """``SOLVER.AGVM.START_ITER`` resolved: -1 means ``SOLVER.WARMUP_ITERS + 100``."""
    return agvm_kwargs(cfg)["start_iter"]


def help_lines(prefix: str = "SOLVER.AGVM.") -> List[str]:
    """``KEY default  meaning`` lines of the keys starting with ``prefix`` (for ``--help``)."""
    return [f"  {k.name} {k.default!r}  {k.meaning}" + (f" ({k.special})" if k.special else "")
            for k in KEYS if k.name.startswith(prefix)]


def key_table() -> str:
    """The Markdown table of every key (key, default, core argument, meaning): the body of
    ``docs/config.md``, checked by a test."""
    rows = ["| key | default | core argument | meaning |", "|---|---|---|---|"]
    for k in KEYS:
        meaning = k.meaning + (f" ({k.special})" if k.special else "")
        if k.choices:
            meaning += "; one of " + ", ".join(map(str, k.choices))
        arg = f"`{k.arg}`" if k.arg else ""
        rows.append(f"| `{k.name}` | `{k.default!r}` | {arg} | {meaning.replace('|', '/')} |")
    return "\n".join(rows)


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
        *path, leaf = key.split(".")
        node = value_of(cfg, ".".join(path))
        old = node[leaf]
        value = type(old)(new[field]) if isinstance(old, (list, tuple)) else new[field]
        if old != value:
            changes.append(f"{key} {old} → {value}")
        node[leaf] = value
    return changes


if __name__ == "__main__":  # python -m agvm.detectron2.config: the key table of docs/config.md
    print(key_table())
