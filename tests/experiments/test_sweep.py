"""scripts/sweep.py (grid expansion, batch rules, resume, aggregation) and scripts/plot_variance.py."""

import csv
import json
import os

import pytest
from projects_util import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
AGVM_MINI = os.path.join(ROOT, "projects", "faster_rcnn", "configs", "mini", "b32_agvm.yaml")




sweep = load_script("sweep")


def test_grid_expansion():
    grid = sweep.parse_grid(["SOLVER.AGVM.MOMENTUM=0.95,0.97,0.98", "SOLVER.AGVM.INTERVAL=5, 10"])
    assert grid == [("SOLVER.AGVM.MOMENTUM", ["0.95", "0.97", "0.98"]), ("SOLVER.AGVM.INTERVAL", ["5", "10"])]
    cells = sweep.expand(grid, [0, 1])
    assert len(cells) == 12 and len({c["name"] for c in cells}) == 12
    assert cells[0] == {"name": "momentum-0.95_interval-5_seed-0", "seed": 0,
                        "point": {"SOLVER.AGVM.MOMENTUM": "0.95", "SOLVER.AGVM.INTERVAL": "5"}}
    assert [c["name"] for c in sweep.expand([], [3])] == ["seed-3"]
    for bad in (["SOLVER.AGVM.MOMENTUM"], ["=1,2"], ["A=1", "A=2"], ["A="]):
        with pytest.raises(ValueError):
            sweep.parse_grid(bad)


def test_batch_overrides_exact_values(tmp_path):
    args = sweep.parse_args(["--config-file", AGVM_MINI, "--output-root", str(tmp_path), "--grid",
                             "SOLVER.IMS_PER_BATCH=8,64", "--lr-rule", "sqrt", "--ref-batch", "32", "--ref-lr", "0.02",
                             "--same-epochs"])
    base = sweep.load_base(args.config_file)
    cells = sweep.expand(args.grid, [0])
    opts = dict(zip(*[iter(sweep.cell_overrides(args, cells[1], base))] * 2))
    # base: batch 32, 120 iterations, steps (90, 105), warm-up 20, start 30, clip (10, 30); 64 = half as many
    assert opts["SOLVER.IMS_PER_BATCH"] == "64" and opts["SEED"] == "0"
    assert opts["SOLVER.LR_SCALING.RULE"] == "sqrt" and opts["SOLVER.LR_SCALING.REFERENCE_IMS_PER_BATCH"] == "32"
    assert opts["SOLVER.MAX_ITER"] == "60" and opts["SOLVER.STEPS"] == "(45, 52)"
    assert opts["SOLVER.WARMUP_ITERS"] == "10" and opts["SOLVER.AGVM.START_ITER"] == "15"
    assert opts["SOLVER.CLIP_GRADIENTS.ITER_RANGE"] == "(5, 15)"
    opts8 = dict(zip(*[iter(sweep.cell_overrides(args, cells[0], base))] * 2))
    assert opts8["SOLVER.MAX_ITER"] == "480" and opts8["SOLVER.WARMUP_ITERS"] == "80"


def test_aggregate_mean_and_std(tmp_path):
    args = sweep.parse_args(["--config-file", AGVM_MINI, "--output-root", str(tmp_path), "--grid",
                             "SOLVER.AGVM.MOMENTUM=0.9,0.97", "--seeds", "0", "1", "2"])
    cells = sweep.expand(args.grid, args.seeds)
    values = {("0.9", 0): 10.0, ("0.9", 1): 12.0, ("0.9", 2): 14.0, ("0.97", 0): 20.0, ("0.97", 1): float("nan")}
    for c in cells:
        v = values.get((c["point"]["SOLVER.AGVM.MOMENTUM"], c["seed"]))
        if v is None:
            continue  # ("0.97", 2): missing
        folder = tmp_path / c["name"]
        folder.mkdir()
        (folder / "eval_results.json").write_text(json.dumps({"bbox": {"AP": v}}))
    csv_path, md_path = sweep.aggregate(args, cells)
    rows = list(csv.DictReader(open(csv_path)))
    assert len(rows) == 6 and [r["status"] for r in rows].count("ok") == 4
    md = open(md_path).read()
    assert "| 0.9 | 12.00 ± 2.00 | 3/3 | — |" in md
    assert "| 0.97 | 20.00 | 1/3 | seed 1: failed, seed 2: missing |" in md


TINY = ["SOLVER.MAX_ITER", "4", "SOLVER.IMS_PER_BATCH", "4", "SOLVER.WARMUP_ITERS", "1", "SOLVER.STEPS", "(3,)",
        "SOLVER.AGVM.START_ITER", "1", "SOLVER.AGVM.INTERVAL", "1", "SOLVER.CLIP_GRADIENTS.ITER_RANGE", "(0, 2)",
        "DATALOADER.NUM_WORKERS", "0", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]


