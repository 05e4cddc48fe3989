"""Figure-1 style plots: Φ (or μ, or the per-module lr) against iterations, one line per module.

Used by the projects' ``check_results.ipynb`` and ``scripts/plot_variance.py``. Needs matplotlib
(imported when called); no torch or detectron2.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

from .results import curves

__all__ = ["plot_runs", "KIND_LABELS"]

#: y-axis label per kind of curve.
KIND_LABELS = {
    "phi": "Φ = 1 − cos(G₁, G₂)",
    "mu": "μ (lr multiplier)",
    "lr": "learning rate",
}


def plot_runs(runs: Mapping[str, Sequence[Mapping]], kind: str = "phi", ncols: int = 2, title: Optional[str] = None):
    """One panel per run (``{label: metrics.json records}``), one line per module of the
    ``agvm/<kind>/<module>`` curves, every panel on the same y-axis (runs compare at a glance,
    e.g. μ for several α). Runs without such curves get an empty panel saying so.
    Returns the matplotlib figure."""
    import matplotlib.pyplot as plt

    if kind not in KIND_LABELS:
        raise ValueError(f"kind must be one of {', '.join(KIND_LABELS)}, got {kind!r}")
    labels = list(runs)
    if not labels:
        raise ValueError("plot_runs needs at least one run")
    ncols = max(1, min(ncols, len(labels)))
    nrows = (len(labels) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.5 * ncols, 3.6 * nrows), squeeze=False, sharey=True)
    for ax in axes.flat[len(labels):]:
        ax.set_visible(False)
    for ax, label in zip(axes.flat, labels):
        data = curves(runs[label], kind)
        for module, (its, vals) in data.items():
            ax.plot(its, vals, marker="." if len(its) < 30 else None, label=module)
        if not data:
            ax.text(0.5, 0.5, f"no agvm/{kind}/* logged", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("iteration")
        ax.set_ylabel(KIND_LABELS[kind])
        ax.grid(alpha=0.3)
        if data:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
