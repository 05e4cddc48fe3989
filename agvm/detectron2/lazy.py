"""AGVM for detectron2's LazyConfig (``.py``) configs: the optimizer builder and its settings node.

A LazyConfig holds the optimizer as a ``LazyCall`` of a torch optimizer whose ``params`` are
:func:`detectron2.solver.get_default_optimizer_params`'s arguments; ``tools/lazyconfig_train_net.py``
sets ``optimizer.params.model`` and instantiates it. :func:`build_lazy_agvm_optimizer` takes the
same node shape and tags every parameter group with its AGVM module, and :func:`agvm_optimizer`
turns detectron2's node into its node (a one-line change of a config)::

    optimizer = model_zoo.get_config("common/optim.py").AdamW   # or .SGD
    optimizer.params.lr_factor_func = partial(vit_lr_decay_rate, num_layers=12, lr_decay_rate=0.7)
    optimizer = agvm_optimizer(optimizer, enabled=True, momentum=0.97, interval=10)

The AGVM settings live in one node, ``optimizer.agvm``: the ``SOLVER.AGVM.*`` keys of
:data:`agvm.detectron2.config.KEYS` in lower case (``enabled``, ``momentum``, ``interval``,
``start_iter``, ...), with the same defaults, special values, checks and messages — the node is
put into those keys of a yacs config (:func:`settings_view`) and checked and converted there by
the yacs path's own code; messages name the LazyConfig key (:data:`LAZY_NAMES`), e.g.
``optimizer.agvm.momentum=1.0 must be in [0, 1) ...``. ``start_iter=-1`` means
``optimizer.warmup_iters + 100`` (the LazyConfig trainer fills ``warmup_iters`` from
``lr_multiplier.warmup_length × train.max_iter`` when it is None).

Each group's learning rate = schedule × lr factor × μ(module): the factor (``lr_factor_func``,
``overrides``, ``bias_lr_factor``) is in the group's initial lr, the schedule
(``LRMultiplier``) rescales it, and :class:`agvm.AGVM` multiplies by μ at each step.
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Callable, Dict, Mapping, Optional, Union

import torch
from detectron2.config import CfgNode
from detectron2.solver.build import get_default_optimizer_params

from ..core.modulator import SettingError
from .build import tag_param_groups, wrap_in_agvm
from .checks import check_agvm_config
from .config import KEYS, Key, agvm_kwargs, default_config, setting_error
from .groups import group_parameters

__all__ = ["AGVM_NODE_KEYS", "LAZY_NAMES", "agvm_node", "agvm_optimizer", "build_lazy_agvm_optimizer",
           "lazy_agvm_kwargs", "lazy_message", "settings_view"]

_PREFIX = "SOLVER.AGVM."

#: ``optimizer.agvm`` node key → its :class:`~agvm.detectron2.config.Key` (the SOLVER.AGVM.* keys, lower case).
AGVM_NODE_KEYS: Dict[str, Key] = {k.name[len(_PREFIX):].lower(): k for k in KEYS if k.name.startswith(_PREFIX)}

#: yacs key → its LazyConfig counterpart, for messages (besides SOLVER.AGVM.X → optimizer.agvm.x).
LAZY_NAMES = {
    "SOLVER.WARMUP_ITERS": "optimizer.warmup_iters",
    "SOLVER.BASE_LR": "optimizer.lr",
    "SOLVER.MAX_ITER": "train.max_iter",
    "SOLVER.IMS_PER_BATCH": "dataloader.train.total_batch_size",
    "SOLVER.GRAD_ACCUM_STEPS": "train.grad_accum_steps",
    "SOLVER.MAX_CONSECUTIVE_NONFINITE": "train.max_consecutive_nonfinite",
    "SOLVER.AMP.ENABLED": "train.amp.enabled",
    "SOLVER.DDP_FP16_COMPRESSION": "train.ddp.fp16_compression",
    "MODEL.DEVICE": "train.device",
    **{f"SOLVER.CLIP_GRADIENTS.{k}": f"train.clip_gradients.{k.lower()}"
       for k in ("ENABLED", "CLIP_TYPE", "CLIP_VALUE", "NORM_TYPE", "ITER_RANGE")},
}


def lazy_message(message: str, node: str = "optimizer.agvm") -> str:
    """``message`` (a yacs-path error) with its key names as the LazyConfig writes them."""
    message = re.sub(r"\bSOLVER\.AGVM\.([A-Z_]+)\b", lambda m: f"{node}.{m.group(1).lower()}", message)
    for yacs, lazy in LAZY_NAMES.items():
        message = re.sub(r"\b%s\b" % re.escape(yacs), lazy, message)
    return message


def agvm_node(**values) -> Dict[str, Any]:
    """The ``optimizer.agvm`` node: every key with its default (:data:`AGVM_NODE_KEYS`), updated
    by ``values``; raises ValueError for an unknown key (see :func:`settings_view`)."""
    _check_names(values)
    node = {name: (list(k.default) if isinstance(k.default, list) else k.default) for name, k in AGVM_NODE_KEYS.items()}
    node.update(values)
    return node


def _check_names(node: Mapping, where: str = "optimizer.agvm") -> None:
    for name in node:
        if name not in AGVM_NODE_KEYS:
            close = difflib.get_close_matches(str(name), list(AGVM_NODE_KEYS), n=2, cutoff=0.6)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise ValueError(f"{where}.{name}: unknown AGVM setting{hint} (known: {', '.join(AGVM_NODE_KEYS)})")


def _plain(value):
    """A Python value of a (possibly omegaconf) config value: lists/tuples as lists, recursively."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__") or isinstance(value, Mapping):
        return value
    return [_plain(v) for v in value]


