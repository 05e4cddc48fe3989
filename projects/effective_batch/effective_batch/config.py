"""``add_effective_batch_config(cfg)``: the keys of :class:`EffectiveBatchRetinaNet`."""

from detectron2.config import CfgNode as CN

__all__ = ["add_effective_batch_config"]


def add_effective_batch_config(cfg: CN) -> None:
    """Add ``MODEL.EFFECTIVE_BATCH.*`` to a detectron2 config, in place (idempotent). With the
    defaults the model is detectron2's stock RetinaNet."""
    if "EFFECTIVE_BATCH" in cfg.MODEL:
        return
    _C = cfg
    _C.MODEL.EFFECTIVE_BATCH = CN()
    # One RetinaNet head (cls + box towers and predictors) per level of
    # MODEL.RETINANET.IN_FEATURES instead of one shared by all levels; every per-level head
    # starts from the weights the shared head would have. Default False (the stock head).
    _C.MODEL.EFFECTIVE_BATCH.UNSHARED_HEADS = False
    # Fraction in (0, 1] of anchor locations (spatial positions; all anchors of a kept position
    # are kept) whose classification and box losses count: round(LOSS_KEEP · H·W) positions, at
    # least 1, drawn per image and level at every iteration from torch's generator. Masked
    # anchors are ignored (as IoU-ignored ones): they contribute nothing, and the loss
    # normaliser counts only kept foreground anchors. 1.0 (default) = stock losses, nothing
    # drawn; 0.25 = the paper's "75 % of the pixel losses masked".
    _C.MODEL.EFFECTIVE_BATCH.LOSS_KEEP = 1.0
