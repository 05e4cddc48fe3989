"""The detectron2 integration of agvm: config, grouping, optimizer, trainer, evaluation.

Importing this package imports detectron2 (``agvm.core`` does not). detectron2 decorates a
few functions with ``torch.jit.script``, which recent torch announces as deprecated with a
FutureWarning on every run; that one message is silenced here (nothing else is).
"""

import warnings

warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)

from .build import agvm_param_groups, build_agvm_optimizer
from .checks import check_agvm_config, validate_config
from .config import KEYS, OPTIMIZERS, add_agvm_config, add_solver_config, agvm_kwargs, agvm_start_iter
from .cli import build_evaluator, default_argument_parser, launch_cli, print_results, setup_cfg, train_or_evaluate
from .groups import DEFAULT_MODULE_ORDER, default_rules, group_parameters, module_of_parameters
from .launch import launch
from .defaults import AGVMTrainer, Trainer
from ..distributed import install_agvm_hook  # noqa: F401  (its former home)
from .train_loop import AGVMStepTrainer, split_batch
from . import catalog  # noqa: F401  (registers the agvm-pretrained:// PathManager handler)

__all__ = [
    "AGVMStepTrainer",
    "AGVMTrainer",
    "DEFAULT_MODULE_ORDER",
    "KEYS",
    "OPTIMIZERS",
    "Trainer",
    "add_agvm_config",
    "add_solver_config",
    "agvm_kwargs",
    "agvm_param_groups",
    "agvm_start_iter",
    "build_agvm_optimizer",
    "build_evaluator",
    "check_agvm_config",
    "default_argument_parser",
    "default_rules",
    "group_parameters",
    "install_agvm_hook",
    "launch",
    "launch_cli",
    "module_of_parameters",
    "print_results",
    "setup_cfg",
    "split_batch",
    "train_or_evaluate",
    "validate_config",
]
