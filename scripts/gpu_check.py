#!/usr/bin/env python
"""The checks that only a GPU can run, one PASS/FAIL/SKIP line each; exits 1 on any FAIL.

    python scripts/gpu_check.py [--device cuda|cpu] [--only stream,amp,hook,nccl,fullscale] [--out DIR]
                                [--plant-old-future]

stream              one GPU, no NCCL: the collectives are faked to run on a side CUDA stream that
                    first sleeps (``torch.cuda._sleep``) and then writes the other ranks' share,
                    completing a ``Future(devices=[cuda])`` inside ``torch.cuda.stream(side)``, as
                    NCCL does; AGVM's hook runs on a CUDA bucket (fake world 4: a half-group and
                    a world all-reduce), and, as DDP does, the returned future is waited on and
                    its value read on the default stream: PASS when the value is the expected
                    mean and the statistics saw the half sum, FAIL when read early.
                    ``--plant-old-future`` wraps the hook's result in the old hand-made
                    ``torch.futures.Future()`` filled from a ``then`` callback: FAIL expected.
                    SKIP without CUDA.
amp                 tests/test_step_safety.py's AMP overflow test on CUDA (float16 autocast, CUDA
                    GradScaler): an estimate iteration whose plain pass overflows leaves μ unchanged.
hook[amp=off|on]    two processes share one GPU over a process group bound to CUDA only
                    (backend "cuda:gloo": any collective on a CPU tensor raises, as NCCL would),
                    run AGVM's DDP comm hook on the mini detector (AGVMStepTrainer, the real
                    step) and compare every estimate's Φ and μ with a reference from the ranks'
                    local gradients gathered in the check; ranks must end bit-identical.
hook[AdamW]         the same with AdamW: Φ on Adam-preconditioned half means (PRECONDITION auto).
nccl[world=2|4]     the same over NCCL, one GPU per rank (needs ≥ 2 visible GPUs, else SKIP).
fullscale[fp32|amp] one process, the full-scale Faster R-CNN R50-FPN config (800 × 1333 input,
                    2 images, SyncBN → BN on one process) for a few iterations with AGVM
                    estimate iterations every other iteration; prints time per iteration and
                    peak GPU memory.

``--device cpu`` runs the hook check over plain gloo on CPU (AMP off): ``make test`` runs it
that way (tests/test_gpu_check.py), so the script itself cannot rot on CPU-only CI. The results
(one line per check, plus JSON) go to ``--out`` (default benchmarks/results/gpu_check).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import socket
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MINI = os.path.join(ROOT, "projects", "faster_rcnn", "configs", "mini", "faster_rcnn_R18_FPN_shapes_agvm.yaml")
FULL = os.path.join(ROOT, "projects", "faster_rcnn", "configs", "b256_agvm.yaml")
ITERS, INTERVAL, PER_RANK = 6, 2, 2  # estimate iterations 0, 2, 4
RTOL = {"cpu": 1e-5, "cuda": 1e-3}  # GPU backward (atomics in RoIAlign) is not bit-reproducible


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _synthetic_batch(seed: int, n: int, size, num_classes: int = 5):
    """``n`` random images of ``size`` (h, w) with two boxes each (detectron2's input format)."""
    import torch
    from detectron2.structures import Boxes, Instances

    g = torch.Generator().manual_seed(seed)
    h, w = size
    batch = []
    for _ in range(n):
        image = torch.randint(0, 255, (3, h, w), generator=g, dtype=torch.uint8).float()
        x0 = torch.randint(0, w // 2, (2,), generator=g).float()
        y0 = torch.randint(0, h // 2, (2,), generator=g).float()
        boxes = torch.stack([x0, y0, x0 + w / 4, y0 + h / 4], dim=1)
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(boxes)
        inst.gt_classes = torch.randint(0, num_classes, (2,), generator=g)
        batch.append({"image": image, "instances": inst, "height": h, "width": w})
    return batch


def _mini_cfg(device: str, amp: bool, adam: bool = False):
    from detectron2.config import get_cfg

    from agvm.detectron2 import add_agvm_config

    cfg = get_cfg()
    add_agvm_config(cfg)
    cfg.merge_from_file(MINI)
    cfg.merge_from_list([
        "MODEL.DEVICE", device, "SOLVER.AMP.ENABLED", str(amp), "SOLVER.AGVM.START_ITER", "0",
        "SOLVER.AGVM.INTERVAL", str(INTERVAL), "SOLVER.BASE_LR", "0.01",
    ])
    if adam:
        cfg.merge_from_list(["SOLVER.OPTIMIZER", "AdamW", "SOLVER.BASE_LR", "1e-4", "SOLVER.WEIGHT_DECAY", "0.05"])
    return cfg


# ------------------------------------------------------------------------------ hook check
def _hook_worker(rank, world, port, backend, device, amp, out_path, adam=False):
    sys.path.insert(0, ROOT)
    import agvm  # noqa: F401  (first: detectron2 0.6 compatibility)
    import torch
    import torch.distributed as dist
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage
    from torch.nn.parallel import DistributedDataParallel

    from agvm.core.modulator import GradientVarianceModulator
    from agvm.detectron2 import AGVMStepTrainer, build_agvm_optimizer
    from agvm.detectron2.defaults import install_agvm_hook
    from agvm.detectron2.resume import _share_iterator
    from agvm.distributed import half_sizes

    dev = f"cuda:{rank % torch.cuda.device_count()}" if device == "cuda" else "cpu"
    if device == "cuda":
        torch.cuda.set_device(dev)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    record = {"rank": rank, "checks": [], "error": None}
    try:
        cfg = _mini_cfg(device, amp, adam)
        torch.manual_seed(0)
        model = build_model(cfg)
        model.to(dev)
        optimizer = build_agvm_optimizer(cfg, model)
        ddp = DistributedDataParallel(model, device_ids=[dev] if device == "cuda" else None)
        state = install_agvm_hook(ddp, optimizer)
        assert (state.precondition is not None) == adam, "PRECONDITION auto must precondition AdamW under DDP"
        batches = [_synthetic_batch(1000 * it + rank, PER_RANK, (128, 128)) for it in range(ITERS)]
        scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 10) if amp else None  # few overflows
        step = AGVMStepTrainer(ddp, batches, optimizer, amp=amp, grad_scaler=scaler)
        step.hook_state = state
        step._write_metrics = lambda *a, **k: None  # detectron2's metric gather is not ours to test here
        _share_iterator(step, None)
        shadow = GradientVarianceModulator(list(optimizer.modulator.modules), interval=INTERVAL, start_iter=0)
        n_a, _ = half_sizes(world)
        torch.manual_seed(1 + rank)
        with EventStorage(0) as storage:
            for it in range(ITERS):
                storage.iter = step.iter = it
                reference = None
                if optimizer.should_estimate(it):
                    reference = _gathered_reference(ddp, optimizer, batches[it], step, world, n_a, amp)
                step.run_step()
                if reference is not None:
                    # the trainer's AMP policy: a non-finite half skips the whole update
                    if amp and not all(v == v and abs(v) != float("inf") for v in reference.values()):
                        shadow.skip(it)
                    else:
                        shadow.update(it, reference)
                    mu_ref = shadow.mu
                    record["checks"].append({
                        "iter": it, "phi_ref": reference, "phi": dict(optimizer.modulator.phi),
                        "mu_ref": dict(mu_ref), "mu": dict(optimizer.mu), "bytes_extra": state.last_bytes_extra,
                    })
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        mine = flat.clone()
        dist.broadcast(flat, 0)
        record["bit_identical"] = bool(torch.equal(flat, mine))
        record["finite"] = bool(torch.isfinite(mine).all())
    except Exception:  # report, then let the other rank fail its collectives
        record["error"] = traceback.format_exc()
    with open(out_path, "w") as f:
        json.dump(record, f)
    dist.destroy_process_group()


def _gathered_reference(ddp, optimizer, data, step, world, n_a, amp):
    """Φ per module from this iteration's local gradients of every rank (no DDP reduction),
    gathered and averaged per half in float64; RNG states are put back for the real step."""
    import torch
    import torch.distributed as dist

    cuda = next(ddp.parameters()).is_cuda
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state() if cuda else None
    optimizer.zero_grad()
    with ddp.no_sync():
        with torch.autocast("cuda", enabled=amp):
            loss = sum(ddp(data).values())
        (step.grad_scaler.scale(loss) if amp else loss).backward()
    phis = {}
    unscale = 1.0 / float(step.grad_scaler.get_scale()) if amp else 1.0
    precondition = optimizer.preconditioner(unscale) if optimizer.precondition else None
    for m, params in optimizer.params_by_module().items():
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        g1 = sum(x.double() for x in gathered[:n_a]) / n_a
        g2 = sum(x.double() for x in gathered[n_a:]) / (world - n_a)
        if precondition is not None:  # per parameter, as the release's use_adam
            offsets = [0]
            for p in params:
                offsets.append(offsets[-1] + p.numel())
            g1 = torch.cat([precondition(p, g1[a:b]) for p, a, b in zip(params, offsets, offsets[1:])])
            g2 = torch.cat([precondition(p, g2[a:b]) for p, a, b in zip(params, offsets, offsets[1:])])
        phis[m] = float(1.0 - torch.dot(g1, g2) / (g1.norm() * g2.norm()))
    optimizer.zero_grad()
    torch.set_rng_state(rng)
    if cuda:
        torch.cuda.set_rng_state(cuda_rng)
    return phis


def check_hook(backend: str, device: str, amp: bool, world: int, adam: bool = False) -> tuple:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        paths = [os.path.join(tmp, f"rank{r}.json") for r in range(world)]
        port = _free_port()
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_hook_worker, args=(r, world, port, backend, device, amp, paths[r], adam)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=600)
        records = []
        for r, path in enumerate(paths):
            if not os.path.exists(path):
                return False, f"rank {r} wrote no result (exit code {procs[r].exitcode})", {}
            with open(path) as f:
                records.append(json.load(f))
    errors = [f"rank {r['rank']}: {r['error'].strip().splitlines()[-1]}" for r in records if r["error"]]
    if errors:
        return False, "; ".join(errors), {"traceback": records[0]["error"] or records[1]["error"]}
    rtol = RTOL[device]
    worst_phi = worst_mu = 0.0
    mismatched, skipped = [], 0
    for rec in records:
        for c in rec["checks"]:
            finite_ref = all(math.isfinite(v) for v in c["phi_ref"].values())
            if not finite_ref:  # an overflowed AMP step: the trainer must have skipped it too
                skipped += rec["rank"] == 0
                if any(math.isfinite(v) for v in c["phi"].values()):
                    mismatched.append(c["iter"])
                continue
            for m, ref in c["phi_ref"].items():
                got = c["phi"][m]
                if not math.isfinite(got):
                    mismatched.append(c["iter"])
                    continue
                worst_phi = max(worst_phi, abs(got - ref) / max(abs(ref), 1e-12))
            for m, ref in c["mu_ref"].items():
                worst_mu = max(worst_mu, abs(c["mu"][m] - ref) / abs(ref))
    n_checks = len(records[0]["checks"])
    identical = all(r["bit_identical"] for r in records)
    finite = all(r["finite"] for r in records)
    ok = (n_checks == ITERS // INTERVAL and n_checks - skipped >= 2 and not mismatched and worst_phi <= rtol
          and worst_mu <= rtol and identical and finite)
    detail = (f"{n_checks} estimates ({skipped} overflowed, skipped alike; mismatched: {mismatched or 'none'}), max rel |Φ − Φ_ref| = {worst_phi:.1e}, max rel |μ − μ_ref| = {worst_mu:.1e} "
              f"(tolerance {rtol:g}), ranks bit-identical: {identical}, extra bytes/estimate: "
              f"{records[0]['checks'][-1]['bytes_extra'] if n_checks else 'n/a'}")
    return ok, detail, {"records": records}


# ------------------------------------------------------------------------------ stream check
def check_stream(plant_old_future: bool = False, world: int = 4, rank: int = 3, sleep_cycles: int = 500_000_000) -> tuple:
    """See the module docstring (``stream``)."""
    from unittest import mock

    import torch
    import torch.distributed as dist

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
    return ok_value and ok_stats, detail, {}


# ------------------------------------------------------------------------------ full scale
def check_fullscale(amp: bool, iters: int = 6, device: str = "cuda", size=(800, 1216)) -> tuple:
    import torch
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from agvm.detectron2 import AGVMStepTrainer, add_agvm_config, build_agvm_optimizer
    from agvm.detectron2.resume import _share_iterator

    cfg = get_cfg()
    add_agvm_config(cfg)
    cfg.merge_from_file(FULL)
    cfg.merge_from_list([
        "MODEL.DEVICE", device, "MODEL.WEIGHTS", "", "SOLVER.AMP.ENABLED", str(amp), "SOLVER.IMS_PER_BATCH", "2",
        "SOLVER.AGVM.START_ITER", "0", "SOLVER.AGVM.INTERVAL", "2", "SOLVER.BASE_LR", "0.01",
        # no pretrained weights on the device (no downloads): the released configs start from
        # ImageNet weights with no FPN norm; from random weights a BN in the FPN keeps the
        # untrained network finite over these few iterations
        "MODEL.FPN.NORM", "BN",
    ])
    torch.manual_seed(0)
    model = build_model(cfg)
    optimizer = build_agvm_optimizer(cfg, model)
    batches = [_synthetic_batch(it, 2, size, num_classes=80) for it in range(iters)]
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 10) if amp else None  # few overflows in 6 iterations
    step = AGVMStepTrainer(model, batches, optimizer, amp=amp, grad_scaler=scaler)
    _share_iterator(step, None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = {"estimate": [], "ordinary": []}
    with EventStorage(0) as storage:
        for it in range(iters):
            storage.iter = step.iter = it
            sync()
            t0 = time.perf_counter()
            step.run_step()
            sync()
            if it >= 2:  # the first two iterations warm up cuDNN and the allocator
                times["estimate" if optimizer.should_estimate(it) else "ordinary"].append(time.perf_counter() - t0)
        losses = storage.history("total_loss").values()
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    phi = dict(optimizer.modulator.phi)
    finite = all(torch.isfinite(p).all() for p in model.parameters()) and all(v == v for v, _ in losses)
    ok = (finite and optimizer.modulator.num_updates == (iters + 1) // 2 and all(v == v for v in phi.values())
          and step.nonfinite_total == 0)
    med = {k: sorted(v)[len(v) // 2] if v else float("nan") for k, v in times.items()}
    detail = (f"R50-FPN 2 × {size[0]}×{size[1]}, {iters} iters: ordinary {med['ordinary'] * 1000:.0f} ms, estimate "
              f"{med['estimate'] * 1000:.0f} ms, peak {peak:.2f} GiB, Φ {', '.join(f'{m} {v:.3g}' for m, v in phi.items())}, "
              f"μ {', '.join(f'{m} {v:.4f}' for m, v in optimizer.mu.items())}")
    return ok, detail, {"median_s": med, "peak_gib": peak, "phi": phi, "mu": optimizer.mu}


# ------------------------------------------------------------------------------ main
def check_amp_mu() -> tuple:
    """The pytest test of an AMP estimate iteration whose plain pass overflows (the GradScaler
    skips the step: μ must stay), on CUDA (float16 autocast, CUDA GradScaler)."""
    import subprocess

    test = "tests/test_step_safety.py::test_amp_plain_pass_overflow_leaves_mu_unchanged[cuda]"
    proc = subprocess.run([sys.executable, "-m", "pytest", test, "-q", "-p", "no:cacheprovider", "-rs"], cwd=ROOT,
                          capture_output=True, text=True)
    last = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
    ok = proc.returncode == 0 and "1 passed" in last
    return ok, f"{test}: {last}", {} if ok else {"traceback": proc.stdout[-4000:] + proc.stderr[-2000:]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--only", default="stream,amp,hook,nccl,fullscale",
                        help="comma-separated subset of stream,amp,hook,nccl,fullscale")
    parser.add_argument("--plant-old-future", action="store_true",
                        help="stream check: return the old hand-made future (the check must then FAIL)")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "gpu_check"))
    args = parser.parse_args(argv)
    sys.path.insert(0, ROOT)
    import agvm  # noqa: F401  (first: detectron2 0.6 compatibility)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("FAIL setup: --device cuda but torch.cuda.is_available() is False (use --device cpu for the CPU part)")
        return 1
    only = set(args.only.split(","))
    machine = (torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine())
    header = (f"# gpu_check {time.strftime('%Y-%m-%d %H:%M')} on {machine}; torch {torch.__version__}; "
              f"command: python scripts/gpu_check.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(header, flush=True)
    lines, results, failed = [header], {}, False

    def report(name, fn):
        nonlocal failed
        t0 = time.time()
        try:
            ok, detail, data = fn()
        except Exception as e:  # a crash is a FAIL of that check, not of the script
            ok, detail, data = False, f"{type(e).__name__}: {e}", {"traceback": traceback.format_exc()}
        status = "PASS" if ok else "FAIL"
        failed |= not ok
        line = f"{status} {name}: {detail} [{time.time() - t0:.0f} s]"
        print(line, flush=True)
        if not ok and "traceback" in data:
            print(data["traceback"], flush=True)
        lines.append(line)
        results[name] = {"ok": ok, "detail": detail, **{k: v for k, v in data.items() if k != "records"}}

    def skip(name, why):
        line = f"SKIP {name}: {why}"
        print(line, flush=True)
        lines.append(line)
        results[name] = {"ok": None, "detail": why}

    if "stream" in only:
        if args.device != "cuda":
            skip("stream", "needs CUDA")
        else:
            report("stream", lambda: check_stream(args.plant_old_future))
    if "amp" in only:
        if args.device != "cuda":
            skip("amp", "needs CUDA")
        else:
            report("amp[plain-pass overflow leaves μ]", check_amp_mu)
    if "hook" in only:
        backend = "cuda:gloo" if args.device == "cuda" else "gloo"
        for amp in ([False, True] if args.device == "cuda" else [False]):
            report(f"hook[{backend}, world=2, amp={'on' if amp else 'off'}]",
                   lambda amp=amp: check_hook(backend, args.device, amp, 2))
        report(f"hook[{backend}, world=2, AdamW, preconditioned Φ]", lambda: check_hook(backend, args.device, False, 2, adam=True))
    if "nccl" in only:
        gpus = torch.cuda.device_count() if args.device == "cuda" else 0
        for world in (2, 4):
            if gpus >= world:
                report(f"nccl[world={world}]", lambda world=world: check_hook("nccl", "cuda", False, world))
            else:
                skip(f"nccl[world={world}]", f"{gpus} GPU(s) visible, {world} needed")
    if "fullscale" in only:
        if args.device != "cuda":
            skip("fullscale", "needs CUDA")
        else:
            for amp in (False, True):
                report(f"fullscale[{'amp' if amp else 'fp32'}]", lambda amp=amp: check_fullscale(amp))
    os.makedirs(args.out, exist_ok=True)
    tag = args.device
    with open(os.path.join(args.out, f"{tag}.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, f"{tag}.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    print(f"{'FAILED' if failed else 'ALL PASSED'}; written to {os.path.relpath(args.out, ROOT)}/{tag}.txt")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
