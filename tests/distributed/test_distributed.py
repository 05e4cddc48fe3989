"""The AGVM DDP comm hook on CPU (gloo) at world sizes 2, 3 and 4, against a single process."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import dist_worker
from agvm.core.modulator import GradientVarianceModulator
from agvm.core.variance import gradient_variance
from agvm.distributed import half_sizes
from agvm.runner import free_port as _free_port

ITERS, INTERVAL = 6, 2  # AGVM iterations 0, 2, 4


def _spawn(world, out_dir, mode):
    mp.start_processes(
        dist_worker.run, args=(world, _free_port(), str(out_dir), ITERS, INTERVAL, mode),
        nprocs=world, start_method="spawn",
    )
    return [torch.load(out_dir / f"{mode}_{r}.pt") for r in range(world)]


def _reference(world, adam=False):
    """One process: per-rank gradients, G1 = mean over the first half's ranks, G2 over the
    second's, Φ per module (AGVM's own single-process measurement on exactly those halves,
    Adam-preconditioned with ``adam``), μ, and the optimizer on the mean of all ranks."""
    from agvm.core.optim import AGVM

    net, groups = dist_worker.make()
    opt = AGVM(dist_worker.make_optimizer(groups, adam), interval=INTERVAL, clamp=None)
    assert opt.precondition == adam
    n_a, _ = half_sizes(world)
    phis = {}
    for it in range(ITERS):
        x, y = dist_worker.global_batch(it, world)
        per_rank = []
        for r in range(world):
            net.zero_grad()
            sl = slice(r * dist_worker.PER_RANK, (r + 1) * dist_worker.PER_RANK)
            nn.functional.mse_loss(net(x[sl]), y[sl]).backward()
            per_rank.append({id(p): p.grad.clone() for p in net.parameters()})
        mean = lambda rs: {k: sum(g[k] for g in rs) / len(rs) for k in rs[0]}  # noqa: E731
        g1, g2, full = mean(per_rank[:n_a]), mean(per_rank[n_a:]), mean(per_rank)
        if opt.should_estimate(it):
            phis[it] = dist_worker.phi_on_halves(opt, g1, g2, it)
        for p in net.parameters():
            p.grad = full[id(p)]
        opt.step()
    return phis, opt.mu, [p.detach().clone() for p in net.parameters()]


@pytest.mark.ddp
@pytest.mark.parametrize("world", [2, 3, 4])
def test_adam_preconditioned_hook_matches_single_process(world, tmp_path):
    """AdamW under DDP: Φ on Adam-preconditioned half means, as the single process measures it
    on the same halves, μ alike, ranks bit-identical. The other half's mean is derived from the
    world mean (no extra bytes); measured worst relative error of Φ: 8.4e-9 (W 2), 7.8e-8 (W 3),
    6.7e-8 (W 4); of μ: 3.7e-11, 1.9e-9, 2.3e-9; the bounds leave a factor ~10. (A former version
    was off by 2.4e-4 at W 3, iteration 0, where v = 0 makes T nearly sign(g) and amplifies a fused
    multiply-add's rounding residue in the derived mean's near-zero elements.)"""
    results = _spawn(world, tmp_path, "hook_adam")
    ref_phis, ref_mu, ref_params = _reference(world, adam=True)
    plain_phis, _, _ = _reference(world, adam=False)
    for r, res in enumerate(results):
        assert sorted(res["phis"]) == sorted(ref_phis) == [0, 2, 4]
        for it, phi in ref_phis.items():
            for m in ("backbone", "head"):
                assert res["phis"][it][m] == pytest.approx(phi[m], rel=1e-6), (world, r, it, m)
        assert res["mus"][4] == pytest.approx(ref_mu, rel=1e-7)
        assert all(torch.equal(a, b) for a, b in zip(res["params"], results[0]["params"]))
    # the preconditioning changes Φ (else this test would not tell the two paths apart)
    assert any(abs(ref_phis[it][m] - plain_phis[it][m]) > 1e-3 * plain_phis[it][m] for it in ref_phis for m in ("backbone", "head"))
    for a, b in zip(results[0]["params"], ref_params):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.ddp
@pytest.mark.parametrize("world", [2, 3, 4])
def test_hook_matches_single_process(world, tmp_path):
    results = _spawn(world, tmp_path, "hook")
    ref_phis, ref_mu, ref_params = _reference(world)
    assert sorted(results[0]["phis"]) == [0, 2, 4]
    for r, res in enumerate(results):
        for it, phi in ref_phis.items():
            for m in ("backbone", "head"):
                assert res["phis"][it][m] == pytest.approx(phi[m], rel=1e-5), (world, r, it, m)
        assert res["mus"][4] == pytest.approx(ref_mu, rel=1e-5)
        # every rank holds bit-identical parameters
        assert all(torch.equal(a, b) for a, b in zip(res["params"], results[0]["params"]))
    for a, b in zip(results[0]["params"], ref_params):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    # extra traffic: one half-group reduction of the gradients per AGVM iteration (none on a
    # rank whose half is itself alone)
    n_bytes = sum(p.numel() * 4 for p in results[0]["params"])
    for r, res in enumerate(results):
        alone = (half_sizes(world)[0] if r < half_sizes(world)[0] else half_sizes(world)[1]) == 1
        assert res["extra"] == [0 if alone else n_bytes] * 3, (world, r)


@pytest.mark.ddp
def test_fp16_compression_on_ordinary_iterations(tmp_path):
    full = _spawn(2, tmp_path, "hook")
    fp16 = _spawn(2, tmp_path, "hook_fp16")
    assert fp16[0]["phis"][0] == full[0]["phis"][0]  # iteration 0 is AGVM: full precision, same start
    assert all(torch.equal(a, b) for a, b in zip(fp16[0]["params"], fp16[1]["params"]))
    diffs = [float((a - b).abs().max()) for a, b in zip(fp16[0]["params"], full[0]["params"])]
    assert 0.0 < max(diffs) < 1e-2  # fp16 rounding on iterations 1, 3, 5 only


@pytest.mark.ddp
@pytest.mark.parametrize("world", [2, 3])
def test_ordinary_iterations_are_plain_ddp(world, tmp_path):
    hook = _spawn(world, tmp_path, "hook_plain")
    ddp = _spawn(world, tmp_path, "ddp")
    for a, b in zip(hook[0]["params"], ddp[0]["params"]):
        assert torch.equal(a, b)


@pytest.mark.ddp
@pytest.mark.parametrize("world", [2, 3, 4])
def test_measure_only_under_the_hook_is_plain_ddp(world, tmp_path):
    """MEASURE_ONLY (μ stays 1) with the hook estimating Φ on iterations 0, 2, 4: the training is
    plain DDP's bit for bit (the world reduction of an AGVM iteration is DDP's own)."""
    hook = _spawn(world, tmp_path, "hook_measure")
    ddp = _spawn(world, tmp_path, "ddp")
    assert sorted(hook[0]["phis"]) == [0, 2, 4] and all(0.0 < v < 2.0 for v in hook[0]["phis"][4].values())
    assert all(mu == 1.0 for mus in hook[0]["mus"].values() for mu in mus.values())
    for res in hook:
        for a, b in zip(res["params"], ddp[0]["params"]):
            assert torch.equal(a, b)


@pytest.mark.ddp
def test_hook_on_a_sub_group(tmp_path):
    """World 4, DDP and the hook on the sub-group of global ranks [1, 2, 3] (rank 0 only waits):
    Φ and μ as the single process measures them at world 3, ranks 1..3 bit-identical."""
    mp.start_processes(
        dist_worker.run, args=(4, _free_port(), str(tmp_path), ITERS, INTERVAL, "hook_sub"),
        nprocs=4, start_method="spawn",
    )
    results = [torch.load(tmp_path / f"hook_sub_{r}.pt") for r in range(3)]
    ref_phis, ref_mu, ref_params = _reference(3)
    for r, res in enumerate(results):
        assert sorted(res["phis"]) == [0, 2, 4]
        for it, phi in ref_phis.items():
            for m in ("backbone", "head"):
                assert res["phis"][it][m] == pytest.approx(phi[m], rel=1e-5), (r, it, m)
        assert res["mus"][4] == pytest.approx(ref_mu, rel=1e-5)
        assert all(torch.equal(a, b) for a, b in zip(res["params"], results[0]["params"]))
    for a, b in zip(results[0]["params"], ref_params):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def _fake_process_group(monkeypatch, world, rank, all_reduce):
    """Make this process rank ``rank`` of a fake ``world``-rank group whose collectives are
    ``all_reduce`` (half groups are named ``("half", ranks)``)."""
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: world)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: rank)
    monkeypatch.setattr(dist, "get_process_group_ranks", lambda group: list(range(world)))
    monkeypatch.setattr(dist, "get_group_rank", lambda group, r: r)
    monkeypatch.setattr(dist, "new_group", lambda ranks, **kw: ("half", tuple(ranks)))
    monkeypatch.setattr(dist, "all_reduce", all_reduce)


class _Work:
    """A collective's work whose future the test completes by hand."""

    def __init__(self, fut):
        self.fut = fut

    def get_future(self):
        return self.fut

    def wait(self):
        self.fut.wait()
        return True


