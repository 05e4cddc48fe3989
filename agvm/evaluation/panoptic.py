"""Panoptic quality (PQ, Kirillov et al., CVPR 2019) without ``panopticapi``.

detectron2's ``COCOPanopticEvaluator`` needs ``panopticapi``, which is only on GitHub. This
evaluator computes the same numbers with the COCO panoptic rules, image by image as predictions
arrive (nothing is written to disk):

* a predicted and a ground-truth segment of the same category match when their IoU is above
  0.5, where the predicted pixels that the ground truth marks void (id 0) are left out of the
  union;
* ground-truth crowd segments are never matched and never count as false negatives;
* an unmatched prediction whose area is more than half void or crowd of its category is
  ignored, otherwise it is a false positive;
* per category ``PQ = Σ IoU(TP) / (TP + FP/2 + FN/2)``, ``SQ = Σ IoU(TP) / TP``,
  ``RQ = TP / (TP + FP/2 + FN/2)``; averages over the categories that occur (TP + FP + FN > 0),
  for all, things (``_th``) and stuff (``_st``); reported in percent like detectron2's.

Ground truth comes from the dataset metadata ``panoptic_json`` and ``panoptic_root`` (the COCO
panoptic format: PNG ids ``R + 256·G + 256²·B``), which detectron2's (and agvm's) panoptic
registrations set.
"""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict, defaultdict
from typing import Dict, Iterable, Mapping, Optional

import numpy as np
from PIL import Image

from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm

__all__ = ["PanopticQualityEvaluator", "pq_from_stats", "match_segments"]

logger = logging.getLogger(__name__)

_OFFSET = 256 * 256 * 256  # larger than any segment id of a COCO panoptic PNG


def _rgb_to_id(png: np.ndarray) -> np.ndarray:
    png = png.astype(np.int64)
    return png[..., 0] + 256 * png[..., 1] + 256 * 256 * png[..., 2]


