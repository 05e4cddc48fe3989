"""The framework-agnostic core of AGVM (pure torch; no detectron2 import)."""

from .modulator import GradientVarianceModulator
from .optim import AGVM, MODULE_KEY, is_adam_like
from .sandbox import UnaccountedStateError, preserved_rng, preserved_state
from .variance import gradient_stats, gradient_variance, variance_from_stats

__all__ = [
    "AGVM",
    "GradientVarianceModulator",
    "MODULE_KEY",
    "gradient_stats",
    "gradient_variance",
    "is_adam_like",
    "preserved_rng",
    "preserved_state",
    "UnaccountedStateError",
    "variance_from_stats",
]