class _Bucket:
    def __init__(self, params):
        self.params = params
        self.buf = torch.cat([p.grad.reshape(-1) for p in params])

    def buffer(self):
        return self.buf

    def index(self):
        return 0

    def parameters(self):
        return self.params

    def is_last(self):
        return True


@pytest.mark.parametrize("world, rank", [(2, 0), (4, 3)])
def test_agvm_iteration_returns_the_then_child_of_the_world_future(world, rank, monkeypatch):
    """On an AGVM iteration the hook returns what ``then`` on the world all-reduce's future
    produced (so it inherits that future's CUDA devices and records events after the callback),
    not a hand-made future; it completes only once the collectives have, with DDP's mean. One
    process, the collectives faked (world 4: with a half-group reduction too)."""
    import threading
    import time


    from agvm.distributed import AGVMHookState, agvm_comm_hook

    children = []

    class RecordingFuture(torch.futures.Future):
        def then(self, callback):
            child = super().then(callback)
            children.append(child)
            return child

    issued = []  # (tensor, group, future): completed by the test, as the other ranks would

    def all_reduce(tensor, group=None, async_op=False):
        fut = RecordingFuture()
        issued.append((tensor, group, fut))
        return _Work(fut)

    _fake_process_group(monkeypatch, world, rank, all_reduce)
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(5, 3)), nn.Parameter(torch.randn(7))]
    for p in params:
        p.grad = torch.randn_like(p)
    state = AGVMHookState({p: "m" for p in params}, ["m"], process_group="world")
    state.estimate = True
    bucket = _Bucket(params)
    grad = bucket.buf.clone()
    others = [torch.randn_like(grad) for _ in range(world - 1)]  # the other ranks' gradients
    mate = others[-1]  # world 4, rank 3: rank 2 is the other member of its half
    fut = agvm_comm_hook(state, bucket)
    assert [g for _, g, _ in issued] == (["world"] if world == 2 else ["world", ("half", (2, 3))])
    assert fut in children and not fut.done()
    world_tensor, _, world_fut = issued[0]
    world_tensor.add_(sum(o * (1.0 / world) for o in others))
    # the world result first, from another thread (as gloo's): the callback runs there
    finisher = threading.Thread(target=world_fut.set_result, args=([world_tensor],))
    finisher.start()
    if world == 4:
        time.sleep(0.2)
        assert world_fut.done() and not fut.done()  # the callback waits for the half reduction
        half_tensor, _, half_fut = issued[1]
        half_tensor.add_(mate)
        half_fut.set_result([half_tensor])
    finisher.join(timeout=60)
    expected = grad * (1.0 / world) + sum(o * (1.0 / world) for o in others)
    assert torch.equal(fut.wait(), expected) and fut is children[-1]
    # the statistics were taken after the half reduction: this rank's share of ‖H_own‖² (at
    # world 4 rank 3 is the second of its half: the second half of every parameter's elements)
    h_own, share = (grad, [slice(0, 22)]) if world == 2 else ((grad + mate) / 2, [slice(7, 15), slice(18, 22)])
    expected = sum(float(h_own[sl].double().square().sum()) for sl in share)
    assert float(state._sums["m"][0]) == pytest.approx(expected, rel=1e-6)


