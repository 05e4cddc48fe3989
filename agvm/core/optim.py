"""AGVM: the optimizer wrapper that applies per-module learning-rate factors μ.

Xue et al., "Large-batch Optimization for Dense Visual Predictions", NeurIPS 2022.
The wrapped optimizer folds momentum and weight decay into its update as usual; AGVM scales
the whole step of module i by μ(i) by multiplying the learning rate of module i's parameter
groups by μ(i) for the duration of ``step()`` and restoring it afterwards, so LR schedulers
keep owning ``lr``. Works with any ``torch.optim.Optimizer`` whose update is proportional to
``lr`` (SGD, AdamW, LAMB, LARS, ...). Pure torch.

A plain PyTorch loop (each parameter group tagged with its module under ``"agvm_module"``)::

    groups = [{"params": net.backbone.parameters(), "agvm_module": "backbone"},
              {"params": net.head.parameters(), "agvm_module": "head"}]
    opt = AGVM(torch.optim.SGD(groups, lr=0.1, momentum=0.9), anchor="backbone", interval=10)
    for it, (x, y) in enumerate(loader):
        opt.zero_grad()
        if opt.should_estimate(it):              # every τ-th iteration: measure Φ on two halves
            h = len(x) // 2
            with preserved_state(net):           # BN statistics, EMAs and RNG put back after
                loss_fn(net(x[:h]), y[:h]).backward()
                opt.stash_first_half()
                loss_fn(net(x[h:]), y[h:]).backward()
                opt.finish_second_half(it)       # Φ, μ updated; the half gradients dropped
        loss_fn(net(x), y).backward()            # the step is always the plain one
        opt.step()

AGVM changes training only through μ: the half-batch gradients exist only to measure Φ. With
gradient accumulation over an even number of micro-batches the halves come for free: call
:meth:`AGVM.copy_first_half` after the first half of the micro-batches and
:meth:`AGVM.finish_accumulated` after the last (the accumulated gradient is the step). Under
DDP the halves are ranks (:mod:`agvm.distributed`), with no extra pass either.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, Iterable, List, Mapping, Optional, Union

import torch
from torch.optim import Optimizer

from .modulator import GradientVarianceModulator, SettingError
from .variance import GradientStats, gradient_stats, variance_from_stats

__all__ = ["AGVM", "MODULE_KEY", "is_adam_like"]

#: The parameter-group key that names a group's module.
MODULE_KEY = "agvm_module"


def is_adam_like(optimizer: Optimizer) -> bool:
    """Whether ``optimizer`` keeps an Adam second moment (``exp_avg_sq``) with ``betas``:
    Adam, AdamW and subclasses, and optimizers whose groups carry ``betas`` and whose class
    name contains "Adam" (default detection for ``precondition="auto"``)."""
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return True
    groups = optimizer.param_groups
    return "adam" in type(optimizer).__name__.lower() and all("betas" in g for g in groups)


class AGVM(Optimizer):
    """Wraps ``optimizer`` and scales each module's learning rate by its μ on every step.

    Args:
        optimizer: the optimizer to wrap. Its parameter groups must each carry the module
            name under ``"agvm_module"``; several groups may belong to one module (e.g.
            detectron2's separate weight-decay groups for norms and biases).
        modulator: a :class:`GradientVarianceModulator` over exactly those module names, or
            None to build one from ``modulator_kwargs`` (its arguments and defaults: anchor,
            momentum α, interval τ, start_iter, stop_iter, clamp, eps, measure_only).
        precondition: take the cosine on Adam-preconditioned half-gradients
            ``g / (sqrt(β2·v + (1 − β2)·g²) + ε)`` (v = the optimizer's current second moment),
            as the authors' release does for AdamW. ``"auto"`` (default) enables it for
            Adam-family optimizers (:func:`is_adam_like`); True/False force it.
        **modulator_kwargs: passed to :class:`GradientVarianceModulator` when ``modulator`` is
            None (e.g. ``interval=5``); not allowed together with ``modulator``.

    The wrapper *is* a ``torch.optim.Optimizer`` sharing ``param_groups``, ``state`` and
    ``defaults`` with ``optimizer``, so LR schedulers and detectron2's hooks work on it.
    ``state_dict()`` adds the modulator's state under ``"agvm"``.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        modulator: Optional[GradientVarianceModulator] = None,
        *,
        precondition: Union[str, bool] = "auto",
        **modulator_kwargs,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"AGVM wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, AGVM):
            raise TypeError("the optimizer is already wrapped in AGVM")
        untagged = [i for i, g in enumerate(optimizer.param_groups) if g.get(MODULE_KEY) is None]
        if untagged:
            raise ValueError(
                f"parameter groups {untagged} of {type(optimizer).__name__} have no {MODULE_KEY!r} key; "
                f"tag every group with the name of its module (e.g. 'backbone')"
            )
        modules = _ordered_modules(optimizer.param_groups)
        if modulator is None:
            modulator = GradientVarianceModulator(modules, **modulator_kwargs)
        elif modulator_kwargs:
            raise TypeError(f"pass either a modulator or its arguments, not both: got {sorted(modulator_kwargs)}")
        elif set(modulator.modules) != set(modules):
            raise ValueError(
                f"the modulator's modules {modulator.modules} differ from the optimizer's groups' modules {modules}"
            )
        if precondition not in ("auto", True, False):
            raise SettingError("precondition", precondition, "must be 'auto', True or False")
        self.optimizer = optimizer
        self.modulator = modulator
        self.precondition = is_adam_like(optimizer) if precondition == "auto" else bool(precondition)
        # share the wrapped optimizer's containers (what schedulers and hooks read and write)
        self.param_groups = optimizer.param_groups
        self.state = optimizer.state
        self.defaults = optimizer.defaults
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()
        self._stash: Dict[torch.Tensor, Optional[torch.Tensor]] = {}
        self._iteration: Optional[int] = None  # the last iteration given to should_estimate

    # ------------------------------------------------------------------ the step
    @property
    def mu(self) -> Dict[str, float]:
        """The current μ per module (anchor first)."""
        return dict(self.modulator.mu)

    @torch.no_grad()
    def step(self, closure=None):
        """One step of the wrapped optimizer with each group's lr multiplied by its module's μ
        (μ = 1 after the modulator's ``stop_iter``, counted from the iteration last given to
        :meth:`should_estimate`). The lr values are restored exactly afterwards (even if the
        step raises).
        """
        saved = [g["lr"] for g in self.param_groups]
        mu = self.modulator.mu if self._iteration is None else self.modulator.applied_mu(self._iteration)
        for g in self.param_groups:
            g["lr"] = g["lr"] * mu[g[MODULE_KEY]]
        try:
            if closure is None:
                return self.optimizer.step()
            with torch.enable_grad():
                return self.optimizer.step(closure)
        finally:
            for g, lr in zip(self.param_groups, saved):
                g["lr"] = lr

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict) -> None:
        if param_group.get(MODULE_KEY) not in self.modulator.mu:
            raise ValueError(
                f"new parameter group's {MODULE_KEY}={param_group.get(MODULE_KEY)!r} is not one of {self.modulator.modules}"
            )
        self.optimizer.add_param_group(param_group)

    # ------------------------------------------------------------------ Φ estimation
    def should_estimate(self, iteration: int) -> bool:
        """Whether ``iteration`` (0-based) is an AGVM iteration (estimate Φ from two halves).
        Call it once per iteration before :meth:`step`: it also tells the step which iteration
        it is (after ``stop_iter`` the plain lr, μ = 1, is applied)."""
        self._iteration = iteration
        return self.modulator.is_update_iter(iteration)

    def params_by_module(self) -> "OrderedDict[str, List[torch.Tensor]]":
        """The parameters of each module (anchor first), in parameter-group order."""
        out: "OrderedDict[str, List[torch.Tensor]]" = OrderedDict((m, []) for m in self.modulator.modules)
        for g in self.param_groups:
            out[g[MODULE_KEY]].extend(g["params"])
        return out

    @torch.no_grad()
    def stash_first_half(self) -> None:
        """Move the gradients of the first half-batch aside (no copy); ``p.grad`` becomes None.

        Call after the first half's backward, then run the second half's backward and call
        :meth:`finish_second_half`. Extra memory: one set of gradients.
        """
        self._stash = {}
        for params in self.params_by_module().values():
            for p in params:
                self._stash[p] = p.grad
                p.grad = None

    @torch.no_grad()
    def finish_second_half(
        self, iteration: int, grad_scale: float = 1.0, skip_if_nonfinite: bool = False
    ) -> Dict[str, Dict[str, float]]:
        """Φ per module from the stashed first half and the current (second-half) gradients;
        update μ; then drop both (``p.grad`` = None).

        The half-batch passes only *measure*: take the step from an ordinary pass over the
        whole batch afterwards (see the module docstring, and :func:`agvm.core.preserved_state`
        for running the halves without touching BN statistics, loss normalisers or the RNG).

        Args:
            iteration: the current iteration (for the modulator's bookkeeping).
            grad_scale: factor that turns each half's gradient into that half's mean gradient
                (1 / loss scale under AMP; default 1.0). The cosine is scale-invariant; Adam
                preconditioning is not.
            skip_if_nonfinite: when any module's gradient is non-finite (an overflowed AMP
                step, which the GradScaler skips), leave μ unchanged altogether (default
                False: only the affected modules keep their μ).

        Returns ``{"phi": {module: Φ}, "mu": {module: μ}}``.
        """
        if not self._stash:
            raise RuntimeError("finish_second_half() called without stash_first_half() before it")
        stats = {}
        for module, params in self.params_by_module().items():
            first = [self._stash.get(p) for p in params]
            second = [p.grad for p in params]
            stats[module] = gradient_stats(first, second, self._transform(params, grad_scale))
            for p in params:
                p.grad = None
        self._stash = {}
        return self.update_from_stats(iteration, stats, skip_if_nonfinite)

    @torch.no_grad()
    def copy_first_half(self) -> None:
        """Copy the gradients accumulated so far (the first half of an accumulated batch) aside;
        ``p.grad`` keeps accumulating. Call between the micro-batches of the two halves, then
        :meth:`finish_accumulated` after the last one. Extra memory: one set of gradients."""
        self._stash = {}
        for params in self.params_by_module().values():
            for p in params:
                self._stash[p] = None if p.grad is None else p.grad.detach().clone()

    @torch.no_grad()
    def finish_accumulated(
        self, iteration: int, grad_scale: float = 1.0, skip_if_nonfinite: bool = False
    ) -> Dict[str, Dict[str, float]]:
        """Φ per module between the copied first half G1 and the rest, ``p.grad − G1``; update μ.
        ``p.grad`` (the whole accumulated batch) is left as it is, so the step is the plain one.
        ``grad_scale`` turns each half's accumulated sum into its mean gradient (2 when every
        micro-batch loss was divided by the number of micro-batches; times 1 / loss scale under
        AMP). Returns ``{"phi": {module: Φ}, "mu": {module: μ}}`` like :meth:`finish_second_half`."""
        if not self._stash:
            raise RuntimeError("finish_accumulated() called without copy_first_half() before it")
        stats = {}
        for module, params in self.params_by_module().items():
            first = [self._stash.get(p) for p in params]
            rest = (_difference(p.grad, g1) for p, g1 in zip(params, first))
            stats[module] = gradient_stats(first, rest, self._transform(params, grad_scale))
        self._stash = {}
        return self.update_from_stats(iteration, stats, skip_if_nonfinite)

    def update_from_stats(
        self, iteration: int, stats: Mapping[str, GradientStats], skip_if_nonfinite: bool = False
    ) -> Dict[str, Dict[str, float]]:
        """Update μ from per-module ``(⟨G1,G2⟩, ‖G1‖², ‖G2‖²)`` measured at ``iteration``
        (the entry point of a distributed implementation that reduces these sums itself).
        ``skip_if_nonfinite``: as in :meth:`finish_second_half`.

        Returns ``{"phi": {module: Φ}, "mu": {module: μ}}``.
        """
        if skip_if_nonfinite and not all(bool(torch.isfinite(torch.stack(s)).all()) for s in stats.values()):
            self.modulator.skip(iteration)
            nan = float("nan")
            return {"phi": {m: nan for m in stats}, "mu": dict(self.modulator.mu)}
        phi = {m: variance_from_stats(*s) for m, s in stats.items()}
        mu = self.modulator.update(iteration, phi)
        return {"phi": phi, "mu": mu}

    def preconditioner(self, grad_scale: float = 1.0):
        """``f(param, grad, index, out=None) -> g / (sqrt(β2·v + (1 − β2)·g²) + ε)``: the Adam
        preconditioning of a half-batch gradient ``grad`` (flat, any float dtype; computed in that
        dtype) of ``param``'s elements ``index`` (a slice; ``slice(None)`` = all), with v the
        optimizer's current second moment (``exp_avg_sq``; none yet = 0) and β2, ε of
        ``param``'s group. ``grad`` is first multiplied by ``grad_scale`` (1 / loss scale under
        AMP). ``out`` (may be ``grad`` itself) receives the result. Used by
        :meth:`finish_second_half` and by the DDP comm hook (which reads ``v``, β2 and ε through
        the function's ``second_moment(param)`` attribute; ``grad_scale`` is its attribute too)."""
        group_of = {p: g for g in self.param_groups for p in g["params"]}

        def precondition(p: torch.Tensor, grad: torch.Tensor, index: slice = slice(None),
                         out: Optional[torch.Tensor] = None) -> torch.Tensor:
            if grad_scale != 1.0:
                grad = grad * grad_scale
            group = group_of[p]
            beta2 = group["betas"][1]
            eps = group.get("eps", 1e-8)
            v = self.optimizer.state.get(p, {}).get("exp_avg_sq")
            denom = torch.mul(grad, 1.0 - beta2).mul_(grad)  # (1 − β2)·g², one temporary
            if v is not None:
                denom.add_(v.reshape(-1)[index].to(grad.dtype), alpha=beta2)
            return torch.div(grad, denom.sqrt_().add_(eps), out=out)

        def second_moment(p: torch.Tensor):
            """``(v or None, β2, ε)`` of ``param``: what ``precondition`` uses (the DDP comm hook
            applies the same formula itself, fused, block by block)."""
            group = group_of[p]
            return self.optimizer.state.get(p, {}).get("exp_avg_sq"), group["betas"][1], group.get("eps", 1e-8)

        precondition.second_moment = second_moment
        precondition.grad_scale = grad_scale
        return precondition

    def _transform(self, params: Iterable[torch.Tensor], grad_scale: float = 1.0):
        if not self.precondition:
            if grad_scale == 1.0:
                return None
            return lambda i, grad: grad * grad_scale
        params = list(params)
        precondition = self.preconditioner(grad_scale)
        return lambda i, grad: precondition(params[i], grad)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        """The wrapped optimizer's state dict plus ``"agvm"``: the modulator's state."""
        state = self.optimizer.state_dict()
        state["agvm"] = self.modulator.state_dict()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state saved by :meth:`state_dict` (or a bare optimizer state: μ stays)."""
        state_dict = dict(state_dict)
        agvm_state = state_dict.pop("agvm", None)
        self.optimizer.load_state_dict(state_dict)
        # load_state_dict replaces the wrapped optimizer's containers: share them again
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state
        if agvm_state is not None:
            self.modulator.load_state_dict(agvm_state)

    def __repr__(self) -> str:
        return f"AGVM({self.optimizer!r},\n  {self.modulator!r})"

    def __getstate__(self):
        return self.__dict__

    def __setstate__(self, state):
        self.__dict__.update(state)


def _difference(total: Optional[torch.Tensor], first: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``total − first`` (None stands for zero)."""
    if total is None:
        return None if first is None else -first
    return total if first is None else total - first


def _ordered_modules(groups: Iterable[Mapping]) -> List[str]:
    seen: List[str] = []
    for g in groups:
        if g[MODULE_KEY] not in seen:
            seen.append(g[MODULE_KEY])
    return seen

