"""The gradient-variance proxy of AGVM: Φ = 1 − cos(G1, G2) per module.

Xue et al., "Large-batch Optimization for Dense Visual Predictions", NeurIPS 2022, Sec. 3:
with G1 and G2 the mean gradients of one module over two disjoint halves of the mini-batch,
Φ = η² · (1 − cos(G1, G2)). The η² factor cancels in the ratio Φ_anchor / Φ_module when every
module shares the global learning rate, so this module computes (and agvm logs) 1 − cos, the
quantity plotted in the paper's Figure 1.

Everything here streams over the parameters of a module: per tensor one dot product and two
squared norms, never a concatenated copy. The products are taken in float64 (a float32 dot over
millions of elements is off by ~1e-6 relative, which 1 − cos turns into ~1e-4 relative error
at Φ ≈ 1e-3, the head's regime at large batch); the cost is one float64 temporary of the
largest tensor. Pure torch.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Optional, Sequence, Tuple

import torch

__all__ = ["GradientStats", "gradient_stats", "gradient_variance", "variance_from_stats"]

#: ``(dot, squared norm of G1, squared norm of G2)`` of one module, float64 tensors (0-dim).
GradientStats = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]

#: Optional per-tensor transform applied to each half-gradient before the cosine, given
#: ``(index of the tensor, half-gradient in float64)``; used for Adam preconditioning.
Transform = Callable[[int, torch.Tensor], torch.Tensor]


def gradient_stats(
    g1: Iterable[Optional[torch.Tensor]],
    g2: Iterable[Optional[torch.Tensor]],
    transform: Optional[Transform] = None,
) -> GradientStats:
    """Stream ``(⟨G1, G2⟩, ‖G1‖², ‖G2‖²)`` over two equally long sequences of tensors.

    Args:
        g1, g2: the two half-batch gradients of one module, tensor by tensor (same shapes).
            A ``None`` entry is a zero gradient (a parameter that one half did not reach,
            e.g. a mask head without positive RoIs): it adds to the other side's norm only.
        transform: optional ``f(i, g) -> g'`` applied to both halves of tensor ``i`` (in
            float64) before the products, e.g. Adam preconditioning. Default: identity.

    Returns:
        Three float64 0-dim tensors on the gradients' device (zeros for an empty module).

    Raises:
        ValueError: when the sequences differ in length or a pair differs in shape.
    """
    acc = None  # float64 [dot, ‖G1‖², ‖G2‖²]
    for i, (a, b) in enumerate(zip_strict(g1, g2)):
        if a is None and b is None:
            continue
        if a is not None and b is not None and a.shape != b.shape:
            raise ValueError(f"tensor {i}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
        a = None if a is None else _flat64(i, a, transform)
        b = None if b is None else _flat64(i, b, transform)
        ref = a if a is not None else b
        zero = ref.new_zeros(())
        terms = torch.stack(
            [
                torch.dot(a, b) if a is not None and b is not None else zero,
                torch.dot(a, a) if a is not None else zero,
                torch.dot(b, b) if b is not None else zero,
            ]
        )
        acc = terms if acc is None else acc + terms
    if acc is None:
        acc = torch.zeros(3, dtype=torch.float64)
    return acc[0], acc[1], acc[2]


def _flat64(i: int, g: torch.Tensor, transform: Optional[Transform]) -> torch.Tensor:
    g = g.detach().reshape(-1).double()
    return g if transform is None else transform(i, g)


def zip_strict(a: Iterable, b: Iterable):
    """``zip`` that raises ``ValueError`` when the two iterables differ in length."""
    sentinel = object()
    ia, ib = iter(a), iter(b)
    while True:
        x, y = next(ia, sentinel), next(ib, sentinel)
        if x is sentinel and y is sentinel:
            return
        if x is sentinel or y is sentinel:
            raise ValueError("the two gradient lists differ in length")
        yield x, y


def variance_from_stats(dot, sq_norm1, sq_norm2) -> float:
    """Φ = 1 − ⟨G1, G2⟩ / (‖G1‖ ‖G2‖), clamped to [0, 2]; NaN when it is undefined.

    Undefined means a zero or non-finite norm (e.g. a mask head that saw no positive RoI in
    one half, or an overflowed fp16 gradient). Callers treat NaN as "skip this module".
    Accepts Python floats or 0-dim tensors; returns a Python float.
    """
    dot, sq_norm1, sq_norm2 = (float(x) for x in (dot, sq_norm1, sq_norm2))
    if not (math.isfinite(dot) and math.isfinite(sq_norm1) and math.isfinite(sq_norm2)):
        return float("nan")
    if sq_norm1 <= 0.0 or sq_norm2 <= 0.0:
        return float("nan")
    cos = dot / math.sqrt(sq_norm1 * sq_norm2)
    return min(2.0, max(0.0, 1.0 - cos))


def gradient_variance(
    g1: Sequence[Optional[torch.Tensor]],
    g2: Sequence[Optional[torch.Tensor]],
    transform: Optional[Transform] = None,
) -> float:
    """1 − cos(G1, G2) over the concatenation of two lists of tensors (AGVM's Φ without η²).

    Computed tensor by tensor (float64 products and accumulation), without building the
    concatenated vectors. Returns a float in [0, 2], or NaN when a half is all zeros or
    non-finite. See :func:`gradient_stats` for ``transform``.

    Example::

        >>> g = [torch.ones(3), torch.ones(2, 2)]
        >>> gradient_variance(g, [2 * t for t in g])
        0.0
    """
    return variance_from_stats(*gradient_stats(g1, g2, transform))
