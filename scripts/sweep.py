#!/usr/bin/env python
"""Grid sweeps over config keys (α, τ, batch size with an LR rule, optimizer, seed).

    python scripts/sweep.py --config-file projects/faster_rcnn/configs/mini/b32_agvm.yaml \\
        --grid SOLVER.AGVM.MOMENTUM=0.95,0.97,0.98 SOLVER.AGVM.INTERVAL=5,10,20 --seeds 0 1 \\
        --output-root output/sweeps/alpha_tau --jobs 2
    python scripts/sweep.py ... --dry-run                 # list the cells and their commands
    python scripts/sweep.py ... --slurm                   # write sweep.sbatch (a SLURM array), run nothing
    python scripts/sweep.py ... --report-only             # aggregate what exists
    python scripts/sweep.py ... -- SOLVER.IMS_PER_BATCH 16 # KEY VALUE pairs after -- go to every cell

Each cell (one point of the grid × one seed) trains ``train_net.py`` (the project's, found from
the config's ``projects/<name>/`` path, or ``--train-net``) into ``<output-root>/<cell>`` with
the grid values (and ``SEED``) as overrides: a plan of ``agvm.runner.Run`` run by
``agvm.runner.execute``, one after another (``--jobs N``: N at once). Its reuse rule resumes the
sweep: a cell whose record has the same config fingerprint and that finished (or diverged) is
skipped; failed ones run again, are listed at the end and in the table, never dropped. Afterwards ``results.csv`` (one row per cell) and ``results.md``
(mean ± std over seeds per grid point) are written to the output root.

Batch size: ``--grid SOLVER.IMS_PER_BATCH=8,32`` with ``--lr-rule linear|sqrt`` sets
SOLVER.LR_SCALING (reference: ``--ref-batch``/``--ref-lr``, default the config's batch and LR),
and with ``--same-epochs`` scales MAX_ITER, STEPS, WARMUP_ITERS, AGVM.START_ITER and the clip
window by ref-batch / batch (same images seen).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
import os
import re
import shlex
import statistics
import sys
from typing import Dict, List, Sequence, Tuple

from agvm.results import cell_result
from agvm.runner import REPO_ROOT as ROOT
from agvm.runner import Result, Run, execute, grad_accum_steps, parse_with_overrides


def parse_grid(items: Sequence[str]) -> List[Tuple[str, List[str]]]:
    """``["KEY=v1,v2", ...]`` → ``[(KEY, [v1, v2]), ...]`` (order kept; values as strings)."""
    grid = []
    for item in items:
        key, sep, values = item.partition("=")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key.strip() or not vals:
            raise ValueError(f"--grid entries look like KEY=v1,v2,...; got {item!r}")
        if key in (k for k, _ in grid):
            raise ValueError(f"--grid names {key!r} twice")
        grid.append((key.strip(), vals))
    return grid


def _slug(key: str, value: str) -> str:
    short = key.split(".")[-1].lower()
    return re.sub(r"[^A-Za-z0-9.\-]+", "", f"{short}-{value}")


def expand(grid: Sequence[Tuple[str, List[str]]], seeds: Sequence[int]) -> List[dict]:
    """Every grid point × seed: ``{"name", "point": {KEY: value}, "seed"}``; names are unique
    and stable (the sweep resumes by them)."""
    cells = []
    keys = [k for k, _ in grid]
    for values in itertools.product(*[v for _, v in grid]) if grid else [()]:
        point = dict(zip(keys, values))
        for seed in seeds:
            name = "_".join([_slug(k, v) for k, v in point.items()] + [f"seed-{seed}"])
            cells.append({"name": name, "point": point, "seed": seed})
    return cells


def cell_overrides(args, cell: dict, base) -> List[str]:
    """``KEY VALUE`` overrides of one cell: its grid values, SEED, and the batch rules."""
    opts: List[str] = []
    for k, v in cell["point"].items():
        opts += [k, v]
    opts += ["SEED", str(cell["seed"])]
    if "SOLVER.IMS_PER_BATCH" in cell["point"]:
        batch = int(cell["point"]["SOLVER.IMS_PER_BATCH"])
        ref_batch = args.ref_batch or base.SOLVER.IMS_PER_BATCH
        if args.lr_rule != "none":
            ref_lr = args.ref_lr if args.ref_lr is not None else base.SOLVER.BASE_LR
            opts += ["SOLVER.LR_SCALING.RULE", args.lr_rule, "SOLVER.LR_SCALING.REFERENCE_IMS_PER_BATCH", str(ref_batch),
                     "SOLVER.LR_SCALING.REFERENCE_LR", repr(ref_lr)]
        if args.same_epochs:
            f = ref_batch / batch
            s = base.SOLVER
            scaled = lambda x: max(1, int(round(x * f))) if x > 0 else x  # noqa: E731
            opts += ["SOLVER.MAX_ITER", str(scaled(s.MAX_ITER)),
                     "SOLVER.STEPS", str(tuple(scaled(x) for x in s.STEPS)),
                     "SOLVER.WARMUP_ITERS", str(scaled(s.WARMUP_ITERS))]
            if s.AGVM.START_ITER >= 0:
                opts += ["SOLVER.AGVM.START_ITER", str(scaled(s.AGVM.START_ITER))]
            lo, hi = s.CLIP_GRADIENTS.ITER_RANGE
            if lo >= 0:
                opts += ["SOLVER.CLIP_GRADIENTS.ITER_RANGE", str((scaled(lo), scaled(hi)))]
    return opts


def load_base(config_file: str):
    """The config the sweep starts from (detectron2 defaults + agvm keys + the file)."""
    from agvm.detectron2.config import default_config

    cfg = default_config()
    cfg.merge_from_file(config_file)
    return cfg


def find_train_net(config_file: str) -> str:
    parts = os.path.abspath(config_file).split(os.sep)
    if "projects" in parts:
        i = len(parts) - 1 - parts[::-1].index("projects")
        candidate = os.sep.join(parts[:i + 2] + ["train_net.py"])
        if os.path.exists(candidate):
            return candidate
    raise SystemExit(f"cannot tell the train_net.py of {config_file}: pass --train-net")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                usage="%(prog)s --config-file CFG --grid KEY=V1,V2 ... --output-root DIR [options] "
                                      "[-- KEY VALUE ...]",
                                epilog="Overrides: KEY VALUE pairs after `--` apply to every cell (after the config, "
                                       "before the grid values); the dry run, the checks and results.md include them.")
    p.add_argument("--config-file", required=True, help="the config every cell starts from")
    p.add_argument("--grid", nargs="+", default=[], metavar="KEY=V1,V2", help="config keys and their values")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="SEED values (default: 0)")
    p.add_argument("--output-root", required=True, help="folder of the cells' output folders and the results")
    p.add_argument("--train-net", default=None, help="train_net.py to run (default: the config's project)")
    p.add_argument("--lr-rule", choices=("none", "linear", "sqrt"), default="none",
                   help="with SOLVER.IMS_PER_BATCH in the grid: scale the LR by this rule (default none)")
    p.add_argument("--ref-batch", type=int, default=None, help="reference batch of the LR rule (default: the config's)")
    p.add_argument("--ref-lr", type=float, default=None, help="reference LR of the LR rule (default: the config's)")
    p.add_argument("--same-epochs", action="store_true", help="scale iteration counts by ref-batch / batch")
    p.add_argument("--max-iter", type=int, default=None, metavar="N",
                   help="every cell runs N iterations, its schedule rescaled (train_net.py --max-iter; default: off)")
    p.add_argument("--metric", default="bbox/AP", help="task/metric to aggregate (default bbox/AP; segm/AP, sem_seg/mIoU, panoptic_seg/PQ)")
    p.add_argument("--jobs", type=int, default=1, help="cells at once on this machine (default 1)")
    p.add_argument("--num-gpus", type=int, default=1, help="processes per cell per machine (default 1)")
    p.add_argument("--num-machines", type=int, default=1, help="machines per cell (default 1)")
    p.add_argument("--max-images-per-gpu", type=int, default=None,
                   help="images per GPU per forward; larger per-GPU batches accumulate gradients "
                        "(SOLVER.GRAD_ACCUM_STEPS) to keep the global batch (default: no limit)")
    p.add_argument("--dry-run", action="store_true", help="print the cells' commands; run and write nothing")
    p.add_argument("--slurm", action="store_true", help="write <output-root>/sweep.sbatch (an array job); run nothing")
    p.add_argument("--slurm-args", default="", help="extra #SBATCH lines' options, e.g. '--partition=gpu --time=4:00:00'")
    p.add_argument("--report-only", action="store_true", help="only aggregate existing output")
    p.add_argument("--python", default=sys.executable, help="interpreter for train_net.py (default: this one)")
    args = parse_with_overrides(p, argv)
    try:
        args.grid = parse_grid(args.grid)
    except ValueError as e:
        p.error(str(e))
    if args.jobs < 1 or args.num_gpus < 1 or args.num_machines < 1:
        p.error("--jobs, --num-gpus and --num-machines must be ≥ 1")
    if args.max_images_per_gpu is not None and args.max_images_per_gpu < 1:
        p.error(f"--max-images-per-gpu must be ≥ 1, got {args.max_images_per_gpu}")
    if "/" not in args.metric:
        p.error(f"--metric must look like task/metric (e.g. bbox/AP), got {args.metric!r}")
    if not os.path.exists(args.config_file):
        p.error(f"--config-file {args.config_file} does not exist")
    args.config_file = os.path.abspath(args.config_file)
    args.output_root = os.path.abspath(args.output_root)
    return args


def cell_split(args, cell: dict, base):
    """``(batch, (images per GPU per micro-batch, GRAD_ACCUM_STEPS))`` that ``--max-images-per-gpu``
    asks for at a grid point (the grid value, else an override after ``--``, else the config's)."""
    overrides = dict(zip(args.opts[0::2], args.opts[1::2]))
    batch = int(cell["point"].get("SOLVER.IMS_PER_BATCH", overrides.get("SOLVER.IMS_PER_BATCH", base.SOLVER.IMS_PER_BATCH)))
    return batch, grad_accum_steps(batch, args.num_gpus * args.num_machines, args.max_images_per_gpu)


def split_opts(args, cell: dict, base) -> List[str]:
    """``SOLVER.GRAD_ACCUM_STEPS`` for ``--max-images-per-gpu`` (none without it: the config's own
    accumulation stays)."""
    if args.max_images_per_gpu is None:
        return []
    _, (_, accum) = cell_split(args, cell, base)
    return ["SOLVER.GRAD_ACCUM_STEPS", str(accum)]


def cell_run(args, cell: dict, base, train_net: str, built=None) -> Run:
    """The run of one cell (``built``: its checked config, for the dry run's note)."""
    flags = ["--num-gpus", str(args.num_gpus)]
    flags += ["--num-machines", str(args.num_machines)] if args.num_machines > 1 else []
    flags += ["--max-iter", str(args.max_iter)] if args.max_iter else []
    note = None
    if built is not None:
        s = built.SOLVER
        processes = args.num_gpus * args.num_machines
        note = (f"{cell['name']}: batch {s.IMS_PER_BATCH} on {processes} GPU(s) = "
                f"{s.IMS_PER_BATCH // processes // s.GRAD_ACCUM_STEPS} images per GPU × {s.GRAD_ACCUM_STEPS} "
                f"micro-batch(es), {s.MAX_ITER} iterations, base LR {s.BASE_LR:g}")
    return Run(cell["name"], args.config_file, os.path.join(args.output_root, cell["name"]), train_net,
               opts=cell_overrides(args, cell, base) + split_opts(args, cell, base) + list(args.opts), flags=flags,
               python=args.python, info={"point": cell["point"], "seed": cell["seed"]}, note=note,
               clean=args.num_machines == 1, meta=cell)


def _num(x: float) -> str:
    """A metric with two decimals, or three significant digits below 1 (a short run's AP of
    0.0034 and 0.0012 must not both read 0.00)."""
    return f"{x:.2f}" if abs(x) >= 1 or x == 0 else f"{x:.3g}"


def aggregate(args, cells: List[dict]) -> Tuple[str, str]:
    """Write results.csv and results.md under the output root; return their paths."""
    key = tuple(args.metric.split("/", 1))
    rows = []
    for c in cells:
        r = cell_result(os.path.join(args.output_root, c["name"]), key)
        rows.append({**c["point"], "seed": c["seed"], "cell": c["name"], "status": r["status"],
                     args.metric: r["measured"], "wall_s": r["wall_s"]})
    keys = [k for k, _ in args.grid]
    os.makedirs(args.output_root, exist_ok=True)
    csv_path = os.path.join(args.output_root, "results.csv")
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys + ["seed", "cell", "status", args.metric, "wall_s"])
        w.writeheader()
        w.writerows(rows)
    groups: Dict[tuple, List[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    head = "| " + " | ".join(keys + [f"{args.metric} (mean ± std)", "seeds ok", "failed / missing"]) + " |"
    extra = " ".join(shlex.quote(x) for x in args.opts)
    lines = [f"Sweep of `{os.path.relpath(args.config_file, ROOT)}`, metric {args.metric}, seeds {args.seeds}; "
             f"overrides for every cell: {f'`{extra}`' if extra else 'none'}"
             + (f"; `--max-iter {args.max_iter}`" if args.max_iter else "")
             + (f"; LR rule {args.lr_rule}" if args.lr_rule != "none" else "")
             + ("; same epochs" if args.same_epochs else "") + ".", "", head, "|" + "---|" * (len(keys) + 3)]
    for point, rs in groups.items():
        vals = [r[args.metric] for r in rs if r["status"] == "ok"]
        if len(vals) > 1:
            stat = f"{_num(statistics.mean(vals))} ± {_num(statistics.stdev(vals))}"
        elif vals:
            stat = _num(vals[0])
        else:
            stat = "—"
        bad = [f"seed {r['seed']}: {r['status']}" for r in rs if r["status"] != "ok"]
        lines.append("| " + " | ".join(list(point) + [stat, f"{len(vals)}/{len(rs)}", ", ".join(bad) or "—"]) + " |")
    md_path = os.path.join(args.output_root, "results.md")
    with open(md_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return csv_path, md_path


def write_sbatch(args, runs: List[Run]) -> str:
    path = os.path.join(args.output_root, "sweep.sbatch")
    os.makedirs(args.output_root, exist_ok=True)
    lines = ["#!/usr/bin/env bash", f"#SBATCH --array=0-{len(runs) - 1}", f"#SBATCH --gpus-per-task={args.num_gpus}",
             f"#SBATCH --output={os.path.join(args.output_root, 'slurm-%A_%a.out')}"]
    lines += [f"#SBATCH {a}" for a in shlex.split(args.slurm_args)]
    lines += [f"cd {shlex.quote(ROOT)}", 'case "$SLURM_ARRAY_TASK_ID" in']
    for i, r in enumerate(runs):
        lines.append(f"  {i}) exec {r.display} ;;")
    lines += ["esac", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def check_cell(args, cell: dict, base) -> None:
    """Build the config one grid point would train with and run every check of a run on it
    (``agvm.detectron2.checks.check_run_config``: unknown key, bad value, a key without effect
    in that config, batch vs GPUs), so that an invalid point fails the sweep before any run
    starts. Raises ValueError naming the point, the key and the value."""
    from agvm.detectron2.checks import check_run_config

    opts = cell_overrides(args, cell, base) + split_opts(args, cell, base) + list(args.opts)
    return check_run_config(args.config_file, opts, args.num_gpus * args.num_machines, what=f"grid point {cell['name']}: ",
                            max_iter=args.max_iter)


def main(argv=None) -> int:
    args = parse_args(argv)
    cells = expand(args.grid, args.seeds)
    base = load_base(args.config_file)
    train_net = args.train_net or find_train_net(args.config_file)
    try:
        built = {c["name"]: check_cell(args, c, base) for c in cells}  # what each cell trains with
    except (ValueError, KeyError) as e:
        print(f"sweep.py: error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    runs = [cell_run(args, c, base, train_net, built[c["name"]]) for c in cells]
    if args.slurm and not args.dry_run:
        path = write_sbatch(args, runs)
        print(f"wrote {path} ({len(cells)} array tasks); submit with: sbatch {path}\n"
              f"then aggregate with: python scripts/sweep.py ... --report-only")
        return 0
    failed: List[str] = []
    if args.dry_run or not args.report_only:
        key = tuple(args.metric.split("/", 1))

        def describe(result: Result) -> str:
            out, rc = result.run.out, result.record["returncode"]
            res = cell_result(out, key)
            if res["status"] != "ok":
                failed.append(f"{result.run.name} ({res['status']}, exit {rc}, see {out}/stdout.log)")
            value = (f"{args.metric} {_num(res['measured'])}" if res["measured"] is not None
                     and not math.isnan(res["measured"]) else "no metric")
            return f"{result.run.name}: {res['status']} ({value}) in {result.record['wall_s'] / 60:.1f} min"

        execute(runs, args.jobs, dry_run=args.dry_run, describe=describe)
        if args.dry_run:
            return 0
    csv_path, md_path = aggregate(args, cells)
    print(f"wrote {csv_path} and {md_path}")
    if failed:
        print("FAILED cells:\n  " + "\n  ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
