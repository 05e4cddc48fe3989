#!/usr/bin/env python
"""The paper's effective-batch experiment at mini scale: Φ of the dense head vs the backbone, 3 seeds.

    python projects/effective_batch/run_experiment.py                 # the 4 variants × 3 seeds (2 at a time), then the report
    python projects/effective_batch/run_experiment.py --jobs 1 --seeds 0 shared masked
    python projects/effective_batch/run_experiment.py --dry-run       # print the training commands still to run
    python projects/effective_batch/run_experiment.py --report-only   # the report from the committed run records
    python projects/effective_batch/run_experiment.py --check-only    # check the runs' configs, nothing else

Variants (``projects/effective_batch/configs/<variant>.yaml``, all ``EffectiveBatchRetinaNet`` in
MEASURE_ONLY, see ``projects/effective_batch``): ``shared`` (the stock head, reference),
``unshared`` (one head per FPN level), ``no_fpn`` (ResNet only, head on res4), ``masked`` (75 %
of anchor locations' losses masked). Each runs once per seed (``--seeds``, default 0 1 2; run
``<variant>_s<seed>``, ``SEED <seed>``) in one regime for all (``effective_batch.experiment.REGIME``:
64 px images of 1,600 training images, 100 iterations at batch 16 as two micro-batches of 8, an
estimate of Φ at every iteration, from the pretrained mini backbone). The plan
(:mod:`effective_batch.experiment`) trains each with ``projects/effective_batch/train_net.py``
into ``<output-root>/<run>`` (default ``output/effective_batch``) through
``agvm.runner.execute``, and copies its small records (``config.yaml``, ``metrics.json``,
``agvm_run.json``, ``stdout_tail.log``) to ``<results>/runs/<run>`` (default
``results/effective_batch``): a run recorded there with the same config fingerprint (finished,
or diverged) is reused unless ``--rerun``, so a later call extends the grid (more seeds)
without running what is there. Then ``<results>/README.md`` and ``phi.png`` are written from
those records alone (``--report-only`` does only that; the same records give the same bytes):
per variant the mean Φ_head/Φ_backbone over seeds ± s.e. and pooled over all estimates ± s.e.,
each variant's difference from ``shared`` (paired by seed, and pooled) with its s.e., and a row
per run. ``--max-iter N`` and ``-- KEY VALUE ...`` change every run (their own fingerprint);
point ``--results`` elsewhere for such trials, as their records replace those in ``<results>/runs``.
Relative paths are taken from the repository root. Every run's config is built and checked
before anything runs. ``scripts/reproduce_mini.py`` runs this script as its experiment 3.

Run as a script, this folder is on ``sys.path``: the project's package ``effective_batch`` imports
from here.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List

from agvm.runner import REPO_ROOT as ROOT
from agvm.runner import Result, execute, parse_with_overrides
from effective_batch.experiment import SEEDS, VARIANTS, check_runs, plan, progress, write_report  # this project's package


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variants", nargs="*", metavar="VARIANT", help=f"variants to run (default all: {' '.join(VARIANTS)})")
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS),
                   help=f"seeds to run (default {' '.join(map(str, SEEDS))}); the report also covers every recorded seed")
    p.add_argument("--jobs", type=int, default=2, help="runs at once, each with its share of the CPU threads; default 2")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing, write nothing")
    p.add_argument("--report-only", action="store_true", help="run nothing; write the report from the run records in <results>/runs")
    p.add_argument("--check-only", action="store_true", help="build and check every run's config; run and write nothing")
    p.add_argument("--max-iter", type=int, default=None, help="override SOLVER.MAX_ITER (iterations) of every variant")
    p.add_argument("--rerun", action="store_true", help="run again what is already recorded")
    p.add_argument("--output-root", default="output/effective_batch", help="runs go to <root>/<run>; default output/effective_batch")
    p.add_argument("--results", default="results/effective_batch", help="folder of README.md, phi.png and the run records (runs/<run>); default results/effective_batch")
    p.add_argument("--python", default=sys.executable, help="interpreter of the training runs; default this one")
    args = parse_with_overrides(p, argv)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    args.variants = args.variants or list(VARIANTS)
    if args.jobs < 1:
        p.error(f"--jobs must be ≥ 1, got {args.jobs}")
    if len(set(args.seeds)) != len(args.seeds) or any(s < 0 for s in args.seeds):
        p.error(f"--seeds must be distinct non-negative integers, got {args.seeds}")
    if args.max_iter is not None and args.max_iter < 1:
        p.error(f"--max-iter must be ≥ 1 (iterations), got {args.max_iter}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    results = os.path.join(ROOT, args.results)
    records = os.path.join(results, "runs")
    runs = plan(args.output_root, args.python, args.max_iter, args.opts, args.variants, args.seeds, records=records)
    try:
        check_runs(runs)
    except ValueError as e:
        print(f"run_experiment.py: error: {e}", file=sys.stderr)
        return 2
    if args.check_only:
        return 0
    failed: List[str] = []
    if args.dry_run or not args.report_only:
        def prepare():
            from agvm.data.pretrained import ensure_pretrained

            ensure_pretrained()

        def describe(result: Result) -> str:
            if result.record["returncode"] != 0:
                failed.append(f"{result.run.name} (exit {result.record['returncode']}, "
                              f"see {result.run.path(result.run.out)}/stdout.log)")
            return progress(result)

        execute(runs, args.jobs, dry_run=args.dry_run, rerun=args.rerun, describe=describe, prepare=prepare)
        if args.dry_run:
            return 0
    print(f"wrote {write_report(records, results, seeds=args.seeds)}")
    if failed:
        print("FAILED runs:\n  " + "\n  ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
