"""The hook's future and CUDA streams, on one GPU without NCCL.

The collectives are faked to run on a side CUDA stream that first sleeps
(``torch.cuda._sleep``) and then writes the other ranks' share, completing a
``Future(devices=[cuda])`` inside ``torch.cuda.stream(side)``, as NCCL does; AGVM's hook runs on
a CUDA bucket (fake world 4: a half-group and a world all-reduce), and, as DDP does, the returned
future is waited on and its value read on the default stream. The check passes when the value
is the expected mean and the statistics saw the half sum, and fails when the value is read
early. Its negative control plants the old design (a hand-made ``torch.futures.Future()``
filled from a ``then`` callback) and asserts that the check then fails, i.e. that it can."""

from unittest import mock

import torch
import torch.distributed as dist
from gpu_helpers import CUDA

pytestmark = CUDA


def stream_check(plant_old_future: bool = False, world: int = 4, rank: int = 3,
                 sleep_cycles: int = 500_000_000) -> tuple:
    """``(value ok, statistics ok, detail)`` (see the module docstring)."""
    from agvm.distributed import AGVMHookState, agvm_comm_hook

    dev = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(1 << 20, device=dev)), torch.nn.Parameter(torch.randn(4096, device=dev))]
    for p in params:
        p.grad = torch.randn_like(p)
    grad = torch.cat([p.grad.reshape(-1) for p in params])
    others = [torch.randn_like(grad) for _ in range(world - 1)]  # ranks 0, 1, 2 (rank 2 shares rank 3's half)
    contribution = {"world": sum(o * (1.0 / world) for o in others), "half": others[-1]}
    streams = []

    class Work:
        def __init__(self, fut, side):
            self.fut, self.side = fut, side

        def get_future(self):
            return self.fut

        def wait(self):  # as ProcessGroupNCCL's: the current stream waits, the host does not
            torch.cuda.current_stream().wait_stream(self.side)
            return True

    def all_reduce(tensor, group=None, async_op=False):
        side = torch.cuda.Stream()
        streams.append(side)
        side.wait_stream(torch.cuda.current_stream())  # NCCL's stream waits for the inputs
        fut = torch.futures.Future(devices=[tensor.device])
        with torch.cuda.stream(side):
            torch.cuda._sleep(sleep_cycles)  # the collective takes a while
            tensor.add_(contribution["world" if group == "world" else "half"])
            fut.set_result([tensor])  # records its events on the side stream, as NCCL's future
        return Work(fut, side)

    class Bucket:
        def __init__(self):
            self.buf = grad.clone()

        def buffer(self):
            return self.buf

        def index(self):
            return 0

        def parameters(self):
            return params

        def is_last(self):
            return True

    patches = [mock.patch.object(dist, name, fn) for name, fn in {
        "get_world_size": lambda group=None: world, "get_rank": lambda group=None: rank,
        "get_process_group_ranks": lambda group: list(range(world)), "get_group_rank": lambda group, r: r,
        "new_group": lambda ranks, **kw: "half", "all_reduce": all_reduce}.items()]
    for p in patches:
        p.start()
    try:
        state = AGVMHookState({p: "m" for p in params}, ["m"], process_group="world")
        state.estimate = True
        torch.cuda.synchronize()
        fut = agvm_comm_hook(state, Bucket())
        if plant_old_future:  # the old design: a hand-made future filled from a then callback
            old = torch.futures.Future()
            fut.then(lambda f: old.set_result(f.value()))
            fut = old
        value = fut.wait()  # as DDP's reducer, then its copy on the default stream
        read = value.clone()
        own_sq = state._sums["m"][0].clone()
        torch.cuda.synchronize()
    finally:
        for p in patches:
            p.stop()
    expected = grad * (1.0 / world) + contribution["world"]
    h_own = (grad + others[-1]) / 2
    # rank 3 is the second of its half: it takes the second half of every parameter's elements
    expected_sq, offset = 0.0, 0
    for p in params:
        n = p.numel()
        expected_sq += float(h_own[offset + n // 2:offset + n].double().square().sum())
        offset += n
    ok_value = bool(torch.equal(read, expected))
    ok_stats = abs(float(own_sq) - expected_sq) <= 1e-5 * expected_sq
    detail = (f"{'old hand-made future planted; ' if plant_old_future else ''}value read after wait(): "
              f"{'the expected mean' if ok_value else 'NOT the expected mean (read before the collective finished)'}, "
              f"max |diff| {float((read - expected).abs().max()):.3g}; statistics saw the half sum: {ok_stats}")
    return ok_value, ok_stats, detail


def test_stream_hook_value_is_ready_after_wait(record_property):
    ok_value, ok_stats, detail = stream_check()
    record_property("detail", detail)
    assert ok_value and ok_stats, detail


def test_stream_planted_old_future_is_caught(record_property):
    """The negative control: with the old hand-made future the check must fail (the value is
    read before the side stream's collective has finished), else it could not catch the bug."""
    ok_value, ok_stats, detail = stream_check(plant_old_future=True)
    record_property("detail", detail)
    assert not (ok_value and ok_stats), "the check passed with the old hand-made future planted: " + detail
