"""PMD-LAMB: LAMB with periodic moment decay.

Wang et al., "Large Batch Optimization for Object Detection: Training COCO in 12 Minutes",
ECCV 2020: LAMB whose first and second moment estimates are decayed periodically, so that
stale gradients from early training weigh less. There is no public implementation and the
paper's period and factor are not known to us. **Assumption** (our defaults): every
``decay_period`` = 100 optimizer steps, both ``exp_avg`` and ``exp_avg_sq`` of every parameter
are multiplied by ``decay_factor`` = 0.5, right after that step. Both are configurable
(``SOLVER.PMD.PERIOD``, ``SOLVER.PMD.FACTOR``).

The LAMB update itself is timm's ``Lamb`` (You et al., ICLR 2020); only the decay is ours.
"""

from __future__ import annotations

import torch
from timm.optim import Lamb

__all__ = ["PMDLamb"]


class PMDLamb(Lamb):
    """timm's ``Lamb`` plus a periodic decay of its moments.

    Args:
        params, lr, betas, eps, weight_decay, max_grad_norm, trust_clip, always_adapt: as for
            ``timm.optim.Lamb`` (lr default 1e-3, betas (0.9, 0.999), eps 1e-6, weight_decay
            0.01, max_grad_norm 1.0 — set None to disable its global gradient clipping).
        decay_period: optimizer steps between two decays (default 100; ≥ 1).
        decay_factor: the factor both moments are multiplied by (default 0.5; in [0, 1]).

    The step count is timm's per-group ``step`` (saved in the state dict), so a resumed run
    decays at the same steps as an uninterrupted one.
    """

    def __init__(self, params, *args, decay_period: int = 100, decay_factor: float = 0.5, **kwargs):
        if not (isinstance(decay_period, int) and decay_period >= 1):
            raise ValueError(f"SOLVER.PMD.PERIOD (decay_period) must be an integer ≥ 1, got {decay_period!r}")
        if not (0.0 <= decay_factor <= 1.0):
            raise ValueError(f"SOLVER.PMD.FACTOR (decay_factor) must be in [0, 1], got {decay_factor!r}")
        super().__init__(params, *args, **kwargs)
        self.decay_period = decay_period
        self.decay_factor = decay_factor

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        for group in self.param_groups:
            if int(group["step"]) % self.decay_period:
                continue
            for p in group["params"]:
                state = self.state.get(p)
                if state:
                    state["exp_avg"].mul_(self.decay_factor)
                    state["exp_avg_sq"].mul_(self.decay_factor)
        return loss
