"""A tiny end-to-end run of projects/faster_rcnn/train_net.py: train, evaluate, eval-only."""

import importlib.util
import json
import math
import os

import pytest

from agvm.detectron2 import default_argument_parser, setup_cfg  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MINI = os.path.join(ROOT, "projects", "faster_rcnn", "configs", "mini", "faster_rcnn_R18_FPN_shapes.yaml")


def load_train_net(project="faster_rcnn"):
    path = os.path.join(ROOT, "projects", project, "train_net.py")
    spec = importlib.util.spec_from_file_location(f"train_net_{project}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_args(train_net, out_dir, *extra, eval_only=False):
    argv = ["--config-file", MINI]
    if eval_only:
        argv.append("--eval-only")
    argv += [
        "OUTPUT_DIR", str(out_dir),
        "SOLVER.MAX_ITER", "6", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "2",
        "SOLVER.STEPS", "(4,)", "DATALOADER.NUM_WORKERS", "0",
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", *extra,
    ]
    return default_argument_parser().parse_args(argv)


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_train_and_evaluate_mini_faster_rcnn(tiny_shapes, capsys):
    train_net = load_train_net()
    out = tiny_shapes / "run"
    results = train_net.main(tiny_args(train_net, out))
    ap = results["bbox"]["AP"]
    assert math.isfinite(ap) and 0.0 <= ap <= 100.0
    assert f"bbox AP = {ap:.2f}" in capsys.readouterr().out
    records = read_metrics(out)
    assert max(r["iteration"] for r in records if "total_loss" in r) == 5
    assert [r["bbox/AP"] for r in records if "bbox/AP" in r] == [pytest.approx(ap)]
    assert all(math.isfinite(r["total_loss"]) for r in records if "total_loss" in r)
    assert os.path.exists(out / "model_final.pth")
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(out))

    # --eval-only on the checkpoint reproduces the AP
    again = train_net.main(
        tiny_args(train_net, tiny_shapes / "eval", "MODEL.WEIGHTS", str(out / "model_final.pth"), eval_only=True)
    )
    assert again["bbox"]["AP"] == pytest.approx(ap, abs=1e-6)


def test_agvm_estimates_reach_log_txt_with_a_summary(tiny_shapes):
    """Φ/μ where people look: one line per estimate in the console and log.txt, and the
    per-module table of the whole run at the end."""
    train_net = load_train_net()
    out = tiny_shapes / "agvm_log"
    args = tiny_args(train_net, out, "SOLVER.AGVM.ENABLED", "True", "SOLVER.AGVM.START_ITER", "1",
                     "SOLVER.AGVM.INTERVAL", "2", "SOLVER.AGVM.STOP_ITER", "-1", "SOLVER.CLIP_GRADIENTS.ENABLED", "False",
                     "TEST.EVAL_PERIOD", "0", "DATASETS.TEST", "()")
    train_net.main(args)
    log = (out / "log.txt").read_text()
    lines = [line for line in log.splitlines() if "AGVM iter " in line]
    assert [line.split("AGVM iter ")[1].split(":")[0] for line in lines] == ["1", "3", "5"]
    assert all("Φ backbone" in line and "| μ neck" in line and "μ backbone" not in line for line in lines)
    logged = [r for r in read_metrics(out) if "agvm/phi/backbone" in r]
    assert f"Φ backbone {logged[-1]['agvm/phi/backbone']:.4g}" in lines[-1]
    assert "| module | Φ mean | Φ last | μ final | estimates | not finite |" in log
    assert any(row.startswith("| box_head |") and row.rstrip().endswith("| 3 | 0 |") for row in log.splitlines())


def test_max_iter_runs_a_short_rescaled_run(tiny_shapes):
    """`--max-iter 3` on a 600-iteration AGVM config: 3 iterations, the rescaled schedule logged."""
    train_net = load_train_net()
    out = tiny_shapes / "short"
    argv = ["--config-file", os.path.join(ROOT, "projects", "faster_rcnn", "configs", "mini",
                                          "faster_rcnn_R18_FPN_shapes_agvm.yaml"),
            "--max-iter", "3", "OUTPUT_DIR", str(out), "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0",
            "TEST.EVAL_PERIOD", "0", "DATASETS.TEST", "()"]
    train_net.main(default_argument_parser().parse_args(argv))
    assert max(r["iteration"] for r in read_metrics(out) if "total_loss" in r) == 2
    log = (out / "log.txt").read_text()
    assert "--max-iter: schedule rescaled: SOLVER.MAX_ITER 600 → 3" in log
