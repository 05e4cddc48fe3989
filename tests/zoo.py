"""detectron2 model-zoo families, built small on CPU, shared by the model and grouping tests.

A *family* is a set of model-zoo configs that build the same kind of model and differ only in
depth, width or schedule (e.g. mask_rcnn_R_50_FPN_1x / _3x / R_101 / quick_schedules); one
representative per family is enough to exercise every code path. Yaml configs are built at
ResNet depth 50 (ResNeXt-50 for the X-101/152 ones) and tiny inputs; LazyConfig (``.py``)
families as written, except that SyncBN becomes BN on CPU.
"""

from __future__ import annotations

import glob
import os
from typing import Dict, List, Tuple

import torch

import agvm  # noqa: F401

from detectron2 import model_zoo
from detectron2.config import instantiate
from detectron2.structures import BitMasks, Boxes, Instances

ZOO_ROOT = os.path.dirname(model_zoo.get_config_file("Base-RCNN-FPN.yaml"))
LAZY_MODELS = [
    "common/models/mask_rcnn_fpn.py",
    "common/models/mask_rcnn_c4.py",
    "common/models/cascade_rcnn.py",
    "common/models/keypoint_rcnn_fpn.py",
    "common/models/panoptic_fpn.py",
    "common/models/retinanet.py",
    "common/models/fcos.py",
    "new_baselines/mask_rcnn_regnetx_4gf_dds_FPN_100ep_LSJ.py",
]
IMAGE = 64  # pixels, square test images


def _family_key(cfg) -> Tuple:
    m = cfg.MODEL
    return (
        m.META_ARCHITECTURE, m.BACKBONE.NAME, m.PROPOSAL_GENERATOR.NAME, m.ROI_HEADS.NAME,
        m.ROI_BOX_HEAD.NAME, m.MASK_ON, m.KEYPOINT_ON, m.RESNETS.NORM, m.FPN.NORM,
        m.ROI_BOX_HEAD.NORM, tuple(m.RESNETS.DEFORM_ON_PER_STAGE), m.RESNETS.STRIDE_IN_1X1,
        m.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG, m.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK,
        m.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE, m.LOAD_PROPOSALS, m.RESNETS.NUM_GROUPS > 1,
    )


def yaml_families() -> Dict[str, List[str]]:
    """{representative config: [all configs of its family]}, over every model-zoo yaml."""
    names = sorted(
        os.path.relpath(p, ZOO_ROOT) for p in glob.glob(f"{ZOO_ROOT}/**/*.yaml", recursive=True)
    )
    families: Dict[Tuple, List[str]] = {}
    for name in names:
        if os.path.basename(name).startswith("Base-"):
            continue
        families.setdefault(_family_key(model_zoo.get_config(name)), []).append(name)
    return {members[0]: members for members in families.values()}


def small_yaml_cfg(name: str):
    cfg = model_zoo.get_config(name)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.RESNETS.DEPTH = 50
    for key in ("RESNETS", "FPN", "ROI_BOX_HEAD", "ROI_MASK_HEAD", "SEM_SEG_HEAD", "ROI_KEYPOINT_HEAD"):
        node = getattr(cfg.MODEL, key)
        if node.get("NORM") == "SyncBN":
            node.NORM = "BN"
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 64
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 32
    cfg.INPUT.MIN_SIZE_TRAIN = (IMAGE,)
    cfg.INPUT.MAX_SIZE_TRAIN = IMAGE
    return cfg


def _replace_syncbn(node):
    if isinstance(node, dict):
        for k, v in list(node.items()):
            if v == "SyncBN":
                node[k] = "BN"
            else:
                _replace_syncbn(v)
    elif isinstance(node, (list, tuple)):
        for v in node:
            _replace_syncbn(v)


def build_lazy_model(name: str):
    cfg = model_zoo.get_config(name)
    model_cfg = cfg.model
    _replace_syncbn(model_cfg)
    return instantiate(model_cfg)


def tiny_batch(num_classes: int = 3, n: int = 2, keypoints: int = 0, seed: int = 0):
    """``n`` random images with two boxes each, masks, semantic labels and (optionally) keypoints."""
    g = torch.Generator().manual_seed(seed)
    batch = []
    for _ in range(n):
        image = torch.randint(0, 255, (3, IMAGE, IMAGE), generator=g, dtype=torch.uint8).float()
        boxes = torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 10.0, 60.0, 50.0]])
        inst = Instances((IMAGE, IMAGE))
        inst.gt_boxes = Boxes(boxes)
        inst.gt_classes = torch.tensor([0, min(1, num_classes - 1)])
        masks = torch.zeros(2, IMAGE, IMAGE, dtype=torch.bool)
        for i, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
            masks[i, y0:y1, x0:x1] = True
        inst.gt_masks = BitMasks(masks)
        if keypoints:
            kp = torch.rand(2, keypoints, 3, generator=g) * IMAGE
            kp[..., 2] = 2.0
            inst.gt_keypoints = __import__("detectron2.structures", fromlist=["Keypoints"]).Keypoints(kp)
        sem = torch.randint(0, 2, (IMAGE, IMAGE), generator=g)
        proposals = Instances((IMAGE, IMAGE))  # for the Fast R-CNN (precomputed proposals) family
        proposals.proposal_boxes = Boxes(torch.cat([boxes, boxes + 2.0]))
        proposals.objectness_logits = torch.ones(4)
        batch.append(
            {"image": image, "instances": inst, "sem_seg": sem, "proposals": proposals,
             "height": IMAGE, "width": IMAGE}
        )
    return batch


def num_keypoints(model) -> int:
    roi_heads = getattr(model, "roi_heads", None)
    head = getattr(roi_heads, "keypoint_head", None) if roi_heads is not None else None
    if head is None:
        return 0
    return head.score_lowres.out_channels if hasattr(head, "score_lowres") else 17
