"""The experiment scripts of the evidence issue: the demo (a tiny real run of both sides and its
summary) and the scaled-down reproduction (its plan, checks and report)."""

import json
import math
import os

from projects_util import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))




TINY = ["SOLVER.IMS_PER_BATCH", "4", "SOLVER.WARMUP_ITERS", "1", "SOLVER.STEPS", "(3,)", "SOLVER.AGVM.START_ITER", "0",
        "SOLVER.AGVM.INTERVAL", "1", "SOLVER.CLIP_GRADIENTS.ITER_RANGE", "(0, 1)", "MODEL.WEIGHTS", "",
        "DATALOADER.NUM_WORKERS", "0", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]


def test_demo_summary_on_a_tiny_run(tiny_shapes, monkeypatch, capsys):
    """Both demo runs (μ = 1 twin and AGVM) train 4 iterations through the runner; the summary
    has Φ of every module for the baseline, μ for the AGVM run, both APs, and the figure."""
    demo = load_script("demo")
    monkeypatch.setattr(demo, "prepare", lambda: 0.0)  # the weights are not needed at this size
    out = tiny_shapes / "demo"
    assert demo.main(["--output", str(out), "--max-iter", "4", "--", *TINY]) == 0
    text = (out / "summary.md").read_text()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in text.splitlines() if line.startswith("| ") and not line.startswith("| module")
            and not line.startswith("| run")}
    for module in ("backbone", "neck", "rpn", "box_head"):
        phi_base, phi_agvm, mu = rows[module]
        assert 0.0 <= float(phi_base) <= 2.0 and 0.0 <= float(phi_agvm) <= 2.0
        assert 0.5 < float(mu) < 4.0
    assert float(rows["backbone"][2]) == 1.0  # the anchor
    for run in ("baseline", "agvm"):
        ap, ap50, status, _ = rows[run]
        assert status == "ok" and math.isfinite(float(ap)), rows[run]
    assert (out / "phi_mu.png").stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "figure: " in printed and "start baseline: log" in printed and "start agvm: log" in printed


def _args(reproduce, *argv):
    return reproduce.parse_args(list(argv))


def test_reproduce_mini_plan_is_same_epoch_batch_scaling_with_seeds():
    reproduce = load_script("reproduce_mini")
    args = _args(reproduce)
    runs = reproduce.plan(args)
    scaling = [r for r in runs if r.experiment == "scaling"]
    batches = sorted({r.batch for r in scaling})
    assert batches[-1] / batches[0] >= 16 and len(batches) >= 4
    assert {r.seed for r in scaling} == {0, 1, 2}
    for b in batches[1:]:
        assert {r.method for r in scaling if r.batch == b} == {"megdet", "twin", "agvm"}
    images = {r.batch * int(r.opts[r.opts.index("SOLVER.MAX_ITER") + 1]) for r in scaling}
    assert max(images) / min(images) < 1.03  # the same epochs at every batch (rounding up)
    grid = [(r.alpha, r.tau) for r in runs if r.experiment == "alpha_tau"]
    assert sorted(grid) == [(0.0, 2), (0.0, 10), (0.9, 2), (0.9, 10), (0.97, 2), (0.97, 10)]
    assert all(r.batch == batches[-1] for r in runs if r.experiment == "alpha_tau")
    # every config is built and checked before anything runs; a bad override fails the command
    reproduce.check_plan(runs[:3])
    assert reproduce.main(["--dry-run", "--", "SOLVER.AGVM.MOMENTUM", "1.5"]) == 2
    gpu = reproduce.plan(_args(reproduce, "--scale", "gpu"))
    assert max(r.batch for r in gpu) == 1024 and all("cuda" in r.opts for r in gpu)


