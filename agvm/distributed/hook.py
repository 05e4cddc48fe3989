"""The DDP communication hook that gives AGVM its two half-batch gradients for free.

On an AGVM iteration every bucket is reduced twice: first inside the rank's own half of the
world (ranks ``[0, n_a)`` are half a, ``[n_a, W)`` half b; mean ``H_own`` over its ``n_own``
ranks), then over the world, each rank contributing ``H_own / W``, which sums to the ordinary
DDP mean ``f = (n_a·H_a + n_b·H_b) / W``. The world all-reduce runs on a new tensor, so the
bucket keeps ``n_own·H_own`` without a copy; the hook returns ``f`` and the step is plain DDP's.
Per module, float64 sums of ‖H_own‖² and of ‖H_own − f‖² accumulate as buckets complete (the
ranks of a half hold the same ``H_own`` and split that work). With ``D = H_a − H_b``,
``H_a − f = n_b·D / W`` and ``H_b − f = −n_a·D / W``, so summing ‖H_own − f‖² over all ranks

    Σ_ranks ‖H_own − f‖² = n_a·n_b·‖D‖² / W,        ⟨H_a, H_b⟩ = (‖H_a‖² + ‖H_b‖² − ‖D‖²) / 2

gives ‖D‖² directly (no cancellation at small Φ), and the float32 rounding of ``f`` cancels to
first order between the two halves (it shifts both distances in opposite directions). Only
squared norms are taken (fast, accurately summed reductions);
and one small all-reduce of those numbers makes every rank agree. Extra communication per AGVM
iteration: one half-group all-reduce per bucket (none where a half is a single rank) plus that
small all-reduce; no all-gather of the gradient (the authors' release gathers the whole
flattened gradient). Unequal halves (odd W)
are exact. Ordinary iterations are a plain all-reduce of the mean (bit-identical to DDP's own),
optionally fp16-compressed. Collectives are only issued from the hook itself, in bucket order
(the same on every rank): bucket i's world all-reduce is started by the hook call of bucket
i + 1, after bucket i's half-group result, so the half reductions overlap with the backward;
the ``then`` callbacks only compute.

Adam-preconditioned Φ (``precondition``, the release's ``use_adam`` for AdamW): the cosine is
taken between T(H_a) and T(H_b), T(g) = g / (sqrt(β2·v + (1 − β2)·g²) + ε), which is not linear,
so the distance trick above does not apply, and T amplifies rounding noise in near-zero elements
(early on, v ≈ 0, T is nearly sign(g)): deriving H_other from the world mean f loses exactness
at odd W (measured: 3e-5 relative at W = 3, 1.6e-4 at the first iteration). So on AGVM
iterations this mode reduces one stacked tensor over the world instead, ``[g, 0]`` from half a's
ranks and ``[0, g]`` from half b's, which gives every rank both half sums separately; the step
gets ``f = (Σ_a + Σ_b) / W`` (the same on every rank; equal to DDP's mean up to rounding). Each
rank preconditions its 1/W share of every parameter with its optimizer's v (identical on every
rank) and adds ‖T(H_a)‖², ‖T(H_b)‖², ‖T(H_a) − T(H_b)‖²; the same small all-reduce completes the
sums. Extra communication: the stacked all-reduce moves twice the bucket's bytes, i.e. one extra
gradient's worth per AGVM iteration (instead of the half-group all-reduce), and no all-gather.

Device and NCCL notes (checked against torch 2.14's DDP and ProcessGroupNCCL):
- Every tensor handed to a collective lives on the device of the gradients it summarises: the
  buckets themselves, their world-mean tensors (``empty_like``), and the statistics table of
  :meth:`AGVMHookState.finish`, which is created on the device recorded from the buckets (an
  NCCL group has no CPU backend; a CPU tensor there raises "No backend type associated with
  device type cpu"). ``tests/test_hook_devices.py`` fails on any tensor factory in this file
  without an explicit ``device=``.
- The two half groups and the world group are separate communicators (``new_group``); every
  rank creates both half groups in the same order. NCCL runs each communicator on its own
  stream; ``work.wait()`` makes the current stream wait for the half result before the world
  all-reduce reads the bucket, and ``fut.then`` callbacks run after the world result is ready
  on the current stream, so the statistics read finished data. All collectives are issued from
  the hook's thread in bucket order, identical on every rank (a requirement of NCCL as of gloo).
- ``gradient_as_bucket_view=True``: the bucket buffer is the gradients' storage. The half
  all-reduce writes the half sum into it, the statistics then overwrite it (scratch), and the
  hook returns the world mean as a separate tensor, which DDP copies into the buffer, i.e. into
  the gradients: the step sees the ordinary mean either way.
- ``find_unused_parameters=True``: unused parameters are zeros in their bucket on every rank, so
  they add zero to every sum; the bucket layout (hence the cached module ranges) may be rebuilt
  after the first iteration, which the layout-keyed cache handles.
- AMP: buckets hold loss-scaled fp32 gradients; the cosine is scale-invariant and the
  preconditioned path multiplies by :attr:`AGVMHookState.grad_scale` (1 / loss scale) first.
  An overflowed step gives non-finite sums, which the trainer treats as a skipped update.

Pure torch. (No ``from __future__ import annotations`` here: DDP checks the hook's
annotations against ``dist.GradBucket`` and ``torch.futures.Future[torch.Tensor]``.)
"""

