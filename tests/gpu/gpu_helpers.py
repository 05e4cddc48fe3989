"""Helpers of the tests in tests/gpu: skip marks, synthetic detectron2 batches, the mini
detector's config, and the two-process hook check (kept importable, not inside a test module,
so that spawned ranks can unpickle their worker)."""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import traceback

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MINI = os.path.join(ROOT, "projects", "faster_rcnn", "configs", "mini", "faster_rcnn_R18_FPN_shapes_agvm.yaml")
FULL = os.path.join(ROOT, "projects", "faster_rcnn", "configs", "b256_agvm.yaml")
ITERS, INTERVAL, PER_RANK = 6, 2, 2  # estimate iterations 0, 2, 4
RTOL = {"cpu": 1e-5, "cuda": 1e-3}  # GPU backward (atomics in RoIAlign) is not bit-reproducible

#: marks of a test that needs one GPU: ``pytestmark = CUDA`` or ``pytest.param(..., marks=CUDA)``
CUDA = [pytest.mark.cuda,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (torch.cuda.is_available() is False)")]


def gpus(n: int) -> list:
    """Marks of a test that needs ``n`` GPUs (one per rank)."""
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [pytest.mark.cuda,
            pytest.mark.skipif(visible < n, reason=f"needs {n} GPUs: {visible} GPU(s) visible")]


def synthetic_batch(seed: int, n: int, size, num_classes: int = 5):
    """``n`` random images of ``size`` (h, w) with two boxes each (detectron2's input format)."""
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


def mini_cfg(device: str, amp: bool, adam: bool = False):
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
def hook_worker(rank, world, port, backend, device, amp, out_path, adam=False):
    sys.path.insert(0, ROOT)
    import agvm  # noqa: F401  (first: detectron2 0.6 compatibility)
    import torch.distributed as dist
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage
    from torch.nn.parallel import DistributedDataParallel

    from agvm.core.modulator import GradientVarianceModulator
    from agvm.detectron2 import AGVMStepTrainer, build_agvm_optimizer
    from agvm.detectron2.defaults import install_agvm_hook
    from agvm.detectron2.resume import set_data_iterator
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
        cfg = mini_cfg(device, amp, adam)
        torch.manual_seed(0)
        model = build_model(cfg)
        model.to(dev)
        optimizer = build_agvm_optimizer(cfg, model)
        ddp = DistributedDataParallel(model, device_ids=[dev] if device == "cuda" else None)
        state = install_agvm_hook(ddp, optimizer)
        assert (state.precondition is not None) == adam, "PRECONDITION auto must precondition AdamW under DDP"
        batches = [synthetic_batch(1000 * it + rank, PER_RANK, (128, 128)) for it in range(ITERS)]
        scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 10) if amp else None  # few overflows
        step = AGVMStepTrainer(ddp, batches, optimizer, amp=amp, grad_scaler=scaler)
        step.hook_state = state
        step._write_metrics = lambda *a, **k: None  # detectron2's metric gather is not ours to test here
        set_data_iterator(step, iter(step.data_loader))
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
    """Run AGVM's DDP comm hook on the mini detector in ``world`` spawned ranks and compare every
    estimate's Φ and μ with the reference from the ranks' gathered local gradients.
    Returns ``(ok, detail, data)``."""
    import torch.multiprocessing as mp

    from agvm.runner import free_port

    with tempfile.TemporaryDirectory() as tmp:
        paths = [os.path.join(tmp, f"rank{r}.json") for r in range(world)]
        port = free_port()
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=hook_worker, args=(r, world, port, backend, device, amp, paths[r], adam))
                 for r in range(world)]
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
    detail = (f"{n_checks} estimates ({skipped} overflowed, skipped alike; mismatched: {mismatched or 'none'}), "
              f"max rel |Φ − Φ_ref| = {worst_phi:.1e}, max rel |μ − μ_ref| = {worst_mu:.1e} "
              f"(tolerance {rtol:g}), ranks bit-identical: {identical}, finite: {finite}, extra bytes/estimate: "
              f"{records[0]['checks'][-1]['bytes_extra'] if n_checks else 'n/a'}")
    return ok, detail, {}


def assert_check(result: tuple, record_property) -> None:
    """Record a check's detail (scripts/gpu_check.py's report shows it) and assert its verdict."""
    ok, detail, data = result
    record_property("detail", detail)
    for key, value in data.items():
        if key != "traceback":  # that one goes into the assertion message
            record_property(key, json.dumps(value, default=str))
    assert ok, detail + (f"\n{data['traceback']}" if "traceback" in data else "")
