"""The effective-batch experiment's RetinaNet and its config keys (a detectron2 project package).

Importing it registers ``EffectiveBatchRetinaNet`` in detectron2's ``META_ARCH_REGISTRY``;
``add_effective_batch_config(cfg)`` adds its ``MODEL.EFFECTIVE_BATCH.*`` keys. The experiment's
plan and report (pure Python): :mod:`effective_batch.experiment`, run by ``run_experiment.py``.
"""

import agvm.detectron2  # noqa: F401  (first: detectron2 0.6 compatibility patches and warning filters)

from .config import add_effective_batch_config
from .modeling import EffectiveBatchRetinaNet, UnsharedRetinaNetHead, check_loss_keep, location_keep_mask

__all__ = [
    "EffectiveBatchRetinaNet",
    "UnsharedRetinaNetHead",
    "add_effective_batch_config",
    "check_loss_keep",
    "location_keep_mask",
]
