#!/usr/bin/env python
"""Φ per module of the mini ViT detector with μ = 1 (AGVM MEASURE_ONLY) at two batch sizes.

Does the misalignment the paper reports for CNN detectors — the heads' gradient variance Φ far
from the backbone's, more so at large batch — also appear with a ViT backbone? The mini ViTDet-
style Mask R-CNN (``configs/mini_mask_rcnn_vit_shapes.py``: a 4-block, 64-wide ViT, simple
feature pyramid, AdamW with layer decay, shapes data at 128 px, from random initialisation) is
trained through the LazyConfig path at each batch with AGVM measuring only: μ stays 1 (plain
AdamW) and Φ = 1 − cos(G₁, G₂) of each module's two half-batch gradients (Adam-preconditioned,
``precondition`` "auto") is logged at every iteration. The halves are the two micro-batches of
``train.grad_accum_steps=2`` (no extra pass). LR 4e-4 at batch 8, square-root rule at other
batches, linear warm-up over the first ``--warmup`` iterations, then constant; no evaluation.

    python projects/vitdet/phi_experiment.py                    # batches 8 and 32, then the report
    python projects/vitdet/phi_experiment.py --dry-run          # the training commands, nothing run
    python projects/vitdet/phi_experiment.py --report-only      # the report from results/vitdet_phi/runs
    python projects/vitdet/phi_experiment.py --iters 2 --results output/vitdet_phi_smoke   # smoke run

Runs go to ``<output-root>/b<batch>`` (default ``output/vitdet_phi``) through
``agvm.runner.execute`` (one at a time, ``--threads`` CPU threads each), their small records to
``<results>/runs/b<batch>`` (reused when their config is unchanged, unless ``--rerun``); then
``<results>/README.md`` (mean Φ per module per batch, Φ_module/Φ_backbone, over the estimates
after the warm-up) and ``<results>/phi.png`` (Φ against iterations) are written from those
records alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shlex
import sys
from typing import Dict, List, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CONFIG = "projects/vitdet/configs/mini_mask_rcnn_vit_shapes.py"
TRAIN_NET = "projects/vitdet/train_net.py"
REFERENCE = (8, 4e-4)  # (batch, AdamW lr) of the mini config
MODULES = ("backbone", "neck", "rpn", "box_head", "mask_head")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[8, 32], help="global batch sizes (images); default 8 32")
    p.add_argument("--iters", type=int, default=60, help="iterations per run; default 60")
    p.add_argument("--warmup", type=int, default=15, help="linear warm-up iterations; default 15")
    p.add_argument("--threads", type=int, default=1, help="CPU threads of each run; default 1")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing, write nothing")
    p.add_argument("--report-only", action="store_true", help="run nothing; write the report from <results>/runs")
    p.add_argument("--rerun", action="store_true", help="run again what is already recorded")
    p.add_argument("--output-root", default="output/vitdet_phi", help="runs go to <root>/b<batch>; default output/vitdet_phi")
    p.add_argument("--results", default="results/vitdet_phi", help="README.md, phi.png and runs/; default results/vitdet_phi")
    p.add_argument("--python", default=sys.executable, help="interpreter of the training runs; default this one")
    args = p.parse_args(argv)
    if any(b < 2 or b % 2 for b in args.batches) or len(set(args.batches)) != len(args.batches):
        p.error(f"--batches must be distinct even numbers ≥ 2 (two micro-batches each), got {args.batches}")
    if args.iters < 1 or not (0 <= args.warmup < args.iters):
        p.error(f"need --iters ≥ 1 and 0 ≤ --warmup < --iters, got {args.iters}, {args.warmup}")
    return args


def overrides(batch: int, iters: int, warmup: int) -> List[str]:
    """The LazyConfig ``key=value`` overrides of the run at ``batch``."""
    lr = REFERENCE[1] * math.sqrt(batch / REFERENCE[0])
    return [
        f"dataloader.train.total_batch_size={batch}", "train.grad_accum_steps=2", f"train.max_iter={iters}",
        f"optimizer.lr={lr:.6g}", "optimizer.agvm.measure_only=True", "optimizer.agvm.start_iter=0",
        "optimizer.agvm.interval=1", f"optimizer.warmup_iters={warmup}",
        f"lr_multiplier.warmup_length={warmup / iters!r}", "lr_multiplier.scheduler.values=[1.0,1.0,1.0]",
        "train.log_period=1", "train.eval_period=0", "dataloader.evaluator=null",
        "train.checkpointer.period=1000000", "train.seed=0",
    ]


def _fingerprint(opts: Sequence[str]) -> str:
    """sha256 of the config, the project's package and the overrides (a changed one reruns)."""
    h = hashlib.sha256()
    files = [os.path.join(ROOT, CONFIG)] + sorted(
        os.path.join(HERE, "vitdet", n) for n in os.listdir(os.path.join(HERE, "vitdet")) if n.endswith(".py"))
    for path in files:
        h.update(os.path.basename(path).encode() + b"\0" + open(path, "rb").read() + b"\0")
    h.update(json.dumps(list(opts)).encode())
    return h.hexdigest()


