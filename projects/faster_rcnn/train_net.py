#!/usr/bin/env python
"""Faster R-CNN (paper Table 2, first block; the AdamW-family table) with AGVM on detectron2; metric: COCO box AP. The configs: projects/faster_rcnn/configs/.

    python projects/faster_rcnn/train_net.py --config-file projects/faster_rcnn/configs/<cell>.yaml --num-gpus 8
    python projects/faster_rcnn/train_net.py --config-file projects/faster_rcnn/configs/mini/<cell>.yaml   # CPU

`--help` lists the options and the AGVM keys; projects/faster_rcnn/README.md the cells.
"""

import agvm  # noqa: F401  (first: detectron2 0.6 compatibility patches)

from agvm.detectron2 import AGVMTrainer, launch_cli, setup_cfg, train_or_evaluate


class Trainer(AGVMTrainer):
    """SGD/SAM/AdamW/LAMB (SOLVER.OPTIMIZER), with AGVM when SOLVER.AGVM.ENABLED; COCO box AP."""

    metrics = ("box AP",)


def main(args):
    return train_or_evaluate(setup_cfg(args), args, Trainer)


if __name__ == "__main__":
    launch_cli(main)
