"""The per-paper-table projects: configs, tables, launch scripts, reproduce_table, notebooks."""

import glob
import json
import math
import os
import subprocess
import sys

import pytest

from agvm.results import cell_output_dir, comparison_rows
from agvm.tables import TABLES, get_table
from projects_util import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROJECTS = sorted(TABLES)




def test_every_project_folder_is_complete():
    for name in PROJECTS:
        folder = os.path.join(ROOT, "projects", name)
        for f in ("train_net.py", "launch.sh", "check_results.ipynb", "README.md"):
            assert os.path.exists(os.path.join(folder, f)), (name, f)
        assert os.access(os.path.join(folder, "launch.sh"), os.X_OK)
        for scale in ("full", "mini"):
            for cell in TABLES[name].cells_at(scale):
                assert os.path.exists(os.path.join(ROOT, TABLES[name].config_path(cell, scale))), cell


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

    from projects_util import project_config_adders

    cfg = get_cfg()
    add_agvm_config(cfg)
    for add in project_config_adders(path):
        add(cfg)
    cfg.merge_from_file(path)
    cfg.merge_from_list(list(opts))
    return cfg


def _mismatches(table, cell, scale, path):
    from agvm.tables import config_mismatches

    return config_mismatches(table, cell, scale, _load_cfg(path), open(path).read(), ROOT)


def test_every_cell_config_means_its_table_entry():
    """The meaning test: each hand-owned cell config, merged with its bases, agrees with its
    entry in agvm/tables.py (batch, iterations, warm-up, LR by the stated rule, LR decay at
    the stated epochs with a comment that says so, the recipe's keys, the overrides)."""
    checked = 0
    for t in TABLES.values():
        for scale in ("full", "mini"):
            for c in t.cells_at(scale):
                assert _mismatches(t, c, scale, os.path.join(ROOT, t.config_path(c, scale))) == [], (t.name, c.name)
                checked += 1
    assert checked == sum(len(t.cells) + len(t.mini_cells) for t in TABLES.values()) > 100


def test_a_hand_edited_cell_that_keeps_its_meaning_passes_and_one_that_changes_it_fails(tmp_path):
    """A researcher rewrites b512_agvm by hand: reordered keys, the LR written as a rule instead
    of a value, other comments. It still means its entry. Changing the batch does not."""
    import shutil

    t = get_table("faster_rcnn")
    cell = t.cell("b512_agvm")
    folder = tmp_path / "projects" / "faster_rcnn" / "configs"
    shutil.copytree(os.path.join(ROOT, "projects", "faster_rcnn", "configs"), folder)
    shutil.copytree(os.path.join(ROOT, "configs"), tmp_path / "configs")
    edited = folder / "b512_agvm.yaml"
    edited.write_text(
        '_BASE_: ["Base-faster_rcnn_R50_FPN.yaml", "../../../configs/recipes/agvm_sgd.yaml"]\n'
        "OUTPUT_DIR: ./output/faster_rcnn/full/b512_agvm\n"
        "SOLVER:\n"
        "  LR_SCALING: {RULE: sqrt, REFERENCE_IMS_PER_BATCH: 128, REFERENCE_LR: 0.19}  # 0.19 * sqrt(4)\n"
        "  CLIP_GRADIENTS: {ITER_RANGE: [360, 560]}\n"
        "  AGVM: {START_ITER: 560}\n"
        "  WARMUP_ITERS: 460\n"
        "  STEPS: (2760, 3220)  # the release: epochs 12 and 14 of 16\n"
        "  MAX_ITER: 3680\n"
        "  IMS_PER_BATCH: 512\n")
    assert _mismatches(t, cell, "full", str(edited)) == []

    edited.write_text(edited.read_text().replace("IMS_PER_BATCH: 512", "IMS_PER_BATCH: 1024"))
    problems = _mismatches(t, cell, "full", str(edited))
    assert any("SOLVER.IMS_PER_BATCH is 1024, the table says 512" in p for p in problems), problems
    assert any("the base LR" in p for p in problems), problems  # the sqrt rule now gives another LR

    edited.write_text(edited.read_text().replace("IMS_PER_BATCH: 1024", "IMS_PER_BATCH: 512")
                      .replace("epochs 12 and 14 of 16", "epochs 8 and 11 of 12"))
    assert _mismatches(t, cell, "full", str(edited)) == ["the STEPS comment (the release: epochs 8 and 11 of 12) does "
                                                         "not say 'epochs 12 and 14 of 16'"]
    edited.write_text(edited.read_text().replace("AGVM: {START_ITER: 560}", "AGVM: {START_ITER: 560, MOMENTUM: 0.9}"))
    assert any("SOLVER.AGVM.MOMENTUM is 0.9, the table says 0.97" in p for p in
               _mismatches(t, cell, "full", str(edited)))


def test_ablations_are_one_key_deltas_on_their_parent():
    import yaml

    mask = get_table("mask_rcnn")
    ablations = [c for c in mask.cells if c.parent]
    assert len(ablations) == 5
    for c in ablations:
        tree = yaml.safe_load(open(os.path.join(ROOT, mask.config_path(c, "full"))))
        assert tree.pop("_BASE_") == f"{c.parent}.yaml" and tree.pop("OUTPUT_DIR").endswith(c.name)
        (key, value), = [o for o in c.overrides if o not in mask.cell(c.parent).overrides]
        node = tree
        for part in key.split("."):
            assert list(node) == [part], (c.name, node)  # nothing but the one key
            node = node[part]
        assert node == value


