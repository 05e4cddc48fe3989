"""The paper's tables as data: every cell (pipeline, batch, method), what it means, and its number.

One :class:`Table` per project folder (``projects/<name>``). A cell at full scale is a training
run of the paper (agvm-spec §3: Table 2, the AdamW-family table, the RetinaNet extreme-batch rows,
the Mask R-CNN ablations); a ``mini`` cell is a CPU-sized stand-in on the embedded shapes dataset
naming the full-scale cell it imitates.

Each :class:`Cell` states what its hand-owned config must mean — batch, iterations, warm-up, the
learning rate and the rule it follows, where the LR decays (in epochs), the method's recipe
(``configs/recipes/[mini/]<recipe>.yaml``) and any key the cell sets beyond it — and
:func:`config_mismatches` compares a loaded config against that. The config files
(``projects/<name>/configs/[mini/]<cell>.yaml``) are short deltas on a project base and a recipe;
edit them freely: ``tests/experiments/test_projects.py`` only asks that each still means its entry.

The rules that produced the entries (stated once, here):

Schedule (full scale)
    MAX_ITER: the paper's iteration column (Table 2) or 12 epochs (AdamW family, RetinaNet).
    LR ×0.1 at 3/4 and 7/8 of training for Table 2 (the release's epochs 12 and 14 of 16; at 14
    epochs: 10.5 and 12.25), at epochs 8 and 11 of 12 for the 12-epoch cells; Semantic FPN:
    cosine decay. Warm-up: 1000 iterations at batch ≤ 32 (detectron2's default), else 2 epochs
    rounded to 10 iterations (the release: 920 at 256, 460 at 512), from factor 0.001.
Methods (recipes in ``configs/recipes/``)
    MegDet: SGD, linear LR rule from (16 images, 0.02) (Semantic FPN: 0.01), linear warm-up;
        AGVM in MEASURE_ONLY mode logs Φ (Figure 1) with μ = 1.
    SAM: ρ = 0.05 around SGD, MegDet's LR and warm-up.
    LARS: trust coefficient 0.001, LR by the square-root rule from (16, 2.0) — our assumption.
    AGVM (SGD): the release — exponential warm-up, whole-model L2 clipping at 1.0 in
        [warm-up − 100, warm-up + 100], start at warm-up + 100, α = 0.97, τ = 10 (5 above batch
        1024) — with its LRs: 0.16·√2 at 256, 0.38 (Faster R-CNN) / 0.32 (Mask R-CNN, Panoptic
        FPN) at 512; above 512 the square-root rule from the 512 value; at 32 MegDet's linear
        rule. Semantic FPN (no release values): half of Mask R-CNN's, as its base LR is.
    AdamW / AdamW+AGVM: square-root rule from (16, 1e-4), weight decay 0.05; +AGVM as above.
    LAMB / PMD-LAMB: square-root rule from (16, 1e-3), weight decay 0.01 — our assumption.
Mini scale (shapes dataset, 1000 train images at 128 px, CPU)
    Every cell sees 3840 images (480 iterations at batch 8), warm-up 640 images, LR decay at 3/4
    and 7/8; LR rules from (8 images, 0.02) for SGD (AdamW 5e-4, LAMB 5e-3); AGVM starts 10
    iterations after warm-up, τ = 5, clip window ±10, linear warm-up (the exponential one over
    20 iterations diverged). At batch 32: MegDet by the linear rule (0.08), AGVM at the batch-8 LR
    (0.02; 0.04 and 0.08 diverged), and ``b32_sgd``: the AGVM cell with μ held at 1.

Used by ``scripts/reproduce_table.py``, the projects' ``check_results.ipynb`` (through
:mod:`agvm.results`) and the tests. Pure Python: no torch, no detectron2.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple

__all__ = ["Cell", "LR", "Table", "TABLES", "get_table", "config_mismatches", "COCO_TRAIN_IMAGES",
           "ADE20K_TRAIN_IMAGES", "SHAPES_TRAIN_IMAGES"]

NAN = float("nan")

#: Images in COCO 2017 train (detectron2's ``coco_2017_train``, with crowd-only images).
COCO_TRAIN_IMAGES = 117266
#: Images in ADE20K (SceneParsing) train.
ADE20K_TRAIN_IMAGES = 20210
#: Images in the embedded shapes train split (agvm.data.shapes' default).
SHAPES_TRAIN_IMAGES = 1000

#: Method label (a column of the paper's tables) -> cell-name suffix and recipe file stem.
METHOD_SLUGS = {
    "MegDet": "megdet",
    "SAM": "sam",
    "LARS": "lars",
    "AGVM": "agvm",
    "SGD": "sgd",
    "AdamW": "adamw",
    "AdamW+AGVM": "adamw_agvm",
    "LAMB": "lamb",
    "PMD-LAMB": "pmd_lamb",
}

#: Method label -> recipe (``configs/recipes/<recipe>.yaml``): SGD is MegDet's recipe at 12 epochs.
RECIPES = dict(METHOD_SLUGS, SGD="megdet", AGVM="agvm_sgd")


@dataclass(frozen=True)
class LR:
    """How a cell's base learning rate is set.

    Attributes:
        rule: "linear" or "sqrt" (scaled from ``reference_batch`` to the cell's batch) or
            "fixed" (``reference_lr`` as it is).
        reference_batch: images per iteration of the reference point (0 for "fixed").
        reference_lr: the learning rate at the reference point.
        note: where the value comes from, e.g. "the authors' release at batch 512".
    """

    rule: str
    reference_batch: int
    reference_lr: float
    note: str = ""

    def at(self, batch: int) -> float:
        """The learning rate at ``batch`` images per iteration."""
        if self.rule == "fixed":
            return self.reference_lr
        ratio = batch / self.reference_batch
        return self.reference_lr * (ratio if self.rule == "linear" else math.sqrt(ratio))


@dataclass(frozen=True)
class Cell:
    """One cell of a table: a training run and what its config must mean.

    Attributes:
        name: the cell's name, also its config file stem and output folder, e.g. ``b512_agvm``.
        section: which of the project's tables it belongs to, e.g. ``"Table 2 (SGD, 16 epochs)"``.
        batch: global images per iteration (``SOLVER.IMS_PER_BATCH``).
        method: the column label (a key of ``METHOD_SLUGS``).
        paper: the paper's number (the table's metric, in %); ``nan`` = the paper reports a
            failed (NaN) run; ``None`` = not in the paper (mini cells).
        iterations: ``SOLVER.MAX_ITER``.
        recipe: the method's recipe, ``configs/recipes/[mini/]<recipe>.yaml``: every key it
            sets must hold in the cell's config unless ``overrides`` says otherwise.
        lr: the base learning rate and its rule (compared with BASE_LR / SOLVER.LR_SCALING).
        warmup_iters: ``SOLVER.WARMUP_ITERS``.
        epochs: training length in epochs of the train set.
        decay_at: epochs at which the LR drops ×0.1 (``SOLVER.STEPS``); () = cosine decay.
        overrides: ``(dotted key, value)`` the cell sets beyond its recipe (τ, α, anchor, the
            AGVM start iteration and clip window).
        parent: an ablation's parent cell: its config is a delta on the parent's file.
        variant: a description of an ablation, for display only.
        counterpart: for mini cells, the full-scale cell it imitates; "" otherwise.
        approximate: the paper number was read off a plot (±0.2).
    """

    name: str
    section: str
    batch: int
    method: str
    paper: Optional[float]
    iterations: int
    recipe: str
    lr: LR
    warmup_iters: int
    epochs: float
    decay_at: Tuple[float, ...]
    overrides: Tuple[Tuple[str, object], ...] = ()
    parent: str = ""
    variant: str = ""
    counterpart: str = ""
    approximate: bool = False


@dataclass(frozen=True)
class Table:
    """One project's cells and how to read its metric.

    Attributes:
        name: the project folder under ``projects/`` (e.g. ``"faster_rcnn"``).
        title: a human title.
        metric: the metric's label (e.g. ``"box AP"``).
        result_key: ``(task, metric)`` in detectron2's evaluation results
            (``{"bbox": {"AP": ...}}`` → ``("bbox", "AP")``).
        cells: full-scale cells.
        mini_cells: mini (embedded dataset, CPU) cells.
        mini_baseline: name of the small-batch baseline among the mini cells.
        baseline: name of the small-batch baseline among the full-scale cells (the
            Δ-vs-baseline column of the comparison tables).
    """

    name: str
    title: str
    metric: str
    result_key: Tuple[str, str]
    cells: Tuple[Cell, ...]
    mini_cells: Tuple[Cell, ...]
    mini_baseline: str
    baseline: str

    def cells_at(self, scale: str) -> Tuple[Cell, ...]:
        """The cells at ``scale`` ("full" or "mini")."""
        if scale == "full":
            return self.cells
        if scale == "mini":
            return self.mini_cells
        raise ValueError(f"scale must be 'full' or 'mini', got {scale!r}")

    def cell(self, name: str, scale: str = "full") -> Cell:
        """The cell called ``name`` at ``scale``."""
        for c in self.cells_at(scale):
            if c.name == name:
                return c
        known = ", ".join(c.name for c in self.cells_at(scale))
        raise KeyError(f"no cell {name!r} in table {self.name!r} at scale {scale!r}; cells: {known}")

    def config_path(self, cell: Cell, scale: str) -> str:
        """The cell's config file, relative to the repository root."""
        sub = "configs/mini" if scale == "mini" else "configs"
        return f"projects/{self.name}/{sub}/{cell.name}.yaml"

    def baseline_at(self, scale: str) -> str:
        """Name of the small-batch baseline cell at ``scale``."""
        return self.mini_baseline if scale == "mini" else self.baseline


