"""ViTDet-style detectors on every detectron2: a plain ViT backbone with a simple feature pyramid.

``ViT`` and ``SimpleFeaturePyramid`` are detectron2's (``detectron2.modeling.backbone.vit``)
when the installed detectron2 has them (its main branch); otherwise (detectron2 0.6) the timm
ViT and the feature pyramid of :mod:`vitdet.backbone`, which take the same constructor
arguments that the configs use. ``HAS_D2_VIT`` says which. :func:`vit_lr_decay_rate` is the
layer-wise LR decay of ViTDet for ``optimizer.params.lr_factor_func``.
"""

from .backbone import ChannelLayerNorm, TimmViT, TimmSimpleFeaturePyramid
from .lr_decay import vit_lr_decay_rate

try:  # detectron2 main
    from detectron2.modeling.backbone.vit import SimpleFeaturePyramid, ViT

    HAS_D2_VIT = True
except ImportError:  # detectron2 0.6
    ViT, SimpleFeaturePyramid = TimmViT, TimmSimpleFeaturePyramid
    HAS_D2_VIT = False

__all__ = ["HAS_D2_VIT", "ChannelLayerNorm", "SimpleFeaturePyramid", "TimmSimpleFeaturePyramid", "TimmViT", "ViT",
           "vit_lr_decay_rate"]
