"""agvm.runner.execute: the one orchestration loop of the experiment scripts (its reuse rule,
dry run, records), on a fake train_net.py that needs no detectron2."""

import json
import os
import socket

import pytest
from projects_util import load_script

from agvm.runner import REUSED, Run, execute, free_port, outcome, stale_reason

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: train_net.py's command line, faked: ``--config-file C [flags] OUTPUT_DIR OUT [KEY VALUE ...]``;
#: ``EXIT n`` exits with n, ``DIVERGE 1`` stops as detectron2 does on a non-finite loss.
FAKE_TRAIN_NET = '''
import json, os, sys
argv = sys.argv[1:]
i = argv.index("OUTPUT_DIR")
out, opts = argv[i + 1], dict(zip(argv[i + 2::2], argv[i + 3::2]))
os.makedirs(out, exist_ok=True)
with open(os.path.join(out, "metrics.json"), "a") as f:
    f.write(json.dumps({"iteration": 0, "total_loss": 1.0}) + "\\n")
print("training", " ".join(argv))
if opts.get("DIVERGE") == "1":
    raise FloatingPointError("Loss became infinite or NaN at iteration=0!")
sys.exit(int(opts.get("EXIT", "0")))
'''


@pytest.fixture
def fake(tmp_path):
    (tmp_path / "train_net.py").write_text(FAKE_TRAIN_NET)
    (tmp_path / "base.yaml").write_text("SOLVER:\n  BASE_LR: 0.02\n")
    (tmp_path / "cell.yaml").write_text('_BASE_: "base.yaml"\nSOLVER:\n  IMS_PER_BATCH: 8\n')

    def run(name, *opts, **kw):
        return Run(name, "cell.yaml", f"out/{name}", "train_net.py", opts=list(opts), cwd=str(tmp_path), **kw)

    return run


def test_free_port_is_bindable():
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def _record(folder, log="", tail=None, **record):
    os.makedirs(folder, exist_ok=True)
    (folder / "agvm_run.json").write_text(json.dumps(record))
    (folder / "stdout.log").write_text(log)
    if tail is not None:
        (folder / "stdout_tail.log").write_text(tail)


def test_outcome_of_a_record(tmp_path):
    assert outcome(str(tmp_path / "none")) == "missing"
    _record(tmp_path / "a", command="x")
    assert outcome(str(tmp_path / "a")) == "unfinished"
    _record(tmp_path / "b", returncode=0)
    assert outcome(str(tmp_path / "b")) == "finished"
    _record(tmp_path / "c", "...\nFloatingPointError: Loss became infinite or NaN\n", returncode=1)
    assert outcome(str(tmp_path / "c")) == "diverged"
    _record(tmp_path / "d", "", "FloatingPointError: Predicted boxes or scores contain Inf/NaN.\n", returncode=1)
    assert outcome(str(tmp_path / "d")) == "diverged"  # the tail kept with copied records
    _record(tmp_path / "e", "FileNotFoundError: model.pth\n", returncode=1)
    assert outcome(str(tmp_path / "e")) == "failed"
    _record(tmp_path / "f", returncode=-9)
    assert outcome(str(tmp_path / "f")) == "failed"


def test_execute_runs_reuses_and_reruns_by_one_rule(fake, tmp_path, capsys):
    plan = [fake("ok"), fake("diverged", "DIVERGE", "1"), fake("failed", "EXIT", "3"),
            fake("kept", records=str(tmp_path / "records" / "kept"), info={"regime": "r"})]
    results = execute(plan, jobs=2)
    assert [r.outcome for r in results] == ["finished", "diverged", "failed", "finished"]
    assert not any(r.reused for r in results)
    rec = json.loads((tmp_path / "out" / "kept" / "agvm_run.json").read_text())
    assert rec["cell"] == "kept" and rec["regime"] == "r" and rec["returncode"] == 0
    assert rec["fingerprint"] == plan[3].fingerprint and "train_net.py --config-file cell.yaml" in rec["command"]
    copied = sorted(os.listdir(tmp_path / "records" / "kept"))
    assert copied == ["agvm_run.json", "metrics.json", "stdout_tail.log"]
    printed = capsys.readouterr().out
    assert "4 run(s) to do, 2 at a time" in printed and "start ok: log" in printed

    # finished and diverged runs are reused, the failed one runs again
    results = execute(plan)
    assert [r.reused for r in results] == [True, True, False, True]
    printed = capsys.readouterr().out
    assert "skip ok: finished (exit 0), same config" in printed
    assert "skip diverged: diverged (exit 1), same config" in printed
    assert "rerun failed: failed (exit 3;" in printed and "1 run(s) to do" in printed
    # the failed run's folder was cleared first: metrics.json holds the new run's rows only
    assert len((tmp_path / "out" / "failed" / "metrics.json").read_text().splitlines()) == 1

    # a changed config makes every run stale; the kept run is read from its records folder
    (tmp_path / "base.yaml").write_text("SOLVER:\n  BASE_LR: 0.04\n")
    changed = [fake("ok"), fake("kept", records=str(tmp_path / "records" / "kept"))]
    assert "changed" in stale_reason(changed[0].record_dir, changed[0].fingerprint)
    results = execute(changed, dry_run=True)
    out, err = capsys.readouterr()
    assert out.splitlines() == [changed[0].display, changed[1].display]
    assert "stale ok: finished, but its config or overrides changed" in err
    assert "2 of 2 run(s) to do; dry run: nothing run or written" in err
    assert json.loads((tmp_path / "out" / "ok" / "agvm_run.json").read_text())["fingerprint"] == plan[0].fingerprint

    # rerun: everything runs; a dry run lists each run's note and command
    execute([fake("ok", note="ok: the note")], rerun=True, dry_run=True)
    assert capsys.readouterr().out.splitlines() == ["# ok: the note", fake("ok").display]


def test_execute_checks_what_is_generic(fake):
    with pytest.raises(ValueError, match="name ok"):
        execute([fake("ok"), fake("ok", "SEED", "1")], dry_run=True)
    with pytest.raises(ValueError, match="jobs"):
        execute([fake("ok")], jobs=0)




def test_the_committed_evidence_records_are_reused():
    """Every committed run record of scripts/evidence.py is reused by the rule of
    agvm.runner.execute: same fingerprint as its plan, finished or diverged."""
    evidence = load_script("evidence")
    records_root = os.path.join(ROOT, "results", "evidence", "runs")
    planned = [x for name in evidence.recorded_regimes(records_root)
               for x in evidence.plan([name], evidence.recorded_seeds(records_root, name))]
    for regime in sorted(os.listdir(os.path.join(records_root, "stage2"))) if os.path.isdir(
            os.path.join(records_root, "stage2")) else []:
        planned += evidence.plan2(regime, [0, 1, 2])
    args = type("Args", (), {"output_root": os.path.join(ROOT, "output", "evidence")})
    recorded = 0
    for x in planned:
        run = evidence.job(x, args, records_root)
        if not os.path.exists(os.path.join(run.record_dir, "agvm_run.json")):
            continue
        recorded += 1
        assert outcome(run.record_dir) in REUSED, run.name
        assert stale_reason(run.record_dir, run.fingerprint) is None, run.name
    assert recorded >= 21
