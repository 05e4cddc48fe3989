"""The micro-batches and halves of one iteration, and the log line of an estimate (pure Python).

Used by :class:`agvm.detectron2.AGVMStepTrainer`, and by any training loop that measures AGVM's
Φ on two halves of its batch.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

__all__ = ["estimate_line", "split_batch"]


def split_batch(data: Sequence, accum_steps: int, halves: bool) -> List[Tuple[int, list]]:
    """The micro-batches of one iteration as ``(half, items)`` pairs.

    Without ``halves``: ``accum_steps`` equal chunks, all in half 0. With ``halves``: an even
    ``accum_steps`` alternates its chunks between half 0 and half 1; an odd one (1 included)
    cuts every chunk into two, the first part to half 0 and the second to half 1. All half-0
    pairs come first.

    Raises ValueError when ``len(data)`` is not divisible by ``accum_steps`` (and, with
    halves, by ``2 * accum_steps`` for odd ``accum_steps``).
    """
    n = len(data)
    if n % accum_steps:
        raise ValueError(
            f"the per-process batch ({n} images) is not divisible by SOLVER.GRAD_ACCUM_STEPS={accum_steps}"
        )
    size = n // accum_steps
    chunks = [list(data[i * size:(i + 1) * size]) for i in range(accum_steps)]
    if not halves:
        return [(0, c) for c in chunks]
    if accum_steps % 2 == 0:
        pairs = [(i % 2, c) for i, c in enumerate(chunks)]
    else:
        if size < 2 or size % 2:
            raise ValueError(
                f"AGVM splits each micro-batch of {size} images into two halves: the per-process batch "
                f"({n} images) / SOLVER.GRAD_ACCUM_STEPS ({accum_steps}) must be even and ≥ 2"
            )
        half = size // 2
        pairs = [(0, c[:half]) for c in chunks] + [(1, c[half:]) for c in chunks]
    return sorted(pairs, key=lambda hc: hc[0])


def estimate_line(iteration: int, phi: Dict[str, float], mu: Dict[str, float], anchor: str,
                  measure_only: bool = False) -> str:
    """One compact console/log.txt line per AGVM estimate: Φ of every module (``nan`` where a
    half had no finite gradient) and μ of every module but the anchor (always 1), e.g.
    ``AGVM iter 40: Φ backbone 0.412 neck 0.233 | μ neck 1.021``."""
    phis = " ".join(f"{m} {phi.get(m, float('nan')):.4g}" for m in mu)
    mus = "μ = 1 (MEASURE_ONLY)" if measure_only else "μ " + " ".join(f"{m} {v:.4f}" for m, v in mu.items() if m != anchor)
    return f"AGVM iter {iteration}: Φ {phis} | {mus}"
