#!/usr/bin/env python
"""The CPU-scale reproduction (``make reproduce-mini``): small vs large batch, with and without AGVM.

On the embedded shapes dataset with the mini Faster R-CNN (R-18-FPN from scratch, 128 px):

1. the faster_rcnn mini table (``scripts/reproduce_table.py --table faster_rcnn --scale mini``):
   batch 8 (the small-batch baseline, Φ measured), batch 32 with the LR scaled up linearly
   (MegDet, 0.08), batch 32 with AGVM, and its twin with μ held at 1 (same LR 0.02, warm-up,
   clipping);
2. the same two at twice the LR (0.04, the square-root rule; ``scripts/sweep.py``), where the
   twin diverges at this scale, with AGVM over a small α × τ grid;
3. Figure-1 style plots of Φ and μ per module (``scripts/plot_variance.py``);
4. ``results/mini/README.md``: the tables, the plots, the exact commands, the machine and the
   times, plus the hand-written findings in ``results/mini/findings.md`` when present.

Finished runs are reused (both scripts resume), so a second call only redoes what is missing.
Budget on a 2-core CPU: about 20–30 minutes from scratch, 2 runs at a time (measured: the four table runs took 0.8–7.0 min each, the five LR-0.04 runs 1.5 + 4.2 min).

    python scripts/reproduce_mini.py [--jobs 2] [--grid-alpha 0.9 0.97] [--grid-tau 2 10]
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from agvm.results import cell_output_dir, comparison_rows, curves, read_metrics, rows_to_markdown  # noqa: E402
from agvm.runner import machine  # noqa: E402
from agvm.tables import get_table  # noqa: E402

RESULTS = os.path.join(ROOT, "results", "mini")
AGVM_CELL = "projects/faster_rcnn/configs/mini/b32_agvm.yaml"
TWIN_CELL = "projects/faster_rcnn/configs/mini/b32_sgd.yaml"


def _run(cmd, log):
    line = " ".join(shlex.quote(c) for c in cmd)
    print(f"$ {line}", flush=True)
    t0 = time.time()
    rc = subprocess.call(cmd, cwd=ROOT)
    log.append((line.replace(sys.executable, "python").replace(ROOT + os.sep, ""), rc, time.time() - t0))
    return rc


def _phi_summary(table, root) -> str:
    """Mean Φ per module over the last five estimates of each run that logged Φ."""
    lines = ["| run | " + " | ".join(["backbone", "neck", "rpn", "box_head"]) + " | estimates |", "|---|---|---|---|---|---|"]
    for cell in table.mini_cells:
        data = curves(read_metrics(cell_output_dir(root, table.name, "mini", cell.name)), "phi")
        if not data:
            lines.append(f"| {cell.name} | — | — | — | — | none logged |")
            continue
        vals = []
        for m in ("backbone", "neck", "rpn", "box_head"):
            v = data.get(m, ([], []))[1][-5:]
            vals.append(f"{sum(v) / len(v):.3f}" if v else "—")
        lines.append(f"| {cell.name} | " + " | ".join(vals) + f" | {len(next(iter(data.values()))[0])} |")
    return "\n".join(lines) + "\n"


def _relative(text: str) -> str:
    return text.replace(ROOT + os.sep, "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=2, help="runs at once (default 2)")
    p.add_argument("--grid-alpha", nargs="+", default=["0.9", "0.97"], help="α values of the grid")
    p.add_argument("--grid-tau", nargs="+", default=["2", "5"], help="τ values of the grid")
    p.add_argument("--stress-lr", default="0.04", help="LR of the grid and of the twin's stress run (default 0.04)")
    p.add_argument("--output-root", default="output", help="runs' output root (default ./output)")
    args = p.parse_args(argv)
    root = os.path.join(ROOT, args.output_root)
    grid_root = os.path.join(root, "mini_grid")
    py = sys.executable
    log = []
    t_start = time.time()
    started = datetime.datetime.now().isoformat(timespec="minutes")
    rc_table = _run([py, "scripts/reproduce_table.py", "--table", "faster_rcnn", "--scale", "mini", "--jobs", str(args.jobs),
                     "--output-root", args.output_root], log)
    twin_root = os.path.join(root, "mini_twin_lr")
    rc_twin = _run([py, "scripts/sweep.py", "--config-file", TWIN_CELL, "--output-root", twin_root,
                    "--", "SOLVER.BASE_LR", args.stress_lr], log)
    rc_grid = _run([py, "scripts/sweep.py", "--config-file", AGVM_CELL, "--output-root", grid_root, "--jobs", str(args.jobs),
                    "--grid", "SOLVER.AGVM.MOMENTUM=" + ",".join(args.grid_alpha),
                    "SOLVER.AGVM.INTERVAL=" + ",".join(args.grid_tau), "--", "SOLVER.BASE_LR", args.stress_lr], log)
    table = get_table("faster_rcnn")
    runs = [cell_output_dir(root, "faster_rcnn", "mini", c.name) for c in table.mini_cells]
    have_phi = [(c, r) for c, r in zip(table.mini_cells, runs) if curves(read_metrics(r), "phi")]
    os.makedirs(RESULTS, exist_ok=True)
    if have_phi:
        _run([py, "scripts/plot_variance.py", *[r for _, r in have_phi], "--labels",
              *[f"{c.name} ({c.method}, batch {c.batch})" for c, _ in have_phi],
              "--out", os.path.join(RESULTS, "faster_rcnn_mini"), "--title", "mini Faster R-CNN, shapes"], log)
    total = time.time() - t_start
    rows = comparison_rows(table, "mini", root)
    grid_md = os.path.join(grid_root, "results.md")
    findings = os.path.join(RESULTS, "findings.md")
    text = [
        "# CPU-scale reproduction: large batch with and without AGVM (mini Faster R-CNN)", "",
        f"Machine: {machine()}. Started {started}; this call took {total / 60:.1f} min "
        "(runs that had finished before were reused; each run's own time is in the table).", "",
    ]
    if os.path.exists(findings):
        text += [open(findings).read().strip(), ""]
    text += ["## The four runs", "", rows_to_markdown(rows, table.metric, "mini"),
             "Cells: `projects/faster_rcnn/configs/mini/<cell>.yaml` (their meaning and rules: `agvm/tables.py`). "
             "The paper column is the full-scale cell each one imitates, for orientation only.", "",
             "## Φ per module at the end (mean of the last five estimates)", "", _phi_summary(table, root),
             "![Φ per module](faster_rcnn_mini_phi.png)", "", "![μ per module](faster_rcnn_mini_mu.png)", "",
             f"## At LR {args.stress_lr} (batch 32): the μ = 1 twin, and AGVM over an α × τ grid", "",
             f"The twin (`{os.path.basename(TWIN_CELL)}` with `SOLVER.BASE_LR {args.stress_lr}`):", ""]
    twin_md = os.path.join(twin_root, "results.md")
    text += [_relative(open(twin_md).read().strip()) if os.path.exists(twin_md) else "(no results)", "",
             f"AGVM (`{os.path.basename(AGVM_CELL)}` with `SOLVER.BASE_LR {args.stress_lr}`):", ""]
    text += [_relative(open(grid_md).read().strip()) if os.path.exists(grid_md) else "(no grid results)", ""]
    text += ["## Commands", "", "```bash", "make reproduce-mini   # = python scripts/reproduce_mini.py, which ran:"]
    text += [f"{line}   # exit {rc}, {secs / 60:.1f} min" for line, rc, secs in log]
    text += ["```", ""]
    with open(os.path.join(RESULTS, "README.md"), "w") as f:
        f.write("\n".join(text))
    print(f"wrote {os.path.join(RESULTS, 'README.md')}")
    # failed runs are results here (a diverged large-batch baseline is one); the scripts' own
    # exit codes are in the README
    return 0 if all(rc in (0, 1) for rc in (rc_table, rc_twin, rc_grid)) else 1


if __name__ == "__main__":
    sys.exit(main())
