#!/usr/bin/env python
"""Write every table cell's config, ``projects/<table>/configs/[mini/]<cell>.yaml``, and each
project's ``check_results.ipynb`` (the same notebook with the project's table name).

The cells and the paper's numbers are in :mod:`agvm.tables`; the rules that turn a cell into
solver settings are here, stated once (and printed into each file as comments):

Schedule (full scale)
    MAX_ITER: the paper's iteration column (Table 2) or 12 epochs (AdamW family, RetinaNet).
    LR steps (×0.1): epochs 12 and 14 of a 16-epoch schedule, i.e. 3/4 and 7/8 of MAX_ITER, for
    Table 2 (the authors' release); epochs 8 and 11 of 12 for the 12-epoch cells. Semantic FPN:
    cosine decay. Warm-up: 1000 iterations at batch 32 (detectron2's default), else 2 epochs
    rounded to 10 iterations (the release: 920 at 256, 460 at 512), from factor 0.001.
Methods
    MegDet / SGD: SGD, linear LR scaling from (16 images, 0.02) (Semantic FPN: 0.01), linear
        warm-up, and AGVM in MEASURE_ONLY mode (logs Φ for Figure 1, μ stays 1).
    SAM: ρ = 0.05 around SGD, MegDet's LR and warm-up.
    LARS: trust coefficient 0.001, LR by the square-root rule from (16 images, 2.0) — the paper
        gives no LARS LR: our assumption.
    AGVM (SGD): the release's settings — exponential warm-up, L2 clipping (max norm 1.0) in
        [warm-up − 100, warm-up + 100], start at warm-up + 100, α = 0.97, τ = 10 (5 above batch
        1024) — and its LRs: 0.16·√2 at 256, 0.38 (Faster R-CNN) / 0.32 (Mask R-CNN, Panoptic
        FPN) at 512; at 1024 and above, the square-root rule from the 512 value; at 32, MegDet's
        linear rule. Semantic FPN (no release values): half of Mask R-CNN's, as its base LR is.
    AdamW / AdamW+AGVM: LR by the square-root rule from (16 images, 1e-4), weight decay 0.05;
        AdamW+AGVM adds AGVM as above (exponential warm-up, clip window).
    LAMB / PMD-LAMB: LR by the square-root rule from (16 images, 1e-3), weight decay 0.01 — our
        assumption; PMD-LAMB's moment decay as agvm.solver.pmd_lamb's defaults.
Mini scale (the embedded shapes dataset, 128 px, CPU)
    Every cell sees 3840 images (480 iterations at batch 8), warm-up 640 images, LR steps at 3/4
    and 7/8. The reference point of the LR rules is the mini base's (8 images, 0.02) for SGD
    (AdamW 5e-4, LAMB 5e-3); AGVM starts 10 iterations after warm-up, τ = 5, clip window ±10.
    Warm-up is linear at this scale (the release's exponential warm-up over 20 iterations at
    batch 32 diverged). At batch 32: MegDet by the linear rule (0.08); AGVM at the batch-8 LR
    (0.02: with the exponential warm-up, 0.02, 0.04 and 0.08 all diverged within 40 iterations);
    and "b32_sgd", the AGVM cell with μ held at 1 (MEASURE_ONLY: same LR, warm-up, clipping, Φ
    logged), so that the modulation is the only difference between those two.

    python scripts/make_project_files.py            # (re)write all cell configs and notebooks
    python scripts/make_project_files.py --check    # exit 1 if any file differs
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import List, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from agvm.tables import ADE20K_TRAIN_IMAGES, COCO_TRAIN_IMAGES, TABLES, Cell, Table  # noqa: E402

# (table, scale) -> the _BASE_ of its cells, relative to the cell file
BASES = {
    ("faster_rcnn", "full"): "Base-faster_rcnn_R50_FPN.yaml",
    ("mask_rcnn", "full"): "Base-mask_rcnn_R50_FPN.yaml",
    ("semantic_fpn", "full"): "Base-semantic_fpn_R50.yaml",
    ("panoptic_fpn", "full"): "Base-panoptic_fpn_R50.yaml",
    ("retinanet", "full"): "Base-retinanet_R18_FPN.yaml",
    ("faster_rcnn", "mini"): "faster_rcnn_R18_FPN_shapes.yaml",
    ("mask_rcnn", "mini"): "mask_rcnn_R18_FPN_shapes.yaml",
    ("semantic_fpn", "mini"): "semantic_fpn_R18_shapes.yaml",
    ("panoptic_fpn", "mini"): "panoptic_fpn_R18_FPN_shapes.yaml",
    ("retinanet", "mini"): "retinanet_R18_FPN_shapes.yaml",
}

Setting = Tuple[str, object, str]  # (dotted key, value, comment)


def _yaml_value(v) -> str:
    if isinstance(v, bool):
        return "True" if v else "False"
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, float):
        return repr(round(v, 8))
    if isinstance(v, tuple):
        return "(" + ", ".join(_yaml_value(x) for x in v) + ("," if len(v) == 1 else "") + ")"
    return str(v)


def render(settings: List[Setting], header: List[str], base: str, output_dir: str) -> str:
    """YAML text: header comments, _BASE_, the settings nested by their dotted keys."""
    lines = [f"# {h}" if h else "#" for h in header]
    lines.append(f'_BASE_: "{base}"')
    tree: dict = {}
    for key, value, comment in settings:
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = (value, comment)

    def emit(node, indent):
        for k, v in node.items():
            if isinstance(v, dict):
                lines.append(" " * indent + f"{k}:")
                emit(v, indent + 2)
            else:
                value, comment = v
                text = " " * indent + f"{k}: {_yaml_value(value)}"
                lines.append(text + (f"  # {comment}" if comment else ""))

    emit(tree, 0)
    lines.append(f'OUTPUT_DIR: "{output_dir}"')
    return "\n".join(lines) + "\n"


def _round10(x: float) -> int:
    return max(10, int(round(x / 10.0)) * 10)


def _steps(cell: Cell, table: Table, scale: str) -> Tuple[Setting, ...]:
    n = cell.iterations
    if table.name == "semantic_fpn" and scale == "full":
        return ()  # cosine decay (the base config)
    if scale == "full" and ("12 epochs" in cell.section or table.name == "retinanet"):
        return (("SOLVER.STEPS", (round(n * 8 / 12), round(n * 11 / 12)), "epochs 8 and 11 of 12"),)
    what = "epochs 12 and 14 of 16" if scale == "full" else "3/4 and 7/8 of training"
    return (("SOLVER.STEPS", (round(n * 3 / 4), round(n * 7 / 8)), what),)


def _warmup(cell: Cell, table: Table, scale: str) -> int:
    if scale == "mini":
        return max(1, 640 // cell.batch)
    if cell.batch <= 32:
        return 1000
    images = ADE20K_TRAIN_IMAGES if table.name == "semantic_fpn" else COCO_TRAIN_IMAGES
    return _round10(2 * images / cell.batch)


def _rule(rule: str, ref_batch: int, ref_lr: float, why: str) -> List[Setting]:
    return [
        ("SOLVER.LR_SCALING.RULE", rule, why),
        ("SOLVER.LR_SCALING.REFERENCE_IMS_PER_BATCH", ref_batch, "images"),
        ("SOLVER.LR_SCALING.REFERENCE_LR", ref_lr, ""),
    ]


def _sgd_lr(table: Table, scale: str) -> Tuple[int, float]:
    if scale == "mini":
        return 8, 0.02
    return 16, (0.01 if table.name == "semantic_fpn" else 0.02)


def _agvm_sgd_lr(cell: Cell, table: Table, scale: str) -> List[Setting]:
    ref_batch, ref_lr = _sgd_lr(table, scale)
    if scale == "mini":
        # measured (H200, 2026-11-27): at batch 32 from scratch, 0.04 (square-root rule) and
        # 0.08 (linear) diverged within 40 iterations with and without the modulation
        return [("SOLVER.BASE_LR", ref_lr, "the batch-8 LR: larger ones diverged at this scale")]
    if cell.batch <= 32:
        return _rule("linear", ref_batch, ref_lr, "MegDet's linear rule")
    at512 = {"faster_rcnn": 0.38, "semantic_fpn": 0.16}.get(table.name, 0.32)
    if cell.batch == 256:
        lr = 0.16 * math.sqrt(2) * (0.5 if table.name == "semantic_fpn" else 1.0)
        return [("SOLVER.BASE_LR", lr, "the authors' release at batch 256: 0.16·√2")]
    if cell.batch == 512:
        return [("SOLVER.BASE_LR", at512, "the authors' release at batch 512")]
    return _rule("sqrt", 512, at512, "square-root rule from the release's batch-512 LR")


def _schedule(cell: Cell, warmup: int, scale: str) -> Tuple[int, int, int, int]:
    """(start, clip from, clip to, τ) of the AGVM estimates."""
    if scale == "mini":
        return warmup + 10, max(0, warmup - 10), warmup + 10, 5
    return warmup + 100, max(0, warmup - 100), warmup + 100, (5 if cell.batch > 1024 else 10)


def _agvm(cell: Cell, warmup: int, scale: str) -> List[Setting]:
    start, lo, hi, interval = _schedule(cell, warmup, scale)
    if scale == "mini":
        # over 20 iterations (batch 32) the exponential warm-up left the LR near 0 until the last
        # few and the R-CNNs diverged right after it (measured 2026-11-27); linear is stable
        warm: Setting = ("SOLVER.WARMUP_METHOD", "linear", "the release's exponential one diverged at this length")
    else:
        warm = ("SOLVER.WARMUP_METHOD", "exp", "factor 0.001^(1 − t/T), the release")
    out: List[Setting] = [
        warm,
        ("SOLVER.CLIP_GRADIENTS.ENABLED", True, ""),
        ("SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "full_model", ""),
        ("SOLVER.CLIP_GRADIENTS.CLIP_VALUE", 1.0, "max L2 norm (whole model)"),
        ("SOLVER.CLIP_GRADIENTS.NORM_TYPE", 2.0, ""),
        ("SOLVER.CLIP_GRADIENTS.ITER_RANGE", (lo, hi), "only around the end of warm-up"),
        ("SOLVER.AGVM.ENABLED", True, ""),
        ("SOLVER.AGVM.MOMENTUM", 0.0 if "α = 0" in cell.variant else 0.97, "α"),
        ("SOLVER.AGVM.INTERVAL", interval, "τ, iterations"),
        ("SOLVER.AGVM.START_ITER", start, "warm-up + %d" % (start - warmup)),
    ]
    if cell.variant.startswith("anchor: "):
        out.append(("SOLVER.AGVM.ANCHOR", cell.variant.split()[1], "ablation: the module the others follow"))
    return out


def _measure_only(cell: Cell, warmup: int, scale: str) -> List[Setting]:
    start, _, _, interval = _schedule(cell, warmup, scale)
    return [
        ("SOLVER.AGVM.ENABLED", True, ""),
        ("SOLVER.AGVM.MEASURE_ONLY", True, "log Φ per module (Figure 1); μ stays 1"),
        ("SOLVER.AGVM.INTERVAL", interval, "τ, iterations (as the AGVM cells)"),
        ("SOLVER.AGVM.START_ITER", start, "as the AGVM cells"),
    ]


def cell_settings(table: Table, cell: Cell, scale: str) -> List[Setting]:
    """The solver settings of ``cell`` (see the module docstring for the rules)."""
    warmup = _warmup(cell, table, scale)
    s: List[Setting] = [
        ("SOLVER.IMS_PER_BATCH", cell.batch, "images per iteration, all processes"),
        ("SOLVER.MAX_ITER", cell.iterations, ""),
        *_steps(cell, table, scale),
        ("SOLVER.WARMUP_ITERS", warmup, ""),
        ("SOLVER.WARMUP_FACTOR", 0.001, ""),
    ]
    ref_batch, ref_lr = _sgd_lr(table, scale)
    mini = scale == "mini"
    adamw_lr = (8, 5e-4) if mini else (16, 1e-4)
    lamb_lr = (8, 5e-3) if mini else (16, 1e-3)
    m = cell.method
    if m == "SGD" and mini:  # the AGVM cell's recipe with μ held at 1
        s += [("SOLVER.OPTIMIZER", "SGD", "")] + _agvm_sgd_lr(cell, table, scale) + _agvm(cell, warmup, scale)
        s += [("SOLVER.AGVM.MEASURE_ONLY", True, "μ stays 1: AGVM's recipe without the modulation")]
    elif m in ("MegDet", "SGD"):
        s += [("SOLVER.OPTIMIZER", "SGD", ""), ("SOLVER.WARMUP_METHOD", "linear", "")]
        s += _rule("linear", ref_batch, ref_lr, "MegDet's linear rule") + _measure_only(cell, warmup, scale)
    elif m == "SAM":
        s += [("SOLVER.OPTIMIZER", "SAM", ""), ("SOLVER.SAM.RHO", 0.05, ""),
              ("SOLVER.SAM.BASE_OPTIMIZER", "SGD", ""), ("SOLVER.WARMUP_METHOD", "linear", "")]
        s += _rule("linear", ref_batch, ref_lr, "MegDet's linear rule")
    elif m == "LARS":
        s += [("SOLVER.OPTIMIZER", "LARS", ""), ("SOLVER.LARS.TRUST_COEFF", 0.001, ""),
              ("SOLVER.WARMUP_METHOD", "linear", "")]
        s += _rule("sqrt", ref_batch if mini else 16, 2.0, "square-root rule (our assumption)")
    elif m == "AGVM":
        s += [("SOLVER.OPTIMIZER", "SGD", "")] + _agvm_sgd_lr(cell, table, scale) + _agvm(cell, warmup, scale)
    elif m in ("AdamW", "AdamW+AGVM"):
        s += [("SOLVER.OPTIMIZER", "AdamW", ""), ("SOLVER.WEIGHT_DECAY", 0.05, "")]
        s += _rule("sqrt", *adamw_lr, "square-root rule")
        if m == "AdamW":
            s += [("SOLVER.WARMUP_METHOD", "linear", "")] + _measure_only(cell, warmup, scale)
        else:
            s += _agvm(cell, warmup, scale)
    elif m in ("LAMB", "PMD-LAMB"):
        s += [("SOLVER.OPTIMIZER", "LAMB" if m == "LAMB" else "PMD_LAMB", ""), ("SOLVER.WEIGHT_DECAY", 0.01, ""),
              ("SOLVER.WARMUP_METHOD", "linear", "")]
        s += _rule("sqrt", *lamb_lr, "square-root rule (our assumption)")
    else:
        raise ValueError(f"no settings rule for method {m!r} (cell {cell.name})")
    return s


def cell_text(table: Table, cell: Cell, scale: str) -> str:
    """The whole config file of ``cell``."""
    if scale == "full":
        paper = "training failed (NaN)" if math.isnan(cell.paper) else f"{cell.paper} {table.metric}"
        if cell.approximate:
            paper += " (read off a plot, ±0.2)"
        what = f"{table.title}. {cell.section}: {cell.method} at batch {cell.batch}"
        header = [what + (f", {cell.variant}" if cell.variant else "") + f". Paper: {paper}."]
    else:
        header = [f"{table.title}, mini (shapes dataset, CPU): {cell.method} at batch {cell.batch},",
                  f"imitating the full-scale cell {cell.counterpart}."]
    header.append("Generated by scripts/make_project_files.py from agvm/tables.py: edit those, not this file.")
    out_dir = f"./output/{table.name}/{scale}/{cell.name}"
    return render(cell_settings(table, cell, scale), header, BASES[(table.name, scale)], out_dir)


NOTEBOOK_CELLS = [
    ("markdown", """# {title}: results check (full scale; `AGVM_SCALE=mini`: the embedded shapes dataset on CPU)

