"""GradientVarianceModulator: the per-module learning-rate factors μ of AGVM.

Xue et al., "Large-batch Optimization for Dense Visual Predictions", NeurIPS 2022, Sec. 3:
every τ iterations, with Φ(i) the gradient-variance proxy of module i and module 1 the
anchor (the backbone),

    μ_new(i) = sqrt(clamp(Φ(1) / Φ(i), lo, hi))        (clamp: the authors' release, [0.5, 10])
    μ(i)    ← α · μ(i) + (1 − α) · μ_new(i)             (μ starts at 1)

and module i steps with learning rate η_t · μ(i) until the next update. The ratio uses
``(Φ(1) + eps) / (Φ(i) + eps)`` as the release does. Pure Python; no torch needed.
"""

from __future__ import annotations

import math
from typing import Dict, Mapping, Optional, Sequence, Tuple

__all__ = ["GradientVarianceModulator", "SettingError", "check_settings"]


class SettingError(ValueError):
    """A bad argument of :class:`GradientVarianceModulator` (or :class:`agvm.AGVM`): ``name``
    (the argument), ``value`` and ``rule`` (what would be accepted). Front ends (the
    detectron2 config) re-raise it under their own key names."""

    def __init__(self, name: str, value, rule: str) -> None:
        self.name, self.value, self.rule = name, value, rule
        super().__init__(f"{name}={value!r} {rule}")


def check_settings(momentum: float = 0.97, interval: int = 10, start_iter: int = 0, stop_iter: Optional[int] = None,
                   clamp: Optional[Tuple[float, float]] = (0.5, 10.0), eps: float = 1e-6):
    """Validate the settings of :class:`GradientVarianceModulator` (its arguments but ``modules``
    and ``anchor``, same meaning and defaults) without building one. Returns ``clamp`` as a pair
    of floats (or None). Raises :class:`SettingError` naming the argument and what is accepted."""
    if not (isinstance(momentum, (int, float)) and 0.0 <= momentum < 1.0):
        raise SettingError("momentum", momentum, "must be in [0, 1) (α, the momentum on μ)")
    if not (isinstance(interval, int) and interval >= 1):
        raise SettingError("interval", interval, "must be an integer ≥ 1 (τ, iterations between estimates)")
    if not (isinstance(start_iter, int) and start_iter >= 0):
        raise SettingError("start_iter", start_iter, "must be an integer ≥ 0")
    if stop_iter is not None and not (isinstance(stop_iter, int) and stop_iter >= start_iter):
        raise SettingError("stop_iter", stop_iter, f"must be None (never) or an integer ≥ the start iteration {start_iter}")
    if clamp is not None:
        if len(clamp) != 2 or not (0.0 < float(clamp[0]) <= float(clamp[1])):
            raise SettingError("clamp", clamp, "must be None (no clamp) or (lo, hi) with 0 < lo ≤ hi")
        clamp = (float(clamp[0]), float(clamp[1]))
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0.0):
        raise SettingError("eps", eps, "must be a finite number ≥ 0 (added to both variances of the ratio)")
    return clamp


