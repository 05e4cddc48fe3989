#!/usr/bin/env python
"""The paper's effective-batch experiment at mini scale: Φ of the dense head vs the backbone.

    python projects/effective_batch/run_experiment.py                 # run the 4 variants (2 at a time), write the report
    python projects/effective_batch/run_experiment.py --jobs 1 shared masked
    python projects/effective_batch/run_experiment.py --dry-run       # print the training commands still to run
    python projects/effective_batch/run_experiment.py --max-iter 20   # shorter runs (own fingerprint: not reused for full ones)
    python projects/effective_batch/run_experiment.py --report-only   # report from existing runs
    python projects/effective_batch/run_experiment.py --check-only    # check the variants' configs, nothing else

Variants (``projects/effective_batch/configs/<variant>.yaml``, all ``EffectiveBatchRetinaNet`` in
MEASURE_ONLY, see ``projects/effective_batch``): ``shared`` (the stock head, reference),
``unshared`` (one head per FPN level), ``no_fpn`` (ResNet only, head on res4), ``masked`` (75 %
of anchor locations' losses masked). The plan (:mod:`effective_batch.experiment`) trains each
with ``projects/effective_batch/train_net.py`` into ``<output-root>/<variant>`` (default
``output/effective_batch``) with ``stdout.log`` and ``agvm_run.json``, through
``agvm.runner.execute``: a finished run (same config fingerprint) is reused unless ``--rerun``;
before a run starts, what an earlier one left in its folder is removed. Then
``<results>/README.md`` (default ``results/effective_batch``) gets a table per variant,
computed from each run's ``metrics.json`` only: mean Φ of backbone, neck, dense_head,
Φ_head/Φ_backbone over the run and over its last half, the per-estimate ratio (mean ± s.e.),
the number of estimates, the wall time, the command; and ``<results>/phi.png`` the curves. ``-- KEY VALUE ...`` at the end overrides
every variant's config. Relative paths are taken from the repository root. Every variant's config
is built and checked before anything runs. ``scripts/reproduce_mini.py`` runs this script as its
experiment 3.

Run as a script, this folder is on ``sys.path``: the project's package ``effective_batch`` imports
from here.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import List

from agvm.runner import REPO_ROOT as ROOT
from agvm.runner import Result, execute, parse_with_overrides
from effective_batch.experiment import VARIANTS, check_runs, plan, progress, write_report  # this project's package


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variants", nargs="*", metavar="VARIANT", help=f"variants to run (default all: {' '.join(VARIANTS)})")
    p.add_argument("--jobs", type=int, default=2, help="runs at once, each with its share of the CPU threads; default 2")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing, write nothing")
    p.add_argument("--report-only", action="store_true", help="run nothing; write the report from existing runs")
    p.add_argument("--check-only", action="store_true", help="build and check every variant's config; run and write nothing")
    p.add_argument("--max-iter", type=int, default=None, help="override SOLVER.MAX_ITER (iterations) of every variant")
    p.add_argument("--rerun", action="store_true", help="run variants that already finished again")
    p.add_argument("--output-root", default="output/effective_batch", help="runs go to <root>/<variant>; default output/effective_batch")
    p.add_argument("--results", default="results/effective_batch", help="folder of README.md and phi.png; default results/effective_batch")
    p.add_argument("--python", default=sys.executable, help="interpreter of the training runs; default this one")
    args = parse_with_overrides(p, argv)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    args.variants = args.variants or list(VARIANTS)
    if args.jobs < 1:
        p.error(f"--jobs must be ≥ 1, got {args.jobs}")
    if args.max_iter is not None and args.max_iter < 1:
        p.error(f"--max-iter must be ≥ 1 (iterations), got {args.max_iter}")
    return args


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    threads = "".join(f"{k}={os.environ[k]} " for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ)
    argv_line = threads + "python projects/effective_batch/run_experiment.py " + " ".join(shlex.quote(a) for a in argv)
    runs = plan(args.output_root, args.python, args.max_iter, args.opts, args.variants)
    try:
        check_runs(runs)
    except ValueError as e:
        print(f"run_experiment.py: error: {e}", file=sys.stderr)
        return 2
    if args.check_only:
        return 0
    failed: List[str] = []
    if args.dry_run or not args.report_only:
        def describe(result: Result) -> str:
            if result.record["returncode"] != 0:
                failed.append(f"{result.run.name} (exit {result.record['returncode']}, "
                              f"see {result.run.path(result.run.out)}/stdout.log)")
            return progress(result)

        execute(runs, args.jobs, dry_run=args.dry_run, rerun=args.rerun, describe=describe)
        if args.dry_run:
            return 0
    out_abs = os.path.join(ROOT, args.output_root)
    print(f"wrote {write_report(out_abs, os.path.join(ROOT, args.results), argv_line)}")
    if failed:
        print("FAILED runs:\n  " + "\n  ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
