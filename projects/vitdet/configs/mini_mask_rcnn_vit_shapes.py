"""A CPU-sized ViTDet-style Mask R-CNN on the shapes data (128 px, 5 classes) with AdamW, ViT
layer-wise LR decay and AGVM: a 4-block, 64-wide ViT (patch 16) + a simple feature pyramid
(p2–p6, 64 channels), detectron2's Mask R-CNN heads made small (as configs/mini/). Trains a few
hundred iterations in minutes on 2 CPU cores; the same code path as a full-scale LazyConfig.

    python projects/vitdet/train_net.py --config-file projects/vitdet/configs/mini_mask_rcnn_vit_shapes.py
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
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.solver import WarmupParamScheduler
from detectron2.solver.build import get_default_optimizer_params
from fvcore.common.param_scheduler import MultiStepParamScheduler

from agvm.detectron2.cli import build_evaluator
from agvm.detectron2.lazy import agvm_optimizer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # projects/vitdet
from vitdet import SimpleFeaturePyramid, ViT, vit_lr_decay_rate  # noqa: E402

IMAGE = 128  # pixels
DEPTH = 4  # ViT blocks

# ------------------------------------------------------------------------------ model
model = model_zoo.get_config("common/models/mask_rcnn_fpn.py").model
model.backbone = L(SimpleFeaturePyramid)(
    net=L(ViT)(img_size=IMAGE, patch_size=16, embed_dim=64, depth=DEPTH, num_heads=4, mlp_ratio=2.0,
               drop_path_rate=0.0, out_feature="last_feat"),
    in_feature="${.net.out_feature}",
    out_channels=64,
    scale_factors=(4.0, 2.0, 1.0, 0.5),
    top_block=L(LastLevelMaxPool)(),
    norm="LN",
    square_pad=IMAGE,
)
model.proposal_generator.head.in_channels = 64
model.proposal_generator.anchor_generator.sizes = [[8], [16], [32], [64], [128]]
model.proposal_generator.batch_size_per_image = 128
model.proposal_generator.pre_nms_topk = (600, 300)
model.proposal_generator.post_nms_topk = (300, 100)
model.roi_heads.num_classes = 5  # len(agvm.data.shapes.THING_CLASSES)
model.roi_heads.batch_size_per_image = 128
model.roi_heads.box_head.input_shape = ShapeSpec(channels=64, height=7, width=7)
model.roi_heads.box_head.fc_dims = [256, 256]
model.roi_heads.box_predictor.input_shape = ShapeSpec(channels=256)
model.roi_heads.mask_head.input_shape = ShapeSpec(channels=64, width=14, height=14)
model.roi_heads.mask_head.conv_dims = [64, 64]
model.pixel_mean = [127.5, 127.5, 127.5]
model.pixel_std = [64.0, 64.0, 64.0]
model.input_format = "RGB"

# ------------------------------------------------------------------------------ data
dataloader = OmegaConf.create()
dataloader.train = L(build_detection_train_loader)(
    dataset=L(get_detection_dataset_dicts)(names="shapes_train"),
    mapper=L(DatasetMapper)(
        is_train=True,
        augmentations=[L(T.ResizeShortestEdge)(short_edge_length=IMAGE, max_size=IMAGE), L(T.RandomFlip)(horizontal=True)],
        image_format="RGB",
        use_instance_mask=True,
    ),
    total_batch_size=8,
    num_workers=0,
)
dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="shapes_val", filter_empty=False),
    mapper=L(DatasetMapper)(
        is_train=False,
        augmentations=[L(T.ResizeShortestEdge)(short_edge_length=IMAGE, max_size=IMAGE)],
        image_format="RGB",
    ),
    num_workers=0,
)
dataloader.evaluator = L(build_evaluator)(cfg=None, dataset_name="shapes_val", output_folder="${train.output_dir}/inference")

# ------------------------------------------------------------------------------ optimizer: AdamW + ViT LR decay + AGVM
optimizer = L(torch.optim.AdamW)(
    params=L(get_default_optimizer_params)(base_lr="${..lr}", weight_decay_norm=0.0),
    lr=4e-4,
    betas=(0.9, 0.999),
    weight_decay=0.1,
)
optimizer.params.lr_factor_func = partial(vit_lr_decay_rate, num_layers=DEPTH, lr_decay_rate=0.7)
optimizer.params.overrides = {"pos_embed": {"weight_decay": 0.0}}
optimizer = agvm_optimizer(optimizer, enabled=True, momentum=0.97, interval=10)  # start_iter -1: warm-up + 100

# ------------------------------------------------------------------------------ schedule and training
MAX_ITER = 600
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(values=[1.0, 0.1, 0.01], milestones=[450, 550], num_updates=MAX_ITER),
    warmup_length=100 / MAX_ITER,
    warmup_factor=0.001,
)
train = model_zoo.get_config("common/train.py").train
train.max_iter = MAX_ITER
train.device = "cpu"
train.output_dir = "./output/vitdet/mini_mask_rcnn_vit_shapes"
train.eval_period = 0  # evaluate once, after training
train.checkpointer = dict(period=100000, max_to_keep=2)  # the final checkpoint only
train.log_period = 20
train.seed = 0