def plan(args) -> list:
    from agvm.runner import Run

    @dataclasses.dataclass
    class LazyRun(Run):
        """A run of the LazyConfig entry point: the output folder as ``train.output_dir=``."""

        @property
        def command(self) -> List[str]:
            return [*self.launcher, self.python, self.train_net, "--config-file", self.config, *self.flags,
                    f"train.output_dir={self.out}", *self.opts]

    runs = []
    for batch in args.batches:
        opts = overrides(batch, args.iters, args.warmup)
        run = LazyRun(name=f"b{batch}", config=CONFIG, out=os.path.join(args.output_root, f"b{batch}"),
                      train_net=TRAIN_NET, opts=opts, python=args.python, cwd=ROOT,
                      records=os.path.join(args.results, "runs", f"b{batch}"), fingerprint=_fingerprint(opts),
                      info={"batch": batch, "iters": args.iters, "warmup": args.warmup, "threads": args.threads})
        run.line = " ".join(shlex.quote(c) for c in [os.path.relpath(run.python, ROOT) if run.python.startswith(ROOT)
                                                     else "python", *run.command[1:]])
        runs.append(run)
    return runs


def check_runs(runs) -> None:
    """Load each run's config with its overrides and apply the trainer's checks (one process)."""
    sys.path.insert(0, HERE)
    import agvm  # noqa: F401
    from agvm.detectron2.lazy_train import load_lazy_config, validate_lazy_config

    for run in runs:
        cfg = load_lazy_config(os.path.join(ROOT, run.config), [*run.opts, f"train.output_dir={run.out}"])
        validate_lazy_config(cfg, world_size=1)


# ------------------------------------------------------------------------------ report

def _records(results: str) -> Dict[int, dict]:
    from agvm.results import read_metrics

    out = {}
    runs = os.path.join(results, "runs")
    for name in sorted(os.listdir(runs)) if os.path.isdir(runs) else []:
        path = os.path.join(runs, name)
        try:
            info = json.load(open(os.path.join(path, "agvm_run.json")))
        except (OSError, ValueError):
            continue
        if info.get("returncode") == 0:
            out[int(info["batch"])] = dict(info=info, metrics=read_metrics(path))
    return dict(sorted(out.items()))


def mean_phi(metrics, first: int) -> Dict[str, float]:
    """Per module, the mean finite Φ over the estimates at iterations ≥ ``first``."""
    from agvm.results import curves

    out = {}
    for module, (its, values) in curves(metrics, "phi").items():
        vals = [v for i, v in zip(its, values) if i >= first and math.isfinite(v)]
        out[module] = sum(vals) / len(vals) if vals else float("nan")
    return out


