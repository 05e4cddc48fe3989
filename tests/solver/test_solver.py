"""Baselines and schedules: every optimizer, SAM's gradient, PMD decay, exp warm-up, LR scaling,
bias/norm exclusion from the trust ratio."""

import math

import pytest

from agvm.detectron2 import default_argument_parser, setup_cfg  # noqa: E402
import torch
from torch import nn

from detectron2.config import get_cfg
from detectron2.utils.events import EventStorage
from fvcore.common.param_scheduler import MultiStepParamScheduler
from timm.optim import Lamb, Lars

from agvm.core.optim import AGVM
from agvm.detectron2 import AGVMStepTrainer, add_agvm_config, build_agvm_optimizer
from agvm.solver import PMDLamb, build_lr_scheduler, exp_warmup, scale_lr

MINI = "projects/faster_rcnn/configs/mini/faster_rcnn_R18_FPN_shapes.yaml"
ALL = ["SGD", "AdamW", "LARS", "LAMB", "PMD_LAMB", "SAM"]


def _cfg(*opts):
    cfg = get_cfg()
    add_agvm_config(cfg)
    cfg.merge_from_file(MINI)
    cfg.merge_from_list(list(opts))
    return cfg


# ------------------------------------------------------------------------ a convex problem
class Quadratic(nn.Module):
    """Least squares with a 'backbone' and a 'head' (so default grouping applies), returning
    a loss dict like a detectron2 model."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(6, 6)
        self.head = nn.Linear(6, 1)

    def forward(self, batch):
        x = torch.stack([b[0] for b in batch])
        y = torch.stack([b[1] for b in batch])
        return {"loss_mse": nn.functional.mse_loss(self.head(self.backbone(x)), y)}


def _quadratic_data(n=64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=g)
    y = x @ torch.randn(6, 1, generator=g) + 0.5
    return [(x[i], y[i]) for i in range(n)]


LRS = {"SGD": 0.01, "AdamW": 0.01, "LARS": 0.2, "LAMB": 0.01, "PMD_LAMB": 0.01, "SAM": 0.01}
# LARS's normalised steps (trust coefficient 0.001, made for deep nets) crawl on a 2-layer problem
EXTRA = {"LARS": ["SOLVER.LARS.TRUST_COEFF", "0.02", "SOLVER.TRUST_RATIO_EXCLUDE_BIAS_NORM", "False"]}


@pytest.mark.parametrize("name", ALL)
def test_each_optimizer_reduces_a_convex_loss(name):
    torch.manual_seed(0)
    model = Quadratic()
    cfg = _cfg("SOLVER.OPTIMIZER", name, "SOLVER.BASE_LR", str(LRS[name]), "SOLVER.WEIGHT_DECAY", "0.0", *EXTRA.get(name, []))
    opt = build_agvm_optimizer(cfg, model)
    data = _quadratic_data()
    batches = [data[i:i + 16] for i in range(0, 64, 16)] * 25
    step = AGVMStepTrainer(model, batches, opt, sam_rho=0.05 if name == "SAM" else None)
    losses = []
    with EventStorage(0) as storage:
        for it in range(len(batches)):
            storage.iter = step.iter = it
            step.run_step()
            losses.append(storage.history("total_loss").latest())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-4:]) < 0.2 * sum(losses[:4]), (name, losses[:4], losses[-4:])


def test_optimizer_classes_and_library_sources():
    model = Quadratic()
    assert isinstance(build_agvm_optimizer(_cfg("SOLVER.OPTIMIZER", "LARS"), model), Lars)
    lamb = build_agvm_optimizer(_cfg("SOLVER.OPTIMIZER", "LAMB"), model)
    assert type(lamb) is Lamb and lamb.defaults["max_grad_norm"] is None  # timm's 1.0 clipping off
    clipped = build_agvm_optimizer(_cfg("SOLVER.OPTIMIZER", "LAMB", "SOLVER.LAMB.MAX_GRAD_NORM", "1.0"), model)
    assert clipped.defaults["max_grad_norm"] == 1.0
    pmd = build_agvm_optimizer(_cfg("SOLVER.OPTIMIZER", "PMD_LAMB", "SOLVER.PMD.PERIOD", "7"), model)
    assert isinstance(pmd, PMDLamb) and pmd.decay_period == 7
    sam = build_agvm_optimizer(_cfg("SOLVER.OPTIMIZER", "SAM", "SOLVER.SAM.BASE_OPTIMIZER", "AdamW"), model)
    assert isinstance(sam, torch.optim.AdamW)
    for name in ("LARS", "LAMB", "SGD", "AdamW"):
        wrapped = build_agvm_optimizer(_cfg("SOLVER.OPTIMIZER", name, "SOLVER.AGVM.ENABLED", "True"), model)
        assert isinstance(wrapped, AGVM)


def test_unknown_optimizer_and_bad_combinations():
    model = Quadratic()
    with pytest.raises(ValueError, match=r"SOLVER.OPTIMIZER='Adam' is not one of \['SGD', 'AdamW', 'LARS', 'LAMB', 'SAM', 'PMD_LAMB'\]"):
        build_agvm_optimizer(_cfg("SOLVER.OPTIMIZER", "Adam"), model)
    with pytest.raises(ValueError, match="SAM.*SOLVER.AGVM.ENABLED"):
        build_agvm_optimizer(_cfg("SOLVER.OPTIMIZER", "SAM", "SOLVER.AGVM.ENABLED", "True"), model)
    with pytest.raises(ValueError, match="SOLVER.SAM.BASE_OPTIMIZER='LARS'"):
        build_agvm_optimizer(_cfg("SOLVER.OPTIMIZER", "SAM", "SOLVER.SAM.BASE_OPTIMIZER", "LARS"), model)
    # SAM accumulates both of its passes over the micro-batches (test_exact_step): accepted
    build_agvm_optimizer(_cfg("SOLVER.OPTIMIZER", "SAM", "SOLVER.GRAD_ACCUM_STEPS", "2"), model)
    with pytest.raises(ValueError, match="SOLVER.PMD.PERIOD"):
        build_agvm_optimizer(_cfg("SOLVER.OPTIMIZER", "PMD_LAMB", "SOLVER.PMD.PERIOD", "0"), model)
    with pytest.raises(ValueError, match="SOLVER.LR_SCALING.RULE='cubic'"):
        build_agvm_optimizer(_cfg("SOLVER.LR_SCALING.RULE", "cubic"), model)
    with pytest.raises(ValueError, match="SOLVER.WARMUP_METHOD='cosine'"):
        build_agvm_optimizer(_cfg("SOLVER.WARMUP_METHOD", "cosine"), model)


# ------------------------------------------------------------------------ SAM
def test_sam_gradient_is_taken_at_the_perturbed_point():
    torch.manual_seed(0)
    model = Quadratic()
    data = _quadratic_data(16)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    rho = 0.1
    # manual: g at w0, e = rho g/|g|, gradient at w0 + e
    ref = Quadratic()
    ref.load_state_dict(model.state_dict())
    ref(data)["loss_mse"].backward()
    g = {n: p.grad.clone() for n, p in ref.named_parameters()}
    norm = torch.norm(torch.stack([v.norm() for v in g.values()]))
    with torch.no_grad():
        for n, p in ref.named_parameters():
            p.add_(rho * g[n] / norm)
            p.grad = None
    ref(data)["loss_mse"].backward()
    expected = {n: p.grad.clone() for n, p in ref.named_parameters()}

    cfg = _cfg("SOLVER.OPTIMIZER", "SAM", "SOLVER.BASE_LR", "0.1", "SOLVER.MOMENTUM", "0.0", "SOLVER.WEIGHT_DECAY", "0.0")
    opt = build_agvm_optimizer(cfg, model)
    step = AGVMStepTrainer(model, [data], opt, sam_rho=rho)
    with EventStorage(0):
        step.run_step()
    for n, p in model.named_parameters():
        # plain SGD step from w0 with the SAM gradient: w = w0 − lr · g_sam
        assert torch.allclose(p, w0[n] - 0.1 * expected[n], atol=1e-6), n


def test_sam_updates_bn_statistics_once():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = model

        def forward(self, batch):
            return {"loss": self.backbone(torch.stack(batch)).pow(2).mean()}

    net = Wrapper()
    cfg = _cfg("SOLVER.OPTIMIZER", "SAM")
    opt = build_agvm_optimizer(cfg, net)
    batch = list(torch.randn(8, 4))
    bn = model[1]
    expected = 0.9 * bn.running_mean + 0.1 * model[0](torch.stack(batch)).mean(0).detach()
    step = AGVMStepTrainer(net, [batch], opt, sam_rho=0.05)
    with EventStorage(0):
        step.run_step()
    assert torch.allclose(bn.running_mean, expected, atol=1e-6)
    assert int(bn.num_batches_tracked) == 1 and bn.momentum == 0.1


# ------------------------------------------------------------------------ PMD-LAMB
def test_pmd_decay_applies_at_the_right_steps():
    p = nn.Parameter(torch.ones(3))
    opt = PMDLamb([p], lr=0.1, decay_period=3, decay_factor=0.5, max_grad_norm=None)
    ref = Lamb([nn.Parameter(torch.ones(3))], lr=0.1, max_grad_norm=None)
    decayed_at = []
    for step in range(1, 8):
        for o, q in ((opt, p), (ref, ref.param_groups[0]["params"][0])):
            q.grad = torch.full((3,), 0.5)
            o.step()
        m, m_ref = opt.state[p]["exp_avg"], ref.state[ref.param_groups[0]["params"][0]]["exp_avg"]
        if not torch.allclose(m, m_ref):
            decayed_at.append(step)
            # re-synchronise the reference to see the next decay alone
            ref.state[ref.param_groups[0]["params"][0]]["exp_avg"].copy_(m)
            ref.state[ref.param_groups[0]["params"][0]]["exp_avg_sq"].copy_(opt.state[p]["exp_avg_sq"])
            ref.param_groups[0]["params"][0].data.copy_(p.data)
    assert decayed_at == [3, 6]


def test_pmd_decay_factor_value():
    p = nn.Parameter(torch.ones(2))
    opt = PMDLamb([p], lr=0.1, decay_period=1, decay_factor=0.25, betas=(0.9, 0.99), max_grad_norm=None)
    p.grad = torch.ones(2)
    opt.step()
    assert torch.allclose(opt.state[p]["exp_avg"], torch.full((2,), 0.1 * 0.25))
    assert torch.allclose(opt.state[p]["exp_avg_sq"], torch.full((2,), 0.01 * 0.25))


# ------------------------------------------------------------------------ schedules
def test_scale_lr_exact_values():
    assert scale_lr(0.02, 16, 256, "linear") == pytest.approx(0.32, rel=1e-12)
    assert scale_lr(0.02, 16, 256, "sqrt") == pytest.approx(0.08, rel=1e-12)
    assert scale_lr(0.02, 16, 1024, "sqrt") == pytest.approx(0.16, rel=1e-12)
    assert scale_lr(0.02, 16, 8, "none") == 0.02
    with pytest.raises(ValueError, match="cubic"):
        scale_lr(0.02, 16, 8, "cubic")


def test_exp_warmup_exact_values():
    main = MultiStepParamScheduler(values=[1.0, 0.1], milestones=[80], num_updates=100)
    sched = exp_warmup(main, 0.001, 0.2)  # T = 20 of 100 iterations
    for t in (0, 5, 10, 19):
        assert sched(t / 100) == pytest.approx(0.001 ** (1 - t / 20), rel=1e-9)
    assert sched(20 / 100) == pytest.approx(1.0)
    assert sched(50 / 100) == pytest.approx(1.0)
    assert sched(90 / 100) == pytest.approx(0.1)


def test_exp_warmup_through_the_config():
    cfg = _cfg("SOLVER.WARMUP_METHOD", "exp", "SOLVER.WARMUP_ITERS", "10", "SOLVER.WARMUP_FACTOR", "0.01",
               "SOLVER.MAX_ITER", "40", "SOLVER.STEPS", "(30,)", "SOLVER.BASE_LR", "0.5")
    model = Quadratic()
    opt = build_agvm_optimizer(cfg, model)
    sched = build_lr_scheduler(cfg, opt)
    lrs = []
    for _ in range(40):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    for t in range(10):
        assert lrs[t] == pytest.approx(0.5 * 0.01 ** (1 - t / 10), rel=1e-9)
    assert lrs[10:30] == pytest.approx([0.5] * 20) and lrs[30] == pytest.approx(0.05)


def test_lr_scaling_rule_sets_base_lr(tmp_path):
    from agvm.detectron2 import default_argument_parser, setup_cfg

    args = default_argument_parser().parse_args(
        ["--config-file", MINI, "OUTPUT_DIR", str(tmp_path), "SOLVER.LR_SCALING.RULE", "sqrt",
         "SOLVER.LR_SCALING.REFERENCE_IMS_PER_BATCH", "2", "SOLVER.LR_SCALING.REFERENCE_LR", "0.01"]
    )
    cfg = setup_cfg(args)
    assert cfg.SOLVER.BASE_LR == pytest.approx(0.01 * 2.0)  # sqrt(8 / 2)


# ------------------------------------------------------------------------ trust-ratio exclusion
@pytest.mark.parametrize("name", ["LARS", "LAMB", "PMD_LAMB"])
def test_bias_and_norm_exclusion_groups(name):
    from detectron2.modeling import build_model

    model = build_model(_cfg())
    excl = build_agvm_optimizer(_cfg("SOLVER.OPTIMIZER", name), model)
    for g in excl.param_groups:
        one_d = [p.ndim <= 1 for p in g["params"]]
        assert all(one_d) or not any(one_d), "1-D and N-D parameters must not share a group"
        if all(one_d):
            assert g["always_adapt"] is False and g["weight_decay"] == 0.0
        else:
            assert g["always_adapt"] is True and g["weight_decay"] == pytest.approx(1e-4)
    incl = build_agvm_optimizer(_cfg("SOLVER.OPTIMIZER", name, "SOLVER.TRUST_RATIO_EXCLUDE_BIAS_NORM", "False"), model)
    assert all(g["always_adapt"] for g in incl.param_groups)


def test_excluded_bias_steps_like_sgd_under_lars():
    """With exclusion, LARS moves a bias exactly like SGD with momentum (no trust ratio);
    without it, the trust ratio rescales the step."""
    torch.manual_seed(0)
    steps = {}
    for exclude in (True, False):
        model = Quadratic()
        cfg = _cfg("SOLVER.OPTIMIZER", "LARS", "SOLVER.BASE_LR", "0.1", "SOLVER.MOMENTUM", "0.0",
                   "SOLVER.TRUST_RATIO_EXCLUDE_BIAS_NORM", str(exclude))
        opt = build_agvm_optimizer(cfg, model)
        before = model.head.bias.detach().clone()
        model.head.bias.grad = torch.tensor([2.0])
        for p in model.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        opt.step()
        steps[exclude] = float(before - model.head.bias.detach())
    assert steps[True] == pytest.approx(0.2, rel=1e-6)
    assert steps[False] != pytest.approx(0.2, rel=1e-3)


# ------------------------------------------------------------------------ the mini detector
@pytest.mark.parametrize("name", ["adamw", "lars", "lamb", "pmd_lamb", "sam"])
def test_mini_config_trains_with_each_optimizer(name, tiny_shapes):
    from test_train_e2e import load_train_net, tiny_args

    train_net = load_train_net()
    config = f"projects/faster_rcnn/configs/mini/faster_rcnn_R18_FPN_shapes_{name}.yaml"
    args = tiny_args(train_net, tiny_shapes / name, "SOLVER.MAX_ITER", "3", "TEST.EVAL_PERIOD", "0",
                     "DATASETS.TEST", "()")
    args.config_file = config
    cfg = setup_cfg(args)
    trainer = train_net.Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    losses = trainer.storage.history("total_loss").values()
    assert len(losses) == 3 and all(math.isfinite(v) for v, _ in losses)
    expected = {"adamw": torch.optim.AdamW, "lars": Lars, "lamb": Lamb, "pmd_lamb": PMDLamb, "sam": torch.optim.SGD}
    assert type(trainer.optimizer) is expected[name]


def test_megdet_recipe_config(tmp_path):
    """configs/recipes/megdet.yaml after the mini model: solver keys only (the model's BN is
    the base's), linear LR scaling, linear warm-up, Φ logged with μ = 1."""
    cfg = _cfg()
    norm = cfg.MODEL.RESNETS.NORM
    cfg.merge_from_file("configs/recipes/megdet.yaml")
    assert cfg.MODEL.RESNETS.NORM == norm
    assert cfg.SOLVER.LR_SCALING.RULE == "linear" and cfg.SOLVER.WARMUP_METHOD == "linear"
    assert cfg.SOLVER.AGVM.ENABLED and cfg.SOLVER.AGVM.MEASURE_ONLY
    from agvm.detectron2 import default_argument_parser, setup_cfg

    args = default_argument_parser().parse_args(
        ["--config-file", MINI, "OUTPUT_DIR", str(tmp_path / "out"), "SOLVER.IMS_PER_BATCH", "64",
         "SOLVER.LR_SCALING.RULE", "linear"]
    )
    assert setup_cfg(args).SOLVER.BASE_LR == pytest.approx(0.02 * 64 / 16)
