"""Where the project follows the authors' release (issue: multi-GPU, multi-node and AdamW runs):
FPN without norm in the full-scale R-CNN bases, μ = 1 after STOP_ITER, clip types that keep
detectron2's meaning of "norm" and add "full_model", and the AGVM cells using it."""

import glob
import os

import pytest
import torch
from detectron2.config import get_cfg

from agvm.detectron2 import add_agvm_config
from agvm.detectron2.build import build_clip_fn

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load(path):
    cfg = get_cfg()
    add_agvm_config(cfg)
    cfg.merge_from_file(path)
    return cfg


@pytest.mark.parametrize("base", ["faster_rcnn/configs/Base-faster_rcnn_R50_FPN.yaml",
                                  "mask_rcnn/configs/Base-mask_rcnn_R50_FPN.yaml",
                                  "panoptic_fpn/configs/Base-panoptic_fpn_R50.yaml"])
def test_full_scale_bases_have_syncbn_backbone_and_no_fpn_norm(base):
    cfg = _load(os.path.join(ROOT, "projects", base))
    assert cfg.MODEL.RESNETS.NORM == "SyncBN" and cfg.MODEL.FPN.NORM == ""


def test_agvm_cells_clip_the_whole_model():
    cells = sorted(glob.glob(os.path.join(ROOT, "projects", "*", "configs", "*agvm*.yaml")))
    assert len(cells) > 20
    for path in cells:
        c = _load(path).SOLVER.CLIP_GRADIENTS
        if c.ENABLED:
            assert c.CLIP_TYPE == "full_model", path


def _grads():
    a = torch.zeros(4, requires_grad=True)
    b = torch.zeros(4, requires_grad=True)
    a.grad = torch.full((4,), 3.0)  # norm 6
    b.grad = torch.full((4,), 4.0)  # norm 8; together 10
    return [a, b]


def _clip(kind, value=1.0):
    cfg = get_cfg()
    add_agvm_config(cfg)
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = kind
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = value
    return build_clip_fn(cfg)


def test_norm_clips_each_parameter_as_detectron2_does():
    params = _grads()
    _clip("norm")(params)
    assert [float(p.grad.norm()) for p in params] == pytest.approx([1.0, 1.0], rel=1e-5)


def test_full_model_clips_one_norm_over_all_parameters():
    params = _grads()
    _clip("full_model")(params)
    norms = [float(p.grad.norm()) for p in params]
    assert norms == pytest.approx([0.6, 0.8], rel=1e-5)  # ratio kept, total 1


def test_unknown_clip_type_names_the_key():
    with pytest.raises(ValueError, match="CLIP_TYPE='global'.*'full_model'"):
        _clip("global")