class _LayoutBucket:
    """A fake ``GradBucket`` over ``params`` (in this order) holding this rank's gradients, with
    what the other ranks add in the world and in the half reduction, in the same layout."""

    def __init__(self, index, params, grads, world_rest, half_rest):
        self.i, self.params = index, [params[j] for j in grads]
        self.buf = torch.cat([g.reshape(-1) for g in grads.values()])
        self.world_rest = torch.cat([g.reshape(-1) for g in world_rest.values()])
        self.half_rest = torch.cat([g.reshape(-1) for g in half_rest.values()])

    def buffer(self):
        return self.buf

    def index(self):
        return self.i

    def parameters(self):
        return self.params

    def is_last(self):
        return self.i == 0


# elements: several 32 K blocks, whole 4096-rows plus a tail, exactly one row, small ones, one
SIZES = [70001, 9000, 4096, 300, 12, 8193, 1, 257, 40000]
MODULE = ["backbone", "backbone", "head", "backbone", "head", "head", "backbone", "head", "head"]
LAYOUTS = [
    [[8, 7, 6, 5, 4], [3, 2, 1, 0]],  # DDP's initial layout: roughly reverse order
    [[0, 1, 2], [3, 4, 5, 6, 7, 8]],
    [[5, 0, 7], [2], [8, 6, 4, 3, 1]],
]


