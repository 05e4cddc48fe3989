"""Clear errors for detectron2's builtin datasets (COCO, COCO panoptic, ADE20K) when missing.

detectron2 registers ``coco_2017_*``, ``coco_2017_*_panoptic_separated``, ``ade20k_sem_seg_*``
and others at import, under ``$DETECTRON2_DATASETS`` (default ``./datasets``), without checking
that the files exist; a missing folder then fails deep inside a loader. :func:`check_datasets`
looks at the paths a dataset's metadata names before anything is built and raises
:class:`DatasetNotFoundError` saying which paths were looked for and how to prepare them.
"""

from __future__ import annotations

import os
from typing import Iterable, List, Union

from .. import compat  # noqa: F401  (importing agvm applies its compatibility patches before detectron2)
from detectron2.data import DatasetCatalog, MetadataCatalog

__all__ = ["DatasetNotFoundError", "check_datasets", "PATH_KEYS"]

#: Metadata keys that name files or folders a dataset needs.
PATH_KEYS = ("json_file", "image_root", "sem_seg_root", "panoptic_root", "panoptic_json")

_D2_README = "https://github.com/facebookresearch/detectron2/blob/main/datasets/README.md"


class DatasetNotFoundError(FileNotFoundError):
    """A registered dataset's files are not on disk (the message says where and what to do)."""


def _how_to_prepare(name: str) -> str:
    if name.startswith("ade20k"):
        return (
            "ADE20K: download ADEChallengeData2016.zip (http://sceneparsing.csail.mit.edu), unzip it into "
            "$DETECTRON2_DATASETS/ and run detectron2's datasets/prepare_ade20k_sem_seg.py, which writes "
            "ADEChallengeData2016/annotations_detectron2/{training,validation}."
        )
    if "panoptic" in name:
        return (
            "COCO panoptic: besides COCO 2017 images and instances, unzip panoptic_annotations_trainval2017.zip "
            "(https://cocodataset.org) into $DETECTRON2_DATASETS/coco (annotations/panoptic_{train,val}2017.json "
            "and the PNG folders coco/panoptic_{train,val}2017), then run detectron2's "
            "datasets/prepare_panoptic_fpn.py for coco/panoptic_stuff_{train,val}2017."
        )
    if name.startswith("coco"):
        return (
            "COCO 2017: download train2017.zip, val2017.zip and annotations_trainval2017.zip from "
            "https://cocodataset.org and unzip them into $DETECTRON2_DATASETS/coco "
            "(coco/train2017, coco/val2017, coco/annotations/instances_{train,val}2017.json)."
        )
    return "See the dataset's documentation."


def check_datasets(names: Union[str, Iterable[str]]) -> List[str]:
    """Raise :class:`DatasetNotFoundError` if a dataset in ``names`` lacks files its metadata
    names (``json_file``, ``image_root``, ``sem_seg_root``, ``panoptic_root``, ``panoptic_json``).

    Names that are not registered, or whose metadata names no paths, are skipped (detectron2
    reports unknown names itself); agvm's generated ``shapes_*`` datasets are skipped (they are
    created on first use). Returns the names that were checked.
    """
    if isinstance(names, str):
        names = [names]
    checked = []
    for name in names:
        if name.startswith("shapes") or name not in DatasetCatalog.list():
            continue
        meta = MetadataCatalog.get(name)
        missing = []
        for key in PATH_KEYS:
            path = meta.get(key, None)
            if path and not os.path.exists(path):
                missing.append(f"{key}: {os.path.abspath(path)}")
        if missing:
            root = os.environ.get("DETECTRON2_DATASETS")
            where = f"DETECTRON2_DATASETS={root}" if root else "DETECTRON2_DATASETS is not set, so ./datasets is used"
            raise DatasetNotFoundError(
                f"dataset {name!r} is not on disk ({where}); looked for\n  " + "\n  ".join(missing)
                + f"\n{_how_to_prepare(name)}\nSet DETECTRON2_DATASETS to the folder that holds it (layout: "
                + f"{_D2_README}). For a run without downloads, use a config under projects/*/configs/mini/."
            )
        checked.append(name)
    return checked
