#!/usr/bin/env python
"""Semantic FPN on ADE20K (paper Table 2, third block) with AGVM on detectron2; metric: mIoU. The configs: projects/semantic_fpn/configs/.

    python projects/semantic_fpn/train_net.py --config-file projects/semantic_fpn/configs/<cell>.yaml --num-gpus 8
    python projects/semantic_fpn/train_net.py --config-file projects/semantic_fpn/configs/mini/<cell>.yaml   # CPU

`--help` lists the options and the AGVM keys; projects/semantic_fpn/README.md the cells.
"""

import agvm  # noqa: F401  (first: detectron2 0.6 compatibility patches)

from agvm.detectron2 import AGVMTrainer, launch_cli, setup_cfg, train_or_evaluate


class Trainer(AGVMTrainer):
    """AGVM when SOLVER.AGVM.ENABLED, else the plain SOLVER.OPTIMIZER; evaluated by mIoU."""

    metrics = ("mIoU",)


def main(args):
    return train_or_evaluate(setup_cfg(args), args, Trainer)


if __name__ == "__main__":
    launch_cli(main)
