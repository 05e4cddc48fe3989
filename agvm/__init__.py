"""agvm: AGVM (Adaptive Gradient Variance Modulator) for large-batch dense visual prediction.

Xue et al., "Large-batch Optimization for Dense Visual Predictions", NeurIPS 2022
(arXiv:2210.11078). ``agvm.compat`` is applied first, so that detectron2 0.6 imports on
today's numpy/Pillow/setuptools and without its C++ ops.

Public API: the pure-torch core (:class:`AGVM`, :class:`GradientVarianceModulator`,
:func:`gradient_variance`) is imported eagerly; the detectron2 parts
(:func:`add_agvm_config`, :class:`AGVMTrainer`, :func:`build_agvm_optimizer`,
:func:`group_parameters`) on first access, so ``import agvm`` works without detectron2.
"""

from . import compat as _compat

_compat.apply()

from .core import AGVM, GradientVarianceModulator, gradient_variance, preserved_state  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "AGVM",
    "AGVMTrainer",
    "GradientVarianceModulator",
    "add_agvm_config",
    "build_agvm_optimizer",
    "gradient_variance",
    "group_parameters",
    "preserved_state",
    "__version__",
]

_DETECTRON2_API = {"AGVMTrainer", "add_agvm_config", "build_agvm_optimizer", "group_parameters"}


def __getattr__(name):
    if name in _DETECTRON2_API:
        from . import detectron2 as _d2

        return getattr(_d2, name)
    raise AttributeError(f"module 'agvm' has no attribute {name!r}")