def test_sweep_runs_resumes_and_reports_failures_then_plots(tiny_shapes, capsys):
    out = tiny_shapes / "sweep"
    # α = 1.5 is checked before anything launches: exit 2, the key and value named, nothing written
    bad = ["--config-file", AGVM_MINI, "--output-root", str(out), "--grid", "SOLVER.AGVM.MOMENTUM=0.9,1.5", "--", *TINY]
    assert sweep.main(bad) == 2
    assert "SOLVER.AGVM.MOMENTUM=1.5 must be in [0, 1)" in capsys.readouterr().err
    assert not out.exists()
    # a cell that passes the checks but fails at run time (missing weights) is reported, not dropped
    argv = ["--config-file", AGVM_MINI, "--output-root", str(out), "--grid",
            f"MODEL.WEIGHTS={tiny_shapes / 'missing.pth'}", "SOLVER.AGVM.MOMENTUM=0.9", "--", *TINY]
    ok = ["--config-file", AGVM_MINI, "--output-root", str(out), "--grid", "SOLVER.AGVM.MOMENTUM=0.9", "--", *TINY]
    assert sweep.main(ok) == 0
    capsys.readouterr()
    assert sweep.main(argv) == 1
    text = capsys.readouterr()
    failed = [c for c in os.listdir(out) if c.startswith("weights")]
    assert len(failed) == 1 and failed[0] in text.err
    rows = {r["cell"]: r for r in csv.DictReader(open(out / "results.csv"))}
    assert rows[failed[0]]["status"] == "failed"
    # resume: the finished cell is skipped
    assert sweep.main(ok) == 0
    assert "skip momentum-0.9_seed-0: finished" in capsys.readouterr().out
    # ... unless what it trains with changed: then it is reported stale and run again, with its
    # log path shown at the start
    assert sweep.main(ok + ["SOLVER.BASE_LR", "0.01"]) == 0
    text = capsys.readouterr().out
    assert "stale momentum-0.9_seed-0: finished, but its config or overrides changed" in text
    assert f"start momentum-0.9_seed-0: log {out / 'momentum-0.9_seed-0' / 'stdout.log'}" in text

    plot = load_script("plot_variance")
    prefix = tiny_shapes / "plots" / "phi"
    assert plot.main([str(out / "momentum-0.9_seed-0"), "--labels", "α 0.9", "--out", str(prefix)]) == 0
    for kind in ("phi", "mu"):
        for ext in ("png", "pdf"):
            path = f"{prefix}_{kind}.{ext}"
            assert os.path.getsize(path) > 1000, path
    with pytest.raises(SystemExit):  # a run without Φ is refused with a message
        plot.main([str(out / failed[0]), "--out", str(prefix)])


def test_grad_accum_steps_keeps_the_global_batch():
    from agvm.runner import grad_accum_steps

    assert grad_accum_steps(1024, 8, 16) == (16, 8)
    assert grad_accum_steps(32, 8, 16) == (4, 1)
    assert grad_accum_steps(1536, 768, 16) == (2, 1)
    assert grad_accum_steps(96, 8, 8) == (6, 2)
    assert grad_accum_steps(6, 1, None) == (6, 1)
    assert grad_accum_steps(6, 1, 4) == (3, 2)
    assert grad_accum_steps(12, 1, 5) == (4, 3)  # one process, odd count: an even micro-batch (AGVM halves it)
    with pytest.raises(ValueError, match="cannot be cut"):
        grad_accum_steps(9, 1, 4)
    with pytest.raises(ValueError, match="batch 32 .* not divisible by 3"):
        grad_accum_steps(32, 3, 16)


def test_reproduce_table_dry_run_prints_per_gpu_batch_and_accumulation(capsys):
    mod = load_script("reproduce_table")
    assert mod.main(["--table", "mask_rcnn", "--scale", "full", "--num-gpus", "8", "--dry-run", "b1024_agvm", "b32_agvm"]) == 0
    out = capsys.readouterr().out
    assert "batch 1024 on 8 GPU(s) = 16 images per GPU × 8 micro-batch(es)" in out
    assert "SOLVER.GRAD_ACCUM_STEPS 8" in out
    assert "batch 32 on 8 GPU(s) = 4 images per GPU × 1 micro-batch(es)" in out
    assert mod.main(["--table", "mask_rcnn", "--scale", "full", "--num-gpus", "3", "--dry-run"]) == 2


