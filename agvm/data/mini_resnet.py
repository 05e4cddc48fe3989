"""The parts of the mini pretrained backbone's recipe (:mod:`agvm.data.pretrained`): the mini
configs' ResNet-18 as detectron2 builds it, the classifier around it, and the shape-crop
classification data it is trained on. Nothing here caches or builds anything.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from typing import Dict, Iterator, List, Tuple

import numpy as np
import torch
from PIL import Image
from torch import nn

# detectron2 announces torch.jit.script as deprecated on every import (as agvm.detectron2 does, silence it)
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)

from detectron2.config import CfgNode, get_cfg  # noqa: E402
from detectron2.layers import ShapeSpec  # noqa: E402
from detectron2.modeling.backbone.resnet import ResNet, build_resnet_backbone  # noqa: E402

__all__ = ["PIXEL_MEAN", "PIXEL_STD", "Classifier", "accuracy", "build_mini_resnet", "dihedral", "mini_resnet_cfg",
           "shape_crops", "torch_threads"]

PIXEL_MEAN, PIXEL_STD = 127.5, 64.0  # as configs/mini (RGB)


def mini_resnet_cfg() -> CfgNode:
    """A detectron2 config holding the mini configs' backbone settings.

    ``MODEL.RESNETS``: ``DEPTH`` 18, ``RES2_OUT_CHANNELS`` 64, ``NORM`` "BN", ``OUT_FEATURES``
    res2..res5 (other ResNet keys at detectron2's defaults, as in ``configs/mini``);
    ``MODEL.BACKBONE.FREEZE_AT`` 0; pixel mean / std 127.5 / 64 (RGB).
    """
    cfg = get_cfg()
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.PIXEL_MEAN = [PIXEL_MEAN] * 3
    cfg.MODEL.PIXEL_STD = [PIXEL_STD] * 3
    cfg.INPUT.FORMAT = "RGB"
    return cfg


def build_mini_resnet() -> ResNet:
    """The mini configs' ResNet-18 (``build_resnet_backbone`` on :func:`mini_resnet_cfg`, 3
    input channels), randomly initialised from torch's global RNG."""
    return build_resnet_backbone(mini_resnet_cfg(), ShapeSpec(channels=3))


class Classifier(nn.Module):
    """The mini ResNet-18 (``bottom_up``) + global average pooling + a linear classifier
    (``head``) of ``num_classes``; takes uint8/float RGB (N, 3, H, W) in [0, 255]."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.bottom_up = build_mini_resnet()
        self.head = nn.Linear(self.bottom_up.output_shape()["res5"].channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.float() - PIXEL_MEAN) / PIXEL_STD
        return self.head(self.bottom_up(x)["res5"].mean(dim=(2, 3)))


def shape_crops(
    folder: str, split: str, crop_size: int = 64, margin: float = 0.25
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Square crops of every thing instance of a shapes dataset split, and their classes.

    Each instance's ``bbox`` is grown to a square of side ``max(w, h) * (1 + 2 * margin)``
    (capped at the image size) around its centre, shifted inside the image (so it still holds
    the whole object), and resized bilinearly to ``crop_size`` px.

    Args:
        folder: a dataset folder of :mod:`agvm.data.shapes` (e.g. from ``ensure_shapes``).
        split: ``"train"`` or ``"val"``.
        crop_size: output side in px; default 64.
        margin: context on each side, as a fraction of the box's longer side; default 0.25.

    Returns:
        ``(images, labels)``: uint8 ``(N, 3, crop_size, crop_size)`` RGB and int64 ``(N,)``
        thing-class indices (``category_id - 1``, see ``THING_CLASSES``), in annotation order.
    """
    with open(os.path.join(folder, "annotations", f"instances_{split}.json")) as f:
        coco = json.load(f)
    files = {img["id"]: img["file_name"] for img in coco["images"]}
    by_image: Dict[int, List[dict]] = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    crops, labels = [], []
    for image_id in sorted(by_image):
        with Image.open(os.path.join(folder, "images", split, files[image_id])) as im:
            im = im.convert("RGB")
            w_img, h_img = im.size
            for ann in by_image[image_id]:
                x, y, w, h = ann["bbox"]
                side = min(max(w, h) * (1.0 + 2.0 * margin), w_img, h_img)
                x0 = min(max(x + w / 2.0 - side / 2.0, 0.0), w_img - side)
                y0 = min(max(y + h / 2.0 - side / 2.0, 0.0), h_img - side)
                crop = im.resize((crop_size, crop_size), Image.BILINEAR,
                                 box=(x0, y0, x0 + side, y0 + side))
                crops.append(np.asarray(crop, dtype=np.uint8).transpose(2, 0, 1))
                labels.append(ann["category_id"] - 1)
    if not crops:
        raise ValueError(f"no instances in {folder} ({split})")
    return torch.from_numpy(np.stack(crops)), torch.tensor(labels, dtype=torch.int64)


def dihedral(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random flips / transposes per sample (the shape classes are invariant to them)."""
    n = x.shape[0]
    for flip in (lambda t: t.flip(-1), lambda t: t.flip(-2), lambda t: t.transpose(-1, -2)):
        m = torch.rand(n, generator=g) < 0.5
        x = torch.where(m[:, None, None, None], flip(x), x)
    return x


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, bs: int = 256) -> float:
    """Fraction of ``images`` that ``model`` (put in eval mode, then back in train mode)
    classifies as ``labels``, in batches of ``bs``."""
    model.eval()
    correct = sum(
        int((model(images[i:i + bs]).argmax(1) == labels[i:i + bs]).sum())
        for i in range(0, len(images), bs)
    )
    model.train()
    return correct / len(images)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch threads, restoring the previous number afterwards."""
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)
