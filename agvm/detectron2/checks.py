"""``validate_config(cfg)``: every check of a run's config, before anything is built or written.

detectron2's ``default_setup`` writes ``config.yaml`` and opens ``log.txt`` in OUTPUT_DIR, so
:func:`agvm.detectron2.setup_cfg` calls :func:`validate_config` first: a rejected run leaves an
existing output folder byte-identical. Every error names the key and the value.
"""

from __future__ import annotations

import hashlib
import logging
import math
from typing import List, Optional, Sequence

from detectron2.config import CfgNode
from detectron2.utils import comm

from ..core.modulator import SettingError, check_settings
from .config import agvm_kwargs, agvm_start_iter, check_choices, default_config, setting_error

__all__ = ["build_run_config", "check_agvm_config", "check_datasets_registered", "check_num_classes", "check_norm_device", "check_run_config", "check_split_batch",
           "ineffective_keys", "validate_config"]

logger = logging.getLogger(__name__)


#: Digests of the configs each check accepted in this process: a run checks its config once.
_ACCEPTED: set = set()


def _once(what: str, cfg: CfgNode, check, *args) -> None:
    """Run ``check(cfg, *args)`` unless it accepted the same config (content and ``args``) before."""
    digest = hashlib.sha256(f"{what}\n{args}\n{cfg.dump()}".encode()).hexdigest()
    if digest not in _ACCEPTED:
        check(cfg, *args)
        _ACCEPTED.add(digest)


def check_agvm_config(cfg: CfgNode) -> None:
    """Reject bad solver and SOLVER.AGVM keys before anything is built; each error names the key
    and value: the fixed choices of :data:`agvm.detectron2.config.KEYS`, the core's rules for
    α, τ, start/stop, clamp and eps (:func:`agvm.core.modulator.check_settings`, nothing built),
    and the combinations the trainer cannot run. Called by :func:`validate_config` and by
    :func:`agvm.detectron2.build_agvm_optimizer`; a config it accepted is not checked again."""
    _once("agvm", cfg, _check_agvm_config)


def _check_agvm_config(cfg: CfgNode) -> None:
    check_choices(cfg)
    s = cfg.SOLVER
    if not (isinstance(s.GRAD_ACCUM_STEPS, int) and s.GRAD_ACCUM_STEPS >= 1):
        raise ValueError(f"SOLVER.GRAD_ACCUM_STEPS={s.GRAD_ACCUM_STEPS!r} must be an integer ≥ 1")
    if s.OPTIMIZER == "SAM":
        if not s.SAM.RHO > 0:
            raise ValueError(f"SOLVER.SAM.RHO={s.SAM.RHO!r} must be > 0")
        if s.AGVM.ENABLED:
            raise ValueError(
                "SOLVER.OPTIMIZER='SAM' cannot be combined with SOLVER.AGVM.ENABLED=True: SAM's gradient is "
                "taken at a perturbed point shared by both half-batches, so AGVM's two half-batch estimates "
                "would not be independent. Use SGD or AdamW with AGVM."
            )
        if s.AMP.ENABLED:
            raise ValueError("SOLVER.OPTIMIZER='SAM' does not support SOLVER.AMP.ENABLED=True")
    if s.WARMUP_METHOD not in ("linear", "constant", "exp"):
        raise ValueError(f"SOLVER.WARMUP_METHOD={s.WARMUP_METHOD!r} must be 'linear', 'constant' or 'exp'")
    if s.CLIP_GRADIENTS.CLIP_TYPE not in ("value", "norm", "full_model"):
        raise ValueError(
            f"SOLVER.CLIP_GRADIENTS.CLIP_TYPE={s.CLIP_GRADIENTS.CLIP_TYPE!r} must be 'value', 'norm' (per parameter, "
            "detectron2's meaning) or 'full_model' (one norm over the whole model)"
        )
    rng = tuple(s.CLIP_GRADIENTS.ITER_RANGE)
    if len(rng) != 2 or (rng != (-1, -1) and not (0 <= rng[0] <= rng[1])):
        raise ValueError(
            f"SOLVER.CLIP_GRADIENTS.ITER_RANGE={rng!r} must be (-1, -1) (always) or (start, end) with 0 ≤ start ≤ end"
        )
    if not s.AGVM.ENABLED:
        return
    kwargs = agvm_kwargs(cfg)
    try:
        check_settings(*(kwargs[k] for k in ("momentum", "interval", "start_iter", "stop_iter", "clamp", "eps")))
    except SettingError as e:
        raise setting_error(cfg, e) from None
    if cfg.SOLVER.AMP.ENABLED and not cfg.MODEL.DEVICE.startswith("cuda"):
        raise ValueError(f"SOLVER.AMP.ENABLED=True needs a CUDA device, got MODEL.DEVICE={cfg.MODEL.DEVICE!r}")


