#!/usr/bin/env python
"""Mask R-CNN (paper Table 2, second block; the anchor and momentum ablations) with AGVM on detectron2; metric: COCO mask AP. The configs: projects/mask_rcnn/configs/.

    python projects/mask_rcnn/train_net.py --config-file projects/mask_rcnn/configs/<cell>.yaml --num-gpus 8
    python projects/mask_rcnn/train_net.py --config-file projects/mask_rcnn/configs/mini/<cell>.yaml   # CPU

`--help` lists the options and the AGVM keys; projects/mask_rcnn/README.md the cells.
"""

import agvm  # noqa: F401  (first: detectron2 0.6 compatibility patches)

from agvm.detectron2 import AGVMTrainer, launch_cli, setup_cfg, train_or_evaluate


class Trainer(AGVMTrainer):
    """AGVM when SOLVER.AGVM.ENABLED, else the plain SOLVER.OPTIMIZER; evaluated by COCO mask AP (and box AP)."""

    metrics = ("box AP", "mask AP")


def main(args):
    return train_or_evaluate(setup_cfg(args), args, Trainer)


if __name__ == "__main__":
    launch_cli(main)
