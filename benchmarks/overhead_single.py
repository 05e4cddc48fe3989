#!/usr/bin/env python
"""Single-process AGVM overhead on the mini detector: time per iteration and extra peak memory.

Step flavours of the same model on the same pre-loaded batches, interleaved round-robin in
one process (so machine noise hits all alike), median over many iterations:

  plain          the bare SGD optimizer: detectron2's ordinary step
  ordinary       AGVM-wrapped SGD on a non-AGVM iteration (μ applied: lr scale / restore)
  agvm           an AGVM iteration on one process, GRAD_ACCUM_STEPS 1: two extra half-batch
                 passes (inside preserved_state) measure Φ, then the plain pass steps
  measure        the same with MEASURE_ONLY (μ stays 1): the baselines that log Φ
  plain_accum2   the bare optimizer, GRAD_ACCUM_STEPS 2
  agvm_accum2    an AGVM iteration with GRAD_ACCUM_STEPS 2: the halves are the two micro-batches
                 (no extra pass; a gradient copy and Φ)

Amortized overhead at interval τ = (t_estimate + (τ − 1)·t_ordinary) / (τ·t_plain) − 1 (against
plain_accum2 for agvm_accum2).
Peak memory: plain and agvm each run alone in a child process (peak RSS from getrusage); the
extra of "agvm" over "plain" is compared with the size of one copy of the gradients.

    python benchmarks/overhead_single.py [--iters 40] [--warmup 5] [--batch 8] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "projects", "faster_rcnn", "configs", "mini", "faster_rcnn_R18_FPN_shapes.yaml")
FLAVOURS = ("plain", "ordinary", "agvm", "measure", "plain_accum2", "agvm_accum2")


def build(batch: int, n_batches: int):
    import agvm  # noqa: F401
    import torch
    from detectron2.config import get_cfg

    from agvm.detectron2 import AGVMStepTrainer, AGVMTrainer, add_agvm_config, build_agvm_optimizer
    from agvm.data.register import register_shapes

    register_shapes()
    cfg = get_cfg()
    add_agvm_config(cfg)
    cfg.merge_from_file(CONFIG)
    cfg.merge_from_list(["SOLVER.IMS_PER_BATCH", str(batch), "DATALOADER.NUM_WORKERS", "0",
                         "SOLVER.AGVM.INTERVAL", "1", "SOLVER.AGVM.START_ITER", "0"])
    torch.manual_seed(0)
    model = AGVMTrainer.build_model(cfg)
    loader = iter(AGVMTrainer.build_train_loader(cfg))
    batches = [next(loader) for _ in range(n_batches)]
    cfg.defrost()
    cfg.SOLVER.AGVM.ENABLED = False
    plain_opt = build_agvm_optimizer(cfg, model)
    cfg.SOLVER.AGVM.ENABLED = True
    agvm_opt = build_agvm_optimizer(cfg, model)
    cfg.SOLVER.AGVM.MEASURE_ONLY = True
    measure_opt = build_agvm_optimizer(cfg, model)
    steps = {
        "plain": AGVMStepTrainer(model, batches, plain_opt),
        "ordinary": AGVMStepTrainer(model, batches, agvm_opt),
        "agvm": AGVMStepTrainer(model, batches, agvm_opt),
        "measure": AGVMStepTrainer(model, batches, measure_opt),
        "plain_accum2": AGVMStepTrainer(model, batches, plain_opt, accum_steps=2),
        "agvm_accum2": AGVMStepTrainer(model, batches, agvm_opt, accum_steps=2),
    }
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return steps, batches, grad_bytes


def run_one(step, batch_data, flavour: str, iteration: int) -> float:
    import torch

    from agvm.detectron2.resume import set_data_iterator

    step.data_loader = [batch_data]
    set_data_iterator(step, iter(step.data_loader))
    step.iter = iteration
    if flavour == "ordinary":
        step.optimizer.should_estimate = lambda it: False
    elif flavour in ("agvm", "measure", "agvm_accum2"):
        step.optimizer.should_estimate = lambda it: True
    torch.set_grad_enabled(True)
    t0 = time.perf_counter()
    step.run_step()
    return time.perf_counter() - t0


def timing(args) -> dict:
    from detectron2.utils.events import EventStorage

    steps, batches, grad_bytes = build(args.batch, args.n_batches)
    times = {f: [] for f in FLAVOURS}
    with EventStorage(0):
        for r in range(args.warmup + args.iters):
            k = r % len(FLAVOURS)
            order = FLAVOURS[k:] + FLAVOURS[:k]  # rotate who goes first
            for f in order:
                t = run_one(steps[f], batches[r % len(batches)], f, r)
                if r >= args.warmup:
                    times[f].append(t)
            if r % 10 == 0:
                print(f"  round {r + 1}/{args.warmup + args.iters}", flush=True)
    med = {f: statistics.median(v) for f, v in times.items()}
    return {"median_s": med, "grad_bytes": grad_bytes, "n": args.iters}


def memory_child(flavour: str, batch: int, iters: int) -> None:
    from detectron2.utils.events import EventStorage

    steps, batches, _ = build(batch, 2)
    with EventStorage(0):
        for i in range(iters):
            run_one(steps[flavour], batches[i % 2], flavour, i)
    print(json.dumps({"maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))


def memory(args) -> dict:
    out = {}
    for f in ("plain", "agvm"):
        res = subprocess.run(
            [sys.executable, __file__, "--memory-child", f, "--batch", str(args.batch)],
            capture_output=True, text=True, check=True,
        )
        out[f] = json.loads(res.stdout.strip().splitlines()[-1])["maxrss_kb"] * 1024
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=40, help="timed rounds (each runs all three flavours)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed rounds first")
    parser.add_argument("--batch", type=int, default=8, help="images per iteration (default 8, the mini config's)")
    parser.add_argument("--n-batches", type=int, default=8, help="distinct pre-loaded batches cycled through")
    parser.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results", "overhead_single.json"))
    parser.add_argument("--memory-child", choices=["plain", "agvm"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        memory_child(args.memory_child, args.batch, 6)
        return 0

    print(f"timing {args.iters} interleaved rounds (+{args.warmup} warm-up), batch {args.batch} ...", flush=True)
    t = timing(args)
    m = memory(args)
    med = t["median_s"]
    base = {"plain": "plain", "ordinary": "plain", "agvm": "plain", "measure": "plain",
            "plain_accum2": "plain_accum2", "agvm_accum2": "plain_accum2"}
    names = {"plain": "plain (bare SGD)", "ordinary": "AGVM ordinary iter", "agvm": "AGVM estimate iter",
             "measure": "MEASURE_ONLY estimate iter", "plain_accum2": "plain, GRAD_ACCUM_STEPS 2",
             "agvm_accum2": "AGVM estimate iter, GRAD_ACCUM_STEPS 2"}
    print("\n| step | median time / iter | vs its plain |")
    print("|---|---|---|")
    for f in FLAVOURS:
        print(f"| {names[f]} | {med[f] * 1000:.1f} ms | {(med[f] / med[base[f]] - 1) * 100:+.1f} % |")

    def amortize(estimate, ordinary, plain, tau):
        return (med[estimate] + (tau - 1) * med[ordinary]) / (tau * med[plain]) - 1

    amortized = {
        "agvm": {tau: amortize("agvm", "ordinary", "plain", tau) for tau in (5, 10, 20)},
        "measure": {tau: amortize("measure", "plain", "plain", tau) for tau in (5, 10, 20)},
        "agvm_accum2": {tau: amortize("agvm_accum2", "plain_accum2", "plain_accum2", tau) for tau in (5, 10, 20)},
    }
    print("\n| τ | AGVM, accum 1 | MEASURE_ONLY, accum 1 | AGVM, accum 2 |")
    print("|---|---|---|---|")
    for tau in (5, 10, 20):
        print(f"| {tau} | {amortized['agvm'][tau] * 100:+.2f} % | {amortized['measure'][tau] * 100:+.2f} % | "
              f"{amortized['agvm_accum2'][tau] * 100:+.2f} % |")
    extra = m["agvm"] - m["plain"]
    print("\n| peak RSS plain | peak RSS AGVM (every iter) | extra | one copy of the gradients |")
    print("|---|---|---|---|")
    print(f"| {m['plain'] / 2**20:.1f} MiB | {m['agvm'] / 2**20:.1f} MiB | {extra / 2**20:+.1f} MiB | {t['grad_bytes'] / 2**20:.1f} MiB |")
    record = {
        "command": "python " + " ".join([os.path.relpath(__file__, ROOT)] + (argv if argv is not None else sys.argv[1:])),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "median_s": med, "amortized_overhead": amortized, "peak_rss_bytes": m,
        "grad_bytes": t["grad_bytes"], "iters": args.iters, "batch": args.batch,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(record, f, indent=2)
    print(f"\nrecorded in {os.path.relpath(args.json, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
