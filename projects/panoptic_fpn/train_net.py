#!/usr/bin/env python
"""Panoptic FPN on COCO panoptic (paper Table 2, fourth block) with AGVM on detectron2.

    python projects/panoptic_fpn/train_net.py --config-file projects/panoptic_fpn/configs/mini/panoptic_fpn_R18_FPN_shapes.yaml
    python projects/panoptic_fpn/train_net.py --config-file projects/panoptic_fpn/configs/<cell>.yaml --num-gpus 8
    python projects/panoptic_fpn/train_net.py --config-file <cfg> --eval-only MODEL.WEIGHTS <checkpoint>

Evaluation: PQ (agvm.evaluation, the COCO panoptic rules), plus box/mask AP and stuff mIoU, chosen by the test dataset's evaluator_type. Runs on CPU when there is
no GPU; with MODEL.DEVICE cpu, --num-gpus N starts N CPU processes (gloo); torchrun / srun
processes join directly. See projects/panoptic_fpn/README.md.
"""

import agvm  # noqa: F401  (first: detectron2 0.6 compatibility patches)

from agvm.detectron2 import AGVMTrainer, default_argument_parser, launch_cli, setup_cfg, train_or_evaluate  # noqa: F401


class Trainer(AGVMTrainer):
    """Panoptic FPN with AGVM when SOLVER.AGVM.ENABLED (else the plain optimizer of SOLVER.OPTIMIZER)."""


setup = setup_cfg  # the run's config: defaults, agvm keys, --config-file, KEY VALUE overrides; checked


def main(args):
    return train_or_evaluate(setup(args), args, Trainer)


if __name__ == "__main__":
    launch_cli(main)
