"""Register the synthetic shapes dataset (:mod:`agvm.data.shapes`) with detectron2.

Importing this module calls :func:`register_shapes` once (root and image counts from the
environment at import time). Registration is lazy: nothing is generated until a dataset is
loaded through ``DatasetCatalog.get`` (each registered function calls
:func:`~agvm.data.shapes.ensure_shapes` first) or :func:`prepare_datasets` is called. The
metadata holds the final, deterministic paths already.

Names (``<prefix>`` defaults to ``shapes``; ``<split>`` is ``train`` or ``val``), following
detectron2's builtin COCO names:

``<prefix>_<split>``
    instances (boxes + polygons), ``load_coco_json``; ``evaluator_type="coco"``.
``<prefix>_<split>_sem_seg``
    semantic segmentation over all classes (things, then stuff), ``load_sem_seg``;
    ``evaluator_type="sem_seg"``.
``<prefix>_<split>_panoptic``
    "standard" COCO panoptic (``register_coco_panoptic``: Panoptic-DeepLab style).
``<prefix>_<split>_panoptic_separated`` / ``<prefix>_<split>_panoptic_stuffonly``
    ``register_coco_panoptic_separated``: instances + ``panoptic_stuff`` semantic labels
    (things -> 0, stuff -> 1..S), what PanopticFPN trains on, and the stuff-only semantic
    dataset.

detectron2 0.6's panoptic loaders assume ``.jpg`` images (``load_coco_panoptic_json``
hard-codes the extension; ``register_coco_panoptic_separated`` calls ``load_sem_seg`` with its
default ``image_ext="jpg"``); the shapes images are PNG, so after calling detectron2's
register functions (which set the metadata) their ``DatasetCatalog`` entries are replaced by
equivalent loaders that use ``.png`` and call ``ensure_shapes`` first.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Callable, Dict, Iterable, List, Optional, Union

from .. import compat  # noqa: F401  (importing agvm applies its compatibility patches before detectron2)
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.coco import load_coco_json, load_sem_seg
from detectron2.data.datasets.coco_panoptic import (
    merge_to_panoptic,
    register_coco_panoptic,
    register_coco_panoptic_separated,
)

from . import shapes as _shapes
from .shapes import ALL_CLASSES, STUFF_CLASSES, STUFF_COLORS, THING_CLASSES, THING_COLORS

__all__ = ["register_shapes", "prepare_datasets", "registered_config"]

logger = logging.getLogger(__name__)

# dataset name -> ensure_shapes kwargs, for the names this module registered
_REGISTERED: Dict[str, Dict[str, object]] = {}

_T = len(THING_CLASSES)
_S = len(STUFF_CLASSES)


def _thing_meta() -> dict:
    return {
        "thing_classes": list(THING_CLASSES),
        "thing_colors": [list(c) for c in THING_COLORS],
        "thing_dataset_id_to_contiguous_id": {i + 1: i for i in range(_T)},
    }


def _sem_seg_meta() -> dict:
    return {
        "stuff_classes": list(ALL_CLASSES),
        "stuff_colors": [list(c) for c in THING_COLORS + STUFF_COLORS],
        # semantic label = category_id - 1
        "stuff_dataset_id_to_contiguous_id": {i + 1: i for i in range(_T + _S)},
    }


def _panoptic_standard_meta() -> dict:
    # like detectron2's "coco_panoptic_standard": one contiguous space over all classes,
    # thing_* and stuff_* both listing every class (for the Visualizer)
    colors = [list(c) for c in THING_COLORS + STUFF_COLORS]
    return {
        "thing_classes": list(ALL_CLASSES),
        "thing_colors": colors,
        "stuff_classes": list(ALL_CLASSES),
        "stuff_colors": colors,
        "thing_dataset_id_to_contiguous_id": {i + 1: i for i in range(_T)},
        "stuff_dataset_id_to_contiguous_id": {_T + j + 1: _T + j for j in range(_S)},
    }


def _panoptic_separated_meta() -> dict:
    # like detectron2's "coco_panoptic_separated": stuff label 0 = all things
    meta = _thing_meta()
    stuff_map = {_T + j + 1: j + 1 for j in range(_S)}
    stuff_map[0] = 0
    meta.update(
        stuff_classes=["things"] + list(STUFF_CLASSES),
        stuff_colors=[[82, 18, 128]] + [list(c) for c in STUFF_COLORS],
        stuff_dataset_id_to_contiguous_id=stuff_map,
    )
    return meta


def _load_panoptic_standard(json_file: str, image_root: str, panoptic_root: str, meta: dict):
    """detectron2's ``load_coco_panoptic_json``, with the image file names from the json."""
    with open(json_file) as f:
        info = json.load(f)
    images = {img["id"]: img for img in info["images"]}
    thing_map = meta["thing_dataset_id_to_contiguous_id"]
    stuff_map = meta["stuff_dataset_id_to_contiguous_id"]
    ret = []
    for ann in info["annotations"]:
        img = images[ann["image_id"]]
        segments = []
        for seg in ann["segments_info"]:
            seg = dict(seg)
            isthing = seg["category_id"] in thing_map
            seg["category_id"] = (thing_map if isthing else stuff_map)[seg["category_id"]]
            seg["isthing"] = isthing
            segments.append(seg)
        ret.append(
            {
                "file_name": os.path.join(image_root, img["file_name"]),
                "image_id": int(ann["image_id"]),
                "height": img["height"],
                "width": img["width"],
                "pan_seg_file_name": os.path.join(panoptic_root, ann["file_name"]),
                "segments_info": segments,
            }
        )
    return ret