def recipe_path(cell: Cell, scale: str) -> str:
    """The cell's recipe file, relative to the repository root."""
    return f"configs/recipes/{'mini/' if scale == 'mini' else ''}{cell.recipe}.yaml"


# --------------------------------------------------------------------------------------------
# the rules (module docstring) that give each cell its meaning
# --------------------------------------------------------------------------------------------

def _epochs_to_iters(epochs: float, batch: int, images: int = COCO_TRAIN_IMAGES) -> int:
    return int(math.ceil(epochs * images / batch))


def _round10(x: float) -> int:
    return max(10, int(round(x / 10.0)) * 10)


def _agvm_window(warmup: int, batch: int, margin: int = 100, interval: Optional[int] = None):
    """The AGVM cells' overrides: start at warm-up + margin, clip in warm-up ± margin, τ."""
    out = [("SOLVER.AGVM.START_ITER", warmup + margin),
           ("SOLVER.CLIP_GRADIENTS.ITER_RANGE", (max(0, warmup - margin), warmup + margin))]
    if interval is None and batch > 1024:
        interval = 5
    if interval is not None:
        out.append(("SOLVER.AGVM.INTERVAL", interval))
    return out


def _full_cell(project: str, section: str, epochs: Optional[float], batch: int, method: str, paper: float,
               iterations: int, name: str = "", **extra) -> Cell:
    """A full-scale cell; ``epochs``: its nominal length (None: from iterations × batch)."""
    images = ADE20K_TRAIN_IMAGES if project == "semantic_fpn" else COCO_TRAIN_IMAGES
    warmup = 1000 if batch <= 32 else _round10(2 * images / batch)
    if epochs is None:  # Semantic FPN: samples seen kept constant, cosine decay
        epochs, decay = round(iterations * batch / images, 2), ()
    elif epochs == 12:
        decay = (8.0, 11.0)
    else:  # Table 2: the release's epochs 12 and 14 of 16, i.e. 3/4 and 7/8 of training
        decay = (epochs * 3 / 4, epochs * 7 / 8)
    sgd_ref = 0.01 if project == "semantic_fpn" else 0.02
    overrides: List[Tuple[str, object]] = []
    if method in ("MegDet", "SGD", "SAM"):
        lr = LR("linear", 16, sgd_ref, "MegDet's linear rule")
    elif method == "LARS":
        lr = LR("sqrt", 16, 2.0, "square-root rule (our assumption)")
    elif method in ("AdamW", "AdamW+AGVM"):
        lr = LR("sqrt", 16, 1e-4, "square-root rule")
    elif method in ("LAMB", "PMD-LAMB"):
        lr = LR("sqrt", 16, 1e-3, "square-root rule (our assumption)")
    elif method == "AGVM":
        half = 0.5 if project == "semantic_fpn" else 1.0
        at512 = {"faster_rcnn": 0.38, "semantic_fpn": 0.16}.get(project, 0.32)
        if batch <= 32:
            lr = LR("linear", 16, sgd_ref, "MegDet's linear rule")
        elif batch == 256:
            lr = LR("fixed", 0, 0.16 * math.sqrt(2) * half, "the authors' release at batch 256: 0.16·√2")
        elif batch == 512:
            lr = LR("fixed", 0, at512, "the authors' release at batch 512")
        else:
            lr = LR("sqrt", 512, at512, "square-root rule from the release's batch-512 LR")
    else:
        raise ValueError(f"no rule for method {method!r}")
    if method in ("AGVM", "AdamW+AGVM"):
        overrides += _agvm_window(warmup, batch)
    elif method in ("MegDet", "SGD", "AdamW"):  # MEASURE_ONLY: Φ at the AGVM cells' iterations
        overrides += [o for o in _agvm_window(warmup, batch) if "CLIP" not in o[0]]
    overrides += extra.pop("overrides", ())
    return Cell(name or f"b{batch}_{METHOD_SLUGS[method]}", section, batch, method, paper, iterations,
                RECIPES[method], lr, warmup, epochs, decay, tuple(overrides), **extra)


