"""Distributed AGVM: the DDP communication hook that supplies the two half-batch gradients."""

from .hook import AGVMHookState, agvm_comm_hook, half_sizes, install_agvm_hook

__all__ = ["AGVMHookState", "agvm_comm_hook", "half_sizes", "install_agvm_hook"]
