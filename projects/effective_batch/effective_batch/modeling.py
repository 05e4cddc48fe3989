"""The RetinaNet of the paper's effective-batch experiment (AGVM, NeurIPS 2022).

The paper explains why a dense head's gradient variance Φ is smaller than the backbone's: the
head sees many more samples per image (every anchor location of every pyramid level) than the
backbone. Its controlled experiment shrinks the head's effective batch in three ways and shows
the head's and the backbone's Φ curves move closer after each:

1. unshared heads: one head per FPN level, so each head sees one level's locations only;
2. no FPN: the head runs on one backbone level (here res4, stride 16; configs only);
3. masked losses: only a random fraction of anchor locations contributes to the losses.

:class:`EffectiveBatchRetinaNet` is detectron2's ``RetinaNet`` with (1) and (3) behind
``MODEL.EFFECTIVE_BATCH.*`` (:func:`effective_batch.add_effective_batch_config`); with the
defaults it is the stock model (same parameters, same initialisation, same losses, same RNG
use). (2) needs no key: ``MODEL.BACKBONE.NAME "build_resnet_backbone"``,
``MODEL.RESNETS.OUT_FEATURES ["res4"]``, ``MODEL.RETINANET.IN_FEATURES ["res4"]`` and all anchor
sizes in one level (``projects/effective_batch/configs/no_fpn.yaml``). The only addition it
needs is in checkpoint loading: a bare ResNet backbone holds its stages at
``backbone.<stage>``, so checkpoint keys ``backbone.bottom_up.*`` (ResNet weights saved from an
FPN model, e.g. ``agvm-pretrained://shapes_r18``) are read as ``backbone.*`` there.

AGVM's automatic grouping (:mod:`agvm.detectron2.groups`) needs no rule: the per-level heads
live under ``head.*`` (``dense_head``), the ResNet under ``backbone.bottom_up.*`` with FPN or
``backbone.*`` without (``backbone``), the FPN convs under the rest of ``backbone.*`` (``neck``).

Importing this module registers ``EffectiveBatchRetinaNet`` in detectron2's
``META_ARCH_REGISTRY`` (``MODEL.META_ARCHITECTURE: "EffectiveBatchRetinaNet"``).
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
from torch import Tensor, nn

from detectron2.config import CfgNode as CN
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.modeling.meta_arch.retinanet import RetinaNet, RetinaNetHead
from detectron2.utils.events import get_event_storage

__all__ = [
    "EffectiveBatchRetinaNet",
    "UnsharedRetinaNetHead",
    "check_loss_keep",
    "location_keep_mask",
]

_KEEP_KEY = "MODEL.EFFECTIVE_BATCH.LOSS_KEEP"


def check_loss_keep(value) -> float:
    """``value`` as a float if it is a valid ``MODEL.EFFECTIVE_BATCH.LOSS_KEEP`` (a number in
    (0, 1]); raises ValueError naming the key and the value otherwise."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0 < value <= 1
    if not ok:
        raise ValueError(
            f"{_KEEP_KEY}={value!r} must be a number in (0, 1]: the fraction of anchor locations whose losses "
            "are kept (1.0 = all, 0.25 = 75 % masked)"
        )
    return float(value)


