#!/usr/bin/env python
"""`make demo`: train and evaluate the mini Faster R-CNN on the embedded shapes dataset (CPU).

Each run is ``projects/faster_rcnn/train_net.py`` in a subprocess (its log streams through,
with detectron2's ETA); the summary at the end reads each run's ``metrics.json``. Outputs
(metrics.json, tensorboard events, model_final.pth, evaluation files) stay under
``output/demo/<run>/``.

    python scripts/demo.py [--output output/demo] [--max-iter N] [KEY VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_NET = os.path.join(ROOT, "projects", "faster_rcnn", "train_net.py")
CONFIG = os.path.join(ROOT, "projects", "faster_rcnn", "configs", "mini", "faster_rcnn_R18_FPN_shapes.yaml")

# (run name, extra config overrides)
RUNS = [("baseline", [])]


def last_metrics(output_dir: str) -> dict:
    """The union of the records of ``output_dir/metrics.json``, later records winning."""
    merged = {}
    path = os.path.join(output_dir, "metrics.json")
    if not os.path.exists(path):
        return merged
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                merged.update(json.loads(line))
    return merged


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=os.path.join(ROOT, "output", "demo"), help="output root (default output/demo)")
    parser.add_argument("--max-iter", type=int, default=None, help="override SOLVER.MAX_ITER (default: the config's)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="extra KEY VALUE config overrides for every run")
    args = parser.parse_args(argv)

    summary = []
    for name, overrides in RUNS:
        out = os.path.join(args.output, name)
        cmd = [sys.executable, TRAIN_NET, "--config-file", CONFIG, "OUTPUT_DIR", out, *overrides]
        if args.max_iter is not None:
            cmd += ["SOLVER.MAX_ITER", str(args.max_iter)]
        cmd += args.opts
        print(f"\n=== demo run '{name}': {' '.join(cmd)}\n", flush=True)
        start = time.time()
        rc = subprocess.call(cmd, cwd=ROOT)
        elapsed = time.time() - start
        if rc != 0:
            print(f"demo run '{name}' failed with exit code {rc}; its log is in {out}/log.txt", file=sys.stderr)
            return rc
        metrics = last_metrics(out)
        summary.append((name, metrics.get("bbox/AP", float("nan")), metrics.get("bbox/AP50", float("nan")), elapsed, out))

    print("\n=== demo summary (mini Faster R-CNN R-18-FPN, shapes_val)")
    print(f"{'run':<10} {'box AP':>7} {'AP50':>7} {'time':>8}  output")
    for name, ap, ap50, elapsed, out in summary:
        print(f"{name:<10} {ap:7.2f} {ap50:7.2f} {elapsed:7.0f}s  {os.path.relpath(out, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
