"""The DDP communication hook that gives AGVM its two half-batch gradients for free.

The world (``process_group``, default WORLD) is split by group rank into two halves: ranks
``[0, n_a)`` are half a, ``[n_a, W)`` half b (``n_a = W // 2``). On an AGVM iteration the hook
issues two collectives per bucket, at once and in bucket order (the same on every rank):

1. the ordinary DDP reduction, on a separate tensor: ``mean = buf · (1/W)``, all-reduced over the
   world, exactly what DDP's reducer computes without a hook (it multiplies by 1/W; dividing by
   W differs in the last bit at W = 3), so the step gets plain DDP's ``f`` bit for bit;
2. an in-place all-reduce of the bucket ``buf`` inside the rank's own half, which leaves
   ``n_own·H_own`` (the half's sum) in the bucket; skipped where the half is a single rank.

It returns ``world_future.then(done)``: ``done`` first waits for the half reduction, then
accumulates the bucket's statistics from ``n_own·H_own`` and ``f`` and returns ``f``, which DDP
copies into the bucket. Per module, float64 sums of ‖H_own‖² and of ‖H_own − f‖² accumulate
(the ranks of a half hold the same ``H_own`` and split that work). With ``D = H_a − H_b`` and ``f = (n_a·H_a + n_b·H_b) / W``,
``H_a − f = n_b·D / W`` and ``H_b − f = −n_a·D / W``, so summing ‖H_own − f‖² over all ranks

    Σ_ranks ‖H_own − f‖² = n_a·n_b·‖D‖² / W,        ⟨H_a, H_b⟩ = (‖H_a‖² + ‖H_b‖² − ‖D‖²) / 2

gives ‖D‖² directly (no cancellation at small Φ). An error δ in ``f`` (float32 rounding of the
world sum) cancels to first order: it adds ``−2⟨δ, n_a(H_a − f) + n_b(H_b − f)⟩ = 0`` and only
``W‖δ‖²``. Only squared norms are taken, and one small all-reduce of those numbers
(:meth:`AGVMHookState.finish`) makes every rank agree.

The sums do not depend on DDP's bucket layout (which a process uses in its first iteration and
then rebuilds, so a resumed run whose first iteration is an AGVM one would otherwise differ in
the last bits, ~3e-9 in μ, and drift): work is split per *parameter*. Every rank takes a slice of
every parameter's elements (``_share(numel, i, parts)``: the i-th of the half's ranks, or of the
world's in the preconditioned path); the slice's head is cut into 4096-element rows counted from
the slice's start (float32 norm per row, squared in float64), its tail (< 4096 elements) is
gathered with all tails of the bucket and squared element by element in float64; all of it is
added per parameter in a fixed order (a serial ``index_add_`` on CPU, a sort-based
``index_put_`` on CUDA), and :meth:`AGVMHookState.finish` adds the parameters up per module in
the canonical order of ``module_of``. Elementwise work whose position in a tensor varies with
the layout (the gathered tails) uses only single, correctly rounded operations, so a vector body
and a scalar remainder (which may contract a multiply-add differently) agree. On a GPU each
block is first written to fresh scratch, since a reduction's order there depends on the
alignment of its input. (Checked on CPU: test_statistics_do_not_depend_on_the_bucket_layout.) Extra communication per AGVM iteration: one half-group all-reduce per bucket (none
where a half is a single rank, e.g. at W = 2) plus that small all-reduce; no all-gather of the
gradient (the authors' release gathers the whole flattened gradient). Unequal halves (odd W) are
exact. Ordinary iterations are the same all-reduce of ``buf · (1/W)`` in place (bit-identical to
DDP's own), optionally fp16-compressed (as DDP's ``fp16_compress_hook``).

Adam-preconditioned Φ (``precondition``, the release's ``use_adam`` for AdamW): the cosine is
taken between T(H_a) and T(H_b), T(g) = g / (sqrt(β2·v + (1 − β2)·g²) + ε), which is not linear,
so each rank needs both halves' means on its share (1/W of every parameter's elements). It has
``H_own`` from the half reduction and derives the other half's as
``H_other = (W·f − n_own·H_own) / n_other``: the same two collectives as above, no extra bytes.
Each rank preconditions its share with its optimizer's v (identical on every rank) and adds
‖T(H_a)‖², ‖T(H_b)‖², ‖T(H_a) − T(H_b)‖² (the same float64 sums as above); the same small
all-reduce completes them. On CPU this runs block by block (64 K elements: derive H_other, scale,
transform both halves side by side with ``addcmul``, take the three norms) in per-thread scratch
that stays in cache, reading H_own, f and v once from memory and allocating nothing large
(share-sized temporaries cost page faults and memory passes: the former whole-share version
made ~18 passes over the share). The derived ``H_other`` carries the float32 rounding of ``f`` scaled
by W / n_other, which T amplifies in elements near zero (T is nearly sign(g) while v ≈ 0). Where
1/W is inexact (W not a power of 2) the half reduction therefore sums the same terms
``g·(1/W)`` as the world one (one extra copy of the bucket), and ``H_other`` is computed with
separate roundings (``f·c − H·c``, never a fused multiply-add, which leaves the rounding error of
one product), so that an element to which the other half contributes nothing comes out exactly
zero. Measured against the single-process reference on the same halves
(test_adam_preconditioned_hook_matches_single_process, iterations 0, 2, 4 of a two-module MLP),
the worst relative error of Φ is 8.4e-9 at W = 2, 7.8e-8 at W = 3 and 6.7e-8 at W = 4; of μ
3.7e-11, 1.9e-9, 2.3e-9 (before the per-parameter rewrite: 1.5e-7, 2.4e-4 at iteration 0 with
v = 0, 2.1e-7). With parameters of 1 to 70 001 elements, 30 % of whose elements only half a
contributes to, v = 0, W = 3, it is 1.3e-7 (a fused multiply-add there gave 2.0e-3).

Streams (checked against torch 2.14's DDP, ``Future`` and ProcessGroupNCCL):
- Every future the hook returns is a ``then`` child of a collective's future. With NCCL, the
  work's future carries the NCCL stream's events; the callback runs on a stream that waits for
  them, and the child records its own events after the callback, so DDP's ``wait()`` orders its
  copy of the result into the gradients after the collective *and* the callback's kernels. A
  hand-made ``torch.futures.Future()`` filled from a callback records no events and lets DDP read
  the bucket early (``scripts/gpu_check.py --only stream`` shows it on one GPU;
  tests/distributed/test_hook_devices.py rejects a ``Future`` without ``devices=`` in this code).
- The half all-reduce is a different communicator (own NCCL stream). ``done`` calls
  ``work.wait()`` on it first: on NCCL that makes the callback's current stream wait for it (no
  host block); on gloo it blocks the world group's thread until the half group's thread is done.
- Collectives are only issued from the hook call itself, in bucket order, never from a callback:
  gloo aborts with "collective mismatch" when callbacks of different buckets run in different
  orders on different ranks, and NCCL needs the same order on every rank.
- ``mean`` is computed before the half all-reduce is issued (on CUDA: on the current stream,
  which the collective's stream waits for), so the in-place half reduction cannot change it.

Device notes:
- Every tensor handed to a collective lives on the device of the gradients it summarises: the
  buckets, their world-mean tensors (``empty_like``), and the statistics table of
  :meth:`AGVMHookState.finish`, created on the device recorded from the buckets (an NCCL group
  has no CPU backend). ``tests/distributed/test_hook_devices.py`` fails on any tensor factory in this file
  without an explicit ``device=``.
- The halves are built from the global ranks of ``process_group``
  (``dist.get_process_group_ranks``) with ``new_group(..., use_local_synchronization=True)``, so
  only the members of the hook's group take part: ``process_group`` may be a sub-group of the
  job, whose other ranks never call the hook. (torch counts groups per rank; after a sub-group's
  halves are created, ranks outside it have counted fewer, so create job-wide groups before.)
- ``gradient_as_bucket_view=True``: the bucket buffer is the gradients' storage. The half
  all-reduce writes the half sum into it, the statistics read it (into scratch), and the
  hook returns the world mean as a separate tensor, which DDP copies into the buffer, i.e. into
  the gradients: the step sees the ordinary mean either way.
- ``find_unused_parameters=True``: unused parameters are zeros in their bucket on every rank, so
  they add zero to every sum; the bucket layout may be rebuilt after the first iteration: the
  per-layout plans are cached by layout, and the sums do not depend on it.
- AMP: buckets hold loss-scaled fp32 gradients; the cosine is scale-invariant and the
  preconditioned path multiplies by :attr:`AGVMHookState.grad_scale` (1 / loss scale) first.
  An overflowed step gives non-finite sums, which the trainer treats as a skipped update.

Pure torch. (No ``from __future__ import annotations`` here: DDP checks the hook's
annotations against ``dist.GradBucket`` and ``torch.futures.Future[torch.Tensor]``.)
"""

