#!/usr/bin/env python
"""Panoptic FPN (paper Table 2, fourth block) with AGVM on detectron2; metric: PQ. The configs: projects/panoptic_fpn/configs/.

    python projects/panoptic_fpn/train_net.py --config-file projects/panoptic_fpn/configs/<cell>.yaml --num-gpus 8
    python projects/panoptic_fpn/train_net.py --config-file projects/panoptic_fpn/configs/mini/<cell>.yaml   # CPU

`--help` lists the options and the AGVM keys; projects/panoptic_fpn/README.md the cells.
"""

import agvm  # noqa: F401  (first: detectron2 0.6 compatibility patches)

from agvm.detectron2 import AGVMTrainer, launch_cli, setup_cfg, train_or_evaluate


class Trainer(AGVMTrainer):
    """AGVM when SOLVER.AGVM.ENABLED, else the plain SOLVER.OPTIMIZER; evaluated by PQ, with the box/mask AP and stuff mIoU of its parts."""

    metrics = ("PQ", "box AP", "mIoU")


def main(args):
    return train_or_evaluate(setup_cfg(args), args, Trainer)


if __name__ == "__main__":
    launch_cli(main)
