"""agvm.core: Φ, the modulator's μ trajectory, and the optimizer wrapper (pure torch)."""

import copy
import math

import pytest
import torch
from torch import nn

from agvm.core.modulator import GradientVarianceModulator
from agvm.core.optim import AGVM, MODULE_KEY
from agvm.core.sandbox import preserved_state
from agvm.core.variance import gradient_stats, gradient_variance, variance_from_stats


# ------------------------------------------------------------------------------------ Φ
def _reference_phi(g1, g2):
    a = torch.cat([t.double().reshape(-1) for t in g1])
    b = torch.cat([t.double().reshape(-1) for t in g2])
    return 1.0 - float(a @ b / (a.norm() * b.norm()))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_phi_matches_float64_reference(seed):
    g = torch.Generator().manual_seed(seed)
    shapes = [(64, 3, 3, 3), (64,), (10, 64), (1,)]
    g1 = [torch.randn(s, generator=g) for s in shapes]
    g2 = [0.3 * t + torch.randn(t.shape, generator=g) for t in g1]
    assert gradient_variance(g1, g2) == pytest.approx(_reference_phi(g1, g2), rel=1e-6, abs=1e-9)


def test_phi_limits_and_scale_invariance():
    g = [torch.randn(100), torch.randn(5, 5)]
    assert gradient_variance(g, g) == pytest.approx(0.0, abs=1e-7)
    assert gradient_variance(g, [-t for t in g]) == pytest.approx(2.0, abs=1e-7)
    scaled = [1e4 * t for t in g]
    other = [torch.randn_like(t) for t in g]
    assert gradient_variance(scaled, other) == pytest.approx(gradient_variance(g, other), rel=1e-5)


def test_phi_half_precision_inputs_use_float32_math():
    g1 = [torch.randn(1000).half()]
    g2 = [torch.randn(1000).half()]
    ref = _reference_phi([t.float() for t in g1], [t.float() for t in g2])
    assert gradient_variance(g1, g2) == pytest.approx(ref, rel=1e-5)


def test_phi_is_nan_when_undefined():
    z = [torch.zeros(4)]
    x = [torch.ones(4)]
    assert math.isnan(gradient_variance(z, x))
    assert math.isnan(gradient_variance(x, [torch.tensor([1.0, float("nan"), 1.0, 1.0])]))
    assert math.isnan(gradient_variance(x, [torch.tensor([float("inf"), 0, 0, 0])]))
    assert math.isnan(gradient_variance([], []))


def test_phi_none_is_zero_gradient():
    a, b = torch.randn(6), torch.randn(3)
    c, d = torch.randn(6), torch.randn(3)
    # second tensor missing in half 2 == a zero gradient there
    assert gradient_variance([a, b], [c, None]) == pytest.approx(
        gradient_variance([a, b], [c, torch.zeros(3)]), rel=1e-6
    )
    dot, n1, n2 = gradient_stats([None, b], [None, d])
    assert float(dot) == pytest.approx(float(b @ d), rel=1e-6)


def test_phi_bad_input():
    with pytest.raises(ValueError, match="differ in length"):
        gradient_variance([torch.ones(2)], [torch.ones(2), torch.ones(2)])
    with pytest.raises(ValueError, match="shapes differ"):
        gradient_variance([torch.ones(2)], [torch.ones(3)])


def test_variance_from_stats_clamps():
    assert variance_from_stats(1.0000001, 1.0, 1.0) == 0.0  # cos slightly > 1 by rounding
    assert variance_from_stats(-1.0000001, 1.0, 1.0) == 2.0


# ------------------------------------------------------------------------------------ μ
def _hand_trajectory(phis, alpha, lo, hi, eps=1e-6):
    """μ of one non-anchor module for a sequence of (Φ_anchor, Φ_module) pairs."""
    mu, out = 1.0, []
    for pa, pm in phis:
        ratio = min(hi, max(lo, (pa + eps) / (pm + eps)))
        mu = alpha * mu + (1 - alpha) * math.sqrt(ratio)
        out.append(mu)
    return out