Reads the output folders of this project's table cells (`<root>/{name}/<scale>/<cell>`, as
written by `launch.sh` / `scripts/reproduce_table.py`), builds the table of measured vs paper
numbers, lists missing and failed (NaN) runs, and plots Φ per module against iterations
(Figure 1 style) for the baseline runs (AGVM in `MEASURE_ONLY` mode) and the AGVM runs.
Runs top to bottom on whatever exists. Environment: `AGVM_SCALE` (`full` or `mini`, default
`full`), `AGVM_RESULTS_ROOT` (default `<repository>/output`)."""),
    ("code", """import os

from IPython.display import Markdown, display

from agvm import plots, results
from agvm.tables import get_table

TABLE = "{name}"
SCALE = os.environ.get("AGVM_SCALE", "full")
here = os.path.abspath(os.getcwd())
REPO = next(p for p in (here, os.path.dirname(here), os.path.dirname(os.path.dirname(here)))
            if os.path.isdir(os.path.join(p, "projects")))
ROOT = os.environ.get("AGVM_RESULTS_ROOT", os.path.join(REPO, "output"))
table = get_table(TABLE)
print(f"table {{TABLE}}, scale {{SCALE}}, results under {{ROOT}}")"""),
    ("code", """rows = results.comparison_rows(table, SCALE, ROOT)
