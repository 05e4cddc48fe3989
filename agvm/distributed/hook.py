"""The DDP communication hook that gives AGVM its two half-batch gradients for free.

On an AGVM iteration every bucket is reduced twice: first inside the rank's own half of the
world (ranks ``[0, n_a)`` are half a, ``[n_a, W)`` half b; mean ``H_own`` over its ``n_own``
ranks), then over the world, each rank contributing ``H_own / W``, which sums to the ordinary
DDP mean ``f = (n_a·H_a + n_b·H_b) / W``. The bucket returns ``f``, so the step is plain DDP's.
Per module, three float64 sums accumulate as buckets complete: ⟨H_own, f⟩, ‖H_own‖², ‖f‖².
The other half's statistics follow without materialising ``H_other = (W·f − n_own·H_own) / n_other``:

    ⟨H_own, H_other⟩ = (W⟨H_own, f⟩ − n_own‖H_own‖²) / n_other
    ‖H_other‖²       = (W²‖f‖² − 2W·n_own⟨H_own, f⟩ + n_own²‖H_own‖²) / n_other²

and one small all-reduce of those numbers makes every rank agree. Extra communication per AGVM
iteration: one half-group all-reduce per bucket (none where a half is a single rank) plus that
small all-reduce; no all-gather of the gradient (the authors' release gathers the whole
flattened gradient). Unequal halves (odd W)
are exact. Ordinary iterations are a plain all-reduce of the mean (bit-identical to DDP's own),
optionally fp16-compressed. Collectives are only issued from the hook itself, in bucket order
(the same on every rank): bucket i's world all-reduce is started by the hook call of bucket
i + 1, after bucket i's half-group result, so the half reductions overlap with the backward;
the ``then`` callbacks only compute.
Pure torch. (No ``from __future__ import annotations`` here: DDP checks the hook's
annotations against ``dist.GradBucket`` and ``torch.futures.Future[torch.Tensor]``.)
"""

import threading
from collections import OrderedDict
from typing import Dict, Mapping, Optional, Sequence

import torch
import torch.distributed as dist

from ..core.variance import GradientStats

__all__ = ["AGVMHookState", "agvm_comm_hook", "half_sizes"]


_CHUNK = 4096  # elements per float32 partial sum in _sums_of_products