def _grid(project: str, section: str, epochs: Optional[float], iters: Dict[int, int],
          values: Dict[str, Tuple]) -> List[Cell]:
    """Cells of a batch × method grid; ``values[method][i]`` is the paper number at the i-th
    batch of ``iters`` (None: the paper has no such cell, '-' in its table)."""
    cells = []
    for i, (batch, n) in enumerate(iters.items()):
        for method, column in values.items():
            if column[i] is None:
                continue
            approx = method in ("LAMB", "PMD-LAMB") and section.startswith("AdamW")
            cells.append(_full_cell(project, section, epochs, batch, method, column[i], n, approximate=approx))
    return cells


#: Images seen by every mini cell (iterations = MINI_IMAGES / batch): 480 iterations at batch 8.
MINI_IMAGES = 3840


def _mini_cell(batch: int, method: str, counterpart: str) -> Cell:
    iterations = MINI_IMAGES // batch
    warmup = max(1, 640 // batch)
    epochs = round(MINI_IMAGES / SHAPES_TRAIN_IMAGES, 2)
    decay = (round(epochs * 3 / 4, 2), round(epochs * 7 / 8, 2))
    overrides: List[Tuple[str, object]] = []
    name = f"b{batch}_{METHOD_SLUGS[method]}"
    recipe = RECIPES[method]
    if method in ("MegDet", "PMD-LAMB"):
        ref = {"MegDet": 0.02, "PMD-LAMB": 5e-3}[method]
        lr = LR("linear" if method == "MegDet" else "sqrt", 8, ref,
                "MegDet's linear rule" if method == "MegDet" else "square-root rule")
    elif method == "AdamW+AGVM":
        lr = LR("sqrt", 8, 5e-4, "square-root rule")
    else:  # AGVM and its μ = 1 twin ("SGD"): the batch-8 LR, larger ones diverged at this scale
        lr = LR("fixed", 0, 0.02, "the batch-8 LR: 0.04 and 0.08 diverged at this scale")
        recipe = "agvm_sgd"
        if method == "SGD":
            overrides.append(("SOLVER.AGVM.MEASURE_ONLY", True))
    if method in ("MegDet",):
        overrides += [o for o in _agvm_window(warmup, batch, 10, 5) if "CLIP" not in o[0]]
    elif method != "PMD-LAMB":
        overrides = _agvm_window(warmup, batch, 10) + overrides
    return Cell(name, "mini", batch, method, None, iterations, recipe, lr, warmup, epochs, decay,
                tuple(overrides), counterpart=counterpart)


_SGD16 = "Table 2 (SGD, 16 epochs)"
_SGD14 = "Table 2 (SGD, 14 epochs)"
_ADAMW = "AdamW family (12 epochs)"
_OPT = "SGD vs AdamW ± AGVM (batch 512, 12 epochs)"

_faster = _grid("faster_rcnn", _SGD16, 16, {32: 58640, 256: 7344, 512: 3680, 1024: 1840}, {
    "MegDet": (36.8, 36.1, 35.3, 34.2),
    "SAM": (36.0, 36.5, 35.3, 33.0),
    "AGVM": (36.8, 36.7, 36.7, 35.4),
})
_adamw_iters = {b: _epochs_to_iters(12, b) for b in (32, 256, 512, 1024)}
_adamw_iters[1536] = 924  # the paper's "4.2 minutes" run: 924 iterations (12 epochs would be 917)
_faster += _grid("faster_rcnn", _ADAMW, 12, _adamw_iters, {
    "AdamW+AGVM": (37.1, 37.2, 36.8, 37.0, 36.6),
    "AdamW": (None, None, 36.2, None, 35.9),
    "LAMB": (36.7, 36.2, 35.5, 34.8, 33.2),
    "PMD-LAMB": (36.7, 36.7, 36.5, 35.3, 33.5),
})
_faster += [
    _full_cell("faster_rcnn", _OPT, 12, 512, "SGD", 35.8, _epochs_to_iters(12, 512), name="b512_sgd_12ep"),
    _full_cell("faster_rcnn", _OPT, 12, 512, "AGVM", 36.7, _epochs_to_iters(12, 512), name="b512_agvm_12ep"),
]

_mask = _grid("mask_rcnn", _SGD14, 14, {32: 51310, 256: 6426, 512: 3220, 1024: 1610}, {
    "MegDet": (33.9, 33.7, 33.1, NAN),
    "SAM": (33.7, 33.9, 33.0, 31.0),
    "LARS": (34.0, 32.0, 30.4, 25.1),
    "AGVM": (33.9, 34.1, 33.9, 32.6),
})
_ABL = "Ablation (batch 512)"


def _ablation(name: str, paper: float, variant: str, key: str, value) -> Cell:
    return _full_cell("mask_rcnn", _ABL, 14, 512, "AGVM", paper, 3220, name=name, variant=variant,
                      parent="b512_agvm", overrides=((key, value),))


_mask += [
    _ablation("b512_agvm_anchor_neck", 33.3, "anchor: neck (FPN)", "SOLVER.AGVM.ANCHOR", "neck"),
    _ablation("b512_agvm_anchor_rpn", 33.1, "anchor: rpn (paper: 'RPN/box head')", "SOLVER.AGVM.ANCHOR", "rpn"),
    _ablation("b512_agvm_anchor_box_head", 33.1, "anchor: box_head (paper: 'RPN/box head')",
              "SOLVER.AGVM.ANCHOR", "box_head"),
    _ablation("b512_agvm_anchor_mask_head", 32.9, "anchor: mask_head", "SOLVER.AGVM.ANCHOR", "mask_head"),
    _ablation("b512_agvm_no_momentum", NAN, "α = 0 (no momentum on μ)", "SOLVER.AGVM.MOMENTUM", 0.0),
]

_semantic = _grid("semantic_fpn", "Table 2 (SGD, ADE20K)", None, {32: 160000, 512: 10000, 1024: 5000, 2048: 2500}, {
    "MegDet": (37.5, 36.7, 36.4, 36.2),
    "SAM": (38.8, 37.6, 37.5, 36.2),
    "AGVM": (37.5, 37.3, 37.3, 37.0),
})

_panoptic = _grid("panoptic_fpn", _SGD14, 14, {32: 51310, 256: 6426, 512: 3220, 1024: 1610}, {
    "MegDet": (38.9, 39.2, 38.7, NAN),
    "SAM": (39.0, 39.3, 38.7, NAN),
    "AGVM": (38.9, 39.3, 39.5, 38.8),
})

_retina_iters = {b: _epochs_to_iters(12, b) for b in (32, 4096, 10240)}
_retina = _grid("retinanet", "RetinaNet R18, extreme batch (12 epochs)", 12, _retina_iters, {
    "PMD-LAMB": (31.4, 23.5, NAN),
    "AdamW+AGVM": (32.8, 28.7, 26.7),
})

# batch 8 (lr 0.02) is the small-batch baseline; at batch 32, MegDet's linear rule (0.08), and
# AGVM beside its twin with μ held at 1 ("SGD": same LR, warm-up and clipping), so that the
# modulation is the only difference between those two
_MINI_SGD = tuple(_mini_cell(*spec) for spec in (
    (8, "MegDet", "b32_megdet"), (32, "MegDet", "b512_megdet"), (32, "SGD", "b512_megdet"), (32, "AGVM", "b512_agvm")))
_MINI_RETINA = tuple(_mini_cell(*spec) for spec in (
    (8, "PMD-LAMB", "b32_pmd_lamb"), (32, "PMD-LAMB", "b4096_pmd_lamb"), (32, "AdamW+AGVM", "b4096_adamw_agvm")))

TABLES: Dict[str, Table] = {
    "faster_rcnn": Table(
        "faster_rcnn", "Faster R-CNN R50-FPN, COCO 2017", "box AP", ("bbox", "AP"),
        tuple(_faster), _MINI_SGD, "b8_megdet", "b32_megdet",
    ),
    "mask_rcnn": Table(
        "mask_rcnn", "Mask R-CNN R50-FPN, COCO 2017", "mask AP", ("segm", "AP"),
        tuple(_mask), _MINI_SGD, "b8_megdet", "b32_megdet",
    ),
    "semantic_fpn": Table(
        "semantic_fpn", "Semantic FPN R50, ADE20K", "mIoU", ("sem_seg", "mIoU"),
        tuple(_semantic), _MINI_SGD, "b8_megdet", "b32_megdet",
    ),
    "panoptic_fpn": Table(
        "panoptic_fpn", "Panoptic FPN R50, COCO 2017 panoptic", "PQ", ("panoptic_seg", "PQ"),
        tuple(_panoptic), _MINI_SGD, "b8_megdet", "b32_megdet",
    ),
    "retinanet": Table(
        "retinanet", "RetinaNet R18-FPN, COCO 2017, extreme batch", "box AP", ("bbox", "AP"),
        tuple(_retina), _MINI_RETINA, "b8_pmd_lamb", "b32_pmd_lamb",
    ),
}


def get_table(name: str) -> Table:
    """The table of project ``name``; a clear error for unknown names."""
    try:
        return TABLES[name]
    except KeyError:
        raise KeyError(f"unknown table {name!r}; known: {', '.join(TABLES)}") from None


# --------------------------------------------------------------------------------------------
# the meaning check
# --------------------------------------------------------------------------------------------

def _get(cfg: Mapping, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b)
                and all(_same(x, y) for x, y in zip(a, b)))
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-9)
    return a == b


