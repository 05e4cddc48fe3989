#!/usr/bin/env python
"""The paper's effective-batch experiment (Φ of RetinaNet's dense head vs its backbone) with AGVM
on detectron2, mini scale. The configs: projects/effective_batch/configs/ (one per variant).

    python projects/effective_batch/train_net.py --config-file projects/effective_batch/configs/shared.yaml

`--help` lists the options and the AGVM keys; projects/effective_batch/README.md the variants.
"""

import agvm  # noqa: F401  (first: detectron2 0.6 compatibility patches)

from agvm.detectron2 import AGVMTrainer, launch_cli, setup_cfg, train_or_evaluate
from effective_batch import add_effective_batch_config  # this project's package: registers the model


def main(args):
    """Train (or evaluate) one variant; ``args``: :func:`agvm.detectron2.default_argument_parser`'s."""
    return train_or_evaluate(setup_cfg(args, config_adders=[add_effective_batch_config]), args, AGVMTrainer)


if __name__ == "__main__":
    launch_cli(main, config_adders=[add_effective_batch_config])
