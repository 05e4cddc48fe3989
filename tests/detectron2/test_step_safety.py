"""Step safety (issue items 4, 5, 6, 8a).

- SAM skips and counts non-finite gradients (the ascent's and the one at the shifted point),
  puts the weights back by copy, and keeps 2-rank DDP bit-identical (a rank-local non-finite
  ascent gradient skips the step on every rank).
- AMP on one process with odd GRAD_ACCUM_STEPS: an estimate iteration whose plain pass
  overflows (the GradScaler skips the step) leaves μ unchanged; autocast and the GradScaler
  follow the parameters' device (testable on CPU).
- ``preserved_state`` restores generators held by the model and reports containers changed in
  place (and does not cry wolf on unchanged ones).
- The consecutive non-finite counter survives a checkpoint.
"""

import collections
import copy
import math
import random

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from detectron2.utils.events import EventStorage

import step_worker
from agvm.core.modulator import GradientVarianceModulator
from agvm.core.optim import AGVM
from agvm.core.sandbox import UnaccountedStateError, preserved_state
from agvm.detectron2 import AGVMStepTrainer
from agvm.detectron2.resume import set_data_iterator
from step_worker import LossNet, Poison, batch, groups, sam_trainer
from agvm.runner import free_port

INF = float("inf")
DDP_ITERS = 20




def _params(net):
    return {n: p.detach().clone() for n, p in net.named_parameters()}


def _run(step, iterations, storage):
    for it in iterations:
        storage.iter = step.iter = it
        step.run_step()


def _poison_calls(*calls):
    """A poisoner that turns the gradient of the given backward calls into inf."""
    return lambda call, grad: torch.full_like(grad, INF) if call in calls else None


# ------------------------------------------------------------------------------ SAM (item 4)
@pytest.fixture(scope="module")
def ddp_sam(tmp_path_factory):
    """``{scenario: [rank 0's result, rank 1's]}`` of step_worker.run, or ``{"error": ...}``
    for a scenario that did not finish."""
    out = tmp_path_factory.mktemp("sam_ddp")
    error = None
    try:
        mp.start_processes(step_worker.run, args=(2, free_port(), str(out), DDP_ITERS), nprocs=2, start_method="spawn")
    except mp.ProcessRaisedException as e:  # kept for the scenario that raised
        lines = str(e).strip().splitlines()
        error = next((line for line in reversed(lines) if "Error" in line), lines[-1])
    results = {}
    for scenario in ("plain", "inf_ascent"):
        paths = [out / f"{scenario}_rank{r}.pt" for r in range(2)]
        results[scenario] = [torch.load(p) for p in paths] if all(p.exists() for p in paths) else {"error": error}
    return results


def _scenario(results, scenario):
    runs = results[scenario]
    assert isinstance(runs, list), f"the {scenario!r} run failed: {runs['error']}"
    return runs


@pytest.mark.ddp
def test_sam_under_ddp_keeps_ranks_bit_identical(ddp_sam):
    """20 SAM steps, 2 gloo ranks with different data: each rank ascends along its own
    gradient; the weights must come back bit for bit, or the ranks drift apart for good."""
    runs = _scenario(ddp_sam, "plain")
    a, b = (r["params"] for r in runs)
    torch.manual_seed(0)
    initial = _params(LossNet())
    assert any(not torch.equal(a[n], initial[n]) for n in a)  # it trained
    drift = {n: float((a[n] - b[n]).abs().max()) for n in a}
    assert all(torch.equal(a[n], b[n]) for n in a), f"ranks differ: max |Δ| per parameter {drift}"
    assert runs[0]["skipped"] == runs[1]["skipped"] == 0


@pytest.mark.ddp
def test_sam_nonfinite_ascent_on_one_rank_skips_the_step_on_every_rank(ddp_sam):
    a, b = _scenario(ddp_sam, "inf_ascent")
    assert a["skipped"] == b["skipped"] == 1
    assert all(torch.isfinite(p).all() for p in a["params"].values())
    assert all(torch.equal(a["params"][n], b["params"][n]) for n in a["params"])