def test_mu_trajectory_by_hand():
    mod = GradientVarianceModulator(["backbone", "head"], momentum=0.9, interval=3, start_iter=2, clamp=(0.5, 10.0))
    phis = [(0.8, 0.2), (0.9, 0.05), (0.5, 0.9), (0.4, 0.0)]
    expected = _hand_trajectory(phis, 0.9, 0.5, 10.0)
    # hand values of the first two: sqrt(4)=2 -> 0.9+0.2=1.1; sqrt(10)=3.1623 (clamped 18 -> 10)
    assert expected[0] == pytest.approx(1.1, abs=1e-5)
    assert expected[1] == pytest.approx(0.9 * 1.1 + 0.1 * math.sqrt(10.0), abs=1e-6)
    update_iters = [it for it in range(14) if mod.is_update_iter(it)]
    assert update_iters == [2, 5, 8, 11]
    got = []
    for it, (pa, pm) in zip(update_iters, phis):
        mu = mod.update(it, {"backbone": pa, "head": pm})
        got.append(mu["head"])
        assert mu["backbone"] == 1.0
    assert got == pytest.approx(expected, rel=1e-12)


def test_mu_stop_iter_and_no_clamp():
    mod = GradientVarianceModulator(["backbone", "head"], momentum=0.5, interval=2, start_iter=0, stop_iter=4, clamp=None)
    assert [it for it in range(10) if mod.is_update_iter(it)] == [0, 2, 4]
    mu = mod.update(0, {"backbone": 1.0, "head": 0.01})
    assert mu["head"] == pytest.approx(0.5 + 0.5 * math.sqrt((1 + 1e-6) / (0.01 + 1e-6)), rel=1e-9)


def test_measure_only_keeps_mu_one():
    mod = GradientVarianceModulator(["backbone", "head"], measure_only=True)
    mod.update(0, {"backbone": 1.0, "head": 0.1})
    assert mod.mu == {"backbone": 1.0, "head": 1.0}
    assert mod.phi["head"] == 0.1


def test_nonfinite_phi_skips_module_and_keeps_mu():
    mod = GradientVarianceModulator(["backbone", "a", "b"], momentum=0.0, clamp=None, eps=0.0)
    mod.update(0, {"backbone": 1.0, "a": 0.25, "b": 0.25})
    assert mod.mu["a"] == pytest.approx(2.0)
    mod.update(10, {"backbone": 1.0, "a": float("nan"), "b": 1.0})
    assert mod.mu["a"] == pytest.approx(2.0) and mod.mu["b"] == pytest.approx(1.0)
    assert mod.skipped == 1
    mod.update(20, {"backbone": float("nan"), "a": 1.0, "b": 1.0})  # anchor undefined: all kept
    assert mod.mu["a"] == pytest.approx(2.0) and mod.skipped == 3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"momentum": 1.0}, "momentum"),
        ({"momentum": -0.1}, "momentum"),
        ({"interval": 0}, "interval"),
        ({"clamp": (0.0, 1.0)}, "clamp"),
        ({"clamp": (2.0, 1.0)}, "clamp"),
        ({"anchor": "neck"}, "anchor"),
        ({"stop_iter": -5}, "stop_iter"),
    ],
)
def test_modulator_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradientVarianceModulator(["backbone", "head"], **kwargs)


def test_modulator_state_roundtrip():
    a = GradientVarianceModulator(["backbone", "head"])
    a.update(0, {"backbone": 0.9, "head": 0.1})
    b = GradientVarianceModulator(["backbone", "head"])
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    assert b.mu == a.mu and b.num_updates == 1
    with pytest.raises(ValueError, match="modules"):
        GradientVarianceModulator(["backbone", "x"]).load_state_dict(a.state_dict())


# ------------------------------------------------------------------------------------ wrapper
class TwoModuleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16))
        self.head = nn.Linear(16, 1)

    def forward(self, x):
        return self.head(torch.relu(self.backbone(x)))


def _groups(net):
    return [
        {"params": list(net.backbone.parameters()), MODULE_KEY: "backbone"},
        {"params": [net.head.weight], MODULE_KEY: "head"},
        {"params": [net.head.bias], MODULE_KEY: "head", "weight_decay": 0.0},
    ]


