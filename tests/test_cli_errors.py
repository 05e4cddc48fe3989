"""Mistakes on the command line are one line, before any process starts; a finished run says so."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AGVM_MINI = "projects/faster_rcnn/configs/mini/b32_agvm.yaml"


@pytest.mark.parametrize("argv, message", [
    (["--config-file", AGVM_MINI, "SOLVER.AGVM.MOMENTUN", "0.9"],
     "error: unknown config key SOLVER.AGVM.MOMENTUN; did you mean SOLVER.AGVM.MOMENTUM"),
    (["--config-file", "projects/faster_rcnn/configs/nope.yaml"], "error: --config-file projects/faster_rcnn/configs/nope.yaml: no such file"),
    (["--num-gpus", "3", "--config-file", AGVM_MINI, "MODEL.DEVICE", "cpu"],
     "error: SOLVER.IMS_PER_BATCH=32 is not divisible by the world size 3"),
    (["--config-file", AGVM_MINI, "--max-iter", "0"], "error: --max-iter 0: the number of iterations must be ≥ 1"),
])
def test_mistakes_are_one_line_before_spawning(argv, message, tmp_path):
    proc = subprocess.run([sys.executable, "projects/faster_rcnn/train_net.py", *argv, "OUTPUT_DIR", str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()  # nothing started, nothing written


def test_debug_keeps_the_traceback():
    proc = subprocess.run([sys.executable, "projects/faster_rcnn/train_net.py", "--debug", "--config-file", AGVM_MINI,
                           "SOLVER.AGVM.MOMENTUN", "0.9"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "did you mean SOLVER.AGVM.MOMENTUM" in proc.stderr


def test_cpu_processes_are_announced():
    from agvm.detectron2 import default_argument_parser
    from agvm.detectron2.cli import preflight

    args = default_argument_parser().parse_args(["--num-gpus", "2", "--config-file", os.path.join(ROOT, AGVM_MINI),
                                                 "MODEL.DEVICE", "cpu"])
    assert preflight(args) == "note: MODEL.DEVICE is cpu: starting 2 CPU processes (gloo), not GPUs"
    one = default_argument_parser().parse_args(["--config-file", os.path.join(ROOT, AGVM_MINI)])
    assert preflight(one) is None


def test_resuming_a_finished_run_says_training_is_complete(tiny_shapes):
    from test_train_e2e import load_train_net, read_metrics, tiny_args

    train_net = load_train_net()
    out = tiny_shapes / "finished"
    first = train_net.main(tiny_args(train_net, out))
    rows = len(read_metrics(out))
    args = tiny_args(train_net, out)
    args.resume = True
    again = train_net.main(args)
    log = (out / "log.txt").read_text()
    assert "training is complete: the checkpoint is at iteration 6 = SOLVER.MAX_ITER" in log
    assert again["bbox"]["AP"] == pytest.approx(first["bbox"]["AP"], abs=1e-6)
    assert len(read_metrics(out)) == rows  # no training iteration logged again