class GradientVarianceModulator:
    """μ per module, updated from Φ per module every ``interval`` iterations.

    Args:
        modules: module names, e.g. ``["backbone", "neck", "rpn", "box_head"]``.
        anchor: the module whose variance the others are aligned to (default ``"backbone"``);
            its μ stays 1.
        momentum: α, the momentum on μ, in [0, 1) (default 0.97; the paper reports
            [0.95, 0.98] as equally good; α = 0 means no momentum, which the paper found to
            diverge).
        interval: τ, iterations between two estimates, ≥ 1 (default 10).
        start_iter: first iteration (0-based) at which μ is estimated (default 0). The
            reference release starts 100 iterations after warm-up; before ``start_iter`` μ = 1.
        stop_iter: last iteration at which μ may be estimated, or None for never stopping
            (default None). After it the plain learning rate returns (μ = 1 applied, see
            :meth:`applied_mu`), as in the authors' release.
        clamp: ``(lo, hi)`` bounds of the ratio Φ_anchor / Φ_i before the square root, with
            ``0 < lo ≤ hi`` (default ``(0.5, 10.0)``, so μ_new ∈ [0.707, 3.16]), or None to
            disable clamping.
        eps: added to both variances in the ratio (default 1e-6).
        measure_only: estimate and record Φ but keep μ = 1 (the baseline curves of the
            paper's Figure 1; default False).

    A module whose Φ is NaN or infinite at an update (zero or non-finite gradient in a half)
    keeps its μ and is counted in :attr:`skipped` (non-anchor module updates skipped, in
    total); if the anchor's Φ is not finite, every module keeps its μ.
    """

    def __init__(
        self,
        modules: Sequence[str],
        anchor: str = "backbone",
        momentum: float = 0.97,
        interval: int = 10,
        start_iter: int = 0,
        stop_iter: Optional[int] = None,
        clamp: Optional[Tuple[float, float]] = (0.5, 10.0),
        eps: float = 1e-6,
        measure_only: bool = False,
    ) -> None:
        modules = list(modules)
        if not modules:
            raise ValueError("modules is empty: give at least the anchor module")
        if len(set(modules)) != len(modules):
            raise ValueError(f"module names must be unique, got {modules}")
        if anchor not in modules:
            raise SettingError("anchor", anchor, f"is not one of the modules {modules}")
        clamp = check_settings(momentum, interval, start_iter, stop_iter, clamp, eps)
        # anchor first, then the others in the given order
        self.modules = [anchor] + [m for m in modules if m != anchor]
        self.anchor = anchor
        self.momentum = float(momentum)
        self.interval = interval
        self.start_iter = start_iter
        self.stop_iter = stop_iter
        self.clamp = clamp
        self.eps = float(eps)
        self.measure_only = bool(measure_only)
        self.mu: Dict[str, float] = {m: 1.0 for m in self.modules}
        self.phi: Dict[str, float] = {m: float("nan") for m in self.modules}
        self.skipped = 0
        self.num_updates = 0
        self.last_update_iter: Optional[int] = None

    def is_update_iter(self, iteration: int) -> bool:
        """Whether μ is (re-)estimated at ``iteration``: every ``interval`` iterations from
        ``start_iter`` through ``stop_iter``."""
        if iteration < self.start_iter:
            return False
        if self.stop_iter is not None and iteration > self.stop_iter:
            return False
        return (iteration - self.start_iter) % self.interval == 0

    def applied_mu(self, iteration: int) -> Dict[str, float]:
        """The μ to apply at ``iteration``: the current μ, or 1 for every module after
        ``stop_iter``."""
        if self.stop_iter is not None and iteration > self.stop_iter:
            return {m: 1.0 for m in self.modules}
        return self.mu

    def target(self, phi: Mapping[str, float]) -> Dict[str, float]:
        """μ_new per module for the variances ``phi`` (non-finite entries are left out)."""
        anchor_phi = phi.get(self.anchor, float("nan"))
        if not math.isfinite(anchor_phi):
            return {}
        out = {}
        for m in self.modules:
            value = phi.get(m, float("nan"))
            if not math.isfinite(value):
                continue
            ratio = (anchor_phi + self.eps) / (value + self.eps) if value + self.eps > 0 else math.inf
            if self.clamp is not None:
                ratio = min(self.clamp[1], max(self.clamp[0], ratio))
            if not math.isfinite(ratio):
                continue
            out[m] = math.sqrt(ratio)
        return out

    def update(self, iteration: int, phi: Mapping[str, float]) -> Dict[str, float]:
        """Record ``phi`` (Φ per module, e.g. 1 − cos) measured at ``iteration`` and return μ.

        Unknown module names raise ``KeyError``. In ``measure_only`` mode μ stays 1.
        """
        unknown = set(phi) - set(self.modules)
        if unknown:
            raise KeyError(f"unknown modules {sorted(unknown)}; known: {self.modules}")
        for m in self.modules:
            self.phi[m] = float(phi.get(m, float("nan")))
        new = self.target(self.phi)
        self.skipped += sum(1 for m in self.modules if m != self.anchor and m not in new)
        if not self.measure_only:
            a = self.momentum
            for m, mu_new in new.items():
                self.mu[m] = a * self.mu[m] + (1.0 - a) * mu_new
            self.mu[self.anchor] = 1.0
        self.num_updates += 1
        self.last_update_iter = iteration
        return dict(self.mu)

    def skip(self, iteration: int) -> None:
        """Record an update at ``iteration`` that could not be measured (e.g. an overflowed
        AMP step): μ is kept and every non-anchor module counts as skipped."""
        self.phi = {m: float("nan") for m in self.modules}
        self.skipped += len(self.modules) - 1
        self.num_updates += 1
        self.last_update_iter = iteration

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> Dict:
        """μ, the last Φ, counters and settings (plain Python values)."""
        return {
            "mu": dict(self.mu),
            "phi": dict(self.phi),
            "skipped": self.skipped,
            "num_updates": self.num_updates,
            "last_update_iter": self.last_update_iter,
            "modules": list(self.modules),
            "anchor": self.anchor,
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restore what :meth:`state_dict` saved. The module lists must match."""
        if list(state["modules"]) != self.modules or state["anchor"] != self.anchor:
            raise ValueError(
                f"modulator state is for modules {list(state['modules'])} (anchor {state['anchor']!r}), "
                f"this modulator has {self.modules} (anchor {self.anchor!r})"
            )
        self.mu = {m: float(state["mu"][m]) for m in self.modules}
        self.phi = {m: float(state["phi"][m]) for m in self.modules}
        self.skipped = int(state["skipped"])
        self.num_updates = int(state["num_updates"])
        self.last_update_iter = state["last_update_iter"]

    def __repr__(self) -> str:
        mu = ", ".join(f"{m}={v:.4f}" for m, v in self.mu.items())
        return (
            f"GradientVarianceModulator(anchor={self.anchor!r}, α={self.momentum}, τ={self.interval}, "
            f"start={self.start_iter}, stop={self.stop_iter}, clamp={self.clamp}, μ: {mu})"
        )