@pytest.mark.parametrize("world, rank, adam", [(2, 0, False), (4, 3, False), (3, 1, False), (2, 1, True),
                                               (3, 2, True), (4, 1, True)])
def test_statistics_do_not_depend_on_the_bucket_layout(world, rank, adam, monkeypatch):
    """The same gradients under three bucket layouts (other orders, other bucket boundaries,
    modules interleaved) give bit-identical per-module sums on this rank (what it adds to the
    all-reduce of :meth:`finish`): a resumed run, whose first iteration uses DDP's initial
    layout, continues exactly. One process, the collectives faked."""

    from agvm.core.optim import AGVM
    from agvm.distributed import AGVMHookState, agvm_comm_hook

    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(n)) for n in SIZES]
    grads = [[torch.randn(n) * (1 + (i % 3)) for i, n in enumerate(SIZES)] for _ in range(world)]
    n_a, _ = half_sizes(world)
    mates = range(n_a) if rank < n_a else range(n_a, world)
    half_scale = 1.0 / world if adam and world & (world - 1) else 1.0  # what the hook puts in the bucket
    world_rest = [sum(grads[r][i] * (1.0 / world) for r in range(world) if r != rank) for i in range(len(SIZES))]
    half_rest = [sum((grads[r][i] * half_scale for r in mates if r != rank), torch.zeros(n))
                 for i, n in enumerate(SIZES)]
    precondition = None
    if adam:  # AdamW with a second moment for all but one parameter, two (β2, ε) groups
        groups = [{"params": [p for p, m in zip(params, MODULE) if m == name], "agvm_module": name}
                  for name in ("backbone", "head")]
        groups[1].update(betas=(0.9, 0.99), eps=1e-6)
        opt = AGVM(torch.optim.AdamW(groups, lr=1e-3), interval=2, clamp=None)
        for i, p in enumerate(params):
            p.grad = None if i == 4 else torch.randn_like(p) * 0.1
        opt.step()
        precondition = opt.preconditioner()
        assert opt.optimizer.state.get(params[4]) is None

    current = {}

    def all_reduce(tensor, group=None, async_op=False):
        if not async_op:
            return None  # finish's table: this rank's sums alone
        tensor.add_(current["bucket"].world_rest if group == "world" else current["bucket"].half_rest)
        fut = torch.futures.Future()
        fut.set_result([tensor])
        return _Work(fut)

    _fake_process_group(monkeypatch, world, rank, all_reduce)
    results, world_means = [], []
    for layout in LAYOUTS:
        state = AGVMHookState(dict(zip(params, MODULE)), ["backbone", "head"], process_group="world",
                              precondition=precondition)
        state.estimate = True
        means = {}
        for b, ids in enumerate(layout):
            bucket = _LayoutBucket(b, params, {j: grads[rank][j] for j in ids}, {j: world_rest[j] for j in ids},
                                   {j: half_rest[j] for j in ids})
            current["bucket"] = bucket
            mean = agvm_comm_hook(state, bucket).wait()
            offsets = [0] + [SIZES[j] for j in ids]
            for n, j in enumerate(ids):
                start = sum(offsets[:n + 1])
                means[j] = mean[start:start + SIZES[j]].clone()
        stats = state.finish()
        results.append(torch.stack([torch.stack(list(stats[m])) for m in ("backbone", "head")]))
        world_means.append([means[j] for j in range(len(SIZES))])
    for means in world_means[1:]:  # the step's gradients: the same, whatever the layout
        assert all(torch.equal(a, b) for a, b in zip(means, world_means[0]))
    assert torch.isfinite(results[0]).all() and (results[0][:, 1:] != 0).any()
    for other in results[1:]:
        assert torch.equal(other, results[0]), (other - results[0]).abs().max()
    if not adam and world == 2 and rank == 0:  # rank 0 alone in its half: ‖G1‖² is its own
        for row, name in zip(results[0], ("backbone", "head")):
            expected = sum(float(g.double().square().sum()) for g, m in zip(grads[0], MODULE) if m == name)
            assert float(row[1]) == pytest.approx(expected, rel=1e-6)


def _spawn_detector(world, out_dir, mode, datasets):
    mp.start_processes(
        dist_worker.run_detector, args=(world, _free_port(), str(out_dir), mode, str(datasets)),
        nprocs=world, start_method="spawn",
    )
    return [torch.load(out_dir / f"det_{mode}_{r}.pt") for r in range(world)]


