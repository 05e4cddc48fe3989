#!/usr/bin/env python
"""`make demo`: the mini Faster R-CNN on the embedded shapes dataset (CPU), baseline and AGVM.

Two runs of ``projects/faster_rcnn/train_net.py``: the plain SGD baseline and the same config
with AGVM. They run side by side, each in a subprocess with ``cpu_count // runs`` threads (on
2 cores two 1-thread runs finish in about 2/3 of the time of two 2-thread runs in a row);
their progress lines (detectron2's ETA) stream through with a ``[run]`` prefix and each full
console log goes to ``output/demo/<run>/console.log``. The summary at the end reads each run's
``metrics.json``: box AP, AP50, wall time, and the final μ per module of the AGVM run. Outputs
(metrics.json, tensorboard events, model_final.pth, evaluation files) stay under
``output/demo/<run>/``.

    python scripts/demo.py [--output output/demo] [--max-iter N] [--runs baseline,agvm] [--sequential] [KEY VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_NET = os.path.join(ROOT, "projects", "faster_rcnn", "train_net.py")
CONFIGS = os.path.join(ROOT, "projects", "faster_rcnn", "configs", "mini")

# run name -> config file
RUNS = {
    "baseline": os.path.join(CONFIGS, "faster_rcnn_R18_FPN_shapes.yaml"),
    "agvm": os.path.join(CONFIGS, "faster_rcnn_R18_FPN_shapes_agvm.yaml"),
}


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


PROGRESS_MARKERS = ("d2.utils.events", "copypaste", "bbox AP", "Error", "Traceback", "AGVM modules")


def _stream(name: str, proc: subprocess.Popen, log_path: str, ended: dict) -> None:
    """Copy ``proc``'s output into ``log_path``, echo its progress lines with a prefix, and
    record in ``ended[name]`` when the output closed (the run ended)."""
    with open(log_path, "w") as log:
        for line in proc.stdout:
            log.write(line)
            if any(marker in line for marker in PROGRESS_MARKERS):
                print(f"[{name}] {line.rstrip()}", flush=True)
    ended[name] = time.time()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=os.path.join(ROOT, "output", "demo"), help="output root (default output/demo)")
    parser.add_argument("--max-iter", type=int, default=None, help="override SOLVER.MAX_ITER (default: the config's)")
    parser.add_argument("--runs", default="baseline,agvm", help="comma-separated runs out of: " + ", ".join(RUNS))
    parser.add_argument("--sequential", action="store_true", help="one run after the other, all threads each")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="extra KEY VALUE config overrides for every run")
    args = parser.parse_args(argv)
    names = [n for n in args.runs.split(",") if n]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        parser.error(f"unknown runs {unknown}; choose from {list(RUNS)}")

    groups = [[n] for n in names] if args.sequential else [names]
    summary = []
    for group in groups:
        threads = max(1, (os.cpu_count() or 1) // len(group))
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        procs, ended = {}, {}
        for name in group:
            out = os.path.join(args.output, name)
            shutil.rmtree(out, ignore_errors=True)  # metrics.json appends: start each demo afresh
            os.makedirs(out)
            cmd = [sys.executable, TRAIN_NET, "--config-file", RUNS[name], "OUTPUT_DIR", out]
            if args.max_iter is not None:
                cmd += ["SOLVER.MAX_ITER", str(args.max_iter)]
            cmd += args.opts
            print(f"=== demo run '{name}' ({threads} thread(s)): {' '.join(cmd)}", flush=True)
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            log = os.path.join(out, "console.log")
            reader = threading.Thread(target=_stream, args=(name, proc, log, ended), daemon=True)
            reader.start()
            procs[name] = (proc, reader, out, log, time.time())
        for name, (proc, reader, out, log, start) in procs.items():
            rc = proc.wait()
            reader.join()
            elapsed = ended[name] - start
            if rc != 0:
                with open(log) as f:
                    tail = f.readlines()[-30:]
                print("".join(tail), file=sys.stderr)
                print(f"demo run '{name}' failed with exit code {rc}; full log: {log}", file=sys.stderr)
                return rc
            summary.append((name, last_metrics(out), elapsed, out))

    print("\n=== demo summary (mini Faster R-CNN R-18-FPN, shapes_val)")
    print(f"{'run':<10} {'box AP':>7} {'AP50':>7} {'time':>8}  output")
    for name, metrics, elapsed, out in summary:
        ap, ap50 = metrics.get("bbox/AP", float("nan")), metrics.get("bbox/AP50", float("nan"))
        print(f"{name:<10} {ap:7.2f} {ap50:7.2f} {elapsed:7.0f}s  {os.path.relpath(out, ROOT)}")
    for name, metrics, _, _ in summary:
        mu = {k[len("agvm/mu/"):]: v for k, v in metrics.items() if k.startswith("agvm/mu/")}
        if mu:
            print(f"final μ of '{name}': " + ", ".join(f"{m} {v:.3f}" for m, v in mu.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
