"""``preserved_state(model)``: run extra passes of a model without changing what it trains.

AGVM measures Φ on two half-batches. On one process those are extra forward/backward passes,
and a forward pass is not free of side effects: BatchNorm updates its running statistics and
``num_batches_tracked``, detectron2's RetinaNet/FCOS update an EMA of the positive-anchor count
(``loss_normalizer``, a Python float attribute), samplers draw from the RNG. Inside
:func:`preserved_state` all of that may happen; on exit it is put back exactly, so the plain
pass that follows is the one a run without AGVM would make.

What :func:`preserved_state` looks at: every buffer of every submodule, every entry of every
submodule's ``__dict__`` (its attributes, less ``nn.Module``'s own bookkeeping: parameters,
buffers, submodules, hooks, ``training``) and, with ``rng=True``, the global RNGs. Each
attribute value is handled by its kind:

- **buffers**: values (and the tensor itself where it was replaced) put back.
- **immutable scalars** (``int``, ``float``, ``bool``, ``complex``, ``str``, ``bytes``, None,
  numpy scalars): compared by value (NaN equal to NaN) and put back.
- **generators** (``torch.Generator``, ``numpy.random.RandomState``/``Generator``,
  ``random.Random``), as attributes or anywhere inside a container: their states are
  snapshotted and put back, so a private generator draws on after the block as if the block
  had not run. (A model attribute that holds a global generator, e.g. ``torch.default_generator``,
  is left to the ``rng`` argument.)
- **containers** (``list``, ``tuple``, ``dict``, ``set``, ``frozenset``, ``deque`` and their
  subclasses, nested to any depth): fingerprinted deeply: scalars by value, tensors by identity
  and ``_version`` (in-place change), numpy arrays by identity and value, generators and other
  objects by identity. A container changed in place (an item appended, a scalar replaced, a
  tensor inside modified in place) is reported, not restored.
- **tensors** that are not buffers: identity and ``_version``; **numpy arrays**: identity and
  value. A change in place is reported.
- **other objects**: identity only (their insides are not inspected); a replacement is
  reported.

An attribute *rebound* to another object inside the block is put back (the original object
restored on the module) when the original is verifiably unchanged: a tensor whose
``_version`` did not move, a container whose deep fingerprint is the same, an array with the
same value, a generator (its state is restored). Attributes created inside the block are
deleted. Everything else that changed (a tensor, array or container changed in place, an other
object replaced, an attribute that existed before deleted) cannot be put back generically:
:class:`UnaccountedStateError` names the module and attribute, after the restorable state has
been restored. Global RNG states restored (``rng=True``): torch (CPU and every initialised CUDA
device), numpy and ``random``. Pure torch (and numpy).
"""

from __future__ import annotations

import collections
import contextlib
import random
from typing import Dict, Iterator, List, Tuple

import numpy as np
import torch
from torch import nn

__all__ = ["UnaccountedStateError", "preserved_rng", "preserved_state"]

#: Attributes every ``nn.Module`` has for its own bookkeeping (parameters, buffers, hooks, ...).
_MODULE_INTERNALS = frozenset(vars(nn.Module()))
#: Immutable values: compared by value, restored by assignment.
_SCALARS = (bool, int, float, complex, str, bytes, type(None), np.generic)
_SEQUENCES = (list, tuple, collections.deque)
_SETS = (set, frozenset)
_CONTAINERS = (dict,) + _SEQUENCES + _SETS
_PLAIN = frozenset((bool, int, str, bytes, type(None)))  # exact types compared by value as they are
_GENERATORS = (torch.Generator, np.random.RandomState, np.random.Generator, random.Random)


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


# ------------------------------------------------------------------------------ generators
def _is_global_generator(value) -> bool:
    """The generators behind the global RNGs (``rng`` of :func:`preserved_state` governs them)."""
    if value is torch.default_generator or value is np.random.mtrand._rand or value is random._inst:
        return True
    return torch.cuda.is_available() and any(value is g for g in torch.cuda.default_generators)


def _generator_state(value):
    """The state of a generator, or None when ``value`` is not one, is a global one or cannot
    report its state (e.g. ``random.SystemRandom``)."""
    if not isinstance(value, _GENERATORS) or _is_global_generator(value):
        return None
    try:
        if isinstance(value, torch.Generator):
            return value.get_state()
        if isinstance(value, np.random.RandomState):
            return value.get_state()
        if isinstance(value, np.random.Generator):
            return value.bit_generator.state
        return value.getstate()  # random.Random
    except NotImplementedError:  # random.SystemRandom keeps no state
        return None


def _set_generator_state(value, state) -> None:
    if isinstance(value, (torch.Generator, np.random.RandomState)):
        value.set_state(state)
    elif isinstance(value, np.random.Generator):
        value.bit_generator.state = state
    else:
        value.setstate(state)


