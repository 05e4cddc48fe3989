"""ViTDet-B Mask R-CNN (common/vitdet_b_100ep.py) at batch 256, AdamW + AGVM.

Square-root LR rule from the recipe's (64, 0.0001): lr 0.0002; 100 epochs = 46094 iterations, LR ×0.1 at
40972 and 44386; exponential warm-up 920 iterations from 0.001; AGVM from iteration 1020
(α = 0.97, τ = 10); whole-model gradient norm clipped to 1.0 in [820, 1020]; 8 GPUs ×
4 images × 8 accumulation steps (``train.grad_accum_steps``). See vitdet/large_batch.py.
Its μ = 1 twin: vitdet_b_mask_rcnn_b256_mu1.py.

    python projects/vitdet/train_net.py --config-file projects/vitdet/configs/vitdet_b_mask_rcnn_b256_agvm.py --num-gpus 8
"""

import os
import sys

from .common.vitdet_b_100ep import dataloader, lr_multiplier, model, optimizer, train  # noqa: F401

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # projects/vitdet
from vitdet.large_batch import to_large_batch  # noqa: E402

to_large_batch(globals(), batch=256, agvm=True, name="vitdet_b_mask_rcnn_b256_agvm", per_gpu=4)
