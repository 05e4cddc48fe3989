"""The detectron2 integration of agvm: config, trainer, evaluation and command-line helpers.

Importing this package imports detectron2 (the core in ``agvm.core`` does not).
"""

from .engine import build_evaluator, default_argument_parser, print_results, setup_cfg
from .trainer import Trainer

__all__ = ["Trainer", "build_evaluator", "default_argument_parser", "print_results", "setup_cfg"]
