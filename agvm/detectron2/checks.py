"""``validate_config(cfg)``: every check of a run's config, before anything is built or written.

detectron2's ``default_setup`` writes ``config.yaml`` and opens ``log.txt`` in OUTPUT_DIR, so
:func:`agvm.detectron2.setup_cfg` calls :func:`validate_config` first: a rejected run leaves an
existing output folder byte-identical. Every error names the key and the value.
"""

from __future__ import annotations

import math

from detectron2.config import CfgNode
from detectron2.utils import comm

from .build import agvm_start_iter, check_agvm_config

__all__ = ["check_datasets_registered", "check_norm_device", "check_split_batch", "validate_config"]


def validate_config(cfg: CfgNode) -> None:
    """Solver and AGVM keys (:func:`agvm.detectron2.check_agvm_config`), the schedule, the
    batch against the world size and accumulation, SyncBN against the device, and the datasets
    (registered). Raises ``ValueError``/``KeyError`` naming the key and value."""
    check_agvm_config(cfg)
    s = cfg.SOLVER
    if not (isinstance(s.BASE_LR, (int, float)) and math.isfinite(s.BASE_LR) and s.BASE_LR > 0):
        raise ValueError(f"SOLVER.BASE_LR={s.BASE_LR!r} must be a finite number > 0 (learning rate at batch SOLVER.IMS_PER_BATCH)")
    if not (isinstance(s.MAX_ITER, int) and s.MAX_ITER >= 1):
        raise ValueError(f"SOLVER.MAX_ITER={s.MAX_ITER!r} must be an integer ≥ 1")
    if s.AGVM.ENABLED:
        start = agvm_start_iter(cfg)
        if start >= s.MAX_ITER:
            raise ValueError(
                f"SOLVER.AGVM.START_ITER={s.AGVM.START_ITER!r} (first estimate at iteration {start}) is not below "
                f"SOLVER.MAX_ITER={s.MAX_ITER}: AGVM would never estimate Φ. Lower START_ITER (-1 = "
                f"SOLVER.WARMUP_ITERS + 100 = {s.WARMUP_ITERS + 100}) or turn SOLVER.AGVM.ENABLED off"
            )
    check_split_batch(cfg)
    check_norm_device(cfg)
    check_datasets_registered(cfg)


def check_datasets_registered(cfg: CfgNode) -> None:
    """Every name in DATASETS.TRAIN / DATASETS.TEST is registered in detectron2's DatasetCatalog."""
    from detectron2.data import DatasetCatalog

    known = set(DatasetCatalog.list())
    for key in ("TRAIN", "TEST"):
        for name in cfg.DATASETS[key]:
            if name not in known:
                raise KeyError(
                    f"DATASETS.{key} names {name!r}, which is not registered; registered: "
                    f"{', '.join(sorted(known)[:12])}{', ...' if len(known) > 12 else ''} (register your own with "
                    "detectron2's DatasetCatalog.register before setup)"
                )


_NORM_KEYS = ("RESNETS", "FPN", "ROI_BOX_HEAD", "ROI_MASK_HEAD", "ROI_KEYPOINT_HEAD", "SEM_SEG_HEAD", "RETINANET")


def check_norm_device(cfg) -> None:
    """SyncBN needs CUDA: fail before building anything on CPU, naming the keys."""
    if not cfg.MODEL.DEVICE.startswith("cpu"):
        return
    bad = [f"MODEL.{k}.NORM" for k in _NORM_KEYS if k in cfg.MODEL and cfg.MODEL[k].get("NORM") == "SyncBN"]
    if bad:
        raise ValueError(
            f"{', '.join(bad)} = 'SyncBN' needs CUDA, but MODEL.DEVICE is {cfg.MODEL.DEVICE!r}: use 'BN' "
            "(per-process statistics) or 'naiveSyncBN' (cross-process statistics over gloo) on CPU"
        )


def check_split_batch(cfg) -> None:
    """Fail before training when the batch cannot be cut into micro-batches, or (one process,
    odd ``SOLVER.GRAD_ACCUM_STEPS``) AGVM's measuring passes cannot halve them."""
    world = comm.get_world_size()
    batch, k = cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.GRAD_ACCUM_STEPS
    if batch % world:
        raise ValueError(f"SOLVER.IMS_PER_BATCH={batch} is not divisible by the world size {world}")
    per_process = batch // world
    if per_process % k:
        raise ValueError(
            f"the per-process batch SOLVER.IMS_PER_BATCH / world = {per_process} is not divisible by "
            f"SOLVER.GRAD_ACCUM_STEPS={k}"
        )
    if world == 1 and cfg.SOLVER.AGVM.ENABLED and k % 2 == 1 and (per_process // k < 2 or (per_process // k) % 2):
        raise ValueError(
            f"AGVM measures Φ on two halves of each micro-batch: the per-process batch "
            f"(SOLVER.IMS_PER_BATCH={batch} / world {world} / SOLVER.GRAD_ACCUM_STEPS={k} = {per_process // k}) "
            "must be even and ≥ 2"
        )