def _data(seed=0, n=32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return x, x[:, :1] * 2 - x[:, 1:2] + 0.1 * torch.randn(n, 1, generator=g)


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda groups: torch.optim.SGD(groups, lr=0.05, momentum=0.9, weight_decay=1e-4),
        lambda groups: torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.05),
    ],
    ids=["sgd", "adamw"],
)
def test_mu_one_is_bit_identical_to_bare_optimizer(make_opt):
    torch.manual_seed(0)
    net_a = TwoModuleNet()
    net_b = copy.deepcopy(net_a)
    bare = make_opt(_groups(net_a))
    wrapped = AGVM(make_opt(_groups(net_b)), measure_only=True)
    sched_a = torch.optim.lr_scheduler.StepLR(bare, step_size=7, gamma=0.5)
    sched_b = torch.optim.lr_scheduler.StepLR(wrapped, step_size=7, gamma=0.5)
    for it in range(25):
        x, y = _data(it)
        for net, opt in ((net_a, bare), (net_b, wrapped)):
            opt.zero_grad()
            nn.functional.mse_loss(net(x), y).backward()
            opt.step()
        sched_a.step()
        sched_b.step()
    for pa, pb in zip(net_a.parameters(), net_b.parameters()):
        assert torch.equal(pa, pb)
    assert [g["lr"] for g in bare.param_groups] == [g["lr"] for g in wrapped.param_groups]


def test_step_scales_lr_per_module_and_restores():
    net = TwoModuleNet()
    opt = AGVM(torch.optim.SGD(_groups(net), lr=0.1), clamp=None)
    opt.modulator.mu["head"] = 3.0
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.1, 0.1]
    assert torch.allclose(net.head.weight, before["head.weight"] - 0.3)
    assert torch.allclose(net.backbone[0].weight, before["backbone.0.weight"] - 0.1)


def test_halves_only_measure_and_leave_no_gradient():
    """finish_second_half gives Φ of the two halves and drops both: the step is taken from a
    plain pass afterwards (AGVM changes training only through μ)."""
    torch.manual_seed(0)
    net = TwoModuleNet()
    x, y = _data(1, 16)
    opt = AGVM(torch.optim.SGD(_groups(net), lr=0.1))
    nn.functional.mse_loss(net(x[:8]), y[:8]).backward()
    g1 = [p.grad.clone() for p in net.parameters()]
    opt.stash_first_half()
    assert all(p.grad is None for p in net.parameters())
    nn.functional.mse_loss(net(x[8:]), y[8:]).backward()
    g2 = [p.grad.clone() for p in net.parameters()]
    out = opt.finish_second_half(0)
    assert all(p.grad is None for p in net.parameters())
    n_backbone = len(list(net.backbone.parameters()))
    assert out["phi"]["backbone"] == pytest.approx(_reference_phi(g1[:n_backbone], g2[:n_backbone]), rel=1e-9)
    assert out["phi"]["head"] == pytest.approx(_reference_phi(g1[n_backbone:], g2[n_backbone:]), rel=1e-9)
    assert out["mu"]["backbone"] == 1.0 and out["mu"]["head"] != 1.0


def test_accumulated_halves_keep_the_accumulated_gradient():
    """copy_first_half / finish_accumulated: Φ between the first micro-batches and the rest,
    and p.grad stays the plain accumulated gradient, bit for bit."""
    torch.manual_seed(0)
    x, y = _data(1, 16)
    ref_net = TwoModuleNet()
    net = TwoModuleNet()
    net.load_state_dict(ref_net.state_dict())
    for i in range(4):
        (nn.functional.mse_loss(ref_net(x[4 * i:4 * i + 4]), y[4 * i:4 * i + 4]) / 4).backward()
    opt = AGVM(torch.optim.SGD(_groups(net), lr=0.1))
    halves = []
    for i in range(4):
        (nn.functional.mse_loss(net(x[4 * i:4 * i + 4]), y[4 * i:4 * i + 4]) / 4).backward()
        if i == 1:
            halves.append([p.grad.clone() for p in net.parameters()])
            opt.copy_first_half()
    halves.append([p.grad - h for p, h in zip(net.parameters(), halves[0])])
    out = opt.finish_accumulated(0, grad_scale=2.0)
    for p, r in zip(net.parameters(), ref_net.parameters()):
        assert torch.equal(p.grad, r.grad)
    n = len(list(net.backbone.parameters()))
    assert out["phi"]["head"] == pytest.approx(_reference_phi(halves[0][n:], halves[1][n:]), rel=1e-6)
    with pytest.raises(RuntimeError, match="copy_first_half"):
        opt.finish_accumulated(1)


