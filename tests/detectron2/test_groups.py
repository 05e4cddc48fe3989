"""Parameter grouping by module on every model-zoo family, and the optimizer's tagged groups."""

import pytest
import torch
from torch import nn

from detectron2.config import get_cfg
from detectron2.modeling import build_model

from agvm.core.optim import AGVM, MODULE_KEY
from agvm.detectron2 import add_agvm_config, agvm_param_groups, build_agvm_optimizer, group_parameters
from agvm.detectron2.groups import module_of_parameters
from zoo import LAZY_MODELS, build_lazy_model, small_yaml_cfg, yaml_families

FAMILIES = sorted(yaml_families())

# the modules each kind of model must have (beyond the backbone)
EXPECTED = {
    "fast_rcnn": ["backbone", "neck", "box_head"],
    "faster_rcnn_R_101_C4": ["backbone", "rpn", "box_head"],
    "faster_rcnn_R_101_DC5": ["backbone", "rpn", "box_head"],
    "faster_rcnn": ["backbone", "neck", "rpn", "box_head"],
    "retinanet": ["backbone", "neck", "dense_head"],
    "fcos": ["backbone", "neck", "dense_head"],
    "rpn_R_50_C4": ["backbone", "rpn"],
    "rpn": ["backbone", "neck", "rpn"],
    "mask_rcnn_R_101_C4": ["backbone", "rpn", "box_head", "mask_head"],
    "mask_rcnn_c4": ["backbone", "rpn", "box_head", "mask_head"],
    "mask_rcnn_R_101_DC5": ["backbone", "rpn", "box_head", "mask_head"],
    "mask_rcnn": ["backbone", "neck", "rpn", "box_head", "mask_head"],
    "cascade": ["backbone", "neck", "rpn", "box_head", "mask_head"],
    "keypoint": ["backbone", "neck", "rpn", "box_head", "keypoint_head"],
    "panoptic": ["backbone", "neck", "rpn", "box_head", "mask_head", "sem_seg_head"],
    "semantic": ["backbone", "neck", "sem_seg_head"],
}


def _expected_modules(name):
    base = name.split("/")[-1]
    for key in sorted(EXPECTED, key=len, reverse=True):
        if base.startswith(key) or key in base:
            return EXPECTED[key]
    raise AssertionError(f"no expectation for {name}")


def _check_coverage(model, name):
    groups = group_parameters(model)
    assert list(groups)[0] == "backbone"
    assert sorted(groups) == sorted(_expected_modules(name)), (name, list(groups))
    ids = [id(p) for ps in groups.values() for p in ps]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(ids) == len(set(ids)) == len(trainable)
    assert set(ids) == {id(p) for p in trainable}


@pytest.mark.parametrize("name", FAMILIES)
def test_grouping_covers_yaml_family(name):
    cfg = small_yaml_cfg(name)
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    _check_coverage(build_model(cfg), name)


@pytest.mark.parametrize("name", LAZY_MODELS)
def test_grouping_covers_lazy_family(name):
    _check_coverage(build_lazy_model(name), name)


def test_specific_assignments():
    cfg = small_yaml_cfg("Misc/cascade_mask_rcnn_R_50_FPN_1x.yaml")
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    assignment = module_of_parameters(build_model(cfg))
    assert assignment["backbone.bottom_up.stem.conv1.weight"] == "backbone"
    assert assignment["backbone.fpn_lateral2.weight"] == "neck"
    assert assignment["roi_heads.box_head.2.fc1.weight"] == "box_head"
    assert assignment["roi_heads.box_predictor.1.cls_score.weight"] == "box_head"
    c4_cfg = small_yaml_cfg("COCO-InstanceSegmentation/mask_rcnn_R_101_C4_3x.yaml")
    c4 = module_of_parameters(build_model(c4_cfg))
    assert c4["roi_heads.res5.0.conv1.weight"] == "box_head"
    assert c4["backbone.res4.0.conv1.weight"] == "backbone"


def test_frozen_parameters_are_left_out():
    cfg = small_yaml_cfg("COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml")
    cfg.MODEL.BACKBONE.FREEZE_AT = 2
    model = build_model(cfg)
    groups = group_parameters(model)
    assert sum(len(ps) for ps in groups.values()) == sum(1 for p in model.parameters() if p.requires_grad)
    assert not model.backbone.bottom_up.stem.conv1.weight.requires_grad


