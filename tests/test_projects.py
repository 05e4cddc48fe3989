"""The per-paper-table projects: configs, tables, launch scripts, reproduce_table, notebooks."""

import glob
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from agvm.results import cell_output_dir, comparison_rows
from agvm.tables import TABLES, get_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECTS = sorted(TABLES)


def _load_script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_project_folder_is_complete():
    for name in PROJECTS:
        folder = os.path.join(ROOT, "projects", name)
        for f in ("train_net.py", "launch.sh", "check_results.ipynb", "README.md"):
            assert os.path.exists(os.path.join(folder, f)), (name, f)
        assert os.access(os.path.join(folder, "launch.sh"), os.X_OK)
        for scale in ("full", "mini"):
            for cell in TABLES[name].cells_at(scale):
                assert os.path.exists(os.path.join(ROOT, TABLES[name].config_path(cell, scale))), cell


def test_generated_files_are_up_to_date(capsys):
    # configs, notebooks, READMEs and launch scripts are written by make_project_files.py
    assert _load_script("make_project_files").main(["--check"]) == 0, capsys.readouterr().out


def test_paper_numbers_and_iterations():
    faster = get_table("faster_rcnn")
    assert faster.cell("b512_agvm").paper == 36.7 and faster.cell("b512_agvm").iterations == 3680
    assert faster.cell("b1536_adamw_agvm").iterations == 924 and faster.cell("b1536_adamw").paper == 35.9
    assert faster.cell("b1024_lamb").approximate and not faster.cell("b1024_agvm").approximate
    mask = get_table("mask_rcnn")
    assert math.isnan(mask.cell("b1024_megdet").paper) and mask.cell("b1024_lars").paper == 25.1
    assert math.isnan(mask.cell("b512_agvm_no_momentum").paper)
    assert get_table("semantic_fpn").cell("b2048_agvm").iterations == 2500
    assert math.isnan(get_table("retinanet").cell("b10240_pmd_lamb").paper)
    # every mini cell imitates a real full-scale cell
    for t in TABLES.values():
        for c in t.mini_cells:
            t.cell(c.counterpart)
        assert len({c.name for c in t.cells}) == len(t.cells)
    with pytest.raises(KeyError, match="unknown table 'nope'"):
        get_table("nope")
    with pytest.raises(KeyError, match="no cell 'b7_agvm'"):
        faster.cell("b7_agvm")


def _load_cfg(path, *opts):
    from detectron2.config import get_cfg

    from agvm.detectron2 import add_agvm_config

    cfg = get_cfg()
    add_agvm_config(cfg)
    cfg.merge_from_file(path)
    cfg.merge_from_list(list(opts))
    return cfg


METHOD_OPTIMIZER = {"MegDet": "SGD", "SGD": "SGD", "AGVM": "SGD", "SAM": "SAM", "LARS": "LARS",
                    "AdamW": "AdamW", "AdamW+AGVM": "AdamW", "LAMB": "LAMB", "PMD-LAMB": "PMD_LAMB"}


def test_cell_configs_match_their_cells():
    from agvm.solver import scale_lr

    for t in TABLES.values():
        for scale in ("full", "mini"):
            for c in t.cells_at(scale):
                cfg = _load_cfg(os.path.join(ROOT, t.config_path(c, scale)))
                s = cfg.SOLVER
                assert s.IMS_PER_BATCH == c.batch and s.MAX_ITER == c.iterations, c
                assert s.OPTIMIZER == METHOD_OPTIMIZER[c.method], c
                assert s.AGVM.ENABLED == ("AGVM" in c.method or c.method in ("MegDet", "SGD", "AdamW")), c
                assert s.AGVM.MEASURE_ONLY == (c.method in ("MegDet", "SGD", "AdamW")), c
                assert cfg.OUTPUT_DIR == f"./output/{t.name}/{scale}/{c.name}"
                if s.AGVM.ENABLED:
                    assert s.WARMUP_ITERS < s.AGVM.START_ITER < s.MAX_ITER, c
    # learning rates by the stated rules, exact values
    def lr(table, cell):
        s = _load_cfg(os.path.join(ROOT, get_table(table).config_path(get_table(table).cell(cell), "full"))).SOLVER
        if s.LR_SCALING.RULE == "none":
            return s.BASE_LR
        return scale_lr(s.LR_SCALING.REFERENCE_LR, s.LR_SCALING.REFERENCE_IMS_PER_BATCH, s.IMS_PER_BATCH, s.LR_SCALING.RULE)

    assert lr("faster_rcnn", "b1024_megdet") == pytest.approx(1.28)
    assert lr("faster_rcnn", "b512_agvm") == pytest.approx(0.38)
    assert lr("faster_rcnn", "b1024_agvm") == pytest.approx(0.38 * math.sqrt(2))
    assert lr("mask_rcnn", "b256_agvm") == pytest.approx(0.16 * math.sqrt(2))
    assert lr("mask_rcnn", "b512_agvm") == pytest.approx(0.32)
    assert lr("faster_rcnn", "b1536_adamw_agvm") == pytest.approx(1e-4 * math.sqrt(96))
    s = _load_cfg(os.path.join(ROOT, "projects/faster_rcnn/configs/b512_agvm.yaml")).SOLVER
    assert (s.WARMUP_ITERS, s.AGVM.START_ITER, tuple(s.CLIP_GRADIENTS.ITER_RANGE), s.STEPS) == (460, 560, (360, 560), (2760, 3220))
    assert _load_cfg(os.path.join(ROOT, "projects/mask_rcnn/configs/b512_agvm_anchor_neck.yaml")).SOLVER.AGVM.ANCHOR == "neck"