def test_module_without_gradient_in_one_half_is_skipped():
    """A module that one half does not reach (e.g. a mask head without positive RoIs) keeps
    its μ and is counted in ``skipped``."""
    torch.manual_seed(0)
    net = TwoModuleNet()
    opt = AGVM(torch.optim.SGD(_groups(net), lr=0.1), clamp=None)
    opt.modulator.mu["head"] = 1.5
    x, y = _data(0, 8)
    nn.functional.mse_loss(net(x[:4]), y[:4]).backward()
    opt.stash_first_half()
    net.backbone(x[4:]).sum().backward()  # the head gets no gradient in half 2
    out = opt.finish_second_half(0)
    assert math.isnan(out["phi"]["head"]) and out["mu"]["head"] == 1.5
    assert opt.modulator.skipped == 1


@pytest.mark.parametrize("precondition", [False, True])
def test_scaled_gradients_give_the_unscaled_phi(precondition):
    """AMP: gradients scaled by S with grad_scale = 1/S give the Φ of the unscaled gradients
    (the cosine is scale-invariant; Adam preconditioning is not, hence grad_scale)."""
    torch.manual_seed(0)
    x, y = _data(0, 16)
    phis = []
    for scale in (1.0, 1024.0):
        torch.manual_seed(0)
        net = TwoModuleNet()
        opt = AGVM(torch.optim.AdamW(_groups(net), lr=1e-3), precondition=precondition)
        (nn.functional.mse_loss(net(x[:8]), y[:8]) * scale).backward()
        opt.stash_first_half()
        (nn.functional.mse_loss(net(x[8:]), y[8:]) * scale).backward()
        phis.append(opt.finish_second_half(0, grad_scale=1.0 / scale)["phi"])
    for m in ("backbone", "head"):
        assert phis[1][m] == pytest.approx(phis[0][m], rel=1e-4)


def test_overflowed_step_leaves_mu_unchanged():
    net = TwoModuleNet()
    opt = AGVM(torch.optim.SGD(_groups(net), lr=0.1), clamp=None)
    opt.modulator.mu["head"] = 1.7
    x, y = _data(0, 8)
    nn.functional.mse_loss(net(x[:4]), y[:4]).backward()
    opt.stash_first_half()
    nn.functional.mse_loss(net(x[4:]), y[4:]).backward()
    net.backbone[0].weight.grad[0, 0] = float("inf")  # an fp16 overflow in the backbone
    out = opt.finish_second_half(5, skip_if_nonfinite=True)
    assert opt.mu == {"backbone": 1.0, "head": 1.7}
    assert all(math.isnan(v) for v in out["phi"].values())
    assert opt.modulator.skipped == 1 and opt.modulator.last_update_iter == 5


def test_adam_preconditioning_auto_and_value():
    net = TwoModuleNet()
    adam = AGVM(torch.optim.AdamW(_groups(net), lr=1e-3, betas=(0.9, 0.99), eps=1e-8))
    sgd = AGVM(torch.optim.SGD(_groups(TwoModuleNet()), lr=0.1))
    assert adam.precondition and not sgd.precondition
    assert not AGVM(torch.optim.AdamW(_groups(TwoModuleNet()), lr=1e-3), precondition=False).precondition
    # after one step the second moment exists: the transform uses it
    x, y = _data(0)
    nn.functional.mse_loss(net(x), y).backward()
    adam.step()
    adam.zero_grad()
    nn.functional.mse_loss(net(x[:16]), y[:16]).backward()
    g1 = [p.grad.clone() for p in net.parameters()]
    adam.stash_first_half()
    nn.functional.mse_loss(net(x[16:]), y[16:]).backward()
    g2 = [p.grad.clone() for p in net.parameters()]
    v = [adam.optimizer.state[p]["exp_avg_sq"] for p in net.parameters()]
    pre = lambda g, v: g / ((0.99 * v + 0.01 * g * g).sqrt() + 1e-8)  # noqa: E731
    h1 = [pre(a, b) for a, b in zip(g1, v)]
    h2 = [pre(a, b) for a, b in zip(g2, v)]
    out = adam.finish_second_half(0)
    nb = len(list(net.backbone.parameters()))
    assert out["phi"]["backbone"] == pytest.approx(_reference_phi(h1[:nb], h2[:nb]), rel=1e-5)
    assert out["phi"]["head"] == pytest.approx(_reference_phi(h1[nb:], h2[nb:]), rel=1e-5)


