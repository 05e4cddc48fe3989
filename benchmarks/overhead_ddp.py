#!/usr/bin/env python
"""Multi-process AGVM overhead on CPU (gloo): plain DDP vs agvm's comm hook vs the reference
release's communication, interleaved in the same processes.

For each world size and model, every rank holds three copies of the model:

  plain      DDP without a hook: the baseline (also every strategy's ordinary iteration)
  hook       DDP with agvm's comm hook (agvm.distributed): on an AGVM iteration one extra
             half-group all-reduce per bucket and a tiny all-reduce of per-module sums
  hook_adam  the comm hook measuring Φ on Adam-preconditioned half means (AdamW): the same
             collectives as hook (the other half's mean derived from the world mean), plus the
             float32 preconditioning of each rank's share (1/W of every parameter's elements),
             block by block in cache-sized scratch
  reference  the authors' release re-implemented from its description (agvm-spec §4): backward
             without DDP sync, then a per-parameter all-reduce inside each half, an all-gather
             of the whole flattened gradient between two ranks (one per half), a full
             all-reduce, and a broadcast of the result

The flavours run round-robin on the same pre-loaded batches; times are medians over the timed
rounds of rank 0. Amortized overhead at τ = (t_agvm + (τ − 1)·t_ordinary) / (τ·t_plain) − 1, with
t_ordinary the strategy's own ordinary iteration. Bytes are the payloads each rank hands to
collectives per iteration (G = one copy of the gradients in float32). Peak memory: the rise of
rank 0's peak RSS during each strategy's first AGVM iteration (RSS is coarse: a rise of 0 means
the extra fit in memory the process had already touched).

    python benchmarks/overhead_ddp.py [--worlds 2 4] [--models mini r50] [--iters 4] [--json PATH]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from agvm.runner import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MINI = os.path.join(ROOT, "projects", "faster_rcnn", "configs", "mini", "faster_rcnn_R18_FPN_shapes.yaml")
FLAVOURS = ("plain", "hook_ordinary", "hook_agvm", "hook_adam_agvm", "reference_agvm")




def _build(model_name, per_rank):
    import agvm  # noqa: F401
    from detectron2.config import get_cfg

    from agvm.data.register import register_shapes
    from agvm.detectron2 import AGVMTrainer, add_agvm_config, group_parameters

    register_shapes()
    cfg = get_cfg()
    add_agvm_config(cfg)
    cfg.merge_from_file(MINI)
    cfg.merge_from_list(["SOLVER.IMS_PER_BATCH", str(per_rank * dist.get_world_size()), "DATALOADER.NUM_WORKERS", "0"])
    if model_name == "r50":  # a detectron2 R50-FPN Faster R-CNN (41 M parameters) on the small images
        cfg.merge_from_list([
            "MODEL.RESNETS.DEPTH", "50", "MODEL.RESNETS.RES2_OUT_CHANNELS", "256", "MODEL.FPN.OUT_CHANNELS", "256",
            "MODEL.ROI_BOX_HEAD.FC_DIM", "1024", "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
        ])
    torch.manual_seed(0)
    model = AGVMTrainer.build_model(cfg)
    loader = iter(AGVMTrainer.build_train_loader(cfg))
    batches = [next(loader) for _ in range(2)]
    modules = group_parameters(model)
    return model, batches, modules


def _reference_agvm_step(model, data, group_own, group_pair, in_pair):
    with model.no_sync():
        losses = model(data)
        sum(losses.values()).backward()
    params = [p for p in model.parameters() if p.grad is not None]
    n_own = dist.get_world_size(group_own)
    for p in params:  # per-parameter all-reduce inside the half
        dist.all_reduce(p.grad, group=group_own)
        p.grad.div_(n_own)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    gathered = None
    if in_pair:  # the whole flattened gradient between one rank of each half
        gathered = [torch.empty_like(flat) for _ in range(2)]
        dist.all_gather(gathered, flat, group=group_pair)
        cos = torch.nn.functional.cosine_similarity(gathered[0], gathered[1], dim=0)
        result = torch.tensor([1.0 - float(cos)])
    else:
        result = torch.zeros(1)
    dist.all_reduce(flat)  # the full all-reduce
    flat.div_(dist.get_world_size())
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n
    dist.broadcast(result, src=0)
    return flat.numel() * 4


def worker(rank, world, port, model_name, iters, warmup, per_rank, out_path):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from agvm.distributed import AGVMHookState, agvm_comm_hook, half_sizes

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    base, batches, modules = _build(model_name, per_rank)
    copies = {name: copy.deepcopy(base) for name in ("plain", "hook", "hook_adam", "reference")}
    ddp = {name: DDP(m, broadcast_buffers=False) for name, m in copies.items()}
    module_of = {}
    for name, ps in modules.items():
        ids = {id(p) for p in ps}
        for p_base, p_hook in zip(base.parameters(), copies["hook"].parameters()):
            if id(p_base) in ids:
                module_of[p_hook] = name
    state = AGVMHookState(module_of, list(modules))
    ddp["hook"].register_comm_hook(state, agvm_comm_hook)
    # AdamW + AGVM with one optimizer step taken, so the preconditioner has a second moment
    from agvm.core.optim import AGVM

    adam_params = list(copies["hook_adam"].parameters())
    tags = {id(p): m for p, m in module_of.items()}
    adam_groups = {}
    for p_hook, p_adam in zip(copies["hook"].parameters(), adam_params):
        if id(p_hook) in tags:
            adam_groups.setdefault(tags[id(p_hook)], []).append(p_adam)
    adam = AGVM(torch.optim.AdamW([{"params": ps, "agvm_module": m} for m, ps in adam_groups.items()], lr=1e-4))
    adam_module_of = {p: m for m, ps in adam_groups.items() for p in ps}
    state_adam = AGVMHookState(adam_module_of, list(modules), precondition=adam.preconditioner())
    ddp["hook_adam"].register_comm_hook(state_adam, agvm_comm_hook)
    n_a, _ = half_sizes(world)
    group_a, group_b = dist.new_group(list(range(n_a))), dist.new_group(list(range(n_a, world)))
    group_pair = dist.new_group([0, n_a])
    group_own = group_a if rank < n_a else group_b
    grad_bytes = sum(p.numel() * 4 for p in base.parameters() if p.requires_grad)

    def step(flavour, data):
        model = ddp["plain" if flavour == "plain" else "hook_adam" if flavour == "hook_adam_agvm"
                    else ("hook" if flavour.startswith("hook") else "reference")]
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        if flavour == "reference_agvm":
            _reference_agvm_step(model, data, group_own, group_pair, rank in (0, n_a))
        elif flavour == "hook_adam_agvm":
            state_adam.estimate = True
            losses = model(data)
            sum(losses.values()).backward()
            state_adam.finish()
        else:
            state.estimate = flavour == "hook_agvm"
            losses = model(data)
            sum(losses.values()).backward()
            if flavour == "hook_agvm":
                state.finish()
        dist.barrier()
        return time.perf_counter() - t0

    from detectron2.utils.events import EventStorage

    times = {f: [] for f in FLAVOURS}
    rss_rise = {}
    with EventStorage(0):
        losses = ddp["hook_adam"](batches[0])  # one AdamW step: a second moment to precondition with
        sum(losses.values()).backward()
        adam.step()
        for r in range(warmup + iters):
            order = FLAVOURS[r % len(FLAVOURS):] + FLAVOURS[:r % len(FLAVOURS)]
            for f in order:
                before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                t = step(f, batches[r % len(batches)])
                if f not in rss_rise:
                    rss_rise[f] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
                if r >= warmup:
                    times[f].append(t)
    if rank == 0:
        with open(out_path, "w") as fh:
            json.dump({"median_s": {f: statistics.median(v) for f, v in times.items()}, "grad_bytes": grad_bytes,
                       "rss_rise_bytes": rss_rise, "hook_extra_bytes": state.last_bytes_extra,
                       "hook_adam_extra_bytes": state_adam.last_bytes_extra}, fh)
    dist.barrier()
    dist.destroy_process_group()


def report(rec) -> dict:
    """Print the table of one (model, world) record and return its summary."""
    med, g, world = rec["median_s"], rec["grad_bytes"], rec["world"]
    n_a = world // 2
    ref_half = g if n_a > 1 else 0  # rank 0's half-group payload in the reference strategy
    strategies = {
        "plain DDP": (med["plain"], med["plain"], g, 0),
        "agvm hook": (med["hook_agvm"], med["hook_ordinary"], g + rec["hook_extra_bytes"], rec["rss_rise_bytes"]["hook_agvm"]),
        "agvm hook, AdamW preconditioned": (med["hook_adam_agvm"], med["hook_ordinary"], g + rec["hook_adam_extra_bytes"],
                                            rec["rss_rise_bytes"]["hook_adam_agvm"]),
        "reference": (med["reference_agvm"], med["plain"], ref_half + 2 * g, rec["rss_rise_bytes"]["reference_agvm"]),
    }
    table = {}
    print(f"\n{rec['model']}, world {world}, gradients {g / 2**20:.1f} MiB (G)")
    print("| strategy | AGVM iter | ordinary iter | overhead τ=5 | overhead τ=10 | bytes / AGVM iter (extra) | peak RSS rise |")
    print("|---|---|---|---|---|---|---|")
    for name, (t_agvm, t_ord, nbytes, rss) in strategies.items():
        amort = {tau: (t_agvm + (tau - 1) * t_ord) / (tau * med["plain"]) - 1 for tau in (5, 10)}
        table[name] = {"agvm_s": t_agvm, "ordinary_s": t_ord, "amortized": amort, "bytes": nbytes, "rss_rise": rss}
        print(f"| {name} | {t_agvm * 1000:.0f} ms | {t_ord * 1000:.0f} ms | {amort[5] * 100:+.2f} % | "
              f"{amort[10] * 100:+.2f} % | {nbytes / 2**20:.0f} MiB ({(nbytes - g) / 2**20:+.0f}) | {rss / 2**20:+.0f} MiB |")
    extra_adam = med["hook_adam_agvm"] - med["plain"]
    print(f"extra time of a preconditioned AGVM iteration: {extra_adam * 1000:+.0f} ms "
          f"({extra_adam / med['plain'] / 10 * 100:+.2f} % amortized at τ=10)", flush=True)
    extra_hook = med["hook_agvm"] - med["plain"]
    extra_ref = med["reference_agvm"] - med["plain"]
    ratio = extra_ref / extra_hook if extra_hook > 0 else float("inf")
    print(f"extra time of an AGVM iteration: hook {extra_hook * 1000:+.0f} ms ({extra_hook / med['plain'] / 10 * 100:+.2f} % "
          f"amortized at τ=10 with ordinary iterations = plain), reference {extra_ref * 1000:+.0f} ms "
          f"(reference / hook = {ratio:.1f}x)", flush=True)
    return {"table": table, "extra_ratio": ratio}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--models", nargs="+", default=["mini", "r50"], choices=["mini", "r50"])
    parser.add_argument("--iters", type=int, default=4, help="timed rounds (each runs all five flavours)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--per-rank", type=int, default=2, help="images per rank and iteration")
    parser.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results", "overhead_ddp.json"))
    parser.add_argument("--report", action="store_true", help="only print the tables of the recorded --json")
    args = parser.parse_args(argv)
    if args.report:
        with open(args.json) as fh:
            saved = json.load(fh)
        print(f"{saved['command']}  ({saved['machine']}, {saved['date']})")
        for rec in saved["records"]:
            report(rec)
        return 0
    records = []
    for model_name in args.models:
        for world in args.worlds:
            print(f"== {model_name}, world {world}: {args.iters} rounds (+{args.warmup} warm-up) ...", flush=True)
            with tempfile.TemporaryDirectory() as tmp:
                out = os.path.join(tmp, "r.json")
                mp.start_processes(worker, nprocs=world, start_method="spawn",
                                   args=(world, free_port(), model_name, args.iters, args.warmup, args.per_rank, out))
                with open(out) as fh:
                    res = json.load(fh)
            rec = {"model": model_name, "world": world, "grad_MiB": res["grad_bytes"] / 2**20, **res}
            rec.update(report(rec))
            records.append(rec)
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump({"command": "python benchmarks/overhead_ddp.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                   "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, torch {torch.__version__}",
                   "date": time.strftime("%Y-%m-%d %H:%M"), "records": records}, fh, indent=2)
    print(f"recorded in {os.path.relpath(args.json, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