def match_segments(
    gt_ids: np.ndarray,
    gt_segments: Mapping[int, Mapping],
    pred_ids: np.ndarray,
    pred_segments: Mapping[int, int],
) -> Dict[int, np.ndarray]:
    """Match one image's segments; return ``{category: [tp, fp, fn, Σ IoU of TPs]}``.

    Args:
        gt_ids: ground-truth segment id per pixel (0 = void).
        gt_segments: ``{id: {"category_id", "iscrowd"}}`` of the ground truth.
        pred_ids: predicted segment id per pixel (0 = nothing); same shape as ``gt_ids``.
        pred_segments: ``{id: category_id}`` of the predictions (dataset category ids).
    """
    if gt_ids.shape != pred_ids.shape:
        raise ValueError(f"ground truth {gt_ids.shape} and prediction {pred_ids.shape} differ in size")
    stats: Dict[int, np.ndarray] = defaultdict(lambda: np.zeros(4))
    gt_area = dict(zip(*np.unique(gt_ids, return_counts=True)))
    pred_area = dict(zip(*np.unique(pred_ids, return_counts=True)))
    pairs, counts = np.unique(gt_ids.astype(np.int64) * _OFFSET + pred_ids.astype(np.int64), return_counts=True)
    inter = {(int(p // _OFFSET), int(p % _OFFSET)): int(c) for p, c in zip(pairs, counts)}
    crowd_of = {int(s["category_id"]): gid for gid, s in gt_segments.items() if s.get("iscrowd", 0)}
    matched_gt, matched_pred = set(), set()
    for (g, p), area in inter.items():
        if g not in gt_segments or p not in pred_segments:
            continue
        gs = gt_segments[g]
        if gs.get("iscrowd", 0) or int(gs["category_id"]) != pred_segments[p]:
            continue
        union = pred_area[p] + gt_area[g] - area - inter.get((0, p), 0)
        iou = area / union
        if iou > 0.5:
            st = stats[int(gs["category_id"])]
            st[0] += 1
            st[3] += iou
            matched_gt.add(g)
            matched_pred.add(p)
    for g, s in gt_segments.items():
        if g in matched_gt or s.get("iscrowd", 0) or g not in gt_area:
            continue
        stats[int(s["category_id"])][2] += 1
    for p, cat in pred_segments.items():
        if p in matched_pred or p not in pred_area:
            continue
        ignored = inter.get((0, p), 0)
        if cat in crowd_of:
            ignored += inter.get((crowd_of[cat], p), 0)
        if ignored / pred_area[p] > 0.5:
            continue
        stats[cat][1] += 1
    return dict(stats)


def pq_from_stats(stats: Mapping[int, Iterable[float]], isthing: Mapping[int, bool]) -> "OrderedDict[str, float]":
    """PQ, SQ, RQ (percent) over all categories, things (``_th``) and stuff (``_st``), from
    per-category ``[tp, fp, fn, Σ IoU]``; categories with no TP, FP or FN are left out."""
    out = OrderedDict()
    for suffix, keep in (("", lambda c: True), ("_th", lambda c: isthing[c]), ("_st", lambda c: not isthing[c])):
        pq = sq = rq = 0.0
        n = 0
        for cat, (tp, fp, fn, iou) in stats.items():
            if cat not in isthing or not keep(cat) or tp + fp + fn == 0:
                continue
            n += 1
            denom = tp + 0.5 * fp + 0.5 * fn
            pq += iou / denom
            sq += iou / tp if tp else 0.0
            rq += tp / denom
        for name, value in (("PQ", pq), ("SQ", sq), ("RQ", rq)):
            out[name + suffix] = 100.0 * value / n if n else float("nan")
    return out


class PanopticQualityEvaluator(DatasetEvaluator):
    """PQ of a panoptic model on ``dataset_name`` (see the module docstring).

    Returns ``{"panoptic_seg": {"PQ", "SQ", "RQ", "PQ_th", ..., "RQ_st"}}``, the keys of
    detectron2's ``COCOPanopticEvaluator``. Works with several processes (statistics are
    gathered to the main process).
    """

    def __init__(self, dataset_name: str, output_dir: Optional[str] = None) -> None:
        meta = MetadataCatalog.get(dataset_name)
        for key in ("panoptic_json", "panoptic_root"):
            if not meta.get(key, None):
                raise ValueError(f"dataset {dataset_name!r} has no metadata {key!r}: PQ needs COCO panoptic ground truth")
        self._meta = meta
        self._output_dir = output_dir
        self._thing_ids = {v: k for k, v in meta.thing_dataset_id_to_contiguous_id.items()}
        self._stuff_ids = {v: k for k, v in meta.stuff_dataset_id_to_contiguous_id.items()}
        with open(meta.panoptic_json) as f:
            info = json.load(f)
        self._gt = {int(a["image_id"]): a for a in info["annotations"]}
        self._isthing = {int(c["id"]): bool(c["isthing"]) for c in info["categories"]}
        self._stats: Dict[int, np.ndarray] = defaultdict(lambda: np.zeros(4))

    def reset(self) -> None:
        self._stats = defaultdict(lambda: np.zeros(4))

    def _dataset_category(self, seg: Mapping) -> int:
        table = self._thing_ids if seg["isthing"] else self._stuff_ids
        return int(table[int(seg["category_id"])])

    def process(self, inputs, outputs) -> None:
        for inp, out in zip(inputs, outputs):
            ids, segments = out["panoptic_seg"]
            pred = ids.cpu().numpy().astype(np.int64)
            pred[pred < 0] = 0
            if segments is None:  # models that encode the category in the id (label_divisor)
                raise ValueError("PanopticQualityEvaluator needs segments_info with the predictions")
            pred_segments = {int(s["id"]): self._dataset_category(s) for s in segments}
            ann = self._gt.get(int(inp["image_id"]))
            if ann is None:
                raise KeyError(f"image_id {inp['image_id']} is not in {self._meta.panoptic_json}")
            with Image.open(os.path.join(self._meta.panoptic_root, ann["file_name"])) as im:
                gt = _rgb_to_id(np.asarray(im.convert("RGB")))
            gt_segments = {int(s["id"]): s for s in ann["segments_info"]}
            for cat, st in match_segments(gt, gt_segments, pred, pred_segments).items():
                self._stats[cat] += st

    def evaluate(self):
        gathered = comm.gather(dict(self._stats), dst=0)
        if not comm.is_main_process():
            return None
        total: Dict[int, np.ndarray] = defaultdict(lambda: np.zeros(4))
        for part in gathered:
            for cat, st in part.items():
                total[cat] += st
        results = pq_from_stats(total, self._isthing)
        if self._output_dir:
            os.makedirs(self._output_dir, exist_ok=True)
            with open(os.path.join(self._output_dir, "panoptic_quality.json"), "w") as f:
                json.dump({"results": results, "per_category": {str(k): list(v) for k, v in total.items()}}, f, indent=1)
        logger.info("Panoptic quality: %s", ", ".join(f"{k} {v:.2f}" for k, v in results.items()))
        return OrderedDict(panoptic_seg=results)