# ------------------------------------------------------------------------------ fingerprints
class _Same:
    """Compares equal to another ``_Same`` of the very same object (and, for a tensor, the same
    ``_version``). Holds a reference, so the identity cannot be recycled while compared."""

    __slots__ = ("obj", "version")

    def __init__(self, obj):
        self.obj = obj
        self.version = obj._version if isinstance(obj, torch.Tensor) else None

    def __eq__(self, other):
        return isinstance(other, _Same) and self.obj is other.obj and self.version == other.version

    def __hash__(self):
        return id(self.obj)


class _Array:
    """A numpy array's identity and a copy of its value."""

    __slots__ = ("obj", "copy")

    def __init__(self, obj: np.ndarray):
        self.obj = obj
        self.copy = np.array(obj, copy=True)

    def __eq__(self, other):
        if not (isinstance(other, _Array) and self.obj is other.obj):
            return False
        a, b = self.copy, other.copy
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        try:
            return bool(np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))
        except TypeError:  # object arrays
            return bool(np.array_equal(a, b))

    def __hash__(self):
        return id(self.obj)


def _fingerprint(value, generators: dict, path: frozenset = frozenset()):
    """A comparable (and hashable) fingerprint of ``value``; records every generator met in
    ``generators`` (``{id: (generator, state)}``)."""
    kind = type(value)
    if kind in _PLAIN:  # the common case first
        return (kind, value)
    if isinstance(value, _SCALARS):
        if isinstance(value, (float, complex, np.inexact)) and value != value:  # NaN != NaN: NaNs compare equal
            return (kind, "nan")
        return (type(value), value)
    if isinstance(value, torch.Tensor):
        return _Same(value)
    if isinstance(value, np.ndarray):
        return _Array(value)
    state = _generator_state(value)
    if state is not None:
        generators.setdefault(id(value), (value, state))
        return _Same(value)
    if isinstance(value, _CONTAINERS):
        if id(value) in path:  # a container that holds itself
            return ("cycle", _Same(value))
        inner = path | {id(value)}
        if isinstance(value, dict):
            items = tuple((_fingerprint(k, generators, inner), _fingerprint(v, generators, inner)) for k, v in value.items())
        elif isinstance(value, _SETS):
            items = frozenset(_fingerprint(v, generators, inner) for v in value)
        else:
            items = tuple(_fingerprint(v, generators, inner) for v in value)
        extra = value.maxlen if isinstance(value, collections.deque) else None
        return (type(value), extra, items)
    return _Same(value)


def _opaque(value) -> bool:
    """Whether ``value`` is compared by identity alone (its insides are not inspected)."""
    return not isinstance(value, (torch.Tensor, np.ndarray, dict) + _SCALARS + _SEQUENCES + _SETS)


def _attributes(model: nn.Module, generators: dict) -> Dict[Tuple[str, str], tuple]:
    """``{(module path, attribute): (object, fingerprint)}`` for every non-internal attribute of
    every submodule; generators met on the way are recorded in ``generators``."""
    out = {}
    for path, module in model.named_modules():
        for name, value in vars(module).items():
            if name in _MODULE_INTERNALS:
                continue
            out[(path, name)] = (value, _fingerprint(value, generators))
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
    True): restore the global RNG states too; False leaves them where the block left them
    (generators held by the model are restored either way). Raises
    :class:`UnaccountedStateError` on exit when state that cannot be restored generically
    changed (see the module docstring for what is restored and what is reported); the
    restorable state is restored first.
    """
    buffers = _buffers(model)
    generators: dict = {}
    before = _attributes(model, generators)
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
        for generator, state in generators.values():
            _set_generator_state(generator, state)
        bad = []
        for key, (obj, old) in before.items():
            path, name = key
            module = modules[path]
            label = f"{path or type(model).__name__}.{name}"
            if name not in vars(module):
                if isinstance(obj, _SCALARS):
                    setattr(module, name, obj)
                else:
                    bad.append(f"{label} (deleted)")
                continue
            now = vars(module)[name]
            if now is obj:
                if not isinstance(obj, _SCALARS) and _fingerprint(now, {}) != old:
                    bad.append(label)  # changed in place
            elif isinstance(obj, _SCALARS) or id(obj) in generators or (
                not _opaque(obj) and _fingerprint(obj, {}) == old
            ):
                setattr(module, name, obj)  # rebound, and the original is intact: put it back
            else:
                bad.append(label)
        for path, module in modules.items():
            for name in [n for n in vars(module) if n not in _MODULE_INTERNALS and (path, n) not in before]:
                # created inside the block (a lazy cache, a first EMA value): remove it
                delattr(module, name)
        if bad:
            raise UnaccountedStateError(
                "a measurement pass changed model state that cannot be restored generically: "
                f"{', '.join(sorted(set(bad)))}. AGVM's half-batch passes on one process must leave "
                "the model as they found it; make that state a buffer, a Python number attribute or "
                "a generator, or train with several processes (the halves are then ranks and no "
                "extra pass runs)"
            )