def _lazy(cfg: dict, load: Callable[[], list]) -> Callable[[], list]:
    def fn():
        _shapes.ensure_shapes(**cfg)
        return load()

    return fn


def _claim(names: List[str], cfg: dict) -> bool:
    """Whether to (re)register ``names``: not yet registered, or ours with another config."""
    present = [n for n in names if n in DatasetCatalog.list()]
    if not present:
        return True
    if all(_REGISTERED.get(n) == cfg for n in present) and len(present) == len(names):
        return False  # already registered, same config
    foreign = [n for n in present if n not in _REGISTERED]
    if foreign:
        logger.warning("not registering %s: %s already registered elsewhere", names, foreign)
        return False
    for n in names:  # ours, with another root/seed/size: replace
        if n in DatasetCatalog.list():
            DatasetCatalog.remove(n)
        if n in MetadataCatalog.list():
            MetadataCatalog.remove(n)
        _REGISTERED.pop(n, None)
    return True


def register_shapes(
    root: Optional[str] = None,
    *,
    seed: int = _shapes.DEFAULT_SEED,
    image_size: int = _shapes.DEFAULT_IMAGE_SIZE,
    num_train: Optional[int] = None,
    num_val: Optional[int] = None,
    prefix: str = "shapes",
) -> List[str]:
    """Register the shapes datasets in detectron2's ``DatasetCatalog`` / ``MetadataCatalog``.

    Args:
        root: cache root, default ``$AGVM_DATASETS`` or ``~/.cache/agvm/datasets``, read at
            call time.
        seed, image_size: as :func:`agvm.data.shapes.ensure_shapes` (0, 128 px).
        num_train, num_val: image counts, default ``$AGVM_SHAPES_NUM_TRAIN`` /
            ``$AGVM_SHAPES_NUM_VAL`` or 1000 / 200, read at call time.
        prefix: name prefix (default ``shapes``); keep it starting with ``shapes_`` or equal
            to ``shapes`` so that :func:`prepare_datasets` recognises unknown names.

    Idempotent: names already registered by this function with the same configuration are
    skipped; names registered by it with another configuration (e.g. ``$AGVM_DATASETS``
    changed) are replaced; names registered by someone else are left alone. Nothing is
    generated here.

    Returns:
        The dataset names this configuration owns (registered now or before).
    """
    num_train, num_val = _shapes._resolve_counts(num_train, num_val)
    root = _shapes.default_root() if root is None else os.path.abspath(os.path.expanduser(root))
    cfg = dict(root=root, seed=int(seed), image_size=int(image_size), num_train=num_train,
               num_val=num_val)
    folder = _shapes.shapes_dir(**cfg)
    names: List[str] = []
    for split in ("train", "val"):
        image_root = os.path.join(folder, "images", split)
        instances_json = os.path.join(folder, "annotations", f"instances_{split}.json")
        sem_seg_root = os.path.join(folder, "sem_seg", split)
        panoptic_root = os.path.join(folder, "panoptic", split)
        panoptic_json = os.path.join(folder, "annotations", f"panoptic_{split}.json")
        stuff_root = os.path.join(folder, "panoptic_stuff", split)
        base = f"{prefix}_{split}"

        # instances
        name = base
        if _claim([name], cfg):
            DatasetCatalog.register(
                name,
                _lazy(cfg, lambda j=instances_json, i=image_root, n=name: load_coco_json(j, i, n)),
            )
            MetadataCatalog.get(name).set(
                json_file=instances_json, image_root=image_root, evaluator_type="coco",
                **_thing_meta(),
            )
            _REGISTERED[name] = cfg
        names.append(name)

        # semantic segmentation over all classes
        name = f"{base}_sem_seg"
        if _claim([name], cfg):
            DatasetCatalog.register(
                name,
                _lazy(cfg, lambda g=sem_seg_root, i=image_root: load_sem_seg(g, i, "png", "png")),
            )
            MetadataCatalog.get(name).set(
                image_root=image_root, sem_seg_root=sem_seg_root, evaluator_type="sem_seg",
                ignore_label=_shapes.IGNORE_LABEL, **_sem_seg_meta(),
            )
            _REGISTERED[name] = cfg
        names.append(name)

        # standard panoptic
        name = f"{base}_panoptic"
        if _claim([name], cfg):
            meta = _panoptic_standard_meta()
            register_coco_panoptic(
                name, meta, image_root, panoptic_root, panoptic_json, instances_json
            )
            DatasetCatalog.remove(name)  # replace the .jpg-assuming loader
            DatasetCatalog.register(
                name,
                _lazy(
                    cfg,
                    lambda j=panoptic_json, i=image_root, p=panoptic_root, m=meta: (
                        _load_panoptic_standard(j, i, p, m)
                    ),
                ),
            )
            _REGISTERED[name] = cfg
        names.append(name)

        # separated panoptic (PanopticFPN) + stuff-only semantic
        sep, stuffonly = f"{base}_panoptic_separated", f"{base}_panoptic_stuffonly"
        if _claim([sep, stuffonly], cfg):
            register_coco_panoptic_separated(
                f"{base}_panoptic", _panoptic_separated_meta(), image_root, panoptic_root,
                panoptic_json, stuff_root, instances_json,
            )
            DatasetCatalog.remove(sep)
            DatasetCatalog.register(
                sep,
                _lazy(
                    cfg,
                    lambda j=instances_json, i=image_root, g=stuff_root, n=sep: merge_to_panoptic(
                        load_coco_json(j, i, n), load_sem_seg(g, i, "png", "png")
                    ),
                ),
            )
            DatasetCatalog.remove(stuffonly)
            DatasetCatalog.register(
                stuffonly,
                _lazy(cfg, lambda g=stuff_root, i=image_root: load_sem_seg(g, i, "png", "png")),
            )
            _REGISTERED[sep] = cfg
            _REGISTERED[stuffonly] = cfg
        names += [sep, stuffonly]
    return names


def registered_config(name: str) -> Optional[Dict[str, object]]:
    """The :func:`~agvm.data.shapes.ensure_shapes` kwargs behind a registered shapes name."""
    cfg = _REGISTERED.get(name)
    return dict(cfg) if cfg is not None else None


def prepare_datasets(names: Union[str, Iterable[str]]) -> List[str]:
    """Generate/verify the shapes data behind ``names`` (call before building evaluators).

    COCOEvaluator opens the metadata's ``json_file`` at construction, before any
    ``DatasetCatalog.get``; this makes sure it exists. Names registered by
    :func:`register_shapes` use their registered configuration; other names starting with
    ``shapes_`` use :func:`~agvm.data.shapes.ensure_shapes`'s defaults; other names are
    ignored.

    Returns:
        The dataset folders ensured (no duplicates).
    """
    if isinstance(names, str):
        names = [names]
    folders: List[str] = []
    for name in names:
        cfg = _REGISTERED.get(name)
        if cfg is None and not name.startswith("shapes_"):
            continue
        folder = _shapes.ensure_shapes(**(cfg or {}))
        if folder not in folders:
            folders.append(folder)
    return folders


register_shapes()
