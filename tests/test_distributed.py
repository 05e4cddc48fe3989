"""The AGVM DDP comm hook on CPU (gloo) at world sizes 2, 3 and 4, against a single process."""

import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import dist_worker
from agvm.core.modulator import GradientVarianceModulator
from agvm.core.variance import gradient_variance
from agvm.distributed import half_sizes

ITERS, INTERVAL = 6, 2  # AGVM iterations 0, 2, 4


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
            for p in net.parameters():
                p.grad = g1[id(p)].clone()
            opt.stash_first_half()
            for p in net.parameters():
                p.grad = g2[id(p)].clone()
            phis[it] = opt.finish_second_half(it)["phi"]
        for p in net.parameters():
            p.grad = full[id(p)]
        opt.step()
    return phis, opt.mu, [p.detach().clone() for p in net.parameters()]


@pytest.mark.ddp
@pytest.mark.parametrize("world", [2, 3, 4])
def test_adam_preconditioned_hook_matches_single_process(world, tmp_path):
    """AdamW under DDP: Φ on Adam-preconditioned half means, as the single process measures it
    on the same halves (rel ≤ 1e-5), μ alike, ranks bit-identical."""
    results = _spawn(world, tmp_path, "hook_adam")
    ref_phis, ref_mu, ref_params = _reference(world, adam=True)
    plain_phis, _, _ = _reference(world, adam=False)
    for r, res in enumerate(results):
        assert sorted(res["phis"]) == sorted(ref_phis) == [0, 2, 4]
        for it, phi in ref_phis.items():
            for m in ("backbone", "head"):
                assert res["phis"][it][m] == pytest.approx(phi[m], rel=1e-5), (world, r, it, m)
        assert res["mus"][4] == pytest.approx(ref_mu, rel=1e-5)
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
def test_ordinary_iterations_are_plain_ddp(tmp_path):
    hook = _spawn(2, tmp_path, "hook_plain")
    ddp = _spawn(2, tmp_path, "ddp")
    for a, b in zip(hook[0]["params"], ddp[0]["params"]):
        assert torch.equal(a, b)


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