def test_learning_rates_by_the_stated_rules():
    def lr(table, cell):
        c = get_table(table).cell(cell)
        return c.lr.at(c.batch)

    assert lr("faster_rcnn", "b1024_megdet") == pytest.approx(1.28)
    assert lr("faster_rcnn", "b512_agvm") == pytest.approx(0.38)
    assert lr("faster_rcnn", "b1024_agvm") == pytest.approx(0.38 * math.sqrt(2))
    assert lr("mask_rcnn", "b256_agvm") == pytest.approx(0.16 * math.sqrt(2))
    assert lr("mask_rcnn", "b512_agvm") == pytest.approx(0.32)
    assert lr("semantic_fpn", "b512_megdet") == pytest.approx(0.32)
    assert lr("faster_rcnn", "b1536_adamw_agvm") == pytest.approx(1e-4 * math.sqrt(96))
    c = get_table("faster_rcnn").cell("b512_agvm")
    assert (c.warmup_iters, dict(c.overrides)["SOLVER.AGVM.START_ITER"], c.decay_at, c.epochs) == (460, 560, (12, 14), 16)
    assert get_table("mask_rcnn").cell("b512_agvm").decay_at == (10.5, 12.25)  # 14 epochs
    assert get_table("retinanet").cell("b4096_adamw_agvm").decay_at == (8, 11)
    assert dict(get_table("retinanet").cell("b4096_adamw_agvm").overrides)["SOLVER.AGVM.INTERVAL"] == 5


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
    reproduce = load_script("reproduce_table")
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
    project's notebook executed on that output (the other cells are missing). The tiny run is
    not the cell (4 iterations, batch 4): the table and the notebook say "mismatched" with the
    differing keys, give it no Δ, and print the command that produces the cells."""
    import nbformat
    from nbclient import NotebookClient

    table = get_table(project)
    cell = [c for c in table.mini_cells if "AGVM" in c.method][0]
    root = tiny_shapes / "out"
    md = tiny_shapes / "{table}_{scale}.md"
    extra = SCORE.get(project, ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"])
    rc = load_script("reproduce_table").main(
        ["--table", project, "--scale", "mini", cell.name, "--output-root", str(root), "--results", str(md), "--", *TINY, *extra])
    out = cell_output_dir(str(root), project, "mini", cell.name)
    log = open(os.path.join(out, "stdout.log")).read()
    assert rc == 0, log[-3000:]
    row = [r for r in comparison_rows(table, "mini", str(root)) if r["cell"] == cell.name][0]
    assert row["status"] == "mismatched" and math.isfinite(row["measured"]) and row["diff"] is None
    assert any(m.startswith("SOLVER.MAX_ITER is 4") for m in row["mismatches"]), row["mismatches"]
    report = open(str(md).format(table=project, scale="mini")).read()
    assert f"| {cell.name} | {cell.batch} |" in report and "missing" in report
    assert "mismatched: " in report and "SOLVER.MAX_ITER is 4" in report

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
    assert f"0 of {len(table.mini_cells)} cells have a final {table.metric}" in text
    assert f"mismatched (1): {cell.name}" in text and f"{cell.name} is not that cell's run: " in text
    assert f"missing ({len(table.mini_cells) - 1})" in text
    assert f"python scripts/reproduce_table.py --table {project} --scale mini --rerun " in text
    assert "image/png" in text  # the Φ (and μ) figures


def test_reproduce_table_checks_every_cell_before_launching(tmp_path, capsys):
    """Bad value, unknown key, a key without effect: the command fails (exit 2) before any run,
    naming the cell, key and value; nothing is written. A cell edited away from its table entry
    runs with a warning that says what changed."""
    reproduce = load_script("reproduce_table")
    root = tmp_path / "out"
    base = ["--table", "faster_rcnn", "--scale", "mini", "--output-root", str(root)]
    cases = [
        (["b32_agvm", "--", "SOLVER.AGVM.MOMENTUM", "1.5"], "cell faster_rcnn/b32_agvm: SOLVER.AGVM.MOMENTUM=1.5 must be in [0, 1)"),
        (["--", "SOLVER.AGVM.MOMENTOM", "0.9"], "SOLVER.AGVM.MOMENTOM"),
        (["b8_megdet", "--", "SOLVER.AGVM.MOMENTUM", "0.9"], "SOLVER.AGVM.MOMENTUM=0.9 would have no effect"),
    ]
    for extra, message in cases:
        assert reproduce.main(base + extra) == 2
        err = capsys.readouterr().err
        assert message in err, err
    assert not root.exists()

    warned = reproduce.main(base + ["--dry-run", "b32_agvm", "--", "SOLVER.IMS_PER_BATCH", "16"])
    assert warned == 0
    err = capsys.readouterr().err
    assert "WARNING" not in err  # a key given on the command line is the user's intent, not an edit


@pytest.mark.parametrize("project", PROJECTS)
def test_a_run_of_the_cell_itself_is_not_mismatched(project, tmp_path):
    """The config.yaml detectron2 writes for a cell's own config (no overrides) reads back as
    that cell (status not "mismatched"), for every mini cell; one changed key makes it mismatched."""
    import yaml

    from agvm.detectron2.checks import check_run_config
    from agvm.results import run_mismatches

    table = get_table(project)
    for cell in table.mini_cells:
        cfg = check_run_config(os.path.join(ROOT, table.config_path(cell, "mini")))
        out = tmp_path / cell.name
        out.mkdir()
        (out / "config.yaml").write_text(cfg.dump())
        assert run_mismatches(table, cell, "mini", str(out)) == [], cell.name
        changed = yaml.safe_load(cfg.dump())
        changed["SOLVER"]["MAX_ITER"] += 1
        (out / "config.yaml").write_text(yaml.safe_dump(changed))
        assert [m.split(" is ")[0] for m in run_mismatches(table, cell, "mini", str(out))] == ["SOLVER.MAX_ITER"]
