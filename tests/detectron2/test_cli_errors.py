"""Mistakes on the command line are one line, before any process starts; a finished run says so."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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


def test_cpu_processes_are_announced_and_launched_on_cpu(monkeypatch, capsys):
    """launch_cli decides the device once, from the config it checked, and tells the launcher."""
    import importlib

    launch_mod = importlib.import_module("agvm.detectron2.launch")
    from agvm.detectron2 import launch_cli

    seen = []
    monkeypatch.setattr(launch_mod, "launch", lambda main, n, **kw: seen.append((n, kw["device"])))
    launch_cli(lambda a: None, ["--num-gpus", "2", "--config-file", os.path.join(ROOT, AGVM_MINI), "MODEL.DEVICE", "cpu"])
    assert "note: MODEL.DEVICE is cpu: starting 2 CPU processes (gloo), not GPUs" in capsys.readouterr().err
    launch_cli(lambda a: None, ["--config-file", os.path.join(ROOT, AGVM_MINI), "MODEL.DEVICE", "cuda"])
    assert "note:" not in capsys.readouterr().err
    assert seen == [(2, "cpu"), (1, "cuda")]


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


def _one_class_coco(root, n=6):
    """A tiny COCO-format set: n 64×64 images with one filled rectangle each, category "box"."""
    import json

    import numpy as np
    from PIL import Image

    (root / "images").mkdir(parents=True)
    rng = np.random.RandomState(0)
    images, annotations = [], []
    for i in range(n):
        img = np.full((64, 64, 3), 30, dtype=np.uint8)
        x, y = int(rng.randint(4, 30)), int(rng.randint(4, 30))
        w, h = int(rng.randint(12, 28)), int(rng.randint(12, 28))
        img[y:y + h, x:x + w] = (220, 180, 40)
        Image.fromarray(img).save(root / "images" / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": 64, "height": 64})
        annotations.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [x, y, w, h], "area": w * h,
                            "iscrowd": 0, "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]})
    (root / "instances.json").write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "box"}]}))
    return str(root / "instances.json"), str(root / "images")


def test_own_coco_dataset_in_one_command(tiny_shapes):
    """`--dataset NAME JSON IMAGE_DIR`: a 1-class COCO set trains and evaluates; the mini config's
    NUM_CLASSES 5 is rejected before anything is written, naming the key and the count."""
    from test_train_e2e import load_train_net, tiny_args

    from agvm.detectron2.cli import preflight

    json_file, images = _one_class_coco(tiny_shapes / "mine")
    train_net = load_train_net()
    data = ["DATASETS.TRAIN", "('boxes',)", "DATASETS.TEST", "('boxes',)"]

    wrong = tiny_args(train_net, tiny_shapes / "wrong", *data)
    wrong.dataset = [["boxes", json_file, images]]
    with pytest.raises(ValueError, match=r"MODEL.ROI_HEADS.NUM_CLASSES=5 but DATASETS.TRAIN 'boxes' has 1 classes "
                                         r"\(thing_classes: box\): set MODEL.ROI_HEADS.NUM_CLASSES 1"):
        preflight(wrong)
    with pytest.raises(ValueError, match="MODEL.ROI_HEADS.NUM_CLASSES=5"):
        train_net.main(wrong)
    assert not (tiny_shapes / "wrong").exists()

    args = tiny_args(train_net, tiny_shapes / "boxes", *data, "MODEL.ROI_HEADS.NUM_CLASSES", "1")
    args.dataset = [["boxes", json_file, images]]
    assert preflight(args).MODEL.ROI_HEADS.NUM_CLASSES == 1
    results = train_net.main(args)
    assert 0.0 <= results["bbox"]["AP"] <= 100.0


def test_unregistered_dataset_names_the_users_own_first(tiny_shapes):
    from detectron2.data import DatasetCatalog

    from agvm.detectron2.checks import check_datasets_registered
    from agvm.detectron2.checks import build_run_config

    if "my_trees_train" not in DatasetCatalog.list():
        DatasetCatalog.register("my_trees_train", lambda: [])
    cfg = build_run_config(os.path.join(ROOT, AGVM_MINI), ["DATASETS.TRAIN", "('trees',)"])
    with pytest.raises(KeyError) as e:
        check_datasets_registered(cfg)
    message = str(e.value)
    listed = message.split("registered: ", 1)[1].split(". Register", 1)[0].split(", ")
    assert "my_trees_train" in listed
    builtins = [i for i, n in enumerate(listed) if n.startswith(("coco_", "lvis_", "cityscapes_", "voc_", "ade20k_"))]
    assert not builtins or listed.index("my_trees_train") < min(builtins)  # the user's own names before detectron2's
    assert "--dataset trees <annotations.json> <image folder>" in message
