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


def _reference(world):
    """One process: per-rank gradients, G1 = mean over the first half's ranks, G2 over the
    second's, Φ per module, μ, and SGD on the mean of all ranks."""
    net, groups = dist_worker.make()
    modules = {"backbone": list(net.backbone.parameters()), "head": list(net.head.parameters())}
    opt = torch.optim.SGD(groups, lr=0.05, momentum=0.9)
    mod = GradientVarianceModulator(["backbone", "head"], interval=INTERVAL, clamp=None)
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
        if mod.is_update_iter(it):
            phis[it] = {
                m: gradient_variance([g1[id(p)] for p in ps], [g2[id(p)] for p in ps]) for m, ps in modules.items()
            }
            mod.update(it, phis[it])
        for p in net.parameters():
            p.grad = full[id(p)]
        saved = [g["lr"] for g in opt.param_groups]
        for g in opt.param_groups:
            g["lr"] *= mod.mu[g["agvm_module"]]
        opt.step()
        for g, lr in zip(opt.param_groups, saved):
            g["lr"] = lr
    return phis, dict(mod.mu), [p.detach().clone() for p in net.parameters()]


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
    # extra traffic: one half-group reduction of the gradients per AGVM iteration
    n_bytes = sum(p.numel() * 4 for p in results[0]["params"])
    assert results[0]["extra"] == [n_bytes] * 3


@pytest.mark.ddp
def test_ordinary_iterations_are_plain_ddp(tmp_path):
    hook = _spawn(2, tmp_path, "hook_plain")
    ddp = _spawn(2, tmp_path, "ddp")
    for a, b in zip(hook[0]["params"], ddp[0]["params"]):
        assert torch.equal(a, b)
