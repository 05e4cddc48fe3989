"""A batch-64 LazyConfig recipe moved to a large batch with AGVM (or its μ = 1 twin).

:func:`to_large_batch` rewrites a config's ``dataloader``, ``train``, ``lr_multiplier`` and
``optimizer`` nodes, by the conventions of the yacs cells (:mod:`agvm.tables`):

- the learning rate by the square-root rule from the recipe's (batch, lr);
- the same number of epochs: ``train.max_iter`` and the LR milestones scaled by
  reference batch / batch (rounded);
- warm-up 2 COCO epochs rounded to 10 iterations (920 at 256, 230 at 1024), exponential from
  0.001 (the release's, :func:`agvm.solver.exp_warmup`);
- AGVM from warm-up + 100, α = 0.97, τ = 10 (5 above batch 1024); the whole model's L2
  gradient norm clipped to 1.0 in [warm-up − 100, warm-up + 100] (``train.clip_gradients``);
- the twin (``agvm=False``): the same config with ``optimizer.agvm.measure_only=True`` (Φ logged,
  μ held at 1), so that the modulation is the only difference;
- ``train.grad_accum_steps`` so that ``gpus`` processes of ``per_gpu`` images per micro-batch
  make the global batch; evaluation and checkpoint periods scaled with the iterations.

:func:`require` fails, before anything is built, with a message naming what is missing.
"""

from __future__ import annotations

import math
from typing import Dict, Sequence

__all__ = ["COCO_TRAIN_IMAGES", "large_batch_schedule", "require", "to_large_batch"]

#: images of COCO 2017 train, as :data:`agvm.tables.COCO_TRAIN_IMAGES` (kept here: pure Python)
COCO_TRAIN_IMAGES = 117266


def _round10(x: float) -> int:
    return max(10, int(round(x / 10.0)) * 10)


def large_batch_schedule(batch: int, reference_batch: int, reference_lr: float, reference_iters: int,
                         reference_milestones: Sequence[int], gpus: int = 8, per_gpu: int = 4,
                         images: int = COCO_TRAIN_IMAGES) -> Dict[str, object]:
    """The numbers of :func:`to_large_batch` (pure arithmetic): ``lr``, ``max_iter``,
    ``milestones``, ``warmup_iters``, ``agvm_start``, ``clip_range``, ``interval`` and
    ``grad_accum_steps``. Raises ValueError when ``gpus × per_gpu`` does not divide ``batch``."""
    if batch % (gpus * per_gpu):
        raise ValueError(f"batch {batch} is not a multiple of {gpus} GPUs × {per_gpu} images per micro-batch")
    scale = reference_batch / batch
    max_iter = int(math.ceil(reference_iters * scale))
    warmup = 1000 if batch <= 32 else _round10(2 * images / batch)
    return dict(
        lr=reference_lr * math.sqrt(batch / reference_batch),
        max_iter=max_iter,
        milestones=[int(round(m * scale)) for m in reference_milestones],
        warmup_iters=warmup,
        agvm_start=warmup + 100,
        clip_range=(max(0, warmup - 100), warmup + 100),
        interval=5 if batch > 1024 else 10,
        grad_accum_steps=batch // (gpus * per_gpu),
    )


def require(what: str, vit: bool = False) -> None:
    """Raise ImportError naming what ``what`` (a config's name) needs and the installed
    detectron2/timm lack: LSJ's ``ResizeScale``/``FixedSizeCrop`` (detectron2 ≥ 0.6), and with
    ``vit`` a ViT: detectron2's ``modeling.backbone.vit`` or timm's ``VisionTransformer`` with
    ``dynamic_img_size`` (timm ≥ 0.9)."""
    import inspect

    import detectron2
    import detectron2.data.transforms as T

    missing = [n for n in ("ResizeScale", "FixedSizeCrop") if not hasattr(T, n)]
    if missing:
        raise ImportError(f"{what} needs detectron2 ≥ 0.6 for large-scale jitter (detectron2.data.transforms."
                          f"{' and '.join(missing)}); installed: detectron2 {detectron2.__version__}")
    if not vit:
        return
    try:
        from detectron2.modeling.backbone.vit import ViT  # noqa: F401

        return
    except ImportError:
        pass
    try:
        import timm
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:
        raise ImportError(f"{what} needs a ViT: detectron2 with detectron2.modeling.backbone.vit (its main branch) "
                          f"or timm ≥ 0.9; installed: detectron2 {detectron2.__version__}, no timm") from None
    if "dynamic_img_size" not in inspect.signature(VisionTransformer).parameters:
        raise ImportError(f"{what} needs a ViT: detectron2 with detectron2.modeling.backbone.vit (its main branch) "
                          f"or timm ≥ 0.9 (VisionTransformer(dynamic_img_size=...)); installed: detectron2 "
                          f"{detectron2.__version__}, timm {timm.__version__}")


def to_large_batch(cfg: Dict[str, object], batch: int, agvm: bool, name: str, gpus: int = 8, per_gpu: int = 4,
                   project: str = "vitdet") -> None:
    """Rewrite the config namespace ``cfg`` (a config file's ``globals()``: ``dataloader``,
    ``train``, ``lr_multiplier``, ``optimizer`` as detectron2's recipes write them, at their
    reference batch) for ``batch`` images per iteration with AGVM (``agvm``) or its μ = 1 twin;
    ``name`` names the output folder ``./output/<project>/<name>``. See the module docstring."""
    from detectron2.config import LazyCall as L
    from fvcore.common.param_scheduler import MultiStepParamScheduler

    from agvm.detectron2.lazy import agvm_optimizer
    from agvm.solver import exp_warmup

    dataloader, train, lr_multiplier = cfg["dataloader"], cfg["train"], cfg["lr_multiplier"]
    reference_batch = int(dataloader.train.total_batch_size)
    reference_iters = int(train.max_iter)
    s = large_batch_schedule(batch, reference_batch, float(cfg["optimizer"].lr), reference_iters,
                             list(lr_multiplier.scheduler.milestones), gpus, per_gpu)
    dataloader.train.total_batch_size = batch
    train.max_iter = s["max_iter"]
    train.grad_accum_steps = s["grad_accum_steps"]
    train.eval_period = max(1, int(round(train.eval_period * reference_batch / batch)))
    train.checkpointer.period = max(1, int(round(train.checkpointer.period * reference_batch / batch)))
    train.output_dir = f"./output/{project}/{name}"
    train.clip_gradients = dict(enabled=True, clip_type="full_model", clip_value=1.0, norm_type=2.0,
                                iter_range=list(s["clip_range"]))
    cfg["lr_multiplier"] = L(exp_warmup)(
        scheduler=L(MultiStepParamScheduler)(values=list(lr_multiplier.scheduler["values"]),
                                             milestones=s["milestones"], num_updates=s["max_iter"]),
        warmup_factor=0.001,
        warmup_length=s["warmup_iters"] / s["max_iter"],
    )
    optimizer = agvm_optimizer(cfg["optimizer"], enabled=True, measure_only=not agvm, momentum=0.97,
                               interval=s["interval"], start_iter=s["agvm_start"])
    optimizer.lr = s["lr"]
    optimizer.warmup_iters = s["warmup_iters"]
    cfg["optimizer"] = optimizer
