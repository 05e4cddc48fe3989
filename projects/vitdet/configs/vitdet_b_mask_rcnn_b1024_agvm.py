"""ViTDet-B Mask R-CNN (common/vitdet_b_100ep.py) at batch 1024, AdamW + AGVM.

Square-root LR rule from the recipe's (64, 0.0001): lr 0.0004; 100 epochs = 11524 iterations, LR ×0.1 at
10243 and 11097; exponential warm-up 230 iterations from 0.001; AGVM from iteration 330
(α = 0.97, τ = 10); whole-model gradient norm clipped to 1.0 in [130, 330]; 8 GPUs ×
4 images × 32 accumulation steps (``train.grad_accum_steps``). See vitdet/large_batch.py.
Its μ = 1 twin: vitdet_b_mask_rcnn_b1024_mu1.py.

    python projects/vitdet/train_net.py --config-file projects/vitdet/configs/vitdet_b_mask_rcnn_b1024_agvm.py --num-gpus 8
"""

import os
import sys

from .common.vitdet_b_100ep import dataloader, lr_multiplier, model, optimizer, train  # noqa: F401

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # projects/vitdet
from vitdet.large_batch import to_large_batch  # noqa: E402

to_large_batch(globals(), batch=1024, agvm=True, name="vitdet_b_mask_rcnn_b1024_agvm", per_gpu=4)
