"""Workers of tests/detectron2/test_resume.py (importable, so that spawned processes can unpickle them).

A 2-rank gloo job of the mini Faster R-CNN on a small dataset of portrait (48×64) and
landscape (64×48) images, with data workers and aspect-ratio grouping, recording per rank and
iteration the images read, the local losses, the RNG states, and on rank 0 the logged
(reduced) losses and μ; optionally SIGKILLed right after an iteration.
"""

import hashlib
import json
import os
import random
import signal

import numpy as np
import torch
import torch.distributed as dist

MINI_AGVM = "projects/faster_rcnn/configs/mini/faster_rcnn_R18_FPN_shapes_agvm.yaml"
DATASET = "resume_mixed_train"
NUM_IMAGES = 12


def mixed_dataset(root, n=NUM_IMAGES):
    """``n`` small images drawn with numpy (portrait 48×64 and landscape 64×48, in a mixed
    order), 1-2 filled rectangles each; detectron2 dataset dicts."""
    from detectron2.structures import BoxMode
    from PIL import Image

    os.makedirs(root, exist_ok=True)
    rng = np.random.RandomState(0)
    dicts = []
    for i in range(n):
        portrait = i % 3 == 1 or i in (4, 9)  # 6 portrait, 6 landscape, interleaved irregularly
        w, h = (48, 64) if portrait else (64, 48)
        image = (rng.rand(h, w, 3) * 60 + 100).astype(np.uint8)
        annotations = []
        for _ in range(1 + i % 2):
            bw, bh = rng.randint(10, 24), rng.randint(10, 24)
            x, y = rng.randint(0, w - bw), rng.randint(0, h - bh)
            image[y:y + bh, x:x + bw] = rng.randint(0, 255, size=3)
            annotations.append({"bbox": [float(x), float(y), float(bw), float(bh)], "bbox_mode": BoxMode.XYWH_ABS,
                                "category_id": int(rng.randint(5)), "iscrowd": 0})
        path = os.path.join(root, f"{i:03d}.png")
        if not os.path.exists(path):
            Image.fromarray(image).save(path)
        dicts.append({"file_name": path, "image_id": i, "width": w, "height": h, "annotations": annotations})
    return dicts


def register(root):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from agvm.data.shapes import THING_CLASSES

    if DATASET not in DatasetCatalog.list():
        dicts = mixed_dataset(root)
        DatasetCatalog.register(DATASET, lambda: dicts)
        MetadataCatalog.get(DATASET).set(thing_classes=list(THING_CLASSES))


def rng_digest():
    """A digest of this process's torch (CPU), numpy and Python RNG states (no draw)."""
    h = hashlib.sha256(torch.get_rng_state().numpy().tobytes())
    name, keys, pos, has_gauss, cached = np.random.get_state()
    h.update(keys.tobytes() + repr((pos, has_gauss, cached)).encode())
    h.update(repr(random.getstate()).encode())
    return h.hexdigest()[:16]


def run(rank, world, port, out_dir, phase, kill_at):
    """phase: "full" (uninterrupted), "first" (SIGKILLed after iteration ``kill_at``),
    "second" (``--resume`` of the killed run). Records go to ``<out_dir>/<phase>_<rank>.jsonl``."""
    import agvm  # noqa: F401
    from detectron2.engine import HookBase
    from detectron2.utils import comm

    from agvm.detectron2 import AGVMTrainer, default_argument_parser, setup_cfg
    from agvm.detectron2.launch import DEFAULT_TIMEOUT, _init

    _init("gloo", f"tcp://127.0.0.1:{port}", world, rank, rank, world, DEFAULT_TIMEOUT)
    torch.set_num_threads(1)
    register(os.path.join(out_dir, "images"))
    run_dir = os.path.join(out_dir, "full" if phase == "full" else "parted")
    opts = [
        "OUTPUT_DIR", run_dir, "DATASETS.TRAIN", f"('{DATASET}',)", "DATASETS.TEST", "()", "TEST.EVAL_PERIOD", "0",
        "SOLVER.IMS_PER_BATCH", str(2 * world), "SOLVER.MAX_ITER", "7", "SOLVER.WARMUP_ITERS", "1",
        "SOLVER.STEPS", "(5,)", "SOLVER.CHECKPOINT_PERIOD", "2",  # checkpoints after iterations 1, 3, 5
        "SOLVER.AGVM.START_ITER", "2", "SOLVER.AGVM.INTERVAL", "2",  # AGVM iterations 2, 4, 6
        "DATALOADER.NUM_WORKERS", "2", "DATALOADER.ASPECT_RATIO_GROUPING", "True",
        "INPUT.MIN_SIZE_TRAIN", "(40, 48)", "INPUT.MAX_SIZE_TRAIN", "64",  # random resize + random flip
        "MODEL.RPN.BATCH_SIZE_PER_IMAGE", "64", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
    ]
    cfg = setup_cfg(default_argument_parser().parse_args(["--config-file", MINI_AGVM, *opts]))
    trainer = AGVMTrainer(cfg)
    record_path = os.path.join(out_dir, f"{phase}_{rank}.jsonl")
    log = open(record_path, "w")
    current = {}

    def on_forward(module, args, output):
        batch = args[0]
        current.setdefault("forwards", []).append({
            "files": [os.path.basename(d["file_name"]) for d in batch],
            "sizes": [list(d["image"].shape) for d in batch],
            "pixels": [float(d["image"].double().sum()) for d in batch],  # the augmentation's result
            "losses": {k: float(v.detach()) for k, v in output.items()},
        })

    model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
    model.register_forward_hook(on_forward)

    class Record(HookBase):
        def before_step(self):
            current.clear()
            current.update(iter=self.trainer.iter, rng=rng_digest())

        def after_step(self):
            if comm.is_main_process():
                storage = self.trainer.storage
                current["logged"] = {k: storage.history(k).latest() for k in storage.histories()
                                     if k.endswith("loss") or k.startswith("loss_")}
                opt = self.trainer.stepper.optimizer
                current["mu"] = dict(getattr(opt, "mu", {}))
            log.write(json.dumps(current) + "\n")
            log.flush()
            if self.trainer.iter == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    trainer.register_hooks([Record()])
    trainer.resume_or_load(resume=phase == "second")
    trainer.train()
    log.close()
    comm.synchronize()
    dist.destroy_process_group()