def test_every_config_builds_its_model_and_optimizer():
    """Every yaml under projects/ loads; each distinct model builds on CPU (SyncBN → BN, no
    weights); every cell's optimizer builds on it (modules, anchor and optimizer settings)."""
    from detectron2.modeling import build_model

    from agvm.detectron2 import build_agvm_optimizer, check_agvm_config

    paths = sorted(glob.glob(os.path.join(ROOT, "projects", "*", "configs", "**", "*.yaml"), recursive=True))
    assert len(paths) > 100
    models = {}
    small = ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.RESNETS.NORM", "BN", "MODEL.FPN.NORM", ""]
    for path in paths:
        cfg = _load_cfg(path, *small)
        check_agvm_config(cfg)
        key = cfg.MODEL.dump()
        if key not in models:
            models[key] = build_model(cfg)
        optimizer = build_agvm_optimizer(cfg, models[key])
        assert optimizer.param_groups, path
    assert len(models) >= 10  # 5 full-scale + 5 mini architectures (and the older mini variants)


def test_launch_dry_run_three_modes():
    def run(*args):
        out = subprocess.run(["bash", os.path.join(ROOT, "projects", "mask_rcnn", "launch.sh"), "--dry-run",
                              "--python", "python", *args],
                             capture_output=True, text=True, cwd="/", env=dict(os.environ, PYTHON=sys.executable))
        assert out.returncode == 0, out.stderr
        return [line for line in out.stdout.strip().splitlines() if not line.startswith("#")]

    local = run("--num-gpus", "8", "b512_agvm")
    # 512 images on 8 GPUs at most 16 per forward: 4 micro-batches (the global batch is kept)
    assert local == ["python projects/mask_rcnn/train_net.py --config-file projects/mask_rcnn/configs/b512_agvm.yaml "
                     "--num-gpus 8 OUTPUT_DIR output/mask_rcnn/full/b512_agvm SOLVER.GRAD_ACCUM_STEPS 4"]
    machines = run("--launcher", "machines", "--num-machines", "2", "--machine-rank", "1",
                   "--dist-url", "tcp://node0:29500", "--num-gpus", "8", "b512_megdet", "--", "SOLVER.AGVM.INTERVAL", "5")
    assert machines == ["python projects/mask_rcnn/train_net.py --config-file projects/mask_rcnn/configs/b512_megdet.yaml "
                        "--num-gpus 8 --num-machines 2 --machine-rank 1 --dist-url tcp://node0:29500 "
                        "OUTPUT_DIR output/mask_rcnn/full/b512_megdet SOLVER.GRAD_ACCUM_STEPS 2 SOLVER.AGVM.INTERVAL 5"]
    slurm = run("--launcher", "slurm", "--num-machines", "4", "--num-gpus", "8", "--srun-args=--partition=gpu")
    assert len(slurm) == len(TABLES["mask_rcnn"].cells)
    assert slurm[0].startswith("srun --nodes=4 --ntasks-per-node=8 --gpus-per-node=8 --partition=gpu python "
                               "projects/mask_rcnn/train_net.py --config-file projects/mask_rcnn/configs/b32_megdet.yaml "
                               '--dist-url tcp://$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1):29500 ')
    bad = subprocess.run(["bash", os.path.join(ROOT, "projects", "mask_rcnn", "launch.sh"), "--dry-run", "--launcher",
                          "machines", "--num-machines", "2"], capture_output=True, text=True,
                         env=dict(os.environ, PYTHON=sys.executable))
    assert bad.returncode == 2 and "--dist-url" in bad.stderr


