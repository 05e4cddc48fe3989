"""Datasets for agvm: the embedded synthetic "shapes" dataset.

:mod:`agvm.data.shapes` (generation and cache; numpy/Pillow/pycocotools only) is imported
eagerly. :mod:`agvm.data.register` (detectron2 registration) is imported only when
``register_shapes`` or ``prepare_datasets`` is first accessed here, or when imported directly.
"""

from .shapes import (
    STUFF_CLASSES,
    SHAPES_VERSION,
    THING_CLASSES,
    ensure_shapes,
    generate_shapes,
    shapes_dir,
)

__all__ = [
    "SHAPES_VERSION",
    "THING_CLASSES",
    "STUFF_CLASSES",
    "ensure_shapes",
    "generate_shapes",
    "shapes_dir",
    "register_shapes",
    "prepare_datasets",
]

_LAZY = {"register_shapes", "prepare_datasets"}


def __getattr__(name):
    if name in _LAZY:
        from . import register

        return getattr(register, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