display(Markdown(results.rows_to_markdown(rows, table.metric, SCALE)))"""),
    ("code", """by_status = {{}}
for r in rows:
    by_status.setdefault(r["status"], []).append(r["cell"])
print(f"{{len(by_status.get('ok', []))}} of {{len(rows)}} cells have a final {{table.metric}}")
for status in ("failed", "incomplete", "missing"):
    if by_status.get(status):
        print(f"{{status}} ({{len(by_status[status])}}): {{', '.join(by_status[status])}}")"""),
    ("code", """runs = {{}}
for r in rows:
    records = results.read_metrics(results.cell_output_dir(ROOT, TABLE, SCALE, r["cell"]))
    if results.curves(records, "phi"):
        runs[f"{{r['cell']}} ({{r['method']}}, batch {{r['batch']}})"] = records
if runs:
    plots.plot_runs(runs, "phi", title=f"{{table.title}}: Φ per module ({{SCALE}})")
    agvm_runs = {{k: v for k, v in runs.items() if any(m != 1.0 for _, ms in results.curves(v, "mu").values() for m in ms)}}
    if agvm_runs:
        plots.plot_runs(agvm_runs, "mu", title="μ per module (AGVM runs)")
else:
    print("no run has logged Φ yet (agvm/phi/* in metrics.json)")"""),
]


def notebook_text(table: Table) -> str:
    """The project's check_results.ipynb (nbformat 4), outputs empty."""
    cells = []
    for i, (kind, source) in enumerate(NOTEBOOK_CELLS):
        text = source.format(title=table.title, name=table.name)
        cell = {"cell_type": kind, "id": f"cell-{i}", "metadata": {}, "source": text.splitlines(keepends=True)}
        if kind == "code":
            cell.update(execution_count=None, outputs=[])
        cells.append(cell)
    nb = {"cells": cells, "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                                       "language_info": {"name": "python"}}, "nbformat": 4, "nbformat_minor": 5}
    return json.dumps(nb, indent=1, ensure_ascii=False) + "\n"


PROJECT_NOTES = {
    "faster_rcnn": dict(
        data="COCO 2017 (`coco_2017_train` / `coco_2017_val`)",
        weights="ImageNet R-50 from detectron2's model zoo (downloaded on first use)",
        mini="faster_rcnn_R18_FPN_shapes.yaml",
        extra="The AdamW-family rows train 12 epochs; LAMB and PMD-LAMB numbers were read off the "
              "paper's plot (≈, ±0.2). Batch 1536 is the paper's 768 GPUs × 2 images, 924 iterations.",
    ),
    "mask_rcnn": dict(
        data="COCO 2017 (`coco_2017_train` / `coco_2017_val`)",
        weights="ImageNet R-50 from detectron2's model zoo (downloaded on first use)",
        mini="mask_rcnn_R18_FPN_shapes.yaml",
        extra="The ablation rows change the anchor module (`SOLVER.AGVM.ANCHOR`) or switch the momentum "
              "on μ off (`SOLVER.AGVM.MOMENTUM 0`); the paper's 'RPN/box head' row is run as two cells.",
    ),
    "semantic_fpn": dict(
        data="ADE20K (`ade20k_sem_seg_train` / `ade20k_sem_seg_val`, 150 classes)",
        weights="ImageNet R-50 from detectron2's model zoo (downloaded on first use)",
        mini="semantic_fpn_R18_shapes.yaml",
        extra="Iterations keep the samples seen constant (160k at batch 32). The schedule is cosine "
              "(detectron2 0.6 has no poly schedule; mmseg's is poly).",
    ),
    "panoptic_fpn": dict(
        data="COCO 2017 panoptic in detectron2's separated format (`coco_2017_*_panoptic_separated`)",
        weights="ImageNet R-50 from detectron2's model zoo (downloaded on first use)",
        mini="panoptic_fpn_R18_FPN_shapes.yaml",
        extra="PQ is computed by `agvm.evaluation.PanopticQualityEvaluator` (the COCO panoptic rules, "
              "no `panopticapi` needed); box/mask AP and stuff mIoU are reported too.",
    ),
    "retinanet": dict(
        data="COCO 2017 (`coco_2017_train` / `coco_2017_val`)",
        weights="ImageNet R-18, converted from torchvision to `weights/R-18.pkl` (detectron2's "
                "`tools/convert-torchvision-to-d2.py`; the model zoo has no R-18)",
        mini="retinanet_R18_FPN_shapes.yaml",
        extra="The paper does not say which optimizer carries AGVM in these rows; we use AdamW+AGVM "
              "(its large-batch family) with τ = 5 above batch 1024. Batch 4k/10k = 4096/10240.",
    ),
}


def readme_text(table: Table) -> str:
    """The project's README.md."""
    n = PROJECT_NOTES[table.name]
    lines = [f"# {table.title}", "",
             f"Reproduces the paper's {table.name.replace('_', ' ')} results with AGVM on detectron2 "
             f"(metric: {table.metric}). Data: {n['data']}; weights: {n['weights']}.", "",
             "## The paper's numbers and the cells", "",
             "One config per cell, `configs/<cell>.yaml` (all from `agvm/tables.py` through "
             "`scripts/make_project_files.py`; the rules for iterations, warm-up and learning rates are "
             "in that script's docstring and in each file's comments). NaN: the paper's run failed.", ""]
    section = None
    for c in table.cells:
        if c.section != section:
            section = c.section
            lines += ["", f"**{section}**", "", f"| cell | batch | method | iterations | paper {table.metric} |",
                      "|---|---|---|---|---|"]
        paper = "NaN" if math.isnan(c.paper) else f"{c.paper}" + (" ≈" if c.approximate else "")
        method = c.method + (f" ({c.variant})" if c.variant else "")
        lines.append(f"| `{c.name}` | {c.batch} | {method} | {c.iterations} | {paper} |")
    lines += ["", n["extra"], "",
              "## Running the full-scale cells", "",
              "```bash",
              f"# one machine, 8 GPUs: one cell, then the whole table",
              f"python projects/{table.name}/train_net.py --config-file projects/{table.name}/configs/{table.cells[-1].name}.yaml --num-gpus 8",
              f"projects/{table.name}/launch.sh --num-gpus 8                    # every cell, one after another",
              f"projects/{table.name}/launch.sh --num-gpus 8 {table.cells[0].name}   # some cells",
              "# several machines: the same command on each, with its rank",
              f"projects/{table.name}/launch.sh --launcher machines --num-machines 4 --machine-rank 0 --dist-url tcp://node0:29500 --num-gpus 8",
              "# SLURM (inside salloc/sbatch): srun with 4 nodes × 8 tasks",
              f"projects/{table.name}/launch.sh --launcher slurm --num-machines 4 --num-gpus 8 --srun-args='--partition=gpu'",
              f"projects/{table.name}/launch.sh --dry-run --num-gpus 8          # print the commands only",
              "```", "",
              f"Each cell writes to `output/{table.name}/full/<cell>/` (`metrics.json` with Φ, μ and the "
              "per-module lr at every AGVM estimate, `eval_results.json`, checkpoints, `stdout.log`, "
              f"`agvm_run.json`), and `launch.sh` then writes `results/full.md`. Open `check_results.ipynb` "
              f"(or run it: `AGVM_SCALE=full .venv/bin/jupyter execute --inplace projects/{table.name}/check_results.ipynb`, "
              "installed by `make install`) for the table against the "
              "paper, the missing or failed runs, and Φ per module against iterations (Figure 1 style; the "
              "baseline cells log Φ in `MEASURE_ONLY` mode).", "",
              "Set `DETECTRON2_DATASETS` to the folder holding the dataset (detectron2's layout); when it "
              "is missing, training stops at once saying which paths were looked for and how to prepare "
              "them. Expected time and hardware: not measured by us at full scale. The paper used up to "
              "768 GPUs; as a yardstick, detectron2 lists about 0.2 s per iteration of 16 images for R50-FPN "
              "R-CNNs on 8 V100s, so the batch-32 rows (≈1.9M images over 14–16 epochs) need about a day "
              "on 8 such GPUs, and the large-batch rows the same images on proportionally more GPUs.", "",
              "## Mini variant (CPU, minutes)", "",
              f"`configs/mini/` holds CPU-sized stand-ins of a few cells on the embedded shapes dataset "
              f"(base: `configs/mini/{n['mini']}`; R-18 from scratch, 128 px images, 3840 images seen per "
              "cell). Each names the full-scale cell it imitates.", "",
              "```bash",
              f"python scripts/reproduce_table.py --table {table.name} --scale mini --jobs 2   # all mini cells, 2 at a time",
              f"python projects/{table.name}/train_net.py --config-file projects/{table.name}/configs/mini/{table.mini_cells[-1].name}.yaml",
              "```", "",
              "The measured mini table, with the command, the machine and the times, is in "
              "[`results/mini.md`](results/mini.md).", ""]
    return "\n".join(lines)


def launch_text(table: Table) -> str:
    """The project's launch.sh (a front end of scripts/reproduce_table.py)."""
    return f"""#!/usr/bin/env bash
# Launch this project's table cells; every cell writes to output/{table.name}/<scale>/<cell>/ and the
# comparison table goes to results/<scale>.md. Options are scripts/reproduce_table.py's:
#   ./launch.sh --num-gpus 8 [CELL ...]                                    one machine, 8 GPUs
#   ./launch.sh --launcher machines --num-machines 2 --machine-rank R \\
#               --dist-url tcp://<machine 0>:29500 --num-gpus 8           each of several machines
#   ./launch.sh --launcher slurm --num-machines 4 --num-gpus 8            inside a SLURM allocation
#   ./launch.sh --scale mini --jobs 2                                      the CPU mini cells
#   ./launch.sh --dry-run ...                                              print the commands only
# Trailing "-- KEY VALUE ..." overrides every cell's config. Default scale: full.
set -euo pipefail
here="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
if [[ -z "${{PYTHON:-}}" ]]; then
  if [[ -x "$repo/.venv/bin/python" ]]; then PYTHON="$repo/.venv/bin/python"; else PYTHON=python; fi
fi
cd "$repo"
exec "$PYTHON" scripts/reproduce_table.py --table {table.name} --scale full "$@"
"""


def all_configs():
    """Yield ``(path relative to the repository, text)`` of every generated file."""
    for table in TABLES.values():
        for scale in ("full", "mini"):
            for cell in table.cells_at(scale):
                yield table.config_path(cell, scale), cell_text(table, cell, scale)
        yield f"projects/{table.name}/check_results.ipynb", notebook_text(table)
        yield f"projects/{table.name}/README.md", readme_text(table)
        yield f"projects/{table.name}/launch.sh", launch_text(table)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if a file differs or is missing")
    args = parser.parse_args(argv)
    stale = []
    for rel, text in all_configs():
        path = os.path.join(ROOT, rel)
        current = open(path).read() if os.path.exists(path) else None
        if current == text:
            continue
        stale.append(rel)
        if not args.check:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(text)
            if path.endswith(".sh"):
                os.chmod(path, 0o755)
    verb = "differ" if args.check else "written"
    print(f"{len(stale)} file(s) {verb}" + "".join(f"\n  {p}" for p in stale))
    return 1 if (args.check and stale) else 0


if __name__ == "__main__":
    sys.exit(main())