def ineffective_keys(cfg: CfgNode) -> List[str]:
    """``KEY=value`` of the settings that differ from their default but have no effect in
    ``cfg``: SOLVER.AGVM.* with AGVM off, SOLVER.LARS.* without LARS, SOLVER.LAMB.* without
    LAMB/PMD_LAMB, SOLVER.PMD.* without PMD_LAMB, SOLVER.SAM.* without SAM. Training warns
    about them; ``scripts/sweep.py`` rejects them (when the grid or its overrides set them)
    before launching. With MEASURE_ONLY, SOLVER.AGVM.MOMENTUM/CLAMP/EPS shape only μ, which
    stays 1, so they count as without effect too."""
    defaults = default_config()
    s, d = cfg.SOLVER, defaults.SOLVER
    inactive = []
    if not s.AGVM.ENABLED:
        inactive.append("AGVM")
    if s.OPTIMIZER != "LARS":  # (SAM's base optimizer is SGD or AdamW)
        inactive.append("LARS")
    if s.OPTIMIZER not in ("LAMB", "PMD_LAMB"):
        inactive.append("LAMB")
    if s.OPTIMIZER != "PMD_LAMB":
        inactive.append("PMD")
    if s.OPTIMIZER != "SAM":
        inactive.append("SAM")
    out = []
    for node in inactive:
        for key, value in s[node].items():
            if key != "ENABLED" and value != d[node][key]:
                out.append(f"SOLVER.{node}.{key}={value!r}")
    if s.AGVM.ENABLED and s.AGVM.MEASURE_ONLY:  # μ stays 1: what shapes μ has no effect
        out += [f"SOLVER.AGVM.{k}={s.AGVM[k]!r}" for k in ("MOMENTUM", "CLAMP", "EPS") if s.AGVM[k] != d.AGVM[k]]
    return out


def build_run_config(config_file: str, opts: Sequence[str] = (), max_iter: Optional[int] = None,
                     what: str = "", config_adders: Sequence = ()) -> CfgNode:
    """detectron2's defaults + agvm's keys + each ``config_adders`` function + ``config_file`` +
    the ``KEY VALUE`` ``opts`` (+ ``--max-iter``), unfrozen and unchecked. Raises ValueError
    starting with ``what``: a missing file names the path; an unknown key names it with the
    closest existing keys ("did you mean")."""
    import difflib
    import os

    from .config import rescale_config

    if config_file and not os.path.isfile(config_file):
        raise ValueError(f"{what}--config-file {config_file}: no such file")
    cfg = default_config()
    for add in config_adders:
        add(cfg)
    try:
        if config_file:
            cfg.merge_from_file(config_file)
        cfg.merge_from_list(list(opts))
        rescale_config(cfg, max_iter)
    except (KeyError, AssertionError, ValueError) as e:
        message = str(e.args[0] if e.args else e)
        if message.startswith("Non-existent"):
            key = message.rsplit(":", 1)[-1].strip()
            close = difflib.get_close_matches(key, _flat_keys(cfg), n=3, cutoff=0.75)
            message = f"unknown config key {key}" + (f"; did you mean {' or '.join(close)}?" if close else "")
        raise ValueError(f"{what}{message}") from None
    return cfg


def _flat_keys(node: CfgNode, prefix: str = "") -> List[str]:
    out = []
    for k, v in node.items():
        out += _flat_keys(v, f"{prefix}{k}.") if isinstance(v, CfgNode) else [f"{prefix}{k}"]
    return out


def check_run_config(config_file: str, opts: Sequence[str] = (), world_size: int = 1, what: str = "",
                     max_iter: Optional[int] = None) -> CfgNode:
    """Build the config a run would train with (defaults, agvm keys, ``config_file``, the
    ``KEY VALUE`` ``opts``) and run every check of a run on it, without building or writing
    anything: unknown key or bad value (:func:`validate_config`, with ``world_size``
    processes), and an ``opts`` key that would have no effect in that config
    (:func:`ineffective_keys`). ``max_iter``: the run's ``--max-iter`` (default None: none).
    Used by the experiment scripts before they launch anything.

    Returns the config. Raises ValueError starting with ``what`` (e.g. "grid point a0.9_t5: ")
    and naming the key and value."""
    from ..data.register import register_shapes

    register_shapes()
    cfg = build_run_config(config_file, opts, max_iter, what)
    given = set(list(opts)[0::2])
    unused = [u for u in ineffective_keys(cfg) if u.split("=", 1)[0] in given]
    if unused:
        raise ValueError(f"{what}{', '.join(unused)} would have no effect in {config_file} (AGVM keys with "
                         "SOLVER.AGVM.ENABLED False; α, CLAMP, EPS with MEASURE_ONLY True; another optimizer's keys)")
    try:
        validate_config(cfg, world_size=world_size)
    except (ValueError, KeyError) as e:
        raise ValueError(f"{what}{e.args[0] if e.args else e}") from None
    return cfg


