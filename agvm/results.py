"""Read the output folders of training runs: final metrics, Φ/μ curves, comparison tables.

A run's folder (``OUTPUT_DIR``) holds detectron2's ``metrics.json`` (one JSON record per line;
agvm logs ``agvm/phi/<module>``, ``agvm/mu/<module>``, ``agvm/lr/<module>`` at every estimate),
``eval_results.json`` (written by ``agvm.detectron2.train_or_evaluate``: ``{task: {metric:
value}}``) and, when started by ``scripts/reproduce_table.py``, ``agvm_run.json`` (command, exit
code, wall time, machine). Pure Python (no torch, no detectron2): the notebooks and scripts use it.
"""

from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from .tables import Table

__all__ = [
    "read_metrics",
    "read_eval_results",
    "read_run",
    "curves",
    "cell_result",
    "comparison_rows",
    "rows_to_markdown",
    "cell_output_dir",
    "phi_mu_summary",
    "run_mismatches",
]

#: Status of a cell in a comparison table ("mismatched": a run whose config is not the cell's).
STATUSES = ("ok", "failed", "missing", "incomplete", "mismatched")


def cell_output_dir(root: str, table: str, scale: str, cell: str) -> str:
    """``<root>/<table>/<scale>/<cell>``: where a cell's run writes (the configs' OUTPUT_DIR
    with ``root = ./output``)."""
    return os.path.join(root, table, scale, cell)


