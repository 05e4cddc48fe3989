#!/usr/bin/env python
"""Mask R-CNN (paper Table 2, second block; the anchor-module and momentum ablations) with AGVM on detectron2.

    python projects/mask_rcnn/train_net.py --config-file projects/mask_rcnn/configs/mini/mask_rcnn_R18_FPN_shapes.yaml
    python projects/mask_rcnn/train_net.py --config-file projects/mask_rcnn/configs/<cell>.yaml --num-gpus 8
    python projects/mask_rcnn/train_net.py --config-file <cfg> --eval-only MODEL.WEIGHTS <checkpoint>

Evaluation: COCO mask AP (and box AP), chosen by the test dataset's evaluator_type. Runs on CPU when there is
no GPU; with MODEL.DEVICE cpu, --num-gpus N starts N CPU processes (gloo); torchrun / srun
processes join directly. See projects/mask_rcnn/README.md.
"""

import agvm  # noqa: F401  (first: detectron2 0.6 compatibility patches)

from agvm.detectron2 import AGVMTrainer, default_argument_parser, launch_cli, setup_cfg, train_or_evaluate  # noqa: F401


class Trainer(AGVMTrainer):
    """Mask R-CNN with AGVM when SOLVER.AGVM.ENABLED (else the plain optimizer of SOLVER.OPTIMIZER)."""


setup = setup_cfg  # the run's config: defaults, agvm keys, --config-file, KEY VALUE overrides; checked


def main(args):
    return train_or_evaluate(setup(args), args, Trainer)


if __name__ == "__main__":
    launch_cli(main)