def settings_view(agvm: Optional[Mapping], warmup_iters: Optional[int] = None, optimizer: str = "SGD",
                  where: str = "optimizer.agvm", **solver) -> CfgNode:
    """A yacs config (detectron2's and agvm's defaults) holding the LazyConfig's settings under
    the yacs keys: the ``agvm`` node (:data:`AGVM_NODE_KEYS`; None/missing keys = defaults) in
    SOLVER.AGVM.*, ``warmup_iters`` in SOLVER.WARMUP_ITERS, ``optimizer`` ("SGD"/"AdamW") in
    SOLVER.OPTIMIZER, and ``solver``'s ``{"MAX_ITER": 90000, "AMP.ENABLED": True, ...}`` under
    SOLVER (a key starting with "MODEL." or "OUTPUT_DIR" at the root). The yacs path's checks
    and :func:`agvm_kwargs` then apply unchanged. Raises ValueError for an unknown setting or a
    value of a type a config cannot hold, naming ``where.<key>``; with AGVM enabled and
    ``start_iter`` -1, for ``warmup_iters`` None."""
    agvm = dict(agvm or {})
    _check_names(agvm, where)
    cfg = default_config()
    cfg.SOLVER.OPTIMIZER = optimizer
    for name, value in agvm.items():
        key = AGVM_NODE_KEYS[name]
        value = _plain(value)
        if isinstance(key.default, tuple) and isinstance(value, list):
            value = tuple(value)
        if name == "groups" and isinstance(value, list):
            value = [list(r) if isinstance(r, (list, tuple)) else r for r in value]
        try:
            cfg.SOLVER.AGVM[key.name[len(_PREFIX):]] = value
        except AssertionError:
            raise ValueError(f"{where}.{name}={value!r}: a config cannot hold a {type(value).__name__}") from None
    start = cfg.SOLVER.AGVM.START_ITER
    if warmup_iters is None and cfg.SOLVER.AGVM.ENABLED and start == -1:
        raise ValueError(f"{where}.start_iter=-1 means the warm-up iterations + 100, but "
                         f"{where.rsplit('.', 1)[0]}.warmup_iters is None: set it, or set {where}.start_iter")
    cfg.SOLVER.WARMUP_ITERS = int(warmup_iters or 0)
    for name, value in solver.items():
        node = cfg if name.startswith(("MODEL.", "OUTPUT_DIR")) else cfg.SOLVER
        *path, leaf = name.split(".")
        for part in path:
            node = node[part]
        node[leaf] = _plain(value)
    return cfg


def lazy_agvm_kwargs(agvm: Optional[Mapping], warmup_iters: Optional[int] = None, optimizer: str = "SGD",
                     where: str = "optimizer.agvm") -> Dict[str, Any]:
    """The core's keyword arguments (:class:`agvm.AGVM`) of the ``agvm`` node, checked by
    :func:`agvm.detectron2.check_agvm_config` and converted by :func:`agvm.detectron2.agvm_kwargs`
    (special values resolved as for SOLVER.AGVM.*). Raises ValueError naming ``where.<key>``."""
    cfg = settings_view(agvm, warmup_iters, optimizer, where)
    _check(cfg, where)
    return agvm_kwargs(cfg)


def _check(cfg: CfgNode, where: str) -> None:
    try:
        check_agvm_config(cfg)
    except ValueError as e:
        raise ValueError(lazy_message(str(e.args[0] if e.args else e), where)) from None


#: optimizer names the builder knows (the yacs path's SGD and AdamW, from torch)
_OPTIMIZERS = {"SGD": torch.optim.SGD, "AdamW": torch.optim.AdamW}