def read_metrics(path: str) -> List[dict]:
    """The records of a ``metrics.json`` (a file, or a folder holding one); a truncated last
    line (a run killed while writing) is skipped. ``[]`` if the file does not exist."""
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.json")
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def read_eval_results(output_dir: str) -> Optional[dict]:
    """``{task: {metric: value}}`` of a finished run: ``eval_results.json`` if present, else the
    last evaluation detectron2 put in ``metrics.json`` (keys ``task/metric``); None if neither."""
    path = os.path.join(output_dir, "eval_results.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    found: Dict[str, Dict[str, float]] = {}
    for rec in read_metrics(output_dir):
        for key, value in rec.items():
            task, _, metric = key.partition("/")
            if task in ("bbox", "segm", "sem_seg", "panoptic_seg", "keypoints") and metric:
                found.setdefault(task, {})[metric] = value
    return found or None


def read_run(output_dir: str) -> Optional[dict]:
    """``agvm_run.json`` of a run started by ``scripts/reproduce_table.py`` (None if absent)."""
    path = os.path.join(output_dir, "agvm_run.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def curves(records: Sequence[Mapping], kind: str = "phi") -> "OrderedDict[str, Tuple[List[int], List[float]]]":
    """Per module, ``(iterations, values)`` of ``agvm/<kind>/<module>`` (kind "phi", "mu" or
    "lr") in the order they were logged; non-finite values are kept (a failed run shows them;
    a NaN/inf that the strict JSON writer stored as null reads back as NaN)."""
    prefix = f"agvm/{kind}/"
    out: "OrderedDict[str, Tuple[List[int], List[float]]]" = OrderedDict()
    for rec in records:
        for key, value in rec.items():
            if key.startswith(prefix):
                its, vals = out.setdefault(key[len(prefix):], ([], []))
                its.append(int(rec.get("iteration", len(its))))
                vals.append(float("nan") if value is None else float(value))
    return out


def phi_mu_summary(records: Sequence[Mapping]) -> str:
    """A per-module markdown table of one run's AGVM estimates (its metrics.json records):
    mean Φ over the finite estimates, the last Φ, μ at the end, and how many estimates there
    were and how many were not finite. Empty string when the run logged no estimate."""
    phi, mu = curves(records, "phi"), curves(records, "mu")
    if not phi:
        return ""
    lines = ["| module | Φ mean | Φ last | μ final | estimates | not finite |", "|---|---|---|---|---|---|"]
    for m, (_, values) in phi.items():
        finite = [v for v in values if math.isfinite(v)]
        mean = f"{sum(finite) / len(finite):.4g}" if finite else "—"
        last = f"{values[-1]:.4g}" if math.isfinite(values[-1]) else "nan"
        final = mu.get(m, ([], []))[1]
        lines.append(f"| {m} | {mean} | {last} | {final[-1]:.4f} | {len(values)} | {len(values) - len(finite)} |"
                     if final else f"| {m} | {mean} | {last} | — | {len(values)} | {len(values) - len(finite)} |")
    return "\n".join(lines)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def cell_result(output_dir: str, result_key: Tuple[str, str]) -> dict:
    """``{"status", "measured", "wall_s", "iterations"}`` of one cell's output folder.

    status: "ok" (a finite metric), "failed" (the run exited with an error, or its metric or
    training loss is NaN/inf: detectron2 stops on a non-finite loss), "incomplete" (the folder
    exists without a final metric: running, or killed) or "missing" (no folder).
    """
    out = {"status": "missing", "measured": None, "wall_s": None, "iterations": None}
    if not os.path.isdir(output_dir):
        return out
    run = read_run(output_dir) or {}
    out["wall_s"] = run.get("wall_s")
    records = read_metrics(output_dir)
    its = [r["iteration"] for r in records if "iteration" in r]
    out["iterations"] = max(its) + 1 if its else None
    results = read_eval_results(output_dir) or {}
    task, metric = result_key
    value = results.get(task, {}).get(metric)
    if value is not None:
        out["measured"] = float(value)
    losses = [r.get("total_loss") for r in records if "total_loss" in r]
    if run.get("returncode", 0) != 0 or any(not _finite(v) for v in losses[-1:]):
        out["status"] = "failed"
    elif value is not None:
        out["status"] = "ok" if _finite(float(value)) else "failed"
    else:
        out["status"] = "incomplete"
    return out


#: The repository root (configs/recipes, which :func:`run_mismatches` compares runs against).
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_mismatches(table: Table, cell, scale: str, output_dir: str, repo_root: str = REPO_ROOT) -> List[str]:
    """What the run in ``output_dir`` trained with (its ``config.yaml``) that is not what the
    table entry ``cell`` means (:func:`agvm.tables.config_mismatches`, except where the output
    went); [] when it agrees or when the folder has no config.yaml."""
    import yaml

    from .tables import config_mismatches

    path = os.path.join(output_dir, "config.yaml")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        cfg = yaml.safe_load(f)
    return [m for m in config_mismatches(table, cell, scale, cfg, "", repo_root) if not m.startswith("OUTPUT_DIR")]


def comparison_rows(table: Table, scale: str, root: str) -> List[dict]:
    """One row per cell of ``table`` at ``scale``: the paper's number (for mini cells, that of
    the full-scale counterpart), the measured one, measured − paper, measured − the
    small-batch baseline cell's measured value, status and wall time. A run whose config is
    not its cell's (:func:`run_mismatches`: another batch, schedule, LR, recipe key, …) gets
    status "mismatched", the differences in ``mismatches`` and no Δ: it is never passed off as
    the cell."""
    cells = table.cells_at(scale)
    folders = {c.name: cell_output_dir(root, table.name, scale, c.name) for c in cells}
    results = {c.name: cell_result(folders[c.name], table.result_key) for c in cells}
    mismatches = {c.name: run_mismatches(table, c, scale, folders[c.name]) for c in cells}
    for name, bad in mismatches.items():
        if bad:
            results[name] = dict(results[name], status="mismatched")
    base = results.get(table.baseline_at(scale), {})
    base = base.get("measured") if base.get("status") != "mismatched" else None
    rows = []
    for c in cells:
        r = results[c.name]
        paper = c.paper if scale == "full" else table.cell(c.counterpart).paper
        measured = r["measured"]
        comparable = r["status"] != "mismatched"
        rows.append(OrderedDict(
            section=c.section, cell=c.name, batch=c.batch, method=c.method, variant=c.variant,
            paper=paper, measured=measured,
            diff=(measured - paper) if comparable and _finite(measured) and _finite(paper) else None,
            vs_baseline=(measured - base) if comparable and _finite(measured) and _finite(base) else None,
            status=r["status"], wall_s=r["wall_s"], counterpart=c.counterpart,
            approximate=c.approximate, mismatches=mismatches[c.name],
        ))
    return rows


def _fmt(x, signed: bool = False) -> str:
    if x is None:
        return "—"
    if isinstance(x, float) and math.isnan(x):
        return "NaN"
    return f"{x:+.1f}" if signed else f"{x:.1f}"


def rows_to_markdown(rows: Sequence[Mapping], metric: str, scale: str) -> str:
    """A markdown table of :func:`comparison_rows` (NaN = the paper's failed runs; "—" = none)."""
    paper_head = "paper (full-scale counterpart)" if scale == "mini" else "paper"
    head = f"| cell | batch | method | {paper_head} | measured {metric} | Δ vs paper | Δ vs small-batch baseline | status | wall |"
    lines = [head, "|" + "---|" * 9]
    section = None
    for r in rows:
        if scale == "full" and r["section"] != section:
            section = r["section"]
            lines.append(f"| **{section}** |  |  |  |  |  |  |  |  |")
        method = r["method"] + (f" ({r['variant']})" if r["variant"] else "")
        paper = _fmt(r["paper"]) + (" ≈" if r.get("approximate") else "")
        if scale == "mini":
            paper += f" ({r['counterpart']})"
        wall = f"{r['wall_s'] / 60:.1f} min" if r["wall_s"] else "—"
        status = r["status"]
        if status == "failed" and isinstance(r["paper"], float) and math.isnan(r["paper"]):
            status = "failed (as in the paper)"
        if status == "mismatched":
            status = "mismatched: " + "; ".join(r.get("mismatches", []))
        lines.append(
            f"| {r['cell']} | {r['batch']} | {method} | {paper} | {_fmt(r['measured'])} | "
            f"{_fmt(r['diff'], True)} | {_fmt(r['vs_baseline'], True)} | {status} | {wall} |"
        )
    return "\n".join(lines) + "\n"
