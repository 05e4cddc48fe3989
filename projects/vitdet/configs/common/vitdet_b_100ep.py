"""ViTDet-B Mask R-CNN, COCO, 100 epochs at batch 64: the recipe of detectron2's
``projects/ViTDet/configs/COCO/mask_rcnn_vitdet_b_100ep.py`` (with its ``common/coco_loader_lsj.py``
and ``common/models/mask_rcnn_vitdet.py``), written out for every detectron2: AdamW lr 1e-4,
betas (0.9, 0.999), weight decay 0.1 (0 for norms and ``pos_embed``), layer-wise LR decay 0.7
over 12 blocks, 250 iterations of linear warm-up, LR ×0.1 at 163889 and 177546 of 184375;
1024 px large-scale jitter; AMP. The base of the large-batch configs (``vitdet_b_*``).

The backbone is ``vitdet.ViT`` + ``vitdet.SimpleFeaturePyramid``: detectron2's own when it has
``modeling.backbone.vit`` (window attention in blocks 0, 1, 3, 4, 6, 7, 9, 10, relative
positions, MAE initialisation), otherwise (detectron2 0.6) the timm ViT-B/16 of
``vitdet.backbone``: global attention in every block, absolute positions, and no checkpoint
(``train.init_checkpoint`` is "": MAE weights would need converting to its parameter names).
"""

import os
import sys
from functools import partial

import torch
from omegaconf import OmegaConf

from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.data import DatasetMapper, build_detection_test_loader, build_detection_train_loader
from detectron2.data import get_detection_dataset_dicts
from detectron2.data import transforms as T
from detectron2.evaluation import COCOEvaluator
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.solver import WarmupParamScheduler
from detectron2.solver.build import get_default_optimizer_params
from fvcore.common.param_scheduler import MultiStepParamScheduler

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # projects/vitdet
from vitdet import HAS_D2_VIT, ChannelLayerNorm, SimpleFeaturePyramid, ViT, vit_lr_decay_rate  # noqa: E402
from vitdet.large_batch import require  # noqa: E402

require("ViTDet-B (projects/vitdet/configs/common/vitdet_b_100ep.py)", vit=True)

IMAGE = 1024  # pixels

# ------------------------------------------------------------------------------ model
model = model_zoo.get_config("common/models/mask_rcnn_fpn.py").model
vit_args = dict(img_size=IMAGE, patch_size=16, embed_dim=768, depth=12, num_heads=12, drop_path_rate=0.1,
                mlp_ratio=4, qkv_bias=True, out_feature="last_feat")
if HAS_D2_VIT:  # detectron2's ViT: windowed attention and relative positions, as the recipe
    vit_args.update(window_size=14, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                    window_block_indexes=[0, 1, 3, 4, 6, 7, 9, 10], residual_block_indexes=[], use_rel_pos=True)
model.backbone = L(SimpleFeaturePyramid)(
    net=L(ViT)(**vit_args),
    in_feature="${.net.out_feature}",
    out_channels=256,
    scale_factors=(4.0, 2.0, 1.0, 0.5),
    top_block=L(LastLevelMaxPool)(),
    norm="LN",
    square_pad=IMAGE,
)
# channel LayerNorm in the heads; detectron2 0.6's get_norm has no "LN": the same norm as a callable
model.roi_heads.box_head.conv_norm = model.roi_heads.mask_head.conv_norm = "LN" if HAS_D2_VIT else ChannelLayerNorm
model.proposal_generator.head.conv_dims = [-1, -1]  # 2 convolutions in the RPN head
model.roi_heads.box_head.conv_dims = [256, 256, 256, 256]  # 4conv1fc box head
model.roi_heads.box_head.fc_dims = [1024]
model.pixel_mean = [123.675, 116.28, 103.53]  # RGB, ImageNet
model.pixel_std = [58.395, 57.12, 57.375]
model.input_format = "RGB"

# ------------------------------------------------------------------------------ data: 1024 px large-scale jitter
dataloader = OmegaConf.create()
dataloader.train = L(build_detection_train_loader)(
    dataset=L(get_detection_dataset_dicts)(names="coco_2017_train"),
    mapper=L(DatasetMapper)(
        is_train=True,
        augmentations=[
            L(T.RandomFlip)(horizontal=True),
            L(T.ResizeScale)(min_scale=0.1, max_scale=2.0, target_height=IMAGE, target_width=IMAGE),
            # detectron2 0.6's model pads only to the stride: the crop pads to the square here
            L(T.FixedSizeCrop)(crop_size=(IMAGE, IMAGE), pad=not HAS_D2_VIT),
        ],
        image_format="RGB",
        use_instance_mask=True,
        recompute_boxes=True,
    ),
    total_batch_size=64,
    num_workers=4,
)
dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="coco_2017_val", filter_empty=False),
    mapper=L(DatasetMapper)(
        is_train=False,
        augmentations=[L(T.ResizeShortestEdge)(short_edge_length=IMAGE, max_size=IMAGE)],
        image_format="RGB",
    ),
    num_workers=4,
)
dataloader.evaluator = L(COCOEvaluator)(dataset_name="${..test.dataset.names}")

# ------------------------------------------------------------------------------ optimizer: AdamW + ViT LR decay
optimizer = L(torch.optim.AdamW)(
    params=L(get_default_optimizer_params)(base_lr="${..lr}", weight_decay_norm=0.0),
    lr=1e-4,
    betas=(0.9, 0.999),
    weight_decay=0.1,
)
optimizer.params.lr_factor_func = partial(vit_lr_decay_rate, num_layers=12, lr_decay_rate=0.7)
optimizer.params.overrides = {"pos_embed": {"weight_decay": 0.0}}

# ------------------------------------------------------------------------------ schedule and training
train = model_zoo.get_config("common/train.py").train
train.amp.enabled = True
train.ddp.fp16_compression = True
train.init_checkpoint = "detectron2://ImageNetPretrained/MAE/mae_pretrain_vit_base.pth" if HAS_D2_VIT else ""
train.max_iter = 184375  # 100 epochs at batch 64
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(values=[1.0, 0.1, 0.01], milestones=[163889, 177546], num_updates=train.max_iter),
    warmup_length=250 / train.max_iter,
    warmup_factor=0.001,
)
