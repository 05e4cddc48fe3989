"""The evidence protocol's checks (agvm.protocol) on made-up runs, with exact expected values."""

import math

import pytest

from agvm.protocol import converged, degraded, mean_std, paired_difference


def test_mean_std():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([5.0]) == (5.0, 0.0)
    assert mean_std([4.0, float("nan")]) == (4.0, 0.0)
    m, s = mean_std([])
    assert math.isnan(m) and math.isnan(s)


@pytest.mark.parametrize("ap75, ap_end, expected", [
    (20.0, 21.0, True),  # +5 %: the boundary is inside
    (20.0, 19.0, True),  # −5 %
    (20.0, 21.01, False),  # still climbing
    (20.0, 18.9, False),
    (None, 20.0, False),  # no evaluation at 75 %
    (20.0, float("nan"), False),
    (0.0, 0.0, False),  # learned nothing
])
def test_converged(ap75, ap_end, expected):
    assert converged(ap75, ap_end) is expected


def test_degraded_needs_both_the_relative_and_the_std_margin():
    small = {0: 20.0, 1: 21.0, 2: 22.0}  # std 1.0: the 3-std margin is 3.0 AP
    ok = degraded(small, {"linear": {0: 10.0, 1: 12.0, 2: 11.0}, "sqrt": {0: 16.0, 1: 17.0, 2: 18.0}})
    assert ok["ok"] and ok["threshold"] == 3.0
    assert ok["per_seed"][0]["best_large"] == 16.0 and ok["per_seed"][0]["loss"] == 4.0
    assert ok["per_seed"][0]["relative"] == pytest.approx(0.2)
    # seed 2 loses 3.5 % only (> 3 std? no: 0.8 AP): the regime fails on that seed
    close = degraded(small, {"linear": {0: 16.0, 1: 17.0, 2: 21.2}, "sqrt": {0: 1.0, 1: 1.0, 2: 1.0}})
    assert not close["ok"] and [v["passes"] for _, v in sorted(close["per_seed"].items())] == [True, True, False]
    # a large relative loss that is within 3 std of a noisy small batch is not enough
    noisy = degraded({0: 10.0, 1: 20.0, 2: 30.0}, {"linear": {0: 8.0, 1: 18.0, 2: 27.0}})
    assert not noisy["ok"] and noisy["threshold"] == 30.0


def test_degraded_counts_divergence_and_rejects_missing_runs():
    small = {0: 20.0, 1: 20.5}
    diverged = degraded(small, {"linear": {0: float("nan"), 1: float("nan")}, "sqrt": {0: float("nan"), 1: 10.0}})
    assert diverged["ok"] and diverged["per_seed"][0]["best_large"] == 0.0
    missing = degraded(small, {"linear": {0: 1.0}, "sqrt": {0: 1.0, 1: 1.0}})
    assert not missing["ok"] and missing["per_seed"][1]["passes"] is False
    assert not degraded({0: 20.0}, {"linear": {0: 1.0}})["ok"]  # one seed: no standard deviation


def test_paired_difference():
    out = paired_difference({0: 30.0, 1: 31.0, 2: 29.0, 3: 40.0}, {0: 29.0, 1: 31.5, 2: float("nan")})
    assert out["per_seed"] == {0: 1.0, 1: -0.5, 2: 29.0}  # seed 3 unpaired; the diverged twin counts as 0
    assert out["ahead"] == 2 and out["seeds"] == 3
    assert out["mean"] == pytest.approx(29.5 / 3)


def test_stage1_report_regenerates_from_the_committed_records(tmp_path):
    """`scripts/evidence.py --report-only` on a copy of the committed run records writes the
    committed results/evidence/stage1.md (and stage2.md) byte for byte (no clock, no machine
    state in them)."""
    import pathlib
    import shutil
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[2]
    committed = root / "results" / "evidence"
    copy = tmp_path / "evidence"
    shutil.copytree(committed / "runs", copy / "runs")
    subprocess.run([sys.executable, str(root / "scripts" / "evidence.py"), "--report-only", "--records", str(copy)],
                   check=True, capture_output=True, cwd=tmp_path)
    assert (copy / "stage1.md").read_text() == (committed / "stage1.md").read_text()
    for regime in sorted(p.name for p in (committed / "runs" / "stage2").glob("*")):  # stage 2, once it has records
        readme = tmp_path / "README.md"  # the README's results block, regenerated into a copy
        readme.write_text((root / "README.md").read_text().replace("| 4 | MegDet", "| 4 | stale MegDet"))
        subprocess.run([sys.executable, str(root / "scripts" / "evidence.py"), "--stage", "2", "--regime", regime,
                        "--report-only", "--records", str(copy), "--readme", str(readme)],
                       check=True, capture_output=True, cwd=tmp_path)
        assert (copy / "stage2.md").read_text() == (committed / "stage2.md").read_text()
        assert readme.read_text() == (root / "README.md").read_text()