def test_wrapper_bad_input():
    net = TwoModuleNet()
    with pytest.raises(ValueError, match="agvm_module"):
        AGVM(torch.optim.SGD(net.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        AGVM(object())
    with pytest.raises(ValueError, match="anchor"):
        AGVM(torch.optim.SGD(_groups(net), lr=0.1), anchor="neck")
    opt = AGVM(torch.optim.SGD(_groups(net), lr=0.1))
    with pytest.raises(RuntimeError, match="stash_first_half"):
        opt.finish_second_half(0)


def test_wrapper_state_dict_carries_modulator():
    net = TwoModuleNet()
    opt = AGVM(torch.optim.SGD(_groups(net), lr=0.1, momentum=0.9))
    opt.modulator.update(0, {"backbone": 0.8, "head": 0.1})
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    state = copy.deepcopy(opt.state_dict())
    fresh = AGVM(torch.optim.SGD(_groups(net), lr=0.1, momentum=0.9))
    fresh.load_state_dict(state)
    assert fresh.mu == opt.mu and fresh.mu["head"] > 1.0
    assert torch.equal(
        fresh.optimizer.state[net.head.weight]["momentum_buffer"], opt.optimizer.state[net.head.weight]["momentum_buffer"]
    )


def test_plain_pytorch_loop_example():
    """The README's plain-PyTorch example: AGVM on a two-module model in an ordinary loop."""
    torch.manual_seed(0)
    net = TwoModuleNet()
    opt = AGVM(torch.optim.SGD(_groups(net), lr=0.05, momentum=0.9), interval=5)
    loss_fn = nn.functional.mse_loss
    x_all, y_all = _data(0, 512)
    first = last = None
    for it in range(60):
        x, y = x_all[(it * 32) % 512:][:32], y_all[(it * 32) % 512:][:32]
        opt.zero_grad()
        if opt.should_estimate(it):
            h = len(x) // 2
            with preserved_state(net):
                loss_fn(net(x[:h]), y[:h]).backward()
                opt.stash_first_half()
                loss_fn(net(x[h:]), y[h:]).backward()
                opt.finish_second_half(it)
        loss = loss_fn(net(x), y)
        loss.backward()
        first = float(loss) if first is None else first
        last = float(loss)
        opt.step()
    assert opt.modulator.num_updates == 12
    assert last < 0.5 * first
    assert opt.mu["head"] != 1.0 and math.isfinite(opt.mu["head"])


def test_plain_lr_returns_after_stop_iter():
    """After stop_iter the step uses the plain lr (μ = 1), as the authors' release does; the
    last μ is kept in the state (and applies again nowhere)."""
    torch.manual_seed(0)
    net = TwoModuleNet()
    opt = AGVM(torch.optim.SGD(_groups(net), lr=0.1), interval=1, stop_iter=3)
    opt.modulator.mu["head"] = 2.0
    seen = []
    inner = opt.optimizer.step

    def spy(*a, **k):
        seen.append({g["agvm_module"]: g["lr"] for g in opt.param_groups})
        return inner(*a, **k)

    opt.optimizer.step = spy
    x, y = _data(0, 8)
    for it in (3, 4):
        opt.should_estimate(it)
        opt.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        opt.step()
    assert seen[0]["head"] == pytest.approx(0.2) and seen[1]["head"] == pytest.approx(0.1)
    assert opt.mu["head"] == 2.0 and opt.modulator.applied_mu(4)["head"] == 1.0
    assert all(g["lr"] == 0.1 for g in opt.param_groups)