def location_keep_mask(
    num_images: int,
    positions_per_level: Sequence[int],
    anchors_per_level: Sequence[int],
    keep: float,
    device: Optional[torch.device] = None,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """A random mask over the anchors of a batch that keeps whole anchor locations.

    Args:
        num_images: N.
        positions_per_level: H_l·W_l of each level (spatial positions).
        anchors_per_level: anchors per position A_l of each level.
        keep: fraction of positions kept per image and level, in (0, 1]: exactly
            ``max(1, round(keep · H_l·W_l))`` of them, uniformly without replacement.
        device: of the mask (default CPU).
        generator: torch generator (default: torch's global one of ``device``).

    Returns:
        bool tensor (N, Σ H_l·W_l·A_l) in detectron2's anchor order (level, position,
        anchor): True = the anchor's losses count.
    """
    keep = check_loss_keep(keep)
    if len(positions_per_level) != len(anchors_per_level):
        raise ValueError(
            f"positions_per_level has {len(positions_per_level)} levels, anchors_per_level {len(anchors_per_level)}"
        )
    masks = []
    for positions, anchors in zip(positions_per_level, anchors_per_level):
        k = max(1, int(math.floor(keep * positions + 0.5)))
        if k >= positions:
            m = torch.ones(num_images, positions, dtype=torch.bool, device=device)
        else:
            scores = torch.rand(num_images, positions, device=device, generator=generator)
            m = torch.zeros(num_images, positions, dtype=torch.bool, device=device)
            m.scatter_(1, scores.topk(k, dim=1).indices, True)
        masks.append(m.repeat_interleave(anchors, dim=1))
    return torch.cat(masks, dim=1)


class UnsharedRetinaNetHead(nn.Module):
    """One :class:`RetinaNetHead` per feature level (``heads[l]`` sees level ``l`` only).

    Args:
        heads: the per-level heads, each built for a single input level.

    ``forward(features)`` returns what ``RetinaNetHead.forward`` does: ``(logits, bbox_reg)``,
    lists of per-level (N, A·K, H_l, W_l) and (N, A·4, H_l, W_l) tensors.
    """

    def __init__(self, heads: Sequence[RetinaNetHead]):
        super().__init__()
        self.heads = nn.ModuleList(heads)

    @classmethod
    def like(cls, shared: RetinaNetHead, cfg, input_shape: List[ShapeSpec], num_anchors: int) -> "UnsharedRetinaNetHead":
        """Per-level heads with the architecture of ``cfg``'s RetinaNet head, each starting from
        the weights of ``shared`` (the shared head built from the same cfg), built without
        advancing torch's global RNG: the model then has the stock model's initial function and
        the rest of the run draws the same random numbers."""
        r = cfg.MODEL.RETINANET
        heads = []
        with torch.random.fork_rng(devices=[]):
            for shape in input_shape:
                head = RetinaNetHead(
                    input_shape=[shape], num_classes=r.NUM_CLASSES, num_anchors=num_anchors,
                    conv_dims=[shape.channels] * r.NUM_CONVS, norm=r.NORM, prior_prob=r.PRIOR_PROB,
                )
                own = head.state_dict()
                # per-level BN (norm "BN"/"SyncBN") has one entry instead of one per level: the
                # shared head's first one (BN starts at its deterministic init either way)
                head.load_state_dict({k: v for k, v in shared.state_dict().items()
                                      if k in own and own[k].shape == v.shape}, strict=False)
                heads.append(head)
        return cls(heads)

    def forward(self, features: List[Tensor]):
        if len(features) != len(self.heads):
            raise ValueError(f"UnsharedRetinaNetHead has {len(self.heads)} per-level heads, got {len(features)} features")
        logits, bbox_reg = [], []
        for head, feature in zip(self.heads, features):
            lg, bb = head([feature])
            logits += lg
            bbox_reg += bb
        return logits, bbox_reg


@META_ARCH_REGISTRY.register()
class EffectiveBatchRetinaNet(RetinaNet):
    """detectron2's RetinaNet with the effective-batch knobs of the paper's experiment.

    Args (besides RetinaNet's):
        loss_keep: fraction in (0, 1] of anchor locations per image and level whose losses
            count (``MODEL.EFFECTIVE_BATCH.LOSS_KEEP``, default 1.0 = all); see
            :func:`location_keep_mask`.

    Per-level heads (``MODEL.EFFECTIVE_BATCH.UNSHARED_HEADS``) are an
    :class:`UnsharedRetinaNetHead` passed as ``head``. A config without ``MODEL.EFFECTIVE_BATCH``
    builds the stock model.
    """

    @configurable
    def __init__(self, *, loss_keep: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.loss_keep = check_loss_keep(loss_keep)

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        eb = cfg.MODEL.get("EFFECTIVE_BATCH", CN())
        unshared = eb.get("UNSHARED_HEADS", False)
        if not isinstance(unshared, bool):
            raise ValueError(f"MODEL.EFFECTIVE_BATCH.UNSHARED_HEADS={unshared!r} must be True or False")
        ret["loss_keep"] = check_loss_keep(eb.get("LOSS_KEEP", 1.0))
        if unshared:
            shapes = [ret["backbone"].output_shape()[f] for f in cfg.MODEL.RETINANET.IN_FEATURES]
            ret["head"] = UnsharedRetinaNetHead.like(
                ret["head"], cfg, shapes, ret["anchor_generator"].num_anchors[0]
            )
        return ret

    def losses(self, anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes):
        """RetinaNet's losses, with the anchors of masked locations relabelled "ignore" (-1)
        when ``loss_keep`` < 1 (logged as ``effective_batch/kept_anchors``, a fraction)."""
        if self.loss_keep < 1.0:
            per_cell = self.anchor_generator.num_anchors
            positions = [len(a) // n for a, n in zip(anchors, per_cell)]
            keep = location_keep_mask(len(gt_labels), positions, per_cell, self.loss_keep, device=gt_labels[0].device)
            gt_labels = [torch.where(k, labels, torch.full_like(labels, -1)) for k, labels in zip(keep, gt_labels)]
            get_event_storage().put_scalar("effective_batch/kept_anchors", keep.float().mean().item())
        return super().losses(anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # no FPN: the ResNet is the backbone itself, so ResNet weights saved under
        # backbone.bottom_up.* (an FPN model's layout) are read as backbone.*
        if not hasattr(self.backbone, "bottom_up"):
            old, new = prefix + "backbone.bottom_up.", prefix + "backbone."
            for key in [k for k in state_dict if k.startswith(old)]:
                target = new + key[len(old):]
                if target not in state_dict:
                    state_dict[target] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