class Odd(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(2, 2)
        self.extra = nn.Linear(2, 2)
        self.head = nn.Linear(2, 2)


def test_stragglers_are_listed():
    with pytest.raises(ValueError, match=r"extra\.weight, extra\.bias"):
        group_parameters(Odd())


def test_user_rules_first_and_anchor():
    model = Odd()
    groups = group_parameters(model, [("extra", r"^extra\."), ("backbone", r"^head\.")], anchor="extra")
    assert list(groups) == ["extra", "backbone"]
    assert groups["backbone"][-1] is model.head.bias
    with pytest.raises(ValueError, match="match no trainable parameter"):
        group_parameters(model, [("extra", r"^extra\."), ("nothing", r"^nope\.")])
    with pytest.raises(ValueError, match="ANCHOR='neck'"):
        group_parameters(model, [("extra", r"^extra\.")], anchor="neck")
    with pytest.raises(ValueError, match="invalid"):
        group_parameters(model, [("extra", r"(")])


def _mini_cfg(**overrides):
    cfg = get_cfg()
    add_agvm_config(cfg)
    cfg.merge_from_file("projects/faster_rcnn/configs/mini/faster_rcnn_R18_FPN_shapes.yaml")
    for k, v in overrides.items():
        cfg.merge_from_list([k, v])
    return cfg


def test_optimizer_groups_keep_detectron2_weight_decay_and_tags():
    cfg = _mini_cfg(**{"SOLVER.WEIGHT_DECAY_NORM": 0.0, "SOLVER.BIAS_LR_FACTOR": 2.0, "SOLVER.AGVM.ENABLED": True})
    model = build_model(cfg)
    groups = agvm_param_groups(cfg, model)
    assert groups[0][MODULE_KEY] == "backbone"
    norm_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    for g in groups:
        if any(id(p) in norm_params for p in g["params"]):
            assert g["weight_decay"] == 0.0
    bias_groups = [g for g in groups if g["lr"] == pytest.approx(2 * cfg.SOLVER.BASE_LR)]
    assert bias_groups and all(p.ndim == 1 for g in bias_groups for p in g["params"])
    covered = [id(p) for g in groups for p in g["params"]]
    assert len(covered) == len(set(covered)) == sum(1 for p in model.parameters() if p.requires_grad)
    opt = build_agvm_optimizer(cfg, model)
    assert isinstance(opt, AGVM) and opt.modulator.modules == ["backbone", "neck", "rpn", "box_head"]
    assert opt.modulator.start_iter == cfg.SOLVER.WARMUP_ITERS + 100
    adamw = build_agvm_optimizer(_mini_cfg(**{"SOLVER.OPTIMIZER": "AdamW", "SOLVER.AGVM.ENABLED": True}), model)
    assert isinstance(adamw.optimizer, torch.optim.AdamW) and adamw.precondition
    plain = build_agvm_optimizer(_mini_cfg(), model)
    assert isinstance(plain, torch.optim.SGD)


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("SOLVER.AGVM.MOMENTUM", "1.0", "SOLVER.AGVM.MOMENTUM=1.0"),
        ("SOLVER.AGVM.INTERVAL", "0", "SOLVER.AGVM.INTERVAL=0"),
        ("SOLVER.AGVM.CLAMP", "(2.0, 1.0)", "SOLVER.AGVM.CLAMP"),
        ("SOLVER.AGVM.CLAMP", "(0.0, 1.0)", "SOLVER.AGVM.CLAMP"),
        ("SOLVER.AGVM.ANCHOR", "'trunk'", "ANCHOR='trunk'"),
        ("SOLVER.AGVM.GROUPS", "[['x', '^nothing_here']]", "match no trainable parameter"),
        ("SOLVER.OPTIMIZER", "'Adagrad'", "SOLVER.OPTIMIZER='Adagrad' is not one of"),
        ("SOLVER.GRAD_ACCUM_STEPS", "0", "SOLVER.GRAD_ACCUM_STEPS=0"),
        ("SOLVER.AGVM.STOP_ITER", "5", "SOLVER.AGVM.STOP_ITER=5"),
        ("SOLVER.AGVM.PRECONDITION", "'maybe'", "PRECONDITION"),
        ("SOLVER.CLIP_GRADIENTS.ITER_RANGE", "(5, 2)", "ITER_RANGE"),
        ("SOLVER.AMP.ENABLED", "True", "AMP"),
    ],
)
def test_bad_config_fails_before_training(key, value, match):
    cfg = _mini_cfg(**{"SOLVER.AGVM.ENABLED": True, key: value})
    model = build_model(_mini_cfg())
    with pytest.raises(ValueError, match=match):
        build_agvm_optimizer(cfg, model)
