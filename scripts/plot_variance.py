#!/usr/bin/env python
"""Figure-1 style plots of Φ per module against iterations (and μ, and the per-module lr).

    python scripts/plot_variance.py output/faster_rcnn/mini/b8_megdet output/faster_rcnn/mini/b32_agvm \\
        --labels "batch 8 (Φ measured)" "batch 32, AGVM" --out results/mini/phi

Reads each run's metrics.json (a run folder or the file itself): the ``agvm/phi/<module>``,
``agvm/mu/<module>`` and ``agvm/lr/<module>`` values agvm logs at every estimate (baseline runs
log Φ with ``SOLVER.AGVM.MEASURE_ONLY``). One panel per run, one line per module; writes
``<out>_<kind>.png`` and ``<out>_<kind>.pdf`` for each ``--kinds`` (default phi mu). The plotted Φ
is 1 − cos of the two half-batch gradients, as in the paper's Figure 1. A folder without a
metrics.json of its own (a sweep's ``--output-root``) stands for every run below it; all panels
of a figure share their y-axis.
"""

from __future__ import annotations

import argparse
import os
import sys

from agvm.plots import KIND_LABELS, plot_runs
from agvm.results import curves, read_metrics


def expand_runs(paths):
    """Each argument as it is when it holds a metrics.json (or is one); otherwise, e.g. a sweep's
    output root, every folder below it that holds one, in name order."""
    out = []
    for path in paths:
        if os.path.isfile(path) or os.path.exists(os.path.join(path, "metrics.json")) or not os.path.isdir(path):
            out.append(path)
            continue
        found = sorted(os.path.dirname(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files if f == "metrics.json")
        out += found or [path]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders, metrics.json files, or folders of runs (a sweep's output root)")
    p.add_argument("--labels", nargs="+", default=None, help="one label per run (default: the folder names)")
    p.add_argument("--out", required=True, help="output path prefix: <out>_<kind>.png / .pdf")
    p.add_argument("--kinds", nargs="+", default=["phi", "mu"], choices=sorted(KIND_LABELS), help="default: phi mu")
    p.add_argument("--title", default=None, help="figure title")
    p.add_argument("--ncols", type=int, default=2, help="panels per row (default 2)")
    args = p.parse_args(argv)
    paths = expand_runs(args.runs)
    if args.labels and len(args.labels) != len(paths):
        p.error(f"{len(args.labels)} labels for {len(paths)} runs ({', '.join(paths)})")
    labels = args.labels or [os.path.relpath(r, os.path.commonpath(paths)) if len(paths) > 1 else os.path.basename(os.path.normpath(r))
                             for r in paths]
    runs = {}
    for label, path in zip(labels, paths):
        records = read_metrics(path)
        if not records:
            p.error(f"no metrics.json records in {path}")
        runs[label] = records
    if not any(curves(r, "phi") for r in runs.values()):
        p.error("none of the runs logged agvm/phi/* (enable SOLVER.AGVM, or MEASURE_ONLY for a baseline)")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    for kind in args.kinds:
        fig = plot_runs(runs, kind, ncols=args.ncols, title=args.title)
        for ext in ("png", "pdf"):
            path = f"{args.out}_{kind}.{ext}"
            fig.savefig(path, dpi=120)
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
