"""Layer-wise learning-rate decay of a ViT backbone (ViTDet's recipe)."""

import re

__all__ = ["vit_lr_decay_rate"]

_BLOCK = re.compile(r"\.blocks\.(\d+)\.")


def vit_lr_decay_rate(name: str, lr_decay_rate: float = 1.0, num_layers: int = 12) -> float:
    """The lr factor of parameter ``name`` of a detector whose ``backbone`` holds a ViT:
    ``lr_decay_rate ** (num_layers + 1 - layer)``, where the layer is 0 for the patch and
    position embeddings, i + 1 for block i (outside a block's ``.residual.`` branch), and
    num_layers + 1 (factor 1) for everything else (the rest of the backbone, neck, heads)."""
    layer = num_layers + 1
    if name.startswith("backbone"):
        if ".pos_embed" in name or ".patch_embed" in name:
            layer = 0
        else:
            block = _BLOCK.search(name)
            if block is not None and ".residual." not in name:
                layer = int(block.group(1)) + 1
    return lr_decay_rate ** (num_layers + 1 - layer)
