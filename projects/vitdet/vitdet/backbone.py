"""A plain ViT backbone from timm and a simple feature pyramid, for detectron2 without ViTDet.

:class:`TimmViT` wraps ``timm.models.vision_transformer.VisionTransformer`` (no class token,
position embeddings resized to the input) and returns its last tokens as one stride-``patch``
map; :class:`TimmSimpleFeaturePyramid` builds p2…p5 (+ p6 with a top block) from that single
map with (de)convolutions and pooling, as ViTDet (Li et al., ECCV 2022) does. Both take the
constructor arguments detectron2's own ``ViT`` / ``SimpleFeaturePyramid`` take in the configs.
Parameter names follow ViTDet's layout: the ViT is ``backbone.net.*`` (AGVM's backbone
module), the pyramid the rest of ``backbone.*`` (AGVM's neck).
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import torch
from detectron2.layers import Conv2d, ShapeSpec
from detectron2.modeling.backbone import Backbone
from timm.models.vision_transformer import VisionTransformer
from torch import nn

__all__ = ["ChannelLayerNorm", "TimmSimpleFeaturePyramid", "TimmViT"]


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of an (N, C, H, W) map."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = nn.functional.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def _norm(norm: str, channels: int) -> Optional[nn.Module]:
    if norm in ("", None):
        return None
    if norm == "LN":
        return ChannelLayerNorm(channels)
    raise ValueError(f"norm={norm!r}: the simple feature pyramid knows 'LN' and '' (none)")


class TimmViT(Backbone):
    """timm's ViT as a detectron2 backbone with one output, ``out_feature`` at stride ``patch_size``."""

    def __init__(self, img_size: int = 1024, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path_rate: float = 0.0, out_feature: str = "last_feat"):
        super().__init__()
        self.vit = VisionTransformer(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, depth=depth,
            num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_path_rate=drop_path_rate,
            num_classes=0, global_pool="", class_token=False, dynamic_img_size=True,
        )
        self.patch_size = patch_size
        self._out_features = [out_feature]
        self._out_feature_channels = {out_feature: embed_dim}
        self._out_feature_strides = {out_feature: patch_size}

    def forward(self, x) -> Dict[str, torch.Tensor]:
        n, _, h, w = x.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"input {h}×{w} is not divisible by the patch size {p} (pad the images to it)")
        tokens = self.vit.forward_features(x)[:, self.vit.num_prefix_tokens:]
        return {self._out_features[0]: tokens.transpose(1, 2).reshape(n, -1, h // p, w // p)}


class TimmSimpleFeaturePyramid(Backbone):
    """Feature maps at ``stride / s`` for each ``s`` in ``scale_factors`` (4, 2, 1, 0.5 → p2…p5
    from a stride-16 map) from the single output ``in_feature`` of ``net``, each a 1×1 and a
    3×3 convolution to ``out_channels`` (with ``norm``), plus ``top_block``'s levels (e.g.
    ``LastLevelMaxPool`` for p6). ``square_pad``: the padded input size (0: none), as
    detectron2's ``padding_constraints``; on detectron2 0.6 the images are padded to a multiple
    of :attr:`size_divisibility` (the largest stride)."""

    def __init__(self, net: Backbone, in_feature: str, out_channels: int, scale_factors: Sequence[float],
                 top_block: Optional[nn.Module] = None, norm: str = "LN", square_pad: int = 0):
        super().__init__()
        self.net = net
        self.in_feature = in_feature
        dim = net.output_shape()[in_feature].channels
        stride = net.output_shape()[in_feature].stride
        self.stages = []
        strides = []
        for s in scale_factors:
            layers, channels = self._resample(s, dim, norm)
            level = int(math.log2(stride / s))
            strides.append(int(stride / s))
            stage = nn.Sequential(
                *layers,
                Conv2d(channels, out_channels, 1, bias=not norm, norm=_norm(norm, out_channels)),
                Conv2d(out_channels, out_channels, 3, padding=1, bias=not norm, norm=_norm(norm, out_channels)),
            )
            self.add_module(f"simfp_{level}", stage)
            self.stages.append(stage)
        self.top_block = top_block
        self._out_feature_strides = {f"p{int(math.log2(s))}": s for s in strides}
        if top_block is not None:
            last = int(math.log2(strides[-1]))
            for i in range(top_block.num_levels):
                self._out_feature_strides[f"p{last + i + 1}"] = 2 ** (last + i + 1)
        self._out_features = list(self._out_feature_strides)
        self._out_feature_channels = {k: out_channels for k in self._out_features}
        self._size_divisibility = max(self._out_feature_strides.values())
        self._square_pad = square_pad

    @staticmethod
    def _resample(scale: float, dim: int, norm: str):
        if scale == 4.0:
            return [nn.ConvTranspose2d(dim, dim // 2, 2, stride=2), ChannelLayerNorm(dim // 2), nn.GELU(),
                    nn.ConvTranspose2d(dim // 2, dim // 4, 2, stride=2)], dim // 4
        if scale == 2.0:
            return [nn.ConvTranspose2d(dim, dim // 2, 2, stride=2)], dim // 2
        if scale == 1.0:
            return [], dim
        if scale == 0.5:
            return [nn.MaxPool2d(2, stride=2)], dim
        raise ValueError(f"scale_factors: {scale} is not one of 4.0, 2.0, 1.0, 0.5")

    @property
    def size_divisibility(self) -> int:
        return self._size_divisibility

    @property
    def padding_constraints(self):
        return {"size_divisiblity": self._size_divisibility, "square_size": self._square_pad}

    def forward(self, x) -> Dict[str, torch.Tensor]:
        feature = self.net(x)[self.in_feature]
        outs = [stage(feature) for stage in self.stages]
        if self.top_block is not None:
            source = outs[self._out_features.index(self.top_block.in_feature)]
            outs.extend(self.top_block(source))
        return dict(zip(self._out_features, outs))

    def output_shape(self):
        return {k: ShapeSpec(channels=self._out_feature_channels[k], stride=self._out_feature_strides[k])
                for k in self._out_features}
