#!/usr/bin/env python
"""Run (or print) every cell of a paper table and write the comparison table as markdown.

    python scripts/reproduce_table.py --table faster_rcnn --scale mini              # run, on CPU
    python scripts/reproduce_table.py --table all --scale mini --dry-run            # list commands
    python scripts/reproduce_table.py --table mask_rcnn --scale full --num-gpus 8 b512_agvm b512_megdet
    python scripts/reproduce_table.py --table mask_rcnn --scale full --launcher machines \\
        --num-machines 4 --machine-rank 0 --dist-url tcp://node0:29500 --num-gpus 8
    python scripts/reproduce_table.py --table panoptic_fpn --scale full --launcher slurm \\
        --num-machines 4 --num-gpus 8                                                 # inside salloc/sbatch
    python scripts/reproduce_table.py --table faster_rcnn --scale mini --report-only   # table from existing runs

Cells (``agvm.tables``) are a plan of ``agvm.runner.Run`` run by ``agvm.runner.execute`` (its
reuse rule: a cell whose record has the same config fingerprint and that finished, or diverged,
is not run again unless ``--rerun``; a failed cell runs again). They run one after another
(``--jobs N`` runs N at once on one machine, each with its share of the CPU threads), each into
``<output-root>/<table>/<scale>/<cell>`` with its console output in ``stdout.log`` and
``agvm_run.json`` (command, exit code, wall time, machine); a failed cell is reported and the
others go on. ``--dry-run`` prints the cells that would run. Afterwards the comparison table
(measured vs paper, Δ, status, time) is written to ``projects/<table>/results/<scale>.md``
(``--results`` to change; not in --dry-run). A relative ``--output-root`` / ``--results`` is
taken from the repository root. ``-- KEY VALUE ...`` at the end overrides every cell's config
(e.g. ``-- MODEL.DEVICE cuda``).
Launchers: ``local`` (this machine, ``--num-gpus`` processes), ``machines`` (this machine is
``--machine-rank`` of ``--num-machines``; run the same command on each), ``slurm`` (``srun`` with
``--num-machines`` nodes × ``--num-gpus`` tasks; run inside an allocation).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import subprocess
import sys
from typing import List

from agvm.results import cell_output_dir, cell_result, comparison_rows, read_run, rows_to_markdown
from agvm.runner import REPO_ROOT as ROOT
from agvm.runner import Result, Run, execute, grad_accum_steps, parse_with_overrides
from agvm.tables import TABLES, Cell, Table, get_table

SLURM_MASTER = '$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)'


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", required=True, help=f"one of {', '.join(TABLES)}, or 'all'")
    p.add_argument("--scale", required=True, choices=("mini", "full"), help="mini: embedded dataset, CPU; full: the paper's")
    p.add_argument("cells", nargs="*", metavar="CELL", help="cells to run (default: every cell of the table)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing, write nothing")
    p.add_argument("--report-only", action="store_true", help="run nothing; write the table from existing output")
    p.add_argument("--launcher", choices=("local", "machines", "slurm"), default="local")
    p.add_argument("--num-gpus", type=int, default=1, help="processes per machine (GPUs; CPU processes on CPU); default 1")
    p.add_argument("--num-machines", type=int, default=1, help="machines (slurm: nodes); default 1")
    p.add_argument("--machine-rank", type=int, default=0, help="this machine's rank (launcher 'machines'); default 0")
    p.add_argument("--max-images-per-gpu", type=int, default=None,
                   help="images per GPU per forward; cells whose per-GPU batch is larger accumulate gradients "
                        "(SOLVER.GRAD_ACCUM_STEPS) to keep their global batch. Default 16 at --scale full, no limit at mini")
    p.add_argument("--dist-url", default="auto", help="tcp://host:port of machine 0 (launcher 'machines')")
    p.add_argument("--srun-args", default="", help="extra srun arguments, e.g. --srun-args='--partition=gpu --time=24:00:00'")
    p.add_argument("--jobs", type=int, default=1, help="cells run at once on this machine (local launcher); default 1")
    p.add_argument("--output-root", default="output", help="folder of the cells' output folders; default ./output")
    p.add_argument("--results", default="projects/{table}/results/{scale}.md",
                   help="markdown file, {table} and {scale} filled in; default projects/{table}/results/{scale}.md")
    p.add_argument("--rerun", action="store_true", help="run cells that already have a final metric again")
    p.add_argument("--max-iter", type=int, default=None, metavar="N",
                   help="a short run of every cell: N iterations, its schedule rescaled (train_net.py --max-iter); "
                        "such a run is not the table's cell (the check before launch warns which keys differ); default: off")
    p.add_argument("--python", default=sys.executable, help="interpreter for train_net.py; default this one")
    args = parse_with_overrides(p, argv)
    for name in ("num_gpus", "num_machines", "jobs"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(args, name)}")
    if args.launcher == "machines" and (args.num_machines < 2 or args.dist_url == "auto"):
        p.error("--launcher machines needs --num-machines ≥ 2 and --dist-url tcp://<machine 0>:<port>")
    if args.max_images_per_gpu is None and args.scale == "full":
        args.max_images_per_gpu = 16
    if args.max_images_per_gpu is not None and args.max_images_per_gpu < 1:
        p.error(f"--max-images-per-gpu must be ≥ 1, got {args.max_images_per_gpu}")
    # train_net.py runs in the repository root: a relative root is relative to it
    args.output_abs = os.path.join(ROOT, args.output_root)
    if args.table != "all" and args.table not in TABLES:
        p.error(f"unknown --table {args.table!r}; known: {', '.join(TABLES)}, all")
    return args


def cell_split(args, cell: Cell):
    """``(images per GPU per micro-batch, GRAD_ACCUM_STEPS)`` of ``cell`` on the GPUs given."""
    return grad_accum_steps(cell.batch, args.num_gpus * args.num_machines, args.max_images_per_gpu)


def cell_run(args, table: Table, cell: Cell) -> Run:
    """The run that trains and evaluates ``cell`` (at its global batch: with
    ``SOLVER.GRAD_ACCUM_STEPS`` when its per-GPU batch exceeds ``--max-images-per-gpu``)."""
    micro, accum = cell_split(args, cell)
    flags = ["--max-iter", str(args.max_iter)] if args.max_iter else []
    launcher: List[str] = []
    if args.launcher == "slurm":
        flags += ["--dist-url", f"tcp://{SLURM_MASTER}:29500"]
        launcher = ["srun", f"--nodes={args.num_machines}", f"--ntasks-per-node={args.num_gpus}",
                    f"--gpus-per-node={args.num_gpus}", *shlex.split(args.srun_args)]
    else:
        flags += ["--num-gpus", str(args.num_gpus)]
        if args.launcher == "machines":
            flags += ["--num-machines", str(args.num_machines), "--machine-rank", str(args.machine_rank),
                      "--dist-url", args.dist_url]
    processes = args.num_gpus * args.num_machines
    run = Run(f"{table.name}/{cell.name}", table.config_path(cell, args.scale),
              cell_output_dir(args.output_root, table.name, args.scale, cell.name), f"projects/{table.name}/train_net.py",
              opts=(["SOLVER.GRAD_ACCUM_STEPS", str(accum)] if accum > 1 else []) + list(args.opts), flags=flags,
              launcher=launcher, python=args.python, info={"table": table.name, "scale": args.scale, "cell": cell.name},
              note=f"{table.name}/{cell.name}: batch {cell.batch} on {processes} GPU(s) = {micro} images per GPU "
                   f"× {accum} micro-batch(es) (SOLVER.GRAD_ACCUM_STEPS {accum})",
              clean=args.launcher != "machines", meta=(table, cell))  # machines share the folder: not cleared
    run.line = shell_line(run.command)
    return run


def shell_line(cmd: List[str]) -> str:
    """``cmd`` as one shell line (the SLURM master-host substitution left unquoted)."""
    return " ".join(c if SLURM_MASTER in c else shlex.quote(c) for c in cmd)


def on_slurm_master(runs: List[Run]) -> List[Run]:
    """``runs`` with the SLURM master host filled in (their fingerprint and printed line keep the
    substitution); SystemExit outside a SLURM allocation."""
    host = subprocess.run(["bash", "-c", SLURM_MASTER[2:-1]], capture_output=True, text=True)
    if host.returncode != 0 or not host.stdout.strip():
        raise SystemExit("--launcher slurm must run inside a SLURM allocation (scontrol found no nodes)")
    name = host.stdout.split()[0]
    return [dataclasses.replace(r, flags=[f.replace(SLURM_MASTER, name) for f in r.flags]) for r in runs]


def check_cells(args, runs: List[Run]) -> None:
    """Before anything runs: build every cell's config as its command would (the overrides
    after ``--`` included) and check it (``check_run_config``); raises ValueError naming the cell,
    key and value. A cell whose config no longer means its table entry (``agvm.tables``: a
    hand edit that changed its batch, LR, schedule, ...) is reported with a warning: its row
    would compare another run with the paper's number."""
    from agvm.detectron2.checks import check_run_config
    from agvm.tables import config_mismatches

    processes = args.num_gpus * args.num_machines
    for run in runs:
        table, cell = run.meta
        path = run.path(run.config)
        cfg = check_run_config(path, ["OUTPUT_DIR", run.out, *run.opts], processes,
                               what=f"cell {table.name}/{cell.name}: ", max_iter=args.max_iter)
        edited = [m for m in config_mismatches(table, cell, args.scale, cfg, open(path).read(), ROOT)
                  if not m.startswith("OUTPUT_DIR") and not any(m.startswith(k + " ") for k in args.opts[0::2])]
        if edited:
            print(f"WARNING: {table.name}/{cell.name} no longer means its table entry (agvm/tables.py): "
                  + "; ".join(edited), file=sys.stderr)