@pytest.mark.parametrize("poisoned", ["ascent", "shifted"])
def test_sam_skips_and_counts_a_nonfinite_gradient(poisoned):
    """An inf gradient in either SAM pass of iteration 1: no parameter or optimizer change,
    counted in nonfinite/skipped_steps; iteration 2 steps again and ends the run of skips."""
    torch.manual_seed(0)
    net = LossNet()
    Poison(net.head.weight, _poison_calls(2 if poisoned == "ascent" else 3))  # 2 backward calls per step
    step = sam_trainer(net, [batch(i, 8) for i in range(3)])
    with EventStorage(0) as storage:
        _run(step, [0], storage)
        before = _params(net)
        momentum = {p: s["momentum_buffer"].clone() for p, s in step.optimizer.state.items()}
        _run(step, [1], storage)
        after = _params(net)
        assert all(torch.equal(after[n], before[n]) for n in before), "a non-finite SAM step was taken"
        assert all(torch.equal(step.optimizer.state[p]["momentum_buffer"], m) for p, m in momentum.items())
        assert (step.nonfinite_run, step.nonfinite_total) == (1, 1)
        assert storage.history("nonfinite/skipped_steps").latest() == 1
        _run(step, [2], storage)
    assert any(not torch.equal(p, before[n]) for n, p in _params(net).items())
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert (step.nonfinite_run, step.nonfinite_total) == (0, 1)


@pytest.mark.parametrize("poisoned", ["ascent", "shifted"])
def test_sam_stops_after_max_consecutive_nonfinite_steps(poisoned):
    """Every step non-finite (in one pass): each counts once, and the third in a row stops
    training (max_nonfinite=3); a finite ascent gradient does not end the run of skips."""
    torch.manual_seed(0)
    net = LossNet()
    poison = Poison(net.head.weight, _poison_calls(0 if poisoned == "ascent" else 1))  # counted per step below
    step = sam_trainer(net, [batch(i, 8) for i in range(5)], max_nonfinite=3)
    initial = _params(net)
    with EventStorage(0) as storage:
        for it in range(2):
            poison.calls = 0
            _run(step, [it], storage)
        assert (step.nonfinite_run, step.nonfinite_total) == (2, 2)
        poison.calls = 0
        with pytest.raises(FloatingPointError, match="3 consecutive"):
            _run(step, [2], storage)
    assert all(torch.equal(p, initial[n]) for n, p in _params(net).items())


# ------------------------------------------------------------------------------ AMP μ (item 5)
def _agvm_step(net, batches, **kwargs):
    optimizer = AGVM(torch.optim.SGD(groups(net), lr=0.1, momentum=0.9), interval=1, clamp=None)
    step = AGVMStepTrainer(net, batches, optimizer, **kwargs)
    set_data_iterator(step, iter(step.data_loader))
    return step