def validate_config(cfg: CfgNode, world_size: Optional[int] = None) -> None:
    """Solver and AGVM keys (:func:`agvm.detectron2.check_agvm_config`), the schedule, the
    batch against the world size (default: the running job's) and accumulation, SyncBN against
    the device, and the datasets (registered). Raises ``ValueError``/``KeyError`` naming the key
    and value; settings without effect (:func:`ineffective_keys`) are logged as a warning.

    A run validates its config once: ``setup_cfg`` validates before anything is written, and
    the trainer's own call on the same config (same content, same world size) returns at once."""
    _once("run", cfg, _validate, comm.get_world_size() if world_size is None else world_size)


def _validate(cfg: CfgNode, world_size: int) -> None:
    check_agvm_config(cfg)
    unused = ineffective_keys(cfg)
    if unused:
        logger.warning(f"settings without effect in this config (ignored): {', '.join(unused)}")
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
    check_split_batch(cfg, world_size)
    check_norm_device(cfg)
    check_datasets_registered(cfg)
    check_num_classes(cfg)


#: meta-architecture -> the config keys of its class counts and the metadata each counts.
_CLASS_KEYS = {
    "GeneralizedRCNN": [("MODEL.ROI_HEADS.NUM_CLASSES", "thing_classes")],
    "PanopticFPN": [("MODEL.ROI_HEADS.NUM_CLASSES", "thing_classes"), ("MODEL.SEM_SEG_HEAD.NUM_CLASSES", "stuff_classes")],
    "SemanticSegmentor": [("MODEL.SEM_SEG_HEAD.NUM_CLASSES", "stuff_classes")],
    "RetinaNet": [("MODEL.RETINANET.NUM_CLASSES", "thing_classes")],
    "FCOS": [("MODEL.FCOS.NUM_CLASSES", "thing_classes")],
}


def check_num_classes(cfg: CfgNode) -> None:
    """Every class count of the model (``MODEL.ROI_HEADS``/``RETINANET``/``FCOS``/``SEM_SEG_HEAD``
    ``.NUM_CLASSES``, by meta-architecture) equals the number of classes of every train and test
    dataset whose metadata lists them (``thing_classes`` / ``stuff_classes``; datasets without
    that metadata are not checked). Raises ValueError naming the key, the dataset and its count
    (a wrong count otherwise trains to the end and fails at evaluation)."""
    from detectron2.data import MetadataCatalog

    for key, field in _CLASS_KEYS.get(cfg.MODEL.META_ARCHITECTURE, []):
        node = cfg
        for part in key.split("."):
            node = node[part]
        for split in ("TRAIN", "TEST"):
            for name in cfg.DATASETS[split]:
                classes = MetadataCatalog.get(name).get(field)
                if classes is not None and len(classes) != node:
                    raise ValueError(
                        f"{key}={node} but DATASETS.{split} {name!r} has {len(classes)} classes ({field}: "
                        f"{', '.join(map(str, classes[:6]))}{', ...' if len(classes) > 6 else ''}): set {key} "
                        f"{len(classes)}")


def _builtin_dataset_names() -> set:
    """The names detectron2 registers by itself (COCO, LVIS, Cityscapes, VOC, ADE20K, ...)."""
    from detectron2.data.datasets import builtin

    names = set()
    for splits in getattr(builtin, "_PREDEFINED_SPLITS_COCO", {}).values():
        names |= set(splits)
    for attr in ("_PREDEFINED_SPLITS_COCO_PANOPTIC", "_PREDEFINED_SPLITS_LVIS", "_RAW_CITYSCAPES_SPLITS"):
        value = getattr(builtin, attr, {})
        for k, v in value.items():
            names.add(k)
            if isinstance(v, dict):
                names |= set(v)
    from detectron2.data import DatasetCatalog

    return names | {n for n in DatasetCatalog.list() if n.startswith(("coco_", "lvis_", "cityscapes_", "voc_", "ade20k_",
                                                                       "keypoints_coco"))}


def check_datasets_registered(cfg: CfgNode) -> None:
    """Every name in DATASETS.TRAIN / DATASETS.TEST is registered in detectron2's DatasetCatalog."""
    from detectron2.data import DatasetCatalog

    known = set(DatasetCatalog.list())
    for key in ("TRAIN", "TEST"):
        for name in cfg.DATASETS[key]:
            if name not in known:
                builtin = _builtin_dataset_names()
                own = sorted(known - builtin)
                listed = own + sorted(known & builtin)
                raise KeyError(
                    f"DATASETS.{key} names {name!r}, which is not registered; registered: "
                    f"{', '.join(listed[:12])}{', ...' if len(listed) > 12 else ''}. Register a COCO-format set with "
                    f"--dataset {name} <annotations.json> <image folder> (train_net.py), or with detectron2's "
                    "DatasetCatalog.register before setup (docs/data.md)"
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


def check_split_batch(cfg, world_size: Optional[int] = None) -> None:
    """Fail before training when the batch cannot be cut into micro-batches, or (one process,
    odd ``SOLVER.GRAD_ACCUM_STEPS``) AGVM's measuring passes cannot halve them. ``world_size``:
    processes of the job (default: the running job's)."""
    world = comm.get_world_size() if world_size is None else world_size
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


