#!/usr/bin/env python
"""Faster R-CNN (paper Table 2, first block; the AdamW table) with AGVM on detectron2.

    python projects/faster_rcnn/train_net.py --config-file projects/faster_rcnn/configs/mini/faster_rcnn_R18_FPN_shapes.yaml
    python projects/faster_rcnn/train_net.py --config-file <cfg> --num-gpus 8
    python projects/faster_rcnn/train_net.py --config-file <cfg> --eval-only MODEL.WEIGHTS <ckpt>

Runs on CPU when there is no GPU; with MODEL.DEVICE cpu, --num-gpus N starts N CPU processes
(gloo). torchrun / srun processes join directly.
"""

import agvm  # noqa: F401  (first: detectron2 0.6 compatibility patches)

from detectron2.checkpoint import DetectionCheckpointer

from agvm.detectron2 import AGVMTrainer, default_argument_parser, launch, print_results, setup_cfg


class Trainer(AGVMTrainer):
    """The Faster R-CNN trainer: AGVM (when SOLVER.AGVM.ENABLED), COCO box AP on the test sets."""


def setup(args):
    return setup_cfg(args)


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        results = Trainer.test(cfg, model)
    else:
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        trainer.train()
        results = getattr(trainer, "_last_eval_results", {})
    print_results(results)
    return results


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