import threading
from collections import OrderedDict
from typing import Callable, Dict, Mapping, Optional, Sequence

import torch
import torch.distributed as dist

from ..core.variance import GradientStats

__all__ = ["AGVMHookState", "agvm_comm_hook", "half_sizes"]


_CHUNK = 4096  # elements per float32 partial norm in _squared_norm


def _squared_norm(x: torch.Tensor) -> torch.Tensor:
    """float64 ``‖x‖²`` of a flat tensor: float32 norms of 4096-element chunks, summed in
    float64 (relative error ~1e-9; a plain float32 dot over millions of elements is off by ~1e-5)."""
    x = x.float()
    n = x.numel()
    head = n - n % _CHUNK
    out = torch.zeros((), dtype=torch.float64, device=x.device)
    if head:
        out += torch.linalg.vector_norm(x[:head].view(-1, _CHUNK), dim=1).double().square().sum()
    if head < n:
        out += torch.linalg.vector_norm(x[head:]).double().square()
    return out


def _share(n: int, index: int, parts: int) -> slice:
    """The ``index``-th of ``parts`` contiguous, nearly equal slices of ``range(n)``."""
    return slice(n * index // parts, n * (index + 1) // parts)


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
        precondition: None (default: Φ on plain gradients) or ``f(param, grad, index)`` that
            Adam-preconditions a flat half-mean gradient of ``param``'s elements ``index``
            (:meth:`agvm.AGVM.preconditioner`); the hook first multiplies each half mean by
            :attr:`grad_scale` (set by the trainer: 1 / AMP loss scale).

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
        precondition: Optional[Callable] = None,
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
        self.precondition = precondition
        self.grad_scale = 1.0  # set by the trainer before an AGVM backward: 1 / AMP loss scale
        # the device of the gradients (updated from every bucket): where the statistics live
        params = list(module_of)
        self.device = params[0].device if params else torch.device("cpu")
        self.estimate = False
        self._lock = threading.Lock()
        self._sums: Dict[str, torch.Tensor] = {}
        self._pending = None  # the previous bucket of the current AGVM iteration
        self._mean_buffers: Dict[int, torch.Tensor] = {}  # CPU: bucket index -> world-mean tensor
        self._range_cache: Dict[tuple, list] = {}
        self.bytes_extra = 0  # bytes reduced in half groups during the current AGVM iteration
        self.last_bytes_extra = 0  # ... and during the last finished one

    # ------------------------------------------------------------------ after the backward
    def finish(self) -> "OrderedDict[str, GradientStats]":  # noqa: F821
        """Per-module ``(⟨G1, G2⟩, ‖G1‖², ‖G2‖²)`` of the AGVM iteration that just ended, the
        same on every rank (a collective: every rank must call it). Resets the sums."""
        # columns ‖H_a‖², ‖H_b‖², Σ_ranks ‖H_own − f‖², each summed from the ranks' disjoint shares
        # preconditioned: ‖T(H_a)‖², ‖T(H_b)‖², ‖T(H_a) − T(H_b)‖², each from all ranks' shares
        table = torch.zeros(len(self.modules), 3, dtype=torch.float64, device=self.device)
        col = 0 if self.in_first_half else 1
        for i, m in enumerate(self.modules):
            if m not in self._sums:
                continue
            if self.precondition is None:
                own_sq, dist_sq = self._sums[m]
                table[i, col], table[i, 2] = own_sq, dist_sq * self.n_own  # the half's ranks split it
            else:
                table[i] = self._sums[m]
        dist.all_reduce(table, group=self.group)
        n_a, n_b, w = float(self.n_a), float(self.n_b), float(self.world)
        first_sq, second_sq = table[:, 0], table[:, 1]
        diff_sq = table[:, 2] if self.precondition is not None else table[:, 2] * w / (n_a * n_b)  # ‖H_a − H_b‖²
        dot = (first_sq + second_sq - diff_sq) / 2.0
        self._sums = {}
        self._pending = None
        self.estimate = False
        self.last_bytes_extra, self.bytes_extra = self.bytes_extra, 0
        return OrderedDict((m, (dot[i], first_sq[i], second_sq[i])) for i, m in enumerate(self.modules))

    # ------------------------------------------------------------------ inside the hook
    def _mean_buffer(self, index: int, like: torch.Tensor) -> torch.Tensor:
        """A tensor shaped like bucket ``index`` for its world mean. On CPU it is kept between
        AGVM iterations (a fresh one costs page faults: ~3× the division itself); CUDA's
        caching allocator makes a fresh one free and keeps the memory for ordinary iterations."""
        if like.device.type != "cpu":
            return torch.empty_like(like)
        buf = self._mean_buffers.get(index)
        if buf is None or buf.shape != like.shape or buf.dtype != like.dtype:
            buf = self._mean_buffers[index] = torch.empty_like(like)
        return buf

    def _ranges(self, bucket: dist.GradBucket):
        """``[(module, start, stop)]``: the bucket cut into runs of consecutive parameters of
        one module (usually a single run), cached per bucket layout."""
        key = ("runs", bucket.index(), tuple(id(p) for p in bucket.parameters()))
        ranges = self._range_cache.get(key)
        if ranges is None:
            ranges = []
            for m, _, start, stop in self._param_ranges(bucket):
                if ranges and ranges[-1][0] == m:
                    ranges[-1][2] = stop
                else:
                    ranges.append([m, start, stop])
            self._range_cache[key] = ranges
        return ranges

    def _param_ranges(self, bucket: dist.GradBucket):
        """``[(module, parameter, start, stop)]``: each parameter's elements in the bucket."""
        params = bucket.parameters()
        key = ("params", bucket.index(), tuple(id(p) for p in params))
        ranges = self._range_cache.get(key)
        if ranges is None:
            ranges, offset = [], 0
            for p in params:
                ranges.append((self.module_of[id(p)], p, offset, offset + p.numel()))
                offset += p.numel()
            self._range_cache[key] = ranges
        return ranges

    def _accumulate_preconditioned(self, bucket: dist.GradBucket, sum_a: torch.Tensor, sum_b: torch.Tensor) -> None:
        """Add this rank's share (1/W of every parameter) of each module's preconditioned
        ``[‖T(H_a)‖², ‖T(H_b)‖², ‖T(H_a) − T(H_b)‖²]`` (H = half sum / half size) to its sums."""
        partial: Dict[str, torch.Tensor] = {}
        scale_a, scale_b = self.grad_scale / self.n_a, self.grad_scale / self.n_b
        for m, p, start, stop in self._param_ranges(bucket):
            share = _share(stop - start, self.rank, self.world)
            if share.start == share.stop:
                continue
            lo, hi = start + share.start, start + share.stop
            ta = self.precondition(p, sum_a[lo:hi].double() * scale_a, share)
            tb = self.precondition(p, sum_b[lo:hi].double() * scale_b, share)
            terms = torch.stack([torch.dot(ta, ta), torch.dot(tb, tb), torch.dot(ta - tb, ta - tb)])
            partial[m] = terms if m not in partial else partial[m] + terms
        with self._lock:
            for m, t in partial.items():
                self._sums[m] = t if m not in self._sums else self._sums[m] + t

    def _accumulate(self, bucket: dist.GradBucket, half_sum: torch.Tensor, full: torch.Tensor) -> None:
        """Add this rank's share of each module's ``[‖H_own‖², ‖H_own − f‖²]`` in the bucket
        (``half_sum`` = n_own·H_own and ``full`` = f, bucket-shaped) to the module's sums.
        Overwrites ``half_sum`` with n_own·(H_own − f)."""
        index = self.rank if self.in_first_half else self.rank - self.n_a
        k = self.n_own
        partial: Dict[str, torch.Tensor] = {}
        for m, start, stop in self._ranges(bucket):
            share = _share(stop - start, index, k)  # the half's ranks hold the same H_own
            lo, hi = start + share.start, start + share.stop
            own = half_sum[lo:hi]
            own_sq = _squared_norm(own)
            dist_sq = _squared_norm(own.sub_(full[lo:hi], alpha=k))
            terms = torch.stack([own_sq, dist_sq]) / (k * k)
            partial[m] = terms if m not in partial else partial[m] + terms
        with self._lock:
            for m, t in partial.items():
                self._sums[m] = t if m not in self._sums else self._sums[m] + t


def agvm_comm_hook(state: AGVMHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """The DDP comm hook (``ddp.register_comm_hook(state, agvm_comm_hook)``); see the module
    docstring for what it does on AGVM and on ordinary iterations."""
    buf = bucket.buffer()
    state.device = buf.device
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
    # backward of the next bucket. The last bucket is completed at once. A rank alone in its
    # half has no half reduction and starts the world all-reduce at once (the world group still
    # sees every rank's buckets in the same order).
    if state.precondition is not None:
        return _stacked_reduction(state, bucket, buf)
    result = torch.futures.Future()
    if state.n_own == 1:  # nothing to reduce in the half: straight to the world all-reduce
        _start_world_reduction(state, bucket, buf, None, result)
        return result
    work = dist.all_reduce(buf, group=state.own_group, async_op=True)
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
    # every rank adds H_own / W: the world sum is (n_a·H_a + n_b·H_b) / W, plain DDP's mean. A
    # new tensor, so that buf keeps the half's sum n_own·H_own for the statistics.
    mean = torch.div(buf, state.n_own * state.world, out=state._mean_buffer(bucket.index(), buf))
    fut = dist.all_reduce(mean, group=state.group, async_op=True).get_future()

    def done(fut):
        try:
            full = fut.value()[0]
            state._accumulate(bucket, buf, full)
            result.set_result(full)
        except Exception as e:  # never leave DDP waiting on a future that cannot complete
            result.set_exception(e)

    fut.then(done)


def _stacked_reduction(state, bucket, buf):
    """AGVM iteration with Adam preconditioning: one world all-reduce of ``[g, 0]`` (half a) or
    ``[0, g]`` (half b) gives both half sums; returns the world mean, accumulates the statistics."""
    n = buf.numel()
    stacked = buf.new_zeros(2 * n)
    slot = 0 if state.in_first_half else 1
    stacked[slot * n:(slot + 1) * n].copy_(buf)
    state.bytes_extra += n * buf.element_size()  # the stacked tensor's extra half
    fut = dist.all_reduce(stacked, group=state.group, async_op=True).get_future()

    def done(fut):
        sums = fut.value()[0]
        sum_a, sum_b = sums[:n], sums[n:]
        state._accumulate_preconditioned(bucket, sum_a, sum_b)
        return torch.add(sum_a, sum_b).div_(state.world)

    return fut.then(done)