@pytest.mark.parametrize("config, grid, message", [
    (AGVM_MINI, "SOLVER.AGVM.MOMENTOM=0.9,0.97", "unknown config key SOLVER.AGVM.MOMENTOM; did you mean SOLVER.AGVM.MOMENTUM"),
    (AGVM_MINI, "SOLVER.AGVM.INTERVAL=0,10", "SOLVER.AGVM.INTERVAL=0 must be an integer ≥ 1"),
    (os.path.join(ROOT, "projects", "faster_rcnn", "configs", "mini", "faster_rcnn_R18_FPN_shapes.yaml"),
     "SOLVER.AGVM.MOMENTUM=0.9,0.97", "SOLVER.AGVM.MOMENTUM=0.9 would have no effect"),
])
def test_sweep_checks_every_point_before_launching(tmp_path, capsys, config, grid, message):
    """A bad key, a bad value, or a key without effect in the config fails the whole sweep
    (exit 2, key and value named) before anything runs, locally or as a SLURM array."""
    for mode in ([], ["--slurm"]):
        out = tmp_path / ("slurm" if mode else "local")
        assert sweep.main(["--config-file", config, "--output-root", str(out), "--grid", grid, *mode]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists()


def test_config_fingerprint_follows_the_base_chain(tmp_path):
    from agvm.runner import config_fingerprint, stale_reason

    (tmp_path / "base.yaml").write_text("SOLVER:\n  BASE_LR: 0.02\n")
    (tmp_path / "cell.yaml").write_text('_BASE_: "base.yaml"\nSOLVER:\n  IMS_PER_BATCH: 8\n')
    first = config_fingerprint(tmp_path / "cell.yaml", ["SEED", "0"])
    assert config_fingerprint(tmp_path / "cell.yaml", ["SEED", "0"]) == first
    assert config_fingerprint(tmp_path / "cell.yaml", ["SEED", "1"]) != first
    (tmp_path / "base.yaml").write_text("SOLVER:\n  BASE_LR: 0.04\n")  # an edit two files away
    assert config_fingerprint(tmp_path / "cell.yaml", ["SEED", "0"]) != first
    run = tmp_path / "run"
    run.mkdir()
    (run / "agvm_run.json").write_text(json.dumps({"fingerprint": first}))
    assert stale_reason(str(run), first) is None
    assert "changed" in stale_reason(str(run), "other")


PRETRAINED_AGVM = os.path.join(ROOT, "projects", "faster_rcnn", "configs", "mini", "pretrained", "b32_agvm.yaml")


def test_overrides_are_documented_shown_and_recorded(tmp_path, capsys):
    """`-- KEY VALUE` overrides: in --help, in the dry-run header (batch and micro-batches as the
    cell will train: the override's batch, the config's own GRAD_ACCUM_STEPS 2), in results.md;
    small metrics keep enough digits to tell points apart."""
    with pytest.raises(SystemExit):
        sweep.parse_args(["--help"])
    assert "[-- KEY VALUE ...]" in capsys.readouterr().out
    base = ["--config-file", PRETRAINED_AGVM, "--output-root", str(tmp_path), "--grid", "SOLVER.AGVM.MOMENTUM=0.9,0.97"]
    assert sweep.main(base + ["--dry-run", "--", "SOLVER.IMS_PER_BATCH", "16"]) == 0
    header = [line for line in capsys.readouterr().out.splitlines() if line.startswith("# ")]
    assert header and all("batch 16 on 1 GPU(s) = 8 images per GPU × 2 micro-batch(es)" in h for h in header), header
    args = sweep.parse_args(base + ["--", "SOLVER.IMS_PER_BATCH", "16"])
    cells = sweep.expand(args.grid, args.seeds)
    for c, v in zip(cells, (0.0034, 0.0012)):
        (tmp_path / c["name"]).mkdir()
        (tmp_path / c["name"] / "eval_results.json").write_text(json.dumps({"bbox": {"AP": v}}))
    md = open(sweep.aggregate(args, cells)[1]).read()
    assert "overrides for every cell: `SOLVER.IMS_PER_BATCH 16`" in md
    assert "| 0.9 | 0.0034 | 1/1 | — |" in md and "| 0.97 | 0.0012 | 1/1 | — |" in md


def test_plot_variance_takes_a_sweep_root_and_shares_y(tmp_path):
    plot = load_script("plot_variance")
    for name, mu in (("alpha-0.9_seed-0", 1.5), ("alpha-0.97_seed-0", 1.1)):
        (tmp_path / "root" / name).mkdir(parents=True)
        rows = [{"iteration": i, "agvm/phi/backbone": 0.5, "agvm/phi/neck": 0.2, "agvm/mu/backbone": 1.0,
                 "agvm/mu/neck": 1.0 + (mu - 1.0) * i / 4} for i in range(5)]
        (tmp_path / "root" / name / "metrics.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert plot.expand_runs([str(tmp_path / "root")]) == [str(tmp_path / "root" / n)
                                                         for n in ("alpha-0.97_seed-0", "alpha-0.9_seed-0")]
    assert plot.main([str(tmp_path / "root"), "--out", str(tmp_path / "fig"), "--kinds", "mu"]) == 0
    assert (tmp_path / "fig_mu.png").exists()

    from agvm.plots import plot_runs
    from agvm.results import read_metrics

    runs = {n: read_metrics(str(tmp_path / "root" / n)) for n in ("alpha-0.9_seed-0", "alpha-0.97_seed-0")}
    fig = plot_runs(runs, "mu")
    a, b = [ax for ax in fig.axes if ax.get_visible()]
    assert a.get_ylim() == b.get_ylim()  # one y-axis for every panel: μ of both α compare directly