def test_reading_of_a_paired_difference():
    from agvm.protocol import paired_difference, reading

    clear = paired_difference({0: 10.0, 1: 11.0, 2: 12.0}, {0: 9.0, 1: 9.8, 2: 11.1})  # +1.0, +1.2, +0.9
    # mean 1.0333, std 0.1528, s.e. 0.0882, t95(2) = 4.303: half-width 0.3795
    assert reading(clear) == ("+1.03 ± 0.09 AP (mean ± s.e., 3 seeds; 95 % interval [+0.65, +1.41]), AGVM ahead on 3 of 3: "
                              "AGVM ahead, clear")
    noisy = paired_difference({0: 10.0, 1: 11.0, 2: 12.0}, {0: 11.0, 1: 10.0, 2: 12.3})  # -1.0, +1.0, -0.3
    assert reading(noisy).endswith("AGVM ahead on 1 of 3: within noise at 95 %")
    # three seeds all ahead can still be within noise: +0.1, +0.3, +0.2 → ±0.25 at 95 %
    small = paired_difference({0: 1.1, 1: 1.3, 2: 1.2}, {0: 1.0, 1: 1.0, 2: 1.0})
    assert reading(small).endswith("AGVM ahead on 3 of 3: within noise at 95 %")
    assert reading(paired_difference({0: 8.1}, {0: 8.0})) == "+0.10 AP on one seed (no error estimate): no conclusion"
    assert reading(paired_difference({}, {})) == "no seed with both runs"


def test_gpu_tier_plan_and_time_estimate(monkeypatch):
    """The GPU tier's plan (B0 32 to 1024, 200 iterations at 1024) and its time estimate: per batch,
    the timed iterations' per-iteration time × the run's iterations + the measured start-up."""
    import json
    import subprocess
    import types

    from projects_util import load_script

    evidence = load_script("evidence")
    runs = [x for x in evidence.plan2("gpu_r64_25600x8", [0, 1, 2]) if x.group == "scaling"]
    assert sorted({x.batch for x in runs}) == [32, 256, 1024]
    assert evidence.schedule(evidence.REGIMES["gpu_r64_25600x8"], 1024)["iters"] == 200
    assert "MODEL.DEVICE" in runs[0].opts and runs[0].opts[runs[0].opts.index("MODEL.DEVICE") + 1] == "cuda"
    step = {32: 0.01, 256: 0.05, 1024: 0.2}  # s per iteration, faked

    def fake_run(cmd, **kw):
        out = cmd[cmd.index("OUTPUT_DIR") + 1]
        batch = int(cmd[cmd.index("SOLVER.IMS_PER_BATCH") + 1])
        assert cmd[-8:-6] == ["SOLVER.MAX_ITER", "4"]  # the timed run's own length wins (last)
        with open(f"{out}/metrics.json", "w") as f:
            f.write(json.dumps({"iteration": 3, "time": step[batch]}) + "\n")
        return types.SimpleNamespace(returncode=0, stderr="")

    clock = iter([0.0, 10.0 + 4 * 0.01, 0.0, 10.0 + 4 * 0.05, 0.0, 10.0 + 4 * 0.2])
    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setattr(evidence.time, "time", lambda: next(clock))
    text = evidence.estimate(runs, iters=4, jobs=4)
    # 32: 6400 iterations × 0.01 s + 10 s start-up = 74 s; 256: 800 × 0.05 + 10 = 50 s; 1024: 200 × 0.2 + 10 = 50 s
    assert "| 32 | 0.0100 | 10 | 3 | 6400 | 1.2 |" in text
    assert "| 1024 | 0.2000 | 10 | 9 | 200 | 0.8 |" in text
    total = (3 * 74 + 9 * 50 + 9 * 50) / 60
    assert f"21 runs: {total:.1f} min one at a time, ≥ {total / 4:.1f} min with 4 at a time" in text
