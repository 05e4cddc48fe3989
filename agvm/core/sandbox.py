"""``preserved_state(model)``: run extra passes of a model without changing what it trains.

AGVM measures Φ on two half-batches. On one process those are extra forward/backward passes,
and a forward pass is not free of side effects: BatchNorm updates its running statistics and
``num_batches_tracked``, detectron2's RetinaNet/FCOS update an EMA of the positive-anchor count
(``loss_normalizer``, a Python float attribute), samplers draw from the RNG. Inside
:func:`preserved_state` all of that may happen; on exit it is put back exactly, so the plain
pass that follows is the one a run without AGVM would make.

Restored on exit: every buffer of every submodule (values, and the tensor itself where it was
replaced), every Python ``int``/``float``/``bool``/``None`` attribute of every submodule
(attributes created inside the block are deleted), and the RNG states of torch (CPU and every
initialised CUDA device), numpy and ``random``. Any other state that changed inside the block
(a tensor attribute modified in place, an object attribute replaced) cannot be put back
generically: :class:`UnaccountedStateError` names the module and attribute. Pure torch.
"""

from __future__ import annotations

import contextlib
import random
from typing import Dict, Iterator, List, Tuple

import numpy as np
import torch
from torch import nn

__all__ = ["UnaccountedStateError", "preserved_rng", "preserved_state"]

#: Attributes every ``nn.Module`` has for its own bookkeeping (parameters, buffers, hooks, ...).
_MODULE_INTERNALS = frozenset(vars(nn.Module()))
_SCALARS = (bool, int, float, type(None))


class UnaccountedStateError(RuntimeError):
    """A measurement pass changed model state that :func:`preserved_state` cannot restore."""


def _rng_states() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_states(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Put the RNG states of torch (CPU and every initialised CUDA device), numpy and
    ``random`` back on exit of the block."""
    state = _rng_states()
    try:
        yield
    finally:
        _set_rng_states(state)


def _attributes(model: nn.Module) -> Dict[Tuple[str, str], tuple]:
    """``{(module path, attribute): ("scalar", value) | ("tensor", id, version) | ("object", id)}``."""
    out = {}
    for path, module in model.named_modules():
        for name, value in vars(module).items():
            if name in _MODULE_INTERNALS:
                continue
            if isinstance(value, _SCALARS):
                out[(path, name)] = ("scalar", value)
            elif isinstance(value, torch.Tensor):
                out[(path, name)] = ("tensor", id(value), value._version)
            else:
                out[(path, name)] = ("object", id(value))
    return out


def _buffers(model: nn.Module) -> List[Tuple[nn.Module, str, torch.Tensor]]:
    return [
        (module, name, buf.detach().clone())
        for module in model.modules()
        for name, buf in module._buffers.items()
        if buf is not None
    ]


@contextlib.contextmanager
def preserved_state(model: nn.Module, rng: bool = True) -> Iterator[None]:
    """Undo, on exit, every side effect of the block on ``model``'s state and on the RNGs.

    Parameters and their gradients are not touched (the caller owns those). ``rng`` (default
    True): restore the RNG states too; False leaves them where the block left them. Raises
    :class:`UnaccountedStateError` on exit when state that cannot be restored generically
    changed (see the module docstring); the restorable state is restored first.
    """
    buffers = _buffers(model)
    before = _attributes(model)
    modules = dict(model.named_modules())
    try:
        with preserved_rng() if rng else contextlib.nullcontext():
            yield
    finally:
        with torch.no_grad():
            for module, name, saved in buffers:
                current = module._buffers.get(name)
                if current is not None and current.shape == saved.shape and current.dtype == saved.dtype:
                    current.copy_(saved)
                else:
                    module._buffers[name] = saved
        after = _attributes(model)
        bad = []
        for key, now in after.items():
            path, name = key
            old = before.get(key)
            if old is None:  # created inside the block (a lazy cache, a first EMA value): remove it
                delattr(modules[path], name)
            elif old[0] == "scalar":
                if now != old:
                    setattr(modules[path], name, old[1])
            elif now != old:
                bad.append(f"{path or type(model).__name__}.{name}")
        for key, old in before.items():
            if key not in after:
                if old[0] == "scalar":
                    setattr(modules[key[0]], key[1], old[1])
                else:
                    bad.append(f"{key[0] or type(model).__name__}.{key[1]} (deleted)")
        if bad:
            raise UnaccountedStateError(
                "a measurement pass changed model state that cannot be restored generically: "
                f"{', '.join(sorted(set(bad)))}. AGVM's half-batch passes on one process must leave "
                "the model as they found it; make that state a buffer or a Python number attribute, "
                "or train with several processes (the halves are then ranks and no extra pass runs)"
            )