def write_report(args, table: Table, argv_line: str) -> str:
    rows = comparison_rows(table, args.scale, args.output_abs)
    runs = [cell_output_dir(args.output_abs, table.name, args.scale, r["cell"]) for r in rows]
    records = [r for r in map(read_run, runs) if r]
    machines = sorted({r.get("machine", "?") for r in records})
    total = sum(r.get("wall_s") or 0 for r in records)
    lines = [f"# {table.title}: {args.scale} table", ""]
    if args.scale == "mini":
        lines += ["Mini cells train CPU-sized models on the embedded shapes dataset (agvm.data): their numbers are "
                  "not comparable to the paper's; the paper column shows the full-scale cell each one imitates. "
                  "What they show is the pipeline working end to end, and the direction of the batch-size and "
                  "AGVM effects at this scale.", ""]
    lines += [f"Command: `{argv_line}`", "",
              f"Machine: {'; '.join(machines) if machines else 'no runs yet'}", "",
              f"Total wall time of the runs: {total / 60:.1f} min", "",
              rows_to_markdown(rows, table.metric, args.scale)]
    for r in records:
        lines.append(f"- `{r['cell']}`: `{r['command']}` (exit {r.get('returncode', '?')}, {r.get('wall_s', '?')} s, {r.get('started', '')})")
    text = ("\n".join(lines) + "\n").replace(ROOT + os.sep, "")
    path = os.path.join(ROOT, args.results.format(table=table.name, scale=args.scale))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    argv_line = "python scripts/reproduce_table.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    tables = list(TABLES.values()) if args.table == "all" else [get_table(args.table)]
    try:
        runs = [cell_run(args, table, table.cell(name, args.scale)) for table in tables
                for name in args.cells or [c.name for c in table.cells_at(args.scale)]]
    except KeyError as e:
        print(f"reproduce_table.py: error: {e.args[0]}", file=sys.stderr)
        return 2
    except ValueError as e:  # a batch that does not split over the GPUs
        print(f"reproduce_table.py: error: {e}", file=sys.stderr)
        return 2
    try:
        check_cells(args, runs)
    except ValueError as e:
        print(f"reproduce_table.py: error: {e}", file=sys.stderr)
        return 2
    failed = []
    if args.dry_run or not args.report_only:
        if args.launcher == "slurm" and not args.dry_run:
            runs = on_slurm_master(runs)

        def describe(result: Result) -> str:
            table, cell = result.run.meta
            out = os.path.join(args.output_abs, table.name, args.scale, cell.name)
            res = cell_result(out, table.result_key)
            value = f"{table.metric} {res['measured']:.2f}" if res["measured"] is not None else "no metric"
            if res["status"] != "ok":
                failed.append(f"{result.run.name} (exit {result.record['returncode']}, see {out}/stdout.log)")
            return f"{result.run.name}: {res['status']} ({value}) in {result.record['wall_s'] / 60:.1f} min"

        execute(runs, args.jobs if args.launcher == "local" else 1, dry_run=args.dry_run, rerun=args.rerun,
                describe=describe)
        if args.dry_run:
            return 0
    if args.launcher == "machines" and args.machine_rank != 0:
        return 1 if failed else 0  # machine 0 writes the table
    for table in tables:
        print(f"wrote {write_report(args, table, argv_line)}")
    if failed:
        print("FAILED cells:\n  " + "\n  ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