import logging
import threading
from collections import OrderedDict
from typing import Callable, Dict, Mapping, Optional, Sequence

import torch
import torch.distributed as dist

from ..core.variance import GradientStats

__all__ = ["AGVMHookState", "agvm_comm_hook", "half_sizes", "install_agvm_hook"]

logger = logging.getLogger(__name__)


_CHUNK = 4096  # elements per float32 partial norm (rows of a block)
# elements per block of a share: the preconditioned path computes a block's two transformed half
# means and their norms in scratch that stays in cache (5 float32 blocks); on a
# GPU a block is large (few launches) and the scratch is a fresh tensor per bucket
_BLOCK_CPU = 1 << 16  # preconditioned path: 5 scratch rows of 256 KiB (measured: 1 << 15 costs op overhead)
_BLOCK_CPU_PLAIN = 1 << 18  # plain path: one scratch row (the difference), 1 MiB
_BLOCK_GPU = 1 << 22


def _share(n: int, index: int, parts: int) -> slice:
    """The ``index``-th of ``parts`` contiguous, nearly equal slices of ``range(n)``."""
    return slice(n * index // parts, n * (index + 1) // parts)


def _segment_add(table: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> None:
    """``table[index[i]] += values[i]`` for i in order: on CPU ``index_add_`` of a 1-d table is
    a serial loop; on CUDA ``index_put_(accumulate=True)`` sorts stably and reduces each
    index's values in a fixed order. Either way an entry's sum depends only on its own values
    in their order, not on what else the call holds (``index_put_`` on CPU would use atomics)."""
    if table.device.type == "cpu":
        table.index_add_(0, index, values)
    else:
        table.index_put_((index,), values, accumulate=True)


def half_sizes(world_size: int):
    """``(n_a, n_b)``: ranks ``[0, n_a)`` form the first half, the rest the second
    (``n_a = W // 2``; for odd W the second half is one rank larger)."""
    if world_size < 2:
        raise ValueError(f"the AGVM comm hook needs a world size ≥ 2, got {world_size}")
    n_a = world_size // 2
    return n_a, world_size - n_a


class _Plan:
    """This rank's work on one bucket layout: for every parameter of the bucket, the slice of
    its elements this rank handles (parameter-local: ``_share(numel, part, parts)``), cut into
    a head of whole ``_CHUNK`` rows and a tail (the last ``len % _CHUNK`` elements).

    - ``large``: ``(param, canonical index, bucket offset of the slice, head length, slice start
      in the parameter)`` for every slice with a head; heads are processed per parameter in
      blocks of whole rows relative to the slice start.
    - the tails of all slices are gathered (``tail_pos``: bucket positions) and summed element by
      element in float64 (``tail_pid``: the canonical index of each element's parameter);
      ``tail_segs``: ``(param, start, stop)`` of each tail in its parameter, in gathered order.

    Every per-parameter value therefore depends only on the parameter's gradients, never on
    where DDP put the parameter or what else shares its bucket."""

    def __init__(self, segments, n_params: int, device) -> None:
        self.large, rows, tail_ranges, tail_params, self.tail_segs = [], [], [], [], []
        for p, pidx, offset, lo, hi in segments:
            n = hi - lo
            head = n - n % _CHUNK
            if head:
                self.large.append((p, pidx, offset + lo, head, lo))
                rows += [pidx] * (head // _CHUNK)
            if head < n:
                tail_ranges.append((offset + lo + head, offset + hi))
                tail_params.append(pidx)
                self.tail_segs.append((p, lo + head, hi))
        self.n_params = n_params
        self.max_head = max((h for _, _, _, h, _ in self.large), default=0)
        self.rows_pid = torch.tensor(rows, dtype=torch.int64, device=device)
        lengths = torch.tensor([b - a for a, b in tail_ranges], dtype=torch.int64, device=device)
        self.tail_pid = torch.tensor(tail_params, dtype=torch.int64, device=device).repeat_interleave(lengths)
        pos = [torch.arange(a, b, dtype=torch.int64, device=device) for a, b in tail_ranges]
        self.tail_pos = torch.cat(pos) if pos else torch.zeros(0, dtype=torch.int64, device=device)
        self.empty = not self.large and not tail_ranges
        self._index: Dict[tuple, torch.Tensor] = {}

    def index(self, cols) -> torch.Tensor:
        """Table positions (column·P + parameter) of the values laid out as: the head rows for
        each column of ``cols`` in turn, then the tail elements for each column in turn."""
        index = self._index.get(cols)
        if index is None:
            p = self.n_params
            index = self._index[cols] = torch.cat(
                [self.rows_pid + c * p for c in cols] + [self.tail_pid + c * p for c in cols])
        return index


def _precondition_(x: torch.Tensor, beta_v: Optional[torch.Tensor], one_minus_beta2, eps, denom: torch.Tensor,
                   fused: bool = True) -> None:
    """``x ← x / (sqrt(β2·v + (1 − β2)·x²) + ε)`` in place (``beta_v`` = β2·v or None for v = 0;
    ``one_minus_beta2`` (1 − β2 computed in double), ``eps``: numbers or per-element float32
    tensors, which hold the same float32 values), with ``denom`` as scratch. ``fused``
    uses ``addcmul`` (one pass); otherwise only correctly rounded single operations, whose
    result does not depend on an element's position in the tensor (vector body or scalar
    remainder, which may contract differently), for tensors whose layout varies."""
    if fused and beta_v is not None:
        torch.addcmul(beta_v, x, x, value=one_minus_beta2, out=denom)
    else:
        torch.mul(x, x, out=denom).mul_(one_minus_beta2)
        if beta_v is not None:
            denom.add_(beta_v)
    x.div_(denom.sqrt_().add_(eps))


class AGVMHookState:
    """State of :func:`agvm_comm_hook`; create it on every rank, once per model.

    Args:
        module_of: ``{parameter: module name}`` for every parameter DDP reduces; its order is
            the canonical order in which per-parameter sums are added up per module.
        modules: the module names, in a fixed order (every rank the same).
        process_group: the group DDP reduces over (default: ``dist.group.WORLD``; a sub-group
            of the job works: only its members create the half groups).
        compress_fp16: reduce in fp16 on ordinary iterations (DDP's ``fp16_compress_hook``
            behaviour); AGVM iterations always reduce in full precision.
        precondition: None (default: Φ on plain gradients) or ``f(param, grad, index, out)`` that
            Adam-preconditions a flat float32 half-mean gradient of ``param``'s elements ``index``
            into ``out`` (here ``out`` is ``grad`` itself; :meth:`agvm.AGVM.preconditioner`); the
            hook first multiplies each half mean by :attr:`grad_scale` (set by the trainer:
            1 / AMP loss scale). If ``f`` has a ``second_moment(param) -> (v or None, β2, ε)``
            attribute (as :meth:`agvm.AGVM.preconditioner`'s has) and a ``grad_scale`` of 1, the
            hook applies the same formula itself, fused and block by block.

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
        self.rank = dist.get_rank(self.group)  # the rank in the group, not the global one
        self.n_a, self.n_b = half_sizes(self.world)
        self.in_first_half = self.rank < self.n_a
        # the halves in the group's rank order, as global ranks (what new_group takes); only the
        # members of a half create it, so ranks outside a sub-group need not take part
        ranks = sorted(dist.get_process_group_ranks(self.group), key=lambda r: dist.get_group_rank(self.group, r))
        own_ranks = ranks[:self.n_a] if self.in_first_half else ranks[self.n_a:]
        self.own_group = dist.new_group(own_ranks, use_local_synchronization=True) if len(own_ranks) > 1 else None
        self.n_own = len(own_ranks)
        self.n_other = self.world - self.n_own
        self.module_of = {id(p): m for p, m in module_of.items()}
        self.modules = list(modules)
        # canonical parameter order (module_of's): per-parameter sums are kept in this order and
        # added up per module in it, whatever DDP's bucket layout
        self._pidx = {id(p): i for i, p in enumerate(module_of)}
        slot = {m: i for i, m in enumerate(self.modules)}
        self._param_module = [slot.get(m, len(self.modules)) for m in module_of.values()]  # unknown: dropped
        self.compress_fp16 = compress_fp16
        self.precondition = precondition
        self.grad_scale = 1.0  # set by the trainer before an AGVM backward: 1 / AMP loss scale
        # the device of the gradients (updated from every bucket): where the statistics live
        params = list(module_of)
        self.device = params[0].device if params else torch.device("cpu")
        self.estimate = False
        self._lock = threading.Lock()
        self._local = threading.local()  # per-thread scratch of the preconditioned path (CPU)
        self._table: Optional[torch.Tensor] = None  # float64 [column · P + parameter] of this iteration
        self._mean_buffers: Dict[int, torch.Tensor] = {}  # CPU: bucket index -> world-mean tensor
        self._plans: Dict[tuple, _Plan] = {}
        self._module_index: Dict[tuple, torch.Tensor] = {}
        self.bytes_extra = 0  # bytes reduced in half groups during the current AGVM iteration
        self.last_bytes_extra = 0  # ... and during the last finished one

    @property
    def _columns(self) -> int:
        return 2 if self.precondition is None else 3

    # ------------------------------------------------------------------ after the backward
    def _module_sums(self) -> torch.Tensor:
        """This rank's float64 sums per module, ``[columns, modules]``, added up from the
        per-parameter sums in the canonical parameter order (SGD: ‖n_own·H_own‖² and
        ‖n_own·(H_own − f)‖² over this rank's slices; preconditioned: ‖T(H_a)‖², ‖T(H_b)‖²,
        ‖T(H_a) − T(H_b)‖²)."""
        cols, m, p = self._columns, len(self.modules), len(self._pidx)
        if self._table is None:
            return torch.zeros(cols, m, dtype=torch.float64, device=self.device)
        device = self._table.device
        key = (cols, device)
        index = self._module_index.get(key)
        if index is None:
            slots = torch.tensor(self._param_module, dtype=torch.int64, device=device)
            index = self._module_index[key] = torch.cat([slots + c * (m + 1) for c in range(cols)])
        out = torch.zeros(cols * (m + 1), dtype=torch.float64, device=device)
        _segment_add(out, index, self._table[:cols * p])
        return out.view(cols, m + 1)[:, :m]

    @property
    def _sums(self) -> Dict[str, torch.Tensor]:
        """``{module: this rank's sums}`` (``_module_sums`` by name; SGD values divided by
        n_own², i.e. ‖H_own‖² and ‖H_own − f‖² over this rank's slices)."""
        sums = self._module_sums()
        if self.precondition is None:
            sums = sums / (self.n_own * self.n_own)
        return {mod: sums[:, i] for i, mod in enumerate(self.modules)}

    def finish(self) -> "OrderedDict[str, GradientStats]":  # noqa: F821
        """Per-module ``(⟨G1, G2⟩, ‖G1‖², ‖G2‖²)`` of the AGVM iteration that just ended, the
        same on every rank (a collective: every rank must call it). Resets the sums."""
        # columns ‖H_a‖², ‖H_b‖², Σ_ranks ‖H_own − f‖², each summed from the ranks' disjoint shares
        # preconditioned: ‖T(H_a)‖², ‖T(H_b)‖², ‖T(H_a) − T(H_b)‖², each from all ranks' shares
        sums = self._module_sums()
        table = torch.zeros(len(self.modules), 3, dtype=torch.float64, device=sums.device)
        if self.precondition is None:
            k2 = float(self.n_own * self.n_own)
            table[:, 0 if self.in_first_half else 1] = sums[0] / k2
            table[:, 2] = sums[1] / k2 * self.n_own  # the half's ranks split it
        else:
            table.copy_(sums.t())
        dist.all_reduce(table, group=self.group)
        n_a, n_b, w = float(self.n_a), float(self.n_b), float(self.world)
        first_sq, second_sq = table[:, 0], table[:, 1]
        diff_sq = table[:, 2] if self.precondition is not None else table[:, 2] * w / (n_a * n_b)  # ‖H_a − H_b‖²
        dot = (first_sq + second_sq - diff_sq) / 2.0
        self._table = None
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

    def _plan(self, bucket: dist.GradBucket, part: int, parts: int, device) -> _Plan:
        """This rank's :class:`_Plan` for the bucket's layout (cached per layout): part
        ``part`` of ``parts`` of every parameter's elements."""
        params = bucket.parameters()
        key = (part, parts, bucket.index(), tuple(id(p) for p in params), str(device))
        plan = self._plans.get(key)
        if plan is None:
            segments, offset = [], 0
            for p in params:
                n = p.numel()
                share = _share(n, part, parts)
                if share.start < share.stop:
                    segments.append((p, self._pidx[id(p)], offset, share.start, share.stop))
                offset += n
            plan = self._plans[key] = _Plan(segments, len(self._pidx), device)
        return plan

    def _add(self, plan: _Plan, cols: tuple, values: torch.Tensor) -> None:
        with self._lock:
            if self._table is None:
                self._table = torch.zeros(self._columns * plan.n_params, dtype=torch.float64, device=values.device)
            _segment_add(self._table, plan.index(cols), values)

    def _scratch(self, device, rows: int, n: int) -> torch.Tensor:
        """``[rows, ≥ n]`` float32 scratch: per thread and kept on CPU (in cache after the first
        block), fresh on other devices (the caching allocator; stream-safe)."""
        if device.type != "cpu":
            return torch.empty(rows, n, dtype=torch.float32, device=device)
        cache = getattr(self._local, "scratch", None)
        if cache is None:
            cache = self._local.scratch = {}
        buf = cache.get(rows)
        if buf is None or buf.shape[1] < n:
            buf = cache[rows] = torch.empty(rows, n, dtype=torch.float32, device=device)
        return buf

    def _accumulate_preconditioned(self, bucket: dist.GradBucket, half_sum: torch.Tensor, full: torch.Tensor) -> None:
        """Add this rank's share (1/W of every parameter's elements) of each parameter's
        preconditioned ``[‖T(H_a)‖², ‖T(H_b)‖², ‖T(H_a) − T(H_b)‖²]`` to the per-parameter
        sums, from ``half_sum`` (the half's sum of g, or of g·(1/W) where W is not a power of 2)
        and ``full`` = f (bucket-shaped). Block by block in scratch; ``half_sum`` is not changed."""
        device = half_sum.device
        plan = self._plan(bucket, self.rank, self.world, device)
        if plan.empty:
            return
        s, w = self.grad_scale, self.world
        k = w if w & (w - 1) else 1  # the bucket holds Σ_own g·(1/W) (W not a power of 2) or Σ_own g
        # H_other = (W·f − n_own·H_own) / n_other, then own → H_own, both times grad_scale
        c_f, c_other, c_own = w * s / self.n_other, k * s / self.n_other, k * s / self.n_own
        precondition = self.precondition
        moments = getattr(precondition, "second_moment", None)
        if getattr(precondition, "grad_scale", 1.0) != 1.0:
            moments = None  # a custom scaling: let the callable do all of it
        own_col, other_col = (0, 1) if self.in_first_half else (1, 0)
        block = _BLOCK_CPU if device.type == "cpu" else _BLOCK_GPU
        rows, rows_diff = [], []  # [2, r] float32 norms of (own, other) rows; [r] of own − other
        if plan.large:
            scratch = self._scratch(device, 5, min(block, plan.max_head))
            for p, _, lo, head, plo in plan.large:
                v, beta2, eps = moments(p) if moments is not None else (None, None, None)
                if v is not None:
                    v = v.reshape(-1)
                for j in range(0, head, block):
                    n = min(block, head - j)
                    # both halves side by side ([2, n], contiguous): one operation transforms both
                    x = scratch[:2].view(-1)[:2 * n].view(2, n)
                    denom = scratch[2:4].view(-1)[:2 * n].view(2, n)
                    x_own, x_other = x[0], x[1]
                    g, f = half_sum[lo + j:lo + j + n], full[lo + j:lo + j + n]
                    # separate roundings, no fused multiply-add: where the other half adds nothing
                    # (f and the half sum hold the same terms) H_other comes out exactly zero
                    torch.mul(g, c_other, out=x_own)
                    torch.mul(f, c_f, out=x_other).sub_(x_own)
                    if c_own != c_other:
                        torch.mul(g, c_own, out=x_own)
                    if moments is not None:
                        bv = None
                        if v is not None:
                            bv = torch.mul(v[plo + j:plo + j + n], beta2, out=scratch[4, :n])
                        _precondition_(x, bv, 1.0 - beta2, eps, denom)
                    else:  # T in place: the preconditioner reads its input before writing out
                        index = slice(plo + j, plo + j + n)
                        precondition(p, x_own, index, out=x_own)
                        precondition(p, x_other, index, out=x_other)
                    rows.append(torch.linalg.vector_norm(x.view(2, -1, _CHUNK), dim=2))
                    rows_diff.append(torch.linalg.vector_norm(x_own.sub_(x_other).view(-1, _CHUNK), dim=1))
        parts = []
        if rows:
            parts.append(torch.cat([torch.cat(rows, dim=1).view(-1)] + rows_diff).double().square_())
        if plan.tail_segs:
            # the tails, gathered: their positions here vary with the layout, so only single,
            # correctly rounded operations (the same result in vector body and remainder)
            g = half_sum.index_select(0, plan.tail_pos).float()
            t_own = torch.mul(g, c_own)
            t_other = full.index_select(0, plan.tail_pos).float().mul_(c_f).sub_(g.mul_(c_other))
            if moments is not None:
                hyper = [moments(p) for p, _, _ in plan.tail_segs]
                lengths = [b - a for _, a, b in plan.tail_segs]
                beta2, one_minus, eps = hyper[0][1], 1.0 - hyper[0][1], hyper[0][2]
                if any((h[1], h[2]) != (hyper[0][1], eps) for h in hyper):  # per element, the same float32 values

                    def per_element(values):
                        counts = torch.tensor(lengths, dtype=torch.int64, device=device)
                        return torch.tensor(values, dtype=torch.float32, device=device).repeat_interleave(counts)

                    beta2, one_minus = per_element([h[1] for h in hyper]), per_element([1.0 - h[1] for h in hyper])
                    eps = per_element([h[2] for h in hyper])
                bv = None
                if any(h[0] is not None for h in hyper):
                    bv = torch.cat([
                        h[0].reshape(-1)[a:b].float() if h[0] is not None
                        else torch.zeros(b - a, dtype=torch.float32, device=device)
                        for h, (_, a, b) in zip(hyper, plan.tail_segs)]).mul_(beta2)
                denom = torch.empty_like(t_own)
                _precondition_(t_own, bv, one_minus, eps, denom, fused=False)
                _precondition_(t_other, bv, one_minus, eps, denom, fused=False)
            else:
                offset = 0
                for p, a, b in plan.tail_segs:
                    x, y = t_own[offset:offset + b - a], t_other[offset:offset + b - a]
                    precondition(p, x, slice(a, b), out=x)
                    precondition(p, y, slice(a, b), out=y)
                    offset += b - a
            parts.append(torch.cat([t_own, t_other, t_own - t_other]).double().square_())
        self._add(plan, (own_col, other_col, 2), torch.cat(parts) if len(parts) > 1 else parts[0])

    def _accumulate(self, bucket: dist.GradBucket, half_sum: torch.Tensor, full: torch.Tensor) -> None:
        """Add this rank's share of each parameter's ``[‖n_own·H_own‖², ‖n_own·(H_own − f)‖²]``
        (``half_sum`` = n_own·H_own and ``full`` = f, bucket-shaped) to the per-parameter sums:
        the ranks of a half hold the same ``H_own`` and split every parameter's elements.
        ``half_sum`` is not changed."""
        device = half_sum.device
        k = self.n_own
        plan = self._plan(bucket, self.rank if self.in_first_half else self.rank - self.n_a, k, device)
        if plan.empty:
            return
        rows_own, rows_diff = [], []
        if plan.large:
            block = _BLOCK_CPU_PLAIN if device.type == "cpu" else _BLOCK_GPU
            scratch = self._scratch(device, 1 if device.type == "cpu" else 2, min(block, plan.max_head))
            for _, _, lo, head, _ in plan.large:
                for j in range(lo, lo + head, block):
                    n = min(block, lo + head - j)
                    g, diff = half_sum[j:j + n], scratch[0, :n]
                    if device.type != "cpu":  # a GPU reduction's order depends on the alignment
                        g = scratch[1, :n].copy_(g)
                    rows_own.append(torch.linalg.vector_norm(g.view(-1, _CHUNK), dim=1))
                    torch.sub(g, full[j:j + n], alpha=k, out=diff)
                    rows_diff.append(torch.linalg.vector_norm(diff.view(-1, _CHUNK), dim=1))
        parts = []
        if rows_own:
            parts.append(torch.cat(rows_own + rows_diff).double().square_())
        if plan.tail_segs:
            t_own = half_sum.index_select(0, plan.tail_pos).float()
            t_diff = full.index_select(0, plan.tail_pos).float().mul_(k)  # k·f, then one subtraction:
            torch.sub(t_own, t_diff, out=t_diff)  # the same bits wherever the element sits
            parts.append(torch.cat([t_own, t_diff]).double().square_())
        self._add(plan, (0, 1), torch.cat(parts) if len(parts) > 1 else parts[0])


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
        buf.mul_(1.0 / state.world)  # as DDP's reducer does without a hook (not div: W = 3 differs)
        fut = dist.all_reduce(buf, group=state.group, async_op=True).get_future()
        return fut.then(lambda fut: fut.value()[0])
    # AGVM iteration: both collectives issued now, in bucket order (the same on every rank).
    # The world reduction is DDP's own, on a separate tensor (the bucket keeps the gradient for
    # the half reduction, which then leaves n_own·H_own in it).
    mean = torch.mul(buf, 1.0 / state.world, out=state._mean_buffer(bucket.index(), buf))
    if state.precondition is not None and state.world & (state.world - 1):
        buf.copy_(mean)  # 1/W inexact: the half sums the world's terms (see the module docstring)
    world_fut = dist.all_reduce(mean, group=state.group, async_op=True).get_future()
    half = None
    if state.own_group is not None:
        half = dist.all_reduce(buf, group=state.own_group, async_op=True)
        state.bytes_extra += buf.numel() * buf.element_size()
    accumulate = state._accumulate if state.precondition is None else state._accumulate_preconditioned

    def done(fut):
        full = fut.value()[0]
        if half is not None:
            half.wait()  # NCCL: the callback's stream waits for the half group's; gloo: blocks
        accumulate(bucket, buf, full)
        return full

    return world_fut.then(done)


def install_agvm_hook(ddp, agvm, compress_fp16: bool = False) -> "AGVMHookState":
    """Register :func:`agvm_comm_hook` on the ``DistributedDataParallel`` model ``ddp`` for the
    modules of ``agvm`` (an :class:`agvm.AGVM`); returns the hook's state
    (``compress_fp16``: fp16 all-reduce on ordinary iterations; default False). With
    ``agvm.precondition`` the hook measures Φ on Adam-preconditioned half means, as the
    authors' release does for AdamW."""
    module_of = {p: m for m, ps in agvm.params_by_module().items() for p in ps}
    state = AGVMHookState(
        module_of, agvm.modulator.modules, compress_fp16=compress_fp16,
        precondition=agvm.preconditioner() if agvm.precondition else None,
    )
    ddp.register_comm_hook(state, agvm_comm_hook)
    logger.info(
        f"AGVM comm hook installed: halves of {state.n_a} and {state.n_b} ranks"
        + ("; Φ on Adam-preconditioned gradients" if agvm.precondition else "")
    )
    return state
