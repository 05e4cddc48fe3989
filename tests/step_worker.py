"""Worker of tests/detectron2/test_step_safety.py: one gloo rank running SAM through ``AGVMStepTrainer``.

Kept importable (not inside the test module) so that spawned processes can unpickle it.
"""

import agvm  # noqa: F401  (first: compat patches must precede any detectron2 import)

import torch
import torch.distributed as dist
from torch import nn

PER_RANK = 4  # samples per rank and iteration


class LossNet(nn.Module):
    """A two-module regression net whose forward takes a list of ``{"x", "y"}`` items and
    returns a loss dict (detectron2's training interface)."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh())
        self.head = nn.Linear(32, 1)

    def forward(self, items):
        x = torch.stack([i["x"] for i in items])
        y = torch.stack([i["y"] for i in items])
        return {"loss_mse": nn.functional.mse_loss(self.head(self.backbone(x)), y)}


class Poison:
    """A gradient hook on ``param``: counts the backward calls through it (``calls``, from 0)
    and uses ``fn(call, grad)`` instead of the gradient where that is not None. Kept out of the
    model, so that ``preserved_state`` does not put the count back."""

    def __init__(self, param, fn):
        self.calls = 0
        self.fn = fn
        param.register_hook(self)

    def __call__(self, grad):
        call, self.calls = self.calls, self.calls + 1
        return self.fn(call, grad)


def batch(seed, n=PER_RANK):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = torch.sin(3 * x[:, :1]) + x[:, 1:2] ** 2
    return [{"x": x[i], "y": y[i]} for i in range(n)]


def groups(net):
    return [
        {"params": list(net.backbone.parameters()), "agvm_module": "backbone"},
        {"params": list(net.head.parameters()), "agvm_module": "head"},
    ]


def sam_trainer(model, batches, **kwargs):
    """AGVMStepTrainer running SAM (ρ = 0.05) with SGD + momentum on ``model``."""
    from agvm.detectron2 import AGVMStepTrainer
    from agvm.detectron2.resume import set_data_iterator

    net = model.module if hasattr(model, "module") else model
    optimizer = torch.optim.SGD(groups(net), lr=0.1, momentum=0.9)
    step = AGVMStepTrainer(model, batches, optimizer, sam_rho=0.05, **kwargs)
    set_data_iterator(step, iter(step.data_loader))
    return step


def run(rank, world, port, out_dir, iters):
    """Two scenarios on every rank, each from the same initial weights, with different data per
    rank: "plain" (``iters`` SAM steps) and "inf_ascent" (rank 1's ascent gradient is
    non-finite at iteration 3). Saves ``{"params", "skipped"}`` to
    ``out_dir/{scenario}_rank{rank}.pt`` as each scenario ends."""
    from detectron2.utils.events import EventStorage
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    for scenario in ("plain", "inf_ascent"):
        torch.manual_seed(0)
        net = LossNet()
        if scenario == "inf_ascent" and rank == 1:
            # backward calls: 2 per iteration (ascent, then at the shifted point)
            Poison(net.head.weight, lambda call, grad: torch.full_like(grad, float("inf")) if call == 2 * 3 else None)
        ddp = DDP(net)
        step = sam_trainer(ddp, [batch(100 * it + rank) for it in range(iters)])
        with EventStorage(0) as storage:
            for it in range(iters):
                storage.iter = step.iter = it
                step.run_step()
        out = {"params": {n: p.detach().clone() for n, p in net.named_parameters()}, "skipped": step.nonfinite_total}
        torch.save(out, f"{out_dir}/{scenario}_rank{rank}.pt")
    dist.barrier()  # no rank tears gloo down while the other still talks to it (SIGABRT in gloo)
    dist.destroy_process_group()