@pytest.mark.ddp
def test_mini_detector_under_ddp(tmp_path):
    """World 2 on CPU: AGVM with the hook logs Φ/μ and keeps the ranks bit-identical; with
    AGVM disabled no hook is installed and training equals detectron2's DefaultTrainer."""
    import json

    datasets = tmp_path / "datasets"
    agvm_runs = _spawn_detector(2, tmp_path, "agvm", datasets)
    assert all(r["hook"] for r in agvm_runs) and agvm_runs[0]["skipped"] == 0
    # Φ from the hook = Φ from the gathered local gradients of the same step, split the same way
    checks = agvm_runs[0]["checks"]
    assert [it for it, _, _ in checks] == [1, 3]
    for it, reference, hooked in checks:
        for m in ("backbone", "neck", "rpn", "box_head"):
            # the reference gradients are the ones the step used: their mean is DDP's mean
            assert reference[m + "_meandiff"] < 1e-5, (it, m, reference)
            # the issue asks for 1e-5; the distance form measured 3.4e-7 at worst (box_head,
            # Φ ≈ 0.013), where forms built on ⟨H_own, f⟩ or ‖f‖² lost 5e-6 to 1e-5
            assert hooked[m] == pytest.approx(reference[m], rel=2e-6), (it, m, hooked[m], reference[m])
    assert all(torch.equal(a, b) for a, b in zip(agvm_runs[0]["params"], agvm_runs[1]["params"]))
    with open(tmp_path / "agvm" / "metrics.json") as f:
        records = [json.loads(line) for line in f if line.strip()]
    for m in ("backbone", "neck", "rpn", "box_head"):
        logged = {r["iteration"]: r[f"agvm/phi/{m}"] for r in records if f"agvm/phi/{m}" in r}
        assert sorted(logged) == [1, 3] and all(0.0 < v < 2.0 for v in logged.values()), (m, logged)

    plain = _spawn_detector(2, tmp_path, "plain", datasets)
    stock = _spawn_detector(2, tmp_path, "stock", datasets)
    assert not any(r["hook"] for r in plain)
    for a, b in zip(plain[0]["params"], stock[0]["params"]):
        assert torch.equal(a, b)


@pytest.mark.ddp
def test_nonfinite_gradient_on_one_rank_is_skipped_on_all(tmp_path):
    """+inf in one parameter's gradient on rank 1 only, at an AGVM iteration and at an ordinary
    one: the reduced gradient is non-finite on both ranks, both skip both steps alike (μ kept),
    parameters stay finite and bit-identical, and every checkpoint is finite."""
    import glob

    from agvm.detectron2.checkpoint import nonfinite_entries

    datasets = tmp_path / "datasets"
    runs = _spawn_detector(2, tmp_path, "agvm_inf", datasets)
    assert [r["nonfinite_total"] for r in runs] == [2, 2]
    assert all(torch.equal(a, b) for a, b in zip(runs[0]["params"], runs[1]["params"]))
    assert not nonfinite_entries({"p": runs[0]["params"], "o": runs[0]["optimizer"]})
    assert runs[0]["skipped"] == runs[1]["skipped"] == 3  # the AGVM update of iteration 1 (3 modules)
    checkpoints = glob.glob(str(tmp_path / "agvm_inf" / "*.pth"))
    assert len(checkpoints) >= 4
    for path in checkpoints:
        assert not nonfinite_entries(torch.load(path, weights_only=False)), path


def test_syncbn_on_cpu_fails_before_building(tiny_shapes):
    from test_trainer import _cfg

    from agvm.detectron2 import AGVMTrainer

    with pytest.raises(ValueError, match="MODEL.RESNETS.NORM = 'SyncBN' needs CUDA.*naiveSyncBN"):
        AGVMTrainer(_cfg(tiny_shapes / "syncbn", "MODEL.RESNETS.NORM", "SyncBN"))


def test_half_sizes():
    assert half_sizes(2) == (1, 1) and half_sizes(3) == (1, 2) and half_sizes(8) == (4, 4)
    with pytest.raises(ValueError, match="world size ≥ 2"):
        half_sizes(1)


@pytest.mark.ddp
def test_dead_rank_stops_the_job(monkeypatch):
    """A rank that raises makes the job fail (the launcher reports it and stops the others)
    instead of leaving rank 0 waiting in its collective."""
    import time
    from datetime import timedelta

    from agvm.detectron2 import launch

    start = time.time()
    with pytest.raises(Exception, match="rank 1 died on purpose"):
        launch(dist_worker.die_on_rank_one, 2, dist_url="auto", device="cpu", timeout=timedelta(seconds=30))
    assert time.time() - start < 60