def test_reproduce_mini_runs_experiment_3_as_the_projectsload_script(monkeypatch, capsys):
    """Experiment 3 is projects/effective_batch/run_experiment.py in a child process: its configs
    checked before anything runs, then run with --jobs (and --dry-run) after the plan of 1 and 2;
    the script imports none of the project's code."""
    reproduce = load_script("reproduce_mini")
    source = open(os.path.join(ROOT, "scripts", "reproduce_mini.py")).read()
    assert "sys.path" not in source and "effective_batch.experiment" not in source
    calls = []
    monkeypatch.setattr(reproduce, "effective_batch", lambda *flags: calls.append(flags) or 0)
    small = ["--batches", "8", "--seeds", "0", "--grid-alpha", "--grid-tau", "--jobs", "3"]
    assert reproduce.main(["--dry-run", *small]) == 0
    assert calls == [("--check-only",), ("--jobs", "3", "--dry-run")]
    assert "projects/faster_rcnn/train_net.py" in capsys.readouterr().out  # its own plan, before
    calls.clear()
    monkeypatch.setattr(reproduce, "effective_batch", lambda *flags: calls.append(flags) or 2)
    assert reproduce.main(["--dry-run", *small]) == 2  # experiment 3's configs failed their check
    assert calls == [("--check-only",)]
    calls.clear()
    assert reproduce.main(["--dry-run", "--scale", "gpu", "--batches", "64", "--grid-alpha", "--grid-tau"]) == 0
    assert calls == []  # experiment 3 at --scale cpu only


def _fake_run(folder, ap=None, diverged=False):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "metrics.json"), "w") as f:
        for it in range(4):
            f.write(json.dumps({"iteration": it, "total_loss": 1.0, "agvm/phi/backbone": 0.8, "agvm/phi/rpn": 0.2}) + "\n")
    if ap is not None:
        with open(os.path.join(folder, "eval_results.json"), "w") as f:
            json.dump({"bbox": {"AP": ap}}, f)
    with open(os.path.join(folder, "stdout.log"), "w") as f:
        f.write("FloatingPointError: Loss became infinite or NaN\n" if diverged else "ok\n")
    with open(os.path.join(folder, "agvm_run.json"), "w") as f:
        json.dump({"command": "python x", "returncode": 1 if diverged else 0, "wall_s": 60}, f)
    with open(os.path.join(folder, "config.yaml"), "w") as f:
        f.write("SOLVER:\n  BASE_LR: 0.04\n")


def test_reproduce_mini_report_mean_std_and_divergence_per_seed(tmp_path):
    reproduce = load_script("reproduce_mini")
    args = _args(reproduce, "--batches", "8", "32", "--seeds", "0", "1", "2", "--grid-alpha", "0", "--grid-tau", "2",
                 "--results", str(tmp_path / "report"))
    runs = reproduce.plan(args)
    root = tmp_path / "runs"
    aps = {"scaling/b32_agvm_s0": 10.0, "scaling/b32_agvm_s1": 12.0, "scaling/b32_agvm_s2": 14.0}
    for r in runs:
        if r.name in aps:
            _fake_run(root / r.name, aps[r.name])
        elif r.name.startswith("scaling/b32_megdet"):
            _fake_run(root / r.name, diverged=r.seed != 0, ap=5.0 if r.seed == 0 else None)
    table = reproduce.scaling_table(runs, str(root))
    assert "| 32 | AGVM (sqrt LR) | 12.00 ± 2.00 | 0/3 | 3 finished | 32 | 0.04 |" in table
    assert "| 32 | MegDet (linear LR) | 5.00 | 2/3 | 1 finished |" in table
    assert "| 8 | MegDet (linear LR) | — | 0/3 | 0 finished | 125 | — |" in table  # not run: missing, not diverged
    phi = reproduce.phi_table(runs, str(root))
    assert "| 32 | MegDet (linear LR) | 0.800 | 0.200 | 4.00–4.00 |" in phi
    path = reproduce.write_report(args, runs, str(root), "2026-11-28T00:00", 60.0)
    text = open(path).read()
    assert "12.00 ± 2.00" in text and "ap_vs_batch.png" in text