def _sums_of_products(a: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """float64 ``[⟨a, f⟩, ‖a‖², ‖f‖²]`` of two flat tensors: float32 dot products over chunks of
    4096 elements, summed in float64 (relative error ~1e-9, 3× faster than float64 throughout).

    The other half's statistics are differences of these sums, which cancel when the halves
    agree (small Φ): plain float32 dot products over whole tensors lost ~1e-4 of Φ there.
    """
    a, f = a.float(), f.float()
    n = a.numel()
    head = n - n % _CHUNK
    out = torch.zeros(3, dtype=torch.float64, device=a.device)
    if head:
        x, y = a[:head].view(-1, _CHUNK), f[:head].view(-1, _CHUNK)
        out += torch.stack([
            torch.linalg.vecdot(x, y).double().sum(),
            torch.linalg.vecdot(x, x).double().sum(),
            torch.linalg.vecdot(y, y).double().sum(),
        ])
    if head < n:
        x, y = a[head:], f[head:]
        out += torch.stack([torch.dot(x, y), torch.dot(x, x), torch.dot(y, y)]).double()
    return out


def half_sizes(world_size: int):
    """``(n_a, n_b)``: ranks ``[0, n_a)`` form the first half, the rest the second
    (``n_a = W // 2``; for odd W the second half is one rank larger)."""
    if world_size < 2:
        raise ValueError(f"the AGVM comm hook needs a world size ≥ 2, got {world_size}")
    n_a = world_size // 2
    return n_a, world_size - n_a


class AGVMHookState:
    """State of :func:`agvm_comm_hook`; create it on every rank, once per model.

    Args:
        module_of: ``{parameter: module name}`` for every parameter DDP reduces.
        modules: the module names, in a fixed order (every rank the same).
        process_group: the world group (default: ``dist.group.WORLD``).
        compress_fp16: reduce in fp16 on ordinary iterations (DDP's ``fp16_compress_hook``
            behaviour); AGVM iterations always reduce in full precision.

    Set :attr:`estimate` to True before the backward of an AGVM iteration (all ranks alike),
    then call :meth:`finish` after it for the per-module ``(⟨G1, G2⟩, ‖G1‖², ‖G2‖²)``, with G1 the
    first half's mean gradient and G2 the second's.
    """

    def __init__(
        self,
        module_of: Mapping[torch.nn.Parameter, str],
        modules: Sequence[str],
        process_group: Optional[dist.ProcessGroup] = None,
        compress_fp16: bool = False,
    ) -> None:
        self.group = process_group if process_group is not None else dist.group.WORLD
        self.world = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        self.n_a, self.n_b = half_sizes(self.world)
        ranks_a = list(range(self.n_a))
        ranks_b = list(range(self.n_a, self.world))
        # every rank takes part in creating both groups (a collective requirement)
        group_a = dist.new_group(ranks_a)
        group_b = dist.new_group(ranks_b)
        self.in_first_half = self.rank < self.n_a
        self.own_group = group_a if self.in_first_half else group_b
        self.n_own = self.n_a if self.in_first_half else self.n_b
        self.n_other = self.world - self.n_own
        self.module_of = {id(p): m for p, m in module_of.items()}
        self.modules = list(modules)
        self.compress_fp16 = compress_fp16
        self.estimate = False
        self._lock = threading.Lock()
        self._sums: Dict[str, torch.Tensor] = {}
        self._pending = None  # the previous bucket of the current AGVM iteration
        self.bytes_extra = 0  # bytes reduced in half groups during the current AGVM iteration
        self.last_bytes_extra = 0  # ... and during the last finished one

    # ------------------------------------------------------------------ after the backward
    def finish(self) -> "OrderedDict[str, GradientStats]":  # noqa: F821
        """Per-module ``(⟨G1, G2⟩, ‖G1‖², ‖G2‖²)`` of the AGVM iteration that just ended, the
        same on every rank (a collective: every rank must call it). Resets the sums."""
        w, n_own, n_other = float(self.world), float(self.n_own), float(self.n_other)
        rows = []
        for m in self.modules:
            own_f, own_sq, f_sq = (self._sums[m] if m in self._sums else torch.zeros(3, dtype=torch.float64)).tolist()
            dot = (w * own_f - n_own * own_sq) / n_other
            other_sq = (w * w * f_sq - 2 * w * n_own * own_f + n_own * n_own * own_sq) / (n_other * n_other)
            first_sq, second_sq = (own_sq, other_sq) if self.in_first_half else (other_sq, own_sq)
            rows.append([dot, first_sq, second_sq])
        table = torch.tensor(rows, dtype=torch.float64).reshape(len(self.modules), 3)
        dist.all_reduce(table, group=self.group)
        table /= self.world
        self._sums = {}
        self._pending = None
        self.estimate = False
        self.last_bytes_extra, self.bytes_extra = self.bytes_extra, 0
        return OrderedDict((m, (table[i, 0], table[i, 1], table[i, 2])) for i, m in enumerate(self.modules))

    # ------------------------------------------------------------------ inside the hook
    def _accumulate(self, bucket: dist.GradBucket, own: torch.Tensor, full: torch.Tensor) -> None:
        offset = 0
        partial: Dict[str, torch.Tensor] = {}
        for p in bucket.parameters():
            n = p.numel()
            terms = _sums_of_products(own[offset:offset + n], full[offset:offset + n])
            offset += n
            m = self.module_of[id(p)]
            partial[m] = terms if m not in partial else partial[m] + terms
        with self._lock:
            for m, t in partial.items():
                self._sums[m] = t if m not in self._sums else self._sums[m] + t


def agvm_comm_hook(state: AGVMHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """The DDP comm hook (``ddp.register_comm_hook(state, agvm_comm_hook)``); see the module
    docstring for what it does on AGVM and on ordinary iterations."""
    buf = bucket.buffer()
    if not state.estimate:
        if state.compress_fp16:
            compressed = buf.to(torch.float16).div_(state.world)
            fut = dist.all_reduce(compressed, group=state.group, async_op=True).get_future()

            def decompress(fut):
                buf.copy_(fut.value()[0])
                return buf

            return fut.then(decompress)
        buf.div_(state.world)
        fut = dist.all_reduce(buf, group=state.group, async_op=True).get_future()
        return fut.then(lambda fut: fut.value()[0])
    # AGVM iteration, pipelined in bucket order (the same sequence on every rank): this call
    # starts its bucket's half-group all-reduce, then completes the previous bucket (waits for
    # its half result, starts its world all-reduce), so each half reduction overlaps with the
    # backward of the next bucket. The last bucket is completed at once.
    work = dist.all_reduce(buf, group=state.own_group, async_op=True) if state.n_own > 1 else None
    result = torch.futures.Future()
    if state._pending is not None:
        _start_world_reduction(state, *state._pending)
    state._pending = (bucket, buf, work, result)
    if bucket.is_last():
        _start_world_reduction(state, *state._pending)
        state._pending = None
    return result


def _start_world_reduction(state, bucket, buf, work, result) -> None:
    """Finish ``bucket``'s half-group mean and start its world all-reduce; ``result`` gets the
    ordinary DDP mean once it is done (and the bucket's statistics are accumulated)."""
    if work is not None:
        work.wait()
        state.bytes_extra += buf.numel() * buf.element_size()
    own = buf / state.n_own  # H_own, kept for the statistics (one copy of the bucket)
    # every rank adds H_own / W: the world sum is (n_a·H_a + n_b·H_b) / W, plain DDP's mean
    buf.div_(state.n_own * state.world)
    fut = dist.all_reduce(buf, group=state.group, async_op=True).get_future()

    def done(fut):
        try:
            full = fut.value()[0]
            state._accumulate(bucket, own, full)
            result.set_result(full)
        except Exception as e:  # never leave DDP waiting on a future that cannot complete
            result.set_exception(e)

    fut.then(done)