def _amp_plain_pass_overflow(device):
    """GRAD_ACCUM_STEPS 1 (the "extra_passes" path) with AMP on ``device``: iteration 1's half
    passes are finite, its plain pass overflows, the GradScaler skips the step: μ stays, the
    estimate is recorded as skipped (modulator state = before + skip(1)), and the parameters do
    not move. Raises AssertionError otherwise."""
    torch.manual_seed(0)
    net = LossNet().to(device)
    Poison(net.head.weight, _poison_calls(3 + 2))  # 3 backward calls per estimate iteration: half 1, half 2, plain
    scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 8)
    to = (lambda items: [{k: v.to(device) for k, v in i.items()} for i in items])
    step = _agvm_step(net, [to(batch(i, 8)) for i in range(3)], amp=True, grad_scaler=scaler)
    assert step.amp_device == device
    modulator = step.optimizer.modulator
    with EventStorage(0) as storage:
        _run(step, [0], storage)
        assert modulator.mu["head"] != 1.0 and modulator.num_updates == 1  # iteration 0 updated μ
        state_before = copy.deepcopy(modulator.state_dict())
        params_before, scale_before = _params(net), scaler.get_scale()
        _run(step, [1], storage)
        assert scaler.get_scale() < scale_before, "the GradScaler did not skip the overflowed step"
        assert all(torch.equal(p, params_before[n]) for n, p in _params(net).items())
        expected = GradientVarianceModulator(modulator.modules, anchor=modulator.anchor)
        expected.load_state_dict(state_before)
        expected.skip(1)
        got, want = modulator.state_dict(), expected.state_dict()
        assert got["mu"] == state_before["mu"], "an overflowed step changed μ"
        assert all(math.isnan(v) for v in got["phi"].values())
        assert {k: got[k] for k in ("skipped", "num_updates", "last_update_iter")} == {
            k: want[k] for k in ("skipped", "num_updates", "last_update_iter")}
        assert storage.history("agvm/mu/head").latest() == state_before["mu"]["head"]
        assert math.isnan(storage.history("agvm/phi/head").latest())
        _run(step, [2], storage)  # finite again: μ moves
        assert modulator.mu != state_before["mu"] and math.isfinite(modulator.phi["head"])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA (scripts/gpu_check.py --only amp runs it on a GPU)"))])
def test_amp_plain_pass_overflow_leaves_mu_unchanged(device):
    """CPU: bfloat16 autocast with the CPU GradScaler; CUDA: float16 autocast, CUDA GradScaler."""
    _amp_plain_pass_overflow(device)


_AUTOCAST_SEEN = []  # (autocast on the CPU enabled, the head's output dtype) per forward


class _AutocastSpy(LossNet):
    def forward(self, items):
        _AUTOCAST_SEEN.append((torch.is_autocast_enabled("cpu"), self.head(torch.zeros(1, 32)).dtype))
        return super().forward(items)


def test_amp_follows_the_parameters_device():
    """With CPU parameters, AMP autocasts on the CPU (bfloat16) and the default GradScaler is a
    CPU one, so the AMP step runs (and is testable) on CPU."""
    torch.manual_seed(0)
    net = _AutocastSpy()
    _AUTOCAST_SEEN.clear()
    step = _agvm_step(net, [batch(i, 8) for i in range(2)], amp=True)
    initial = _params(net)
    with EventStorage(0) as storage:
        _run(step, [0, 1], storage)
    assert _AUTOCAST_SEEN and set(_AUTOCAST_SEEN) == {(True, torch.bfloat16)}
    assert step.grad_scaler.is_enabled() and step.grad_scaler.get_scale() > 1.0
    assert any(not torch.equal(p, initial[n]) for n, p in _params(net).items())
    assert math.isfinite(step.optimizer.modulator.phi["head"])


# ------------------------------------------------------------------------------ preserved_state (item 6)
class _StatefulNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.gen = torch.Generator().manual_seed(1)
        self.np_gen = np.random.default_rng(2)
        self.np_state = np.random.RandomState(3)
        self.py_gen = random.Random(4)
        self.nested_gens = {"a": [torch.Generator().manual_seed(5)]}
        self.history = [1, 2.5, float("nan"), {"k": (3, torch.zeros(2))}]
        self.table = {"x": 1}
        self.seen = {1, 2}
        self.window = collections.deque([1.0], maxlen=3)
        self.array = np.zeros(3)
        self.name = "a"

    def draw(self):
        return (
            float(torch.rand(1, generator=self.gen)), float(self.np_gen.random()), float(self.np_state.rand()),
            self.py_gen.random(), float(torch.rand(1, generator=self.nested_gens["a"][0])),
        )


def test_preserved_state_restores_private_generators():
    expected = _StatefulNet().draw()
    net = _StatefulNet()
    with preserved_state(net):
        net.draw(), net.draw()
        net.gen = torch.Generator()  # rebound: the original (its state restored) is put back
    assert net.draw() == expected


