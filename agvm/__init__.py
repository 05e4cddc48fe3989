"""agvm: AGVM (Adaptive Gradient Variance Modulator) for large-batch dense visual prediction.

Xue et al., "Large-batch Optimization for Dense Visual Predictions", NeurIPS 2022
(arXiv:2210.11078). ``agvm.compat`` is applied first, so that detectron2 0.6 imports on
today's numpy/Pillow/setuptools and without its C++ ops.
"""

from . import compat as _compat

_compat.apply()

__version__ = "0.1.0"

__all__ = ["__version__"]