def build_lazy_agvm_optimizer(
    params: Mapping,
    optimizer: Union[str, type] = "SGD",
    agvm: Optional[Mapping] = None,
    warmup_iters: Optional[int] = None,
    **optimizer_kwargs,
) -> torch.optim.Optimizer:
    """The optimizer of a LazyConfig, each parameter group tagged with its AGVM module, wrapped
    in :class:`agvm.AGVM` when ``agvm["enabled"]``.

    Args:
        params: :func:`detectron2.solver.get_default_optimizer_params`'s arguments, ``model``
            included (set by the trainer, as ``lazyconfig_train_net.py`` does): ``base_lr``,
            ``weight_decay``, ``weight_decay_norm``, ``bias_lr_factor``, ``weight_decay_bias``,
            ``overrides`` and ``lr_factor_func`` (detectron2 main's meaning on every detectron2:
            ``lr_factor_func(parameter name)`` multiplies the parameter's lr, unless an
            ``overrides`` entry of its name sets ``lr``; needs ``base_lr``).
        optimizer: "SGD", "AdamW" or a ``torch.optim.Optimizer`` class.
        agvm: the AGVM settings node (:func:`agvm_node`'s keys; missing keys take their defaults);
            ``groups`` and ``anchor`` choose the modules (:func:`agvm.detectron2.group_parameters`).
        warmup_iters: iterations of the LR warm-up (resolves ``agvm.start_iter=-1``).
        optimizer_kwargs: the optimizer's own arguments (``lr``, ``momentum``, ``betas``,
            ``weight_decay``, ...).

    Parameters whose hyper-parameters differ (a per-layer lr factor) get groups of their own;
    no group holds two modules. Raises ValueError for a bad setting, naming its LazyConfig key.
    """
    params = dict(params)
    model = params.pop("model", None)
    if not isinstance(model, torch.nn.Module):
        raise ValueError("optimizer.params.model must be set to the model before the optimizer is instantiated "
                         "(as detectron2's lazyconfig_train_net.py does), got "
                         f"{type(model).__name__}")
    lr_factor_func: Optional[Callable[[str], float]] = params.pop("lr_factor_func", None)
    overrides = {str(k): dict(v) for k, v in (params.pop("overrides", None) or {}).items()}
    cls = _OPTIMIZERS.get(optimizer, optimizer) if isinstance(optimizer, str) else optimizer
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ValueError(f"optimizer={optimizer!r} must be one of {list(_OPTIMIZERS)} or a torch.optim.Optimizer class")
    name = "AdamW" if issubclass(cls, torch.optim.AdamW) else "SGD"
    view = settings_view(agvm, warmup_iters, name)
    _check(view, "optimizer.agvm")
    try:
        modules = group_parameters(model, [tuple(r) for r in view.SOLVER.AGVM.GROUPS], view.SOLVER.AGVM.ANCHOR)
    except ValueError as e:
        raise ValueError(lazy_message(str(e))) from None
    d2_groups = get_default_optimizer_params(model, overrides=overrides or None, **params)

    def adjust(p, pname, hyper):
        if lr_factor_func is None or "lr" in overrides.get(pname.rsplit(".", 1)[-1], {}):
            return
        if "lr" not in hyper:
            raise ValueError("optimizer.params.lr_factor_func needs optimizer.params.base_lr")
        hyper["lr"] = hyper["lr"] * float(lr_factor_func(pname))

    opt = cls(tag_param_groups(model, d2_groups, modules, adjust), **optimizer_kwargs)
    if not view.SOLVER.AGVM.ENABLED:
        return opt
    try:
        return wrap_in_agvm(opt, agvm_kwargs(view))
    except SettingError as e:
        raise ValueError(lazy_message(str(setting_error(view, e)))) from None


def agvm_optimizer(node, **agvm):
    """detectron2's optimizer node (``L(torch.optim.X)(params=L(get_default_optimizer_params)(...),
    lr=..., ...)``, e.g. ``model_zoo.get_config("common/optim.py").SGD``) as the node of
    :func:`build_lazy_agvm_optimizer` with the settings ``agvm`` (:func:`agvm_node`): the same
    ``params`` keys (``optimizer.params.lr_factor_func = ...`` still works), the same optimizer
    arguments, plus ``optimizer.agvm`` and ``optimizer.warmup_iters`` (None: the trainer's)."""
    from detectron2.config import LazyCall

    def items(n):  # interpolations (``base_lr="${..lr}"``) kept as written
        return n.items_ex(resolve=False) if hasattr(n, "items_ex") else n.items()

    target = node["_target_"]
    kwargs = {k: v for k, v in items(node) if k not in ("_target_", "params")}
    params = {k: v for k, v in items(node["params"]) if k != "_target_"}
    name = next((n for n, c in _OPTIMIZERS.items() if target in (c, f"{c.__module__}.{c.__name__}")), target)
    return LazyCall(build_lazy_agvm_optimizer)(params=params, optimizer=name, agvm=agvm_node(**agvm),
                                               warmup_iters=None, **kwargs)