def test_preserved_state_leaves_unchanged_or_rebound_containers_alone():
    net = _StatefulNet()
    history, array = net.history, net.array
    with preserved_state(net):
        net.history[2] = float("nan")  # another NaN object: the same value
        net.table["x"] = 1
        net.history = []  # rebound; the original list is intact: put back
        net.array = np.ones(2)
        net.name = "b"
        net.lin.cache = [1]  # created inside: deleted
    assert net.history is history and net.array is array and net.name == "a" and not hasattr(net.lin, "cache")


@pytest.mark.parametrize("mutate, attribute", [
    (lambda n: n.history.append(1), "history"),
    (lambda n: n.history[3]["k"][1].add_(1.0), "history"),  # a tensor inside, changed in place
    (lambda n: n.history.__setitem__(0, 1.0), "history"),  # 1 → 1.0: another value
    (lambda n: n.table.__setitem__("x", 2), "table"),
    (lambda n: n.seen.add(3), "seen"),
    (lambda n: n.window.append(2.0), "window"),
    (lambda n: n.array.__setitem__(0, 1.0), "array"),
    (lambda n: n.nested_gens["a"].append(None), "nested_gens"),
])
def test_preserved_state_reports_containers_changed_in_place(mutate, attribute):
    net = _StatefulNet()
    with pytest.raises(UnaccountedStateError, match=rf"_StatefulNet\.{attribute}\b"):
        with preserved_state(net):
            mutate(net)


class _NoisyNet(LossNet):
    """Draws noise from a private generator in every forward (a dropout-like sampler)."""

    def __init__(self):
        super().__init__()
        self.noise = torch.Generator().manual_seed(7)

    def forward(self, items):
        loss = super().forward(items)["loss_mse"]
        return {"loss_mse": loss * (1.0 + 0.5 * torch.rand((), generator=self.noise))}


def test_estimate_iterations_with_a_private_generator_train_like_plain_ones():
    """MEASURE_ONLY AGVM (an estimate every iteration, extra half passes) equals plain training
    bit for bit when the model draws from its own generator."""
    def train(agvm):
        torch.manual_seed(0)
        net = _NoisyNet()
        optimizer = torch.optim.SGD(groups(net), lr=0.1, momentum=0.9)
        if agvm:
            optimizer = AGVM(optimizer, interval=1, measure_only=True)
        step = AGVMStepTrainer(net, [batch(i, 8) for i in range(4)], optimizer)
        set_data_iterator(step, iter(step.data_loader))
        with EventStorage(0) as storage:
            _run(step, range(4), storage)
        return _params(net)

    plain, measured = train(False), train(True)
    assert all(torch.equal(measured[n], plain[n]) for n in plain)


# ------------------------------------------------------------------------------ checkpoint (item 8a)
def _always_nonfinite_step(max_nonfinite=5):
    torch.manual_seed(0)
    net = LossNet()
    Poison(net.head.weight, lambda call, grad: torch.full_like(grad, INF))
    step = AGVMStepTrainer(net, [batch(i, 8) for i in range(8)], torch.optim.SGD(groups(net), lr=0.1),
                           max_nonfinite=max_nonfinite)
    set_data_iterator(step, iter(step.data_loader))
    return step


def test_nonfinite_run_survives_a_checkpoint():
    """k = 2 skipped steps in a row before the checkpoint: the resumed run stops after
    max − k = 3 more, as the uninterrupted run would."""
    step = _always_nonfinite_step()
    with EventStorage(0) as storage:
        _run(step, [0, 1], storage)
    state = step.state_dict()
    assert state["nonfinite_run"] == 2 and state["nonfinite_total"] == 2
    resumed = _always_nonfinite_step()
    resumed.load_state_dict(copy.deepcopy(state))
    assert (resumed.nonfinite_run, resumed.nonfinite_total) == (2, 2)
    done = 0
    with EventStorage(2) as storage:
        with pytest.raises(FloatingPointError, match="5 consecutive"):
            for it in range(2, 8):
                storage.iter = resumed.iter = it
                resumed.run_step()
                done += 1
    assert done == 5 - 2 - 1  # the third step after the resume raises
