"""The paper's tables as data: every cell (pipeline, batch, method), its config and its number.

One :class:`Table` per project folder (``projects/<name>``). Each cell at full scale points at
its config ``projects/<name>/configs/<cell>.yaml`` and carries the paper's number (agvm-spec §3:
Table 2, the AdamW-family table, the RetinaNet extreme-batch rows, the Mask R-CNN ablations);
the ``mini`` cells are CPU-sized stand-ins on the embedded shapes dataset
(``projects/<name>/configs/mini/<cell>.yaml``), each naming the full-scale cell it imitates.

Used by ``scripts/reproduce_table.py``, ``scripts/make_project_files.py``, the projects'
``launch.sh`` and ``check_results.ipynb`` (through :mod:`agvm.results`). Pure Python: no torch,
no detectron2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

__all__ = ["Cell", "Table", "TABLES", "get_table", "COCO_TRAIN_IMAGES", "ADE20K_TRAIN_IMAGES"]

NAN = float("nan")

#: Images in COCO 2017 train (detectron2's ``coco_2017_train``, with crowd-only images).
COCO_TRAIN_IMAGES = 117266
#: Images in ADE20K (SceneParsing) train.
ADE20K_TRAIN_IMAGES = 20210

#: Method label (a column of the paper's tables) -> cell-name suffix.
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


@dataclass(frozen=True)
class Cell:
    """One cell of a table: a training run.

    Attributes:
        name: the cell's name, also its config file stem and output folder, e.g. ``b512_agvm``.
        section: which of the project's tables it belongs to, e.g. ``"Table 2 (SGD)"``.
        batch: global images per iteration (``SOLVER.IMS_PER_BATCH``).
        method: the column label (a key of ``METHOD_SLUGS``).
        paper: the paper's number for it (the table's metric, in %); ``nan`` = the paper
            reports a failed (NaN) run; ``None`` = not in the paper (mini cells).
        iterations: ``SOLVER.MAX_ITER`` (the paper's iteration column where it gives one).
        variant: extra description of an ablation ("anchor: neck", "α = 0"); "" otherwise.
        counterpart: for mini cells, the full-scale cell it imitates (its paper number is shown
            beside the mini result); "" for full-scale cells.
        approximate: the paper number was read off a plot (±0.2).
    """

    name: str
    section: str
    batch: int
    method: str
    paper: Optional[float]
    iterations: int
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


def _epochs_to_iters(epochs: float, batch: int, images: int = COCO_TRAIN_IMAGES) -> int:
    return int(math.ceil(epochs * images / batch))


def _name(batch: int, method: str, suffix: str = "") -> str:
    return f"b{batch}_{METHOD_SLUGS[method]}{suffix}"


def _grid(section: str, iters: Dict[int, int], values: Dict[str, Tuple]) -> List[Cell]:
    """Cells of a batch × method grid; ``values[method][i]`` is the paper number at the i-th
    batch of ``iters`` (None: the paper has no such cell, '-' in its table)."""
    cells = []
    for i, (batch, n) in enumerate(iters.items()):
        for method, column in values.items():
            if column[i] is None:
                continue
            approx = method in ("LAMB", "PMD-LAMB") and section.startswith("AdamW")
            cells.append(Cell(_name(batch, method), section, batch, method, column[i], n, approximate=approx))
    return cells


def _mini(specs) -> Tuple[Cell, ...]:
    """Mini cells: (batch, method, counterpart) with a fixed budget of images seen."""
    out = []
    for batch, method, counterpart in specs:
        out.append(Cell(_name(batch, method), "mini", batch, method, None, MINI_IMAGES // batch,
                        counterpart=counterpart))
    return tuple(out)


#: Images seen by every mini cell (iterations = MINI_IMAGES / batch): 480 iterations at batch 8.
MINI_IMAGES = 3840

_SGD16 = "Table 2 (SGD, 16 epochs)"
_SGD14 = "Table 2 (SGD, 14 epochs)"
_ADAMW = "AdamW family (12 epochs)"
_OPT = "SGD vs AdamW ± AGVM (batch 512, 12 epochs)"

_faster = _grid(_SGD16, {32: 58640, 256: 7344, 512: 3680, 1024: 1840}, {
    "MegDet": (36.8, 36.1, 35.3, 34.2),
    "SAM": (36.0, 36.5, 35.3, 33.0),
    "AGVM": (36.8, 36.7, 36.7, 35.4),
})
_adamw_iters = {b: _epochs_to_iters(12, b) for b in (32, 256, 512, 1024)}
_adamw_iters[1536] = 924  # the paper's "4.2 minutes" run: 924 iterations (12 epochs would be 917)
_faster += _grid(_ADAMW, _adamw_iters, {
    "AdamW+AGVM": (37.1, 37.2, 36.8, 37.0, 36.6),
    "AdamW": (None, None, 36.2, None, 35.9),
    "LAMB": (36.7, 36.2, 35.5, 34.8, 33.2),
    "PMD-LAMB": (36.7, 36.7, 36.5, 35.3, 33.5),
})
_faster += [
    Cell("b512_sgd_12ep", _OPT, 512, "SGD", 35.8, _epochs_to_iters(12, 512)),
    Cell("b512_agvm_12ep", _OPT, 512, "AGVM", 36.7, _epochs_to_iters(12, 512)),
]

_mask = _grid(_SGD14, {32: 51310, 256: 6426, 512: 3220, 1024: 1610}, {
    "MegDet": (33.9, 33.7, 33.1, NAN),
    "SAM": (33.7, 33.9, 33.0, 31.0),
    "LARS": (34.0, 32.0, 30.4, 25.1),
    "AGVM": (33.9, 34.1, 33.9, 32.6),
})
_ABL = "Ablation (batch 512)"
_mask += [
    Cell("b512_agvm_anchor_neck", _ABL, 512, "AGVM", 33.3, 3220, variant="anchor: neck (FPN)"),
    Cell("b512_agvm_anchor_rpn", _ABL, 512, "AGVM", 33.1, 3220, variant="anchor: rpn (paper: 'RPN/box head')"),
    Cell("b512_agvm_anchor_box_head", _ABL, 512, "AGVM", 33.1, 3220,
         variant="anchor: box_head (paper: 'RPN/box head')"),
    Cell("b512_agvm_anchor_mask_head", _ABL, 512, "AGVM", 32.9, 3220, variant="anchor: mask_head"),
    Cell("b512_agvm_no_momentum", _ABL, 512, "AGVM", NAN, 3220, variant="α = 0 (no momentum on μ)"),
]

_semantic = _grid("Table 2 (SGD, ADE20K)", {32: 160000, 512: 10000, 1024: 5000, 2048: 2500}, {
    "MegDet": (37.5, 36.7, 36.4, 36.2),
    "SAM": (38.8, 37.6, 37.5, 36.2),
    "AGVM": (37.5, 37.3, 37.3, 37.0),
})

_panoptic = _grid(_SGD14, {32: 51310, 256: 6426, 512: 3220, 1024: 1610}, {
    "MegDet": (38.9, 39.2, 38.7, NAN),
    "SAM": (39.0, 39.3, 38.7, NAN),
    "AGVM": (38.9, 39.3, 39.5, 38.8),
})

_retina_iters = {b: _epochs_to_iters(12, b) for b in (32, 4096, 10240)}
_retina = _grid("RetinaNet R18, extreme batch (12 epochs)", _retina_iters, {
    "PMD-LAMB": (31.4, 23.5, NAN),
    "AdamW+AGVM": (32.8, 28.7, 26.7),
})

# batch 8 (lr 0.02) is the small-batch baseline; at batch 32, MegDet's linear rule (0.08), and
# AGVM beside its twin with μ held at 1 ("SGD": same LR, warm-up and clipping), so that the
# modulation is the only difference between those two (scripts/make_project_files.py)
_MINI_SGD = ((8, "MegDet", "b32_megdet"), (32, "MegDet", "b512_megdet"), (32, "SGD", "b512_megdet"),
             (32, "AGVM", "b512_agvm"))

TABLES: Dict[str, Table] = {
    "faster_rcnn": Table(
        "faster_rcnn", "Faster R-CNN R50-FPN, COCO 2017", "box AP", ("bbox", "AP"),
        tuple(_faster), _mini(_MINI_SGD), "b8_megdet", "b32_megdet",
    ),
    "mask_rcnn": Table(
        "mask_rcnn", "Mask R-CNN R50-FPN, COCO 2017", "mask AP", ("segm", "AP"),
        tuple(_mask), _mini(_MINI_SGD), "b8_megdet", "b32_megdet",
    ),
    "semantic_fpn": Table(
        "semantic_fpn", "Semantic FPN R50, ADE20K", "mIoU", ("sem_seg", "mIoU"),
        tuple(_semantic), _mini(_MINI_SGD), "b8_megdet", "b32_megdet",
    ),
    "panoptic_fpn": Table(
        "panoptic_fpn", "Panoptic FPN R50, COCO 2017 panoptic", "PQ", ("panoptic_seg", "PQ"),
        tuple(_panoptic), _mini(_MINI_SGD), "b8_megdet", "b32_megdet",
    ),
    "retinanet": Table(
        "retinanet", "RetinaNet R18-FPN, COCO 2017, extreme batch", "box AP", ("bbox", "AP"),
        tuple(_retina),
        _mini(((8, "PMD-LAMB", "b32_pmd_lamb"), (32, "PMD-LAMB", "b4096_pmd_lamb"),
                            (32, "AdamW+AGVM", "b4096_adamw_agvm"))),
        "b8_pmd_lamb", "b32_pmd_lamb",
    ),
}


def get_table(name: str) -> Table:
    """The table of project ``name``; a clear error for unknown names."""
    try:
        return TABLES[name]
    except KeyError:
        raise KeyError(f"unknown table {name!r}; known: {', '.join(TABLES)}") from None