def _leaves(tree: Mapping, prefix: str = ""):
    for k, v in tree.items():
        if isinstance(v, Mapping):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def load_recipe(path: str) -> Dict[str, object]:
    """``{dotted key: value}`` set by a recipe yaml and the ``_BASE_`` files it inherits from
    (pure yaml; tuples written as ``(a, b)`` are parsed like detectron2 does)."""
    import yaml

    with open(path) as f:
        tree = yaml.safe_load(f) or {}
    out: Dict[str, object] = {}
    bases = tree.pop("_BASE_", [])
    for base in [bases] if isinstance(bases, str) else bases:
        out.update(load_recipe(os.path.join(os.path.dirname(path), base)))
    for key, value in _leaves(tree):
        if isinstance(value, str) and value.startswith("(") and value.endswith(")"):
            import ast

            value = ast.literal_eval(value)
        out[key] = value
    return out


_STEPS_COMMENT = re.compile(r"epochs\s+([\d.]+)\s+and\s+([\d.]+)\s+of\s+([\d.]+)")


def config_mismatches(table: Table, cell: Cell, scale: str, cfg: Mapping, text: str = "",
                      root: str = ".") -> List[str]:
    """What in ``cfg`` (the cell's merged config: a detectron2 CfgNode or nested dicts) does
    not mean what the table entry ``cell`` says; [] when it agrees.

    Checked: batch, iterations, warm-up, the effective base LR (BASE_LR, or SOLVER.LR_SCALING
    applied) against ``cell.lr`` at the batch (rel 1e-9), the LR decay iterations against
    ``cell.decay_at`` (±1 iteration) and, when ``text`` (the config file) is given, that the
    comment on its ``STEPS`` line states those epochs; every key of the recipe (other than the
    LR keys) and every override; OUTPUT_DIR = ``./output/<table>/<scale>/<cell>``.
    ``root``: the repository root (to find the recipe)."""
    s = cfg["SOLVER"]
    bad = []

    def expect(key, want):
        got = _get(cfg, key)
        if not _same(got, want):
            bad.append(f"{key} is {got!r}, the table says {want!r}")

    expect("SOLVER.IMS_PER_BATCH", cell.batch)
    expect("SOLVER.MAX_ITER", cell.iterations)
    expect("SOLVER.WARMUP_ITERS", cell.warmup_iters)
    scaling = s["LR_SCALING"]
    if scaling["RULE"] == "none":
        lr = s["BASE_LR"]
    else:
        lr = LR(scaling["RULE"], scaling["REFERENCE_IMS_PER_BATCH"], scaling["REFERENCE_LR"]).at(s["IMS_PER_BATCH"])
    want = cell.lr.at(cell.batch)
    if not math.isclose(lr, want, rel_tol=1e-9):
        bad.append(f"the base LR is {lr:g}, the table says {want:g} ({cell.lr.rule} rule: {cell.lr.note})")
    if cell.decay_at:
        per_epoch = cell.iterations / cell.epochs
        want_steps = [e * per_epoch for e in cell.decay_at]
        steps = list(s["STEPS"])
        if len(steps) != len(want_steps) or any(abs(a - b) > 1.0 for a, b in zip(steps, want_steps)):
            bad.append(f"SOLVER.STEPS is {tuple(steps)}, the table says epochs "
                       f"{' and '.join(f'{e:g}' for e in cell.decay_at)} of {cell.epochs:g} "
                       f"= iterations {tuple(round(x) for x in want_steps)}")
        line = next((ln for ln in text.splitlines() if ln.strip().startswith("STEPS:")), None)
        if text and line is not None:
            m = _STEPS_COMMENT.search(line)
            stated = tuple(float(x) for x in m.groups()) if m else None
            if stated is None or not all(math.isclose(a, b, abs_tol=0.01) for a, b in
                                         zip(stated, (*cell.decay_at, cell.epochs))):
                bad.append(f"the STEPS comment ({line.split('#', 1)[-1].strip() if '#' in line else 'none'}) does "
                           f"not say 'epochs {' and '.join(f'{e:g}' for e in cell.decay_at)} of {cell.epochs:g}'")
    else:
        expect("SOLVER.LR_SCHEDULER_NAME", "WarmupCosineLR")
    overrides = dict(cell.overrides)
    for key, value in load_recipe(os.path.join(root, recipe_path(cell, scale))).items():
        if key in overrides or key == "SOLVER.BASE_LR" or key.startswith("SOLVER.LR_SCALING."):
            continue
        expect(key, value)
    for key, value in cell.overrides:
        expect(key, value)
    expect("OUTPUT_DIR", f"./output/{table.name}/{scale}/{cell.name}")
    return bad
