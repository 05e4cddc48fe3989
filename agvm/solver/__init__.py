"""Baselines and schedules of the paper's comparisons: PMD-LAMB, LR scaling, exp warm-up.

LARS and LAMB come from timm (``timm.optim.Lars``, ``timm.optim.Lamb``); SAM's two-pass step
lives in the trainer (``agvm.detectron2.train_loop``). See ``agvm.detectron2.build`` for the
``SOLVER.OPTIMIZER`` names.
"""

from .pmd_lamb import PMDLamb
from .schedules import LR_SCALING_RULES, build_lr_scheduler, exp_warmup, rescale_schedule, scale_lr

__all__ = ["LR_SCALING_RULES", "PMDLamb", "build_lr_scheduler", "exp_warmup", "rescale_schedule", "scale_lr"]