def write_report(results: str) -> str:
    runs = _records(results)
    if not runs:
        raise SystemExit(f"phi_experiment.py: no finished run recorded in {results}/runs")
    means = {b: mean_phi(r["metrics"], r["info"]["warmup"]) for b, r in runs.items()}
    batches = list(runs)
    info0 = runs[batches[0]]["info"]
    lines = [
        "# Φ per module of the mini ViT detector, μ = 1",
        "",
        "Generated by `projects/vitdet/phi_experiment.py` from the run records in `runs/` (do not edit).",
        "",
        "The mini ViTDet-style Mask R-CNN (`projects/vitdet/configs/mini_mask_rcnn_vit_shapes.py`: 4-block, "
        "64-wide ViT/16, simple feature pyramid, Mask R-CNN heads; shapes data at 128 px; random initialisation) "
        "trained with AdamW and AGVM in MEASURE_ONLY mode (μ = 1: plain AdamW), Φ = 1 − cos(G₁, G₂) per module "
        "on Adam-preconditioned half-batch gradients (the two micro-batches of `train.grad_accum_steps=2`) at "
        "every iteration. Mean over the estimates from the end of the warm-up on.",
        "",
        "Command:",
        "",
        "```bash",
        f"python projects/vitdet/phi_experiment.py --batches {' '.join(map(str, batches))} --iters {info0['iters']} "
        f"--warmup {info0['warmup']} --threads {info0['threads']}",
        "```",
        "",
        "| batch | iterations | warm-up | lr | wall time | machine |",
        "|---|---|---|---|---|---|",
    ]
    for b, r in runs.items():
        info = r["info"]
        lr = REFERENCE[1] * math.sqrt(b / REFERENCE[0])
        lines.append(f"| {b} | {info['iters']} | {info['warmup']} | {lr:.3g} | {info.get('wall_s', 0) / 60:.1f} min "
                     f"({info['threads']} thread) | {info.get('machine', '?')} |")
    lines += ["", "Per run: `" + "`, `".join(r["info"]["command"] for r in runs.values()) + "`", ""]
    head = "| module | " + " | ".join(f"Φ b{b}" for b in batches) + " | " + \
        " | ".join(f"Φ/Φ_backbone b{b}" for b in batches) + " |"
    lines += [head, "|---" * (1 + 2 * len(batches)) + "|"]
    for m in MODULES:
        phis = [means[b].get(m, float("nan")) for b in batches]
        ratios = [means[b].get(m, float("nan")) / means[b].get("backbone", float("nan")) for b in batches]
        lines.append(f"| {m} | " + " | ".join(f"{v:.4f}" for v in phis) + " | " +
                     " | ".join(f"{v:.2f}" for v in ratios) + " |")
    lines += ["", "![Φ per module against iterations](phi.png)", "",
              "A few dozen iterations from random initialisation on CPU: early training only, one seed; "
              "the paper's Figure 1 covers whole runs of pretrained CNN detectors.", ""]
    path = os.path.join(results, "README.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    _plot(runs, os.path.join(results, "phi.png"))
    return path


def _plot(runs, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from agvm.plots import plot_runs

    fig = plot_runs({f"batch {b}": r["metrics"] for b, r in runs.items()}, "phi", ncols=len(runs),
                    title="mini ViT Mask R-CNN, μ = 1: Φ per module")
    fig.savefig(path, dpi=100, metadata={"Software": None})


def main(argv=None) -> int:
    args = parse_args(argv)
    results = os.path.join(ROOT, args.results)
    if not args.report_only:
        from agvm.runner import execute

        runs = plan(args)
        try:
            check_runs(runs)
        except ValueError as e:
            print(f"phi_experiment.py: error: {e}", file=sys.stderr)
            return 2
        done = execute(runs, 1, dry_run=args.dry_run, rerun=args.rerun, threads=args.threads)
        if args.dry_run:
            return 0
        failed = [r.run.name for r in done if (r.record or {}).get("returncode") != 0]
        if failed:
            print(f"FAILED runs: {', '.join(failed)} (see their stdout.log)", file=sys.stderr)
            return 1
    print(f"wrote {write_report(results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