@pytest.mark.parametrize("scale", ["mini", "full"])
def test_reproduce_table_dry_run_lists_every_cell(scale, capsys):
    reproduce = _load_script("reproduce_table")
    assert reproduce.main(["--table", "all", "--scale", scale, "--dry-run"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    lines = [line for line in out if not line.startswith("#")]
    expected = [(t, c) for t in TABLES.values() for c in t.cells_at(scale)]
    assert len(lines) == len(expected) == len(out) - len(lines)  # one "# per-GPU batch" line per cell
    for line, (t, c) in zip(lines, expected):
        assert f"--config-file {t.config_path(c, scale)} " in line and f"OUTPUT_DIR output/{t.name}/{scale}/{c.name}" in line
    assert reproduce.main(["--table", "faster_rcnn", "--scale", scale, "--dry-run", "b9_nope"]) == 2


def _write_run(folder, records=(), results=None, run=None):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "metrics.json"), "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    if results is not None:
        with open(os.path.join(folder, "eval_results.json"), "w") as f:
            json.dump(results, f)
    if run is not None:
        with open(os.path.join(folder, "agvm_run.json"), "w") as f:
            json.dump(run, f)


def test_comparison_rows_statuses(tmp_path):
    from agvm.results import rows_to_markdown

    t = get_table("mask_rcnn")
    d = lambda cell: cell_output_dir(str(tmp_path), "mask_rcnn", "full", cell)  # noqa: E731
    _write_run(d("b32_megdet"), [{"iteration": 9, "total_loss": 1.0}], {"segm": {"AP": 34.4}}, {"returncode": 0, "wall_s": 60})
    _write_run(d("b512_agvm"), [{"iteration": 9, "total_loss": 1.0}], {"segm": {"AP": 33.0}})
    _write_run(d("b1024_megdet"), [{"iteration": 3, "total_loss": float("nan")}], None, {"returncode": 1})
    _write_run(d("b256_agvm"), [{"iteration": 3, "total_loss": 2.0}])
    with open(os.path.join(d("b256_agvm"), "metrics.json"), "a") as f:
        f.write('{"iteration": 4, "total_lo')  # killed while writing
    rows = {r["cell"]: r for r in comparison_rows(t, "full", str(tmp_path))}
    assert rows["b32_megdet"]["status"] == "ok" and rows["b32_megdet"]["diff"] == pytest.approx(0.5)
    assert rows["b512_agvm"]["vs_baseline"] == pytest.approx(-1.4) and rows["b512_agvm"]["diff"] == pytest.approx(-0.9)
    assert rows["b1024_megdet"]["status"] == "failed" and rows["b256_agvm"]["status"] == "incomplete"
    assert rows["b1024_sam"]["status"] == "missing" and rows["b1024_sam"]["measured"] is None
    md = rows_to_markdown(list(rows.values()), "mask AP", "full")
    assert "| b1024_megdet | 1024 | MegDet | NaN | — | — | — | failed (as in the paper) | — |" in md
    assert "| b32_megdet | 32 | MegDet | 33.9 | 34.4 | +0.5 | +0.0 | ok | 1.0 min |" in md


TINY = ["SOLVER.MAX_ITER", "4", "SOLVER.IMS_PER_BATCH", "4", "SOLVER.WARMUP_ITERS", "1", "SOLVER.STEPS", "(3,)",
        "SOLVER.AGVM.START_ITER", "1", "SOLVER.AGVM.INTERVAL", "2", "SOLVER.CLIP_GRADIENTS.ITER_RANGE", "(0, 2)",
        "DATALOADER.NUM_WORKERS", "0"]
SCORE = {"retinanet": ["MODEL.RETINANET.SCORE_THRESH_TEST", "0.0"]}


@pytest.mark.parametrize("project", PROJECTS)
def test_tiny_run_reproduce_table_and_notebook(project, tiny_shapes):
    """A tiny real run of the project's mini AGVM cell through reproduce_table.py, then the
    project's notebook executed on that output (the other cells are missing)."""
    import nbformat
    from nbclient import NotebookClient

    table = get_table(project)
    cell = [c for c in table.mini_cells if "AGVM" in c.method][0]
    root = tiny_shapes / "out"
    md = tiny_shapes / "{table}_{scale}.md"
    extra = SCORE.get(project, ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"])
    rc = _load_script("reproduce_table").main(
        ["--table", project, "--scale", "mini", cell.name, "--output-root", str(root), "--results", str(md), "--", *TINY, *extra])
    out = cell_output_dir(str(root), project, "mini", cell.name)
    log = open(os.path.join(out, "stdout.log")).read()
    assert rc == 0, log[-3000:]
    row = [r for r in comparison_rows(table, "mini", str(root)) if r["cell"] == cell.name][0]
    assert row["status"] == "ok" and math.isfinite(row["measured"])
    report = open(str(md).format(table=project, scale="mini")).read()
    assert f"| {cell.name} | {cell.batch} |" in report and "missing" in report

    nb = nbformat.read(os.path.join(ROOT, "projects", project, "check_results.ipynb"), as_version=4)
    env = {"AGVM_SCALE": "mini", "AGVM_RESULTS_ROOT": str(root)}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3",
                       resources={"metadata": {"path": os.path.join(ROOT, "projects", project)}}).execute()
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    texts = []
    for c in nb.cells:
        for o in c.get("outputs", []):
            texts.append(o.get("text", "") + json.dumps(o.get("data", {})))
    text = "\n".join(texts)
    assert f"1 of {len(table.mini_cells)} cells have a final {table.metric}" in text
    assert f"missing ({len(table.mini_cells) - 1})" in text and cell.name in text
    assert "image/png" in text  # the Φ (and μ) figures
