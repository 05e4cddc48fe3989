"""The evidence protocol's checks, as small pure functions (no torch, no detectron2).

The protocol (``results/evidence/protocol.md``) accepts a training regime only when the
small-batch baseline has converged, the large-batch baselines lose AP clearly, and the largest
batch still gets enough iterations; it then compares AGVM with its μ = 1 twin on paired seeds.
Everything here takes plain numbers (AP in COCO points, 0–100) so that it can be tested on
made-up runs and re-applied to the committed run records.
"""

from __future__ import annotations

import math
import statistics
from typing import Dict, Mapping, Optional, Sequence

__all__ = ["converged", "degraded", "paired_difference", "mean_std", "reading"]


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def mean_std(values: Sequence[float]) -> tuple:
    """``(mean, sample std)`` of the finite values (std 0.0 for one value; ``(nan, nan)`` for none)."""
    vals = [float(v) for v in values if _finite(v)]
    if not vals:
        return float("nan"), float("nan")
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def converged(ap_at_75: Optional[float], ap_end: Optional[float], tolerance: float = 0.05) -> bool:
    """Criterion (a): the run's AP at the end is within ``tolerance`` (relative, default 0.05 =
    5 %) of its AP at 75 % of training. False when either AP is missing, non-finite or ≤ 0
    (a run that learned nothing has not converged to anything worth comparing)."""
    if not (_finite(ap_at_75) and _finite(ap_end)) or ap_at_75 <= 0 or ap_end <= 0:
        return False
    return abs(ap_end - ap_at_75) <= tolerance * ap_at_75


def degraded(small: Mapping[int, float], large: Mapping[str, Mapping[int, float]],
             min_relative: float = 0.05, min_stds: float = 3.0) -> Dict[str, object]:
    """Criterion (b): per seed, the better large-batch baseline (the max over the rules in
    ``large``, e.g. ``{"linear": {seed: AP}, "sqrt": {seed: AP}}``; a diverged run counts as
    AP 0) loses against the small-batch baseline's AP of the same seed by at least
    ``min_relative`` (default 5 %, relative) and by at least ``min_stds`` (default 3) times the
    small-batch AP's sample standard deviation over seeds.

    Returns ``{"ok": bool, "per_seed": {seed: {"small", "best_large", "loss", "relative",
    "passes"}}, "small_std", "threshold"}``; ok is False when any seed fails or is missing, and
    when fewer than two small-batch seeds give no standard deviation.
    """
    seeds = sorted(small)
    _, std = mean_std([small[s] for s in seeds])
    per_seed: Dict[int, Dict[str, object]] = {}
    ok = len(seeds) >= 2 and _finite(std)
    for s in seeds:
        candidates = [runs.get(s) for runs in large.values()]
        if any(c is None for c in candidates) or not _finite(small[s]):
            per_seed[s] = {"small": small[s], "best_large": None, "loss": None, "relative": None, "passes": False}
            ok = False
            continue
        best = max(float(c) if _finite(c) else 0.0 for c in candidates)
        loss = float(small[s]) - best
        relative = loss / float(small[s]) if small[s] > 0 else float("nan")
        passes = _finite(relative) and relative >= min_relative and _finite(std) and loss >= min_stds * std
        per_seed[s] = {"small": small[s], "best_large": best, "loss": loss, "relative": relative, "passes": passes}
        ok = ok and passes
    threshold = min_stds * std if _finite(std) else float("nan")
    return {"ok": ok, "per_seed": per_seed, "small_std": std, "threshold": threshold}


def paired_difference(a: Mapping[int, float], b: Mapping[int, float]) -> Dict[str, object]:
    """AGVM − twin per seed (``a`` minus ``b`` on the seeds both have; a diverged run counts as
    AP 0): ``{"per_seed": {seed: diff}, "mean", "std", "ahead": seeds where a > b, "seeds": n}``."""
    seeds = sorted(set(a) & set(b))
    diffs = {s: (float(a[s]) if _finite(a[s]) else 0.0) - (float(b[s]) if _finite(b[s]) else 0.0) for s in seeds}
    mean, std = mean_std(list(diffs.values()))
    return {"per_seed": diffs, "mean": mean, "std": std, "ahead": sum(d > 0 for d in diffs.values()), "seeds": len(seeds)}


#: Two-sided 95 % quantiles of Student's t by degrees of freedom (1–10); 1.96 beyond.
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def reading(d: Mapping[str, object]) -> str:
    """One sentence on a :func:`paired_difference` result: the mean with its standard error
    (std / sqrt(n)), the 95 % t-interval (n − 1 degrees of freedom, :data:`T95`), on how many
    seeds AGVM is ahead, and whether the interval excludes 0 ("clear") or not ("within noise");
    one seed: "no error estimate"."""
    n = int(d["seeds"])
    if n == 0:
        return "no seed with both runs"
    mean = float(d["mean"])
    if n == 1:
        return f"{mean:+.2f} AP on one seed (no error estimate): no conclusion"
    se = float(d["std"]) / math.sqrt(n)
    half = T95.get(n - 1, 1.96) * se
    clear = abs(mean) > half
    side = "AGVM ahead" if mean > 0 else "AGVM behind"
    return (f"{mean:+.2f} ± {se:.2f} AP (mean ± s.e., {n} seeds; 95 % interval [{mean - half:+.2f}, {mean + half:+.2f}]), "
            f"AGVM ahead on {d['ahead']} of {n}: " + (f"{side}, clear" if clear else "within noise at 95 %"))
