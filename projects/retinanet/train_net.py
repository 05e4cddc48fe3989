#!/usr/bin/env python
"""RetinaNet R18 at extreme batch (paper: PMD-LAMB vs AdamW+AGVM, up to 10K) with AGVM on detectron2; metric: COCO box AP. The configs: projects/retinanet/configs/.

    python projects/retinanet/train_net.py --config-file projects/retinanet/configs/<cell>.yaml --num-gpus 8
    python projects/retinanet/train_net.py --config-file projects/retinanet/configs/mini/<cell>.yaml   # CPU

`--help` lists the options and the AGVM keys; projects/retinanet/README.md the cells.
"""

import agvm  # noqa: F401  (first: detectron2 0.6 compatibility patches)

from agvm.detectron2 import AGVMTrainer, launch_cli, setup_cfg, train_or_evaluate


class Trainer(AGVMTrainer):
    """AdamW+AGVM or PMD-LAMB (SOLVER.OPTIMIZER, SOLVER.AGVM.ENABLED); evaluated by COCO box AP."""

    metrics = ("box AP",)


def main(args):
    return train_or_evaluate(setup_cfg(args), args, Trainer)


if __name__ == "__main__":
    launch_cli(main)
