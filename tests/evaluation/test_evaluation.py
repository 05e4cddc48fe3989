"""PQ without panopticapi, and the clear errors for missing builtin datasets."""

import numpy as np
import pytest

from agvm.data.builtin import DatasetNotFoundError, check_datasets
from agvm.evaluation import PanopticQualityEvaluator, pq_from_stats
from agvm.evaluation.panoptic import match_segments


def test_match_segments_exact_counts():
    gt = np.zeros((4, 6), dtype=np.int64)
    gt[:, 0:3] = 1  # category 10, 12 px
    gt[:, 3:5] = 2  # category 20, 8 px
    gt[:, 5] = 0  # void column, 4 px
    pred = np.zeros_like(gt)
    pred[:, 0:2] = 7  # category 10: IoU 8/12 with gt 1 -> TP
    pred[:, 2:4] = 8  # category 20: IoU 4/12 with gt 2 -> FP; gt 2 -> FN
    pred[:, 4:6] = 9  # category 30: half on gt 2, half void (4/8 = 0.5, not > 0.5) -> FP
    gt_segments = {1: {"category_id": 10, "iscrowd": 0}, 2: {"category_id": 20, "iscrowd": 0}}
    stats = match_segments(gt, gt_segments, pred, {7: 10, 8: 20, 9: 30})
    assert stats[10].tolist() == [1, 0, 0, pytest.approx(8 / 12)]
    assert stats[20].tolist() == [0, 1, 1, 0]
    assert stats[30].tolist() == [0, 1, 0, 0]
    # void pixels leave the union: a prediction covering gt 1 plus the void column still matches
    pred2 = np.where(gt == 2, 0, 5)
    stats2 = match_segments(gt, gt_segments, pred2, {5: 10})
    assert stats2[10].tolist() == [1, 0, 0, 1.0] and stats2[20].tolist() == [0, 0, 1, 0]
    # a crowd region is never a FN, and a prediction mostly on it is ignored
    crowd = {1: {"category_id": 10, "iscrowd": 1}, 2: {"category_id": 20, "iscrowd": 0}}
    stats3 = match_segments(gt, crowd, np.where(gt == 1, 4, 0), {4: 10})
    assert 10 not in stats3 and stats3[20].tolist() == [0, 0, 1, 0]
    with pytest.raises(ValueError, match="differ in size"):
        match_segments(gt, gt_segments, pred[:, :3], {})


def test_pq_from_stats_exact_values():
    stats = {1: [2, 1, 1, 1.6], 2: [0, 1, 0, 0.0], 3: [1, 0, 0, 0.9], 4: [0, 0, 0, 0.0]}
    isthing = {1: True, 2: True, 3: False, 4: False}
    r = pq_from_stats(stats, isthing)
    # cat 1: PQ 1.6/3, SQ 0.8, RQ 2/3; cat 2: 0, 0, 0; cat 3: 0.9, 0.9, 1; cat 4 left out
    assert r["PQ"] == pytest.approx(100 * (1.6 / 3 + 0 + 0.9) / 3)
    assert r["SQ_th"] == pytest.approx(100 * 0.8 / 2) and r["RQ_th"] == pytest.approx(100 * (2 / 3) / 2)
    assert r["PQ_st"] == pytest.approx(90.0) and r["RQ_st"] == pytest.approx(100.0)


def test_ground_truth_as_prediction_scores_100(tiny_shapes):
    """The evaluator fed the ground truth itself (through the model's output format) gives PQ 100."""
    import json
    import os

    import torch
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from PIL import Image

    from agvm.data.register import prepare_datasets, register_shapes

    register_shapes()
    name = "shapes_val_panoptic_separated"
    prepare_datasets([name])
    meta = MetadataCatalog.get(name)
    ev = PanopticQualityEvaluator(name)
    ev.reset()
    with open(meta.panoptic_json) as f:
        anns = json.load(f)["annotations"]
    thing_c = meta.thing_dataset_id_to_contiguous_id
    stuff_c = meta.stuff_dataset_id_to_contiguous_id
    for d in DatasetCatalog.get(name):
        ann = [a for a in anns if a["image_id"] == d["image_id"]][0]
        png = np.asarray(Image.open(os.path.join(meta.panoptic_root, ann["file_name"])).convert("RGB")).astype(np.int64)
        ids = png[..., 0] + 256 * png[..., 1] + 65536 * png[..., 2]
        segs = []
        for s in ann["segments_info"]:
            isthing = s["category_id"] in thing_c
            segs.append({"id": s["id"], "isthing": isthing,
                         "category_id": (thing_c if isthing else stuff_c)[s["category_id"]]})
        ev.process([{"image_id": d["image_id"]}], [{"panoptic_seg": (torch.from_numpy(ids), segs)}])
    res = ev.evaluate()["panoptic_seg"]
    assert res["PQ"] == pytest.approx(100.0) and res["PQ_th"] == pytest.approx(100.0) and res["PQ_st"] == pytest.approx(100.0)


def test_missing_builtin_dataset_is_a_clear_error(monkeypatch, tmp_path):
    import detectron2.data  # noqa: F401  (registers the builtin datasets)

    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    with pytest.raises(DatasetNotFoundError) as e:
        check_datasets(["coco_2017_val"])
    msg = str(e.value)
    assert "coco_2017_val" in msg and "instances_val2017.json" in msg and "cocodataset.org" in msg
    with pytest.raises(DatasetNotFoundError, match="prepare_ade20k_sem_seg.py"):
        check_datasets("ade20k_sem_seg_val")
    with pytest.raises(DatasetNotFoundError, match="prepare_panoptic_fpn.py"):
        check_datasets("coco_2017_val_panoptic_separated")
    assert check_datasets(["shapes_val", "not_registered_anywhere"]) == []


def test_setup_cfg_stops_on_a_missing_dataset(tmp_path, monkeypatch):
    import os

    from agvm.detectron2 import default_argument_parser, setup_cfg

    monkeypatch.chdir(tmp_path)  # ./datasets (detectron2's default root) does not exist here
    cfg = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "projects/faster_rcnn/configs/b512_agvm.yaml")
    args = default_argument_parser().parse_args(["--config-file", cfg, "OUTPUT_DIR", str(tmp_path / "out")])
    with pytest.raises(DatasetNotFoundError, match="DETECTRON2_DATASETS"):
        setup_cfg(args)
    assert not os.path.exists(tmp_path / "out")  # stopped before writing anything
