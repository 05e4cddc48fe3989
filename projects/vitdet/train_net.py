#!/usr/bin/env python
"""ViTDet-style detectors (LazyConfig ``.py`` configs) with AGVM: detectron2's
``tools/lazyconfig_train_net.py`` on agvm's trainer (:mod:`agvm.detectron2.lazy_train`).

    python projects/vitdet/train_net.py --config-file projects/vitdet/configs/mini_mask_rcnn_vit_shapes.py   # CPU
    python projects/vitdet/train_net.py --config-file <config>.py --num-gpus 8 optimizer.agvm.enabled=True
    python projects/vitdet/train_net.py --config-file <config>.py --eval-only train.init_checkpoint=<model>.pth
"""

import os
import sys

import agvm  # noqa: F401  (first: detectron2 0.6 compatibility patches)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the vitdet package

import vitdet  # noqa: E402,F401  (the ViT backbone and pyramid the configs name)
from agvm.detectron2.lazy_train import launch_lazy_cli, lazy_main  # noqa: E402


def main(args):
    return lazy_main(args)


if __name__ == "__main__":
    launch_lazy_cli(main)
