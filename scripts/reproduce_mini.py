#!/usr/bin/env python
"""The scaled-down reproduction (``make reproduce-mini``): the paper's claims tested where we can run.

Everything starts from the pretrained mini backbone (``agvm-pretrained://shapes_r18``; FPN and
heads fresh, the paper's regime) on the embedded shapes dataset, mini Faster R-CNN (R-18-FPN,
128 px). Three experiments on one runner (``agvm.runner.execute``: 2 runs at a time by default,
each with its share of the threads, a progress line per finished run with an ETA; a run that
finished or diverged is reused unless its config changed, so the command resumes): 1 and 2 one
plan, 3 its project's own script after them:

1. **Same-epoch batch scaling with seeds.** Batches ``--batches`` (default 4, 8, 16, 32, 64: a
   16× span) at the same ``--epochs``; at each batch above the smallest: MegDet (SGD, the linear
   LR rule from (8 images, 0.02), linear warm-up), AGVM (the square-root rule from the same
   point, clip window, α = 0.97) and AGVM's μ = 1 twin (same LR, warm-up, clipping; Φ logged);
   at the smallest, MegDet only (the small-batch reference). ``--seeds`` seeds each (default 3).
   Warm-up: ``--warmup-images`` images; τ: ``--tau`` (default 2) iterations.
2. **α × τ at the largest batch**: α in ``--grid-alpha`` (0, 0.9, 0.97) × τ in ``--grid-tau``
   (2, 10), seed 0 (the paper: α = 0 diverges).
3. **The effective-batch experiment** (``projects/effective_batch``'s four RetinaNet variants in
   MEASURE_ONLY mode), at ``--scale cpu``: ``projects/effective_batch/run_experiment.py --jobs N``
   (``--dry-run`` passed on) runs in a child process after the plan of 1 and 2 (its configs are
   checked with the others, before anything starts; a finished variant is reused, as there); its
   runs go to output/effective_batch, its report to results/effective_batch.

Settings are chosen once for all methods before the comparison (module docstring and
``--help`` defaults), not tuned per method on the validation set. The report,
``results/mini/README.md``, has mean ± std over seeds with divergences counted per seed, the α × τ
table, Φ per module, the figures, the machine, the times and the exact commands; every number in
it is computed from the runs in ``--output-root`` by this script.

``--scale gpu``: the same experiments at batches up to 1024 on one GPU (MODEL.DEVICE cuda, more
epochs; ``--dry-run`` prints the plan without a GPU).

    python scripts/reproduce_mini.py [--jobs 2] [--dry-run] [--scale cpu|gpu] [--seeds 0 1 2] ...
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from agvm import runner
from agvm.results import cell_result, curves, read_metrics, read_run
from agvm.runner import REPO_ROOT as ROOT
from agvm.runner import machine

TRAIN_NET = "projects/faster_rcnn/train_net.py"
#: experiment 3, run as a script (in a child process: the project's code stays in the project)
EFFECTIVE_BATCH = "projects/effective_batch/run_experiment.py"
CONFIGS = "projects/faster_rcnn/configs/mini/pretrained"
#: method -> config (relative to the repository root); the plan sets batch, schedule, LR point, τ
METHOD_CONFIGS = {"megdet": f"{CONFIGS}/megdet.yaml", "agvm": f"{CONFIGS}/b32_agvm.yaml", "twin": f"{CONFIGS}/b32_twin.yaml"}
METHOD_LABELS = {"megdet": "MegDet (linear LR)", "twin": "μ = 1 twin (sqrt LR)", "agvm": "AGVM (sqrt LR)"}
SCALES = {
    # batches, epochs, warm-up images, seeds, shapes train images, extra options. The gpu tier is
    # sized by estimate (not yet run): 8 runs of ≤ 1 min on one H100 with 4 at a time.
    "cpu": dict(batches=(4, 8, 16, 32, 64), epochs=1.0, warmup_images=192, seeds=(0, 1, 2), train_images=1000,
                grid_alpha=(0.0, 0.9, 0.97), grid_tau=(2, 10), jobs=2, opts=()),
    "gpu": dict(batches=(64, 256, 1024), epochs=4.0, warmup_images=2048, seeds=(0,), train_images=8192,
                grid_alpha=(0.0,), grid_tau=(2,), jobs=4,
                opts=("MODEL.DEVICE", "cuda", "DATALOADER.NUM_WORKERS", "3")),
}


@dataclass
class Run:
    """One training run of the plan, as the report sees it (:func:`job`: the run itself)."""

    name: str  # output folder name
    experiment: str  # "scaling" or "alpha_tau" (experiment 3 runs apart: :func:`effective_batch`)
    method: str
    batch: int
    seed: int
    config: str
    opts: List[str] = field(default_factory=list)
    alpha: Optional[float] = None
    tau: Optional[int] = None


def schedule_opts(batch: int, epochs: float, warmup_images: int, tau: int, train_images: int = 1000) -> List[str]:
    """Batch, iterations (``epochs`` of the train split), LR decay at 3/4 and 7/8, warm-up of
    ``warmup_images`` images, the first AGVM estimate at its end, the clip window warm-up ± warm-up."""
    iters = max(4, int(math.ceil(epochs * train_images / batch)))
    warm = max(1, min(iters // 4, int(round(warmup_images / batch))))
    steps = (int(round(iters * 3 / 4)), int(round(iters * 7 / 8)))
    # two micro-batches per iteration: AGVM's two half-batch gradients come for free (no extra
    # pass on one process); every method runs so, the comparison stays like for like
    return ["SOLVER.IMS_PER_BATCH", str(batch), "SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", str(steps),
            "SOLVER.WARMUP_ITERS", str(warm), "SOLVER.AGVM.START_ITER", str(warm), "SOLVER.AGVM.INTERVAL", str(tau),
            "SOLVER.GRAD_ACCUM_STEPS", "2"]


def plan(args) -> List[Run]:
    """Every run of the three experiments, in launch order."""
    runs: List[Run] = []
    smallest, largest = min(args.batches), max(args.batches)
    for batch in args.batches:
        methods = ["megdet"] if batch == smallest else ["megdet", "twin", "agvm"]
        for method in methods:
            for seed in args.seeds:
                opts = schedule_opts(batch, args.epochs, args.warmup_images, args.tau, args.train_images) + ["SEED", str(seed)]
                if method != "megdet":
                    warm = opts[opts.index("SOLVER.WARMUP_ITERS") + 1]
                    opts += ["SOLVER.CLIP_GRADIENTS.ITER_RANGE", f"(0, {2 * int(warm)})"]
                runs.append(Run(f"scaling/b{batch}_{method}_s{seed}", "scaling", method, batch, seed,
                                METHOD_CONFIGS[method], opts))
    for alpha in args.grid_alpha:
        for tau in args.grid_tau:
            opts = schedule_opts(largest, args.epochs, args.warmup_images, tau, args.train_images) + ["SEED", "0"]
            warm = opts[opts.index("SOLVER.WARMUP_ITERS") + 1]
            opts += ["SOLVER.CLIP_GRADIENTS.ITER_RANGE", f"(0, {2 * int(warm)})", "SOLVER.AGVM.MOMENTUM", str(alpha)]
            runs.append(Run(f"alpha_tau/b{largest}_a{alpha:g}_t{tau}", "alpha_tau", "agvm", largest, 0,
                            METHOD_CONFIGS["agvm"], opts, alpha=alpha, tau=tau))
    for r in runs:
        r.opts += list(SCALES[args.scale]["opts"]) + list(args.opts)
    return runs


def job(run: Run, output_root: str) -> runner.Run:
    """What ``agvm.runner.execute`` runs for ``run``: ``train_net.py`` into ``<output_root>/<name>``."""
    return runner.Run(run.name, run.config, os.path.join(output_root, run.name), TRAIN_NET, opts=list(run.opts), meta=run)


def check_plan(runs: Sequence[Run]) -> None:
    """Every run's config is built and checked before anything starts (ValueError naming the
    run, key and value)."""
    from agvm.detectron2.checks import check_run_config

    for r in runs:
        check_run_config(os.path.join(ROOT, r.config), r.opts, 1, what=f"run {r.name}: ")


def _mean_std(values: Sequence[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def outcome(out: str) -> Tuple[str, Optional[float]]:
    """("ok", AP) / ("diverged", None) (a non-finite loss stopped it) / (status, None)."""
    res = cell_result(out, ("bbox", "AP"))
    if res["status"] == "ok":
        return "ok", res["measured"]
    log = os.path.join(out, "stdout.log")
    text = open(log, errors="replace").read() if os.path.exists(log) else ""
    if "FloatingPointError" in text or "non-finite" in text:
        return "diverged", None
    return res["status"], None


def run_lr(out: str) -> Optional[float]:
    """The base LR a run trained with (its config.yaml, LR scaling rule applied), or None."""
    import yaml

    try:
        with open(os.path.join(out, "config.yaml")) as f:
            return float(yaml.safe_load(f)["SOLVER"]["BASE_LR"])
    except (OSError, KeyError, TypeError, ValueError):
        return None


def scaling_table(runs: Sequence[Run], root: str) -> str:
    """batch × method: box AP mean ± std over the seeds that finished, and diverged / seeds."""
    rows = ["| batch | method | box AP (mean ± std over seeds) | diverged | seeds | iterations | LR |", "|---|---|---|---|---|---|---|"]
    groups: Dict[Tuple[int, str], List[Run]] = {}
    for r in runs:
        if r.experiment == "scaling":
            groups.setdefault((r.batch, r.method), []).append(r)
    order = list(METHOD_LABELS)
    for (batch, method), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], order.index(kv[0][1]))):
        results = [outcome(os.path.join(root, r.name)) for r in rs]
        aps = [ap for status, ap in results if status == "ok"]
        diverged = sum(status == "diverged" for status, _ in results)
        iters = rs[0].opts[rs[0].opts.index("SOLVER.MAX_ITER") + 1]
        lr = run_lr(os.path.join(root, rs[0].name))
        rows.append(f"| {batch} | {METHOD_LABELS[method]} | {_mean_std(aps)} | {diverged}/{len(rs)} | "
                    f"{len(aps)} finished | {iters} | {'—' if lr is None else f'{lr:.3g}'} |")
    return "\n".join(rows) + "\n"


def alpha_tau_table(runs: Sequence[Run], root: str) -> str:
    rows = ["| α | τ | box AP | outcome |", "|---|---|---|---|"]
    for r in runs:
        if r.experiment == "alpha_tau":
            status, ap = outcome(os.path.join(root, r.name))
            rows.append(f"| {r.alpha:g} | {r.tau} | {'—' if ap is None else f'{ap:.2f}'} | {status} |")
    return "\n".join(rows) + "\n"


def phi_table(runs: Sequence[Run], root: str) -> str:
    """Mean Φ per module (over its finite estimates) of the μ = 1 runs (MegDet, twin) per batch,
    first seed: the misalignment."""
    rows = []
    modules: List[str] = []
    for r in runs:
        if r.experiment == "scaling" and r.method in ("megdet", "twin") and r.seed == min(x.seed for x in runs):
            phi = curves(read_metrics(os.path.join(root, r.name)), "phi")
            modules = modules or list(phi)
            if phi:
                finite = {m: [v for v in phi.get(m, ([], []))[1] if math.isfinite(v)] for m in modules}
                means = [statistics.mean(finite[m]) if finite[m] else float("nan") for m in modules]
                ratio = [means[0] / x if x > 0 else float("nan") for x in means]
                rows.append(f"| {r.batch} | {METHOD_LABELS[r.method]} | " + " | ".join(f"{m:.3f}" for m in means)
                            + f" | {min(ratio[1:]) if len(ratio) > 1 else float('nan'):.2f}–"
                            f"{max(ratio[1:]) if len(ratio) > 1 else float('nan'):.2f} |")
    head = "| batch | run | " + " | ".join(modules) + " | Φ_backbone / Φ_module (range) |"
    return "\n".join([head, "|" + "---|" * (len(modules) + 3)] + rows) + "\n"


def plot_scaling(runs: Sequence[Run], root: str, path: str) -> Optional[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, label in METHOD_LABELS.items():
        xs, ys, es = [], [], []
        for batch in sorted({r.batch for r in runs}):
            aps = [ap for r in runs if r.experiment == "scaling" and r.method == method and r.batch == batch
                   for status, ap in [outcome(os.path.join(root, r.name))] if status == "ok"]
            if aps:
                xs.append(batch)
                ys.append(statistics.mean(aps))
                es.append(statistics.stdev(aps) if len(aps) > 1 else 0.0)
        if xs:
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch (images per iteration), same epochs")
    ax.set_ylabel("box AP (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def effective_batch_section(args) -> List[str]:
    """Experiment 3's table, as its report was written (results/effective_batch/README.md)."""
    path = os.path.join(ROOT, "results", "effective_batch", "README.md")
    if args.scale != "cpu" or not os.path.exists(path):
        return []
    table = [line for line in open(path).read().splitlines() if line.startswith("|")]
    return ["## 3. The effective-batch experiment (mini RetinaNet, MEASURE_ONLY)", "",
            f"Written by `{EFFECTIVE_BATCH}` (details, setup and commands: "
            "[`results/effective_batch/README.md`](../effective_batch/README.md)):", "", *table, "",
            "![Φ ratio per variant](../effective_batch/phi.png)", ""]


def write_report(args, runs: Sequence[Run], root: str, started: str, total_s: float) -> str:
    os.makedirs(args.results, exist_ok=True)
    records = [read_run(os.path.join(root, r.name)) or {} for r in runs]
    run_minutes = sum((rec.get("wall_s") or 0) for rec in records) / 60
    stamps = [(rec["started"], rec["finished"]) for rec in records if rec.get("started") and rec.get("finished")]
    span = ""
    if stamps:
        first = datetime.datetime.fromisoformat(min(a for a, _ in stamps))
        last = datetime.datetime.fromisoformat(max(b for _, b in stamps))
        span = (f" The runs went from {first.isoformat(timespec='minutes')} to {last.isoformat(timespec='minutes')}: "
                f"{(last - first).total_seconds() / 60:.0f} min of wall-clock time.")
    fig = plot_scaling(runs, root, os.path.join(args.results, "ap_vs_batch.png"))
    text = [f"# Scaled-down reproduction ({args.scale}): pretrained mini backbone, same-epoch batch scaling", "",
            f"Machine: {machine()}. Started {started}; this call took {total_s / 60:.1f} min; the runs' own time "
            f"adds up to {run_minutes:.1f} min ({args.jobs} at a time).{span} Generated by `{args.command_line}` from the runs "
            f"in `{os.path.relpath(root, ROOT)}`.", ""]
    findings = os.path.join(args.results, "findings.md")
    if os.path.exists(findings):
        text += [open(findings).read().strip(), ""]
    text += ["## 1. Box AP against batch at the same epochs (mean ± std over seeds)", "",
             f"{args.epochs:g} epochs of the {args.train_images} training images at every batch; warm-up {args.warmup_images} "
             f"images; τ = {args.tau}; seeds {', '.join(map(str, args.seeds))}.", "", scaling_table(runs, root),
             f"![AP vs batch]({os.path.basename(fig)})" if fig else "", "",
             "## Φ per module with μ = 1 (mean over the run, seed 0)", "", phi_table(runs, root),
             f"## 2. α × τ at batch {max(args.batches)} (AGVM, seed 0)", "", alpha_tau_table(runs, root),
             *effective_batch_section(args),
             "## Commands", "", "```bash", f"{args.command_line}   # ran, per run:"]
    for r, rec in zip(runs, records):
        if rec:
            text.append(f"{rec.get('command', '').replace(sys.executable, 'python').replace(ROOT + os.sep, '')}"
                        f"   # exit {rec.get('returncode', '?')}, {(rec.get('wall_s') or 0) / 60:.1f} min")
    text += ["```", ""]
    path = os.path.join(args.results, "README.md")
    with open(path, "w") as f:
        f.write("\n".join(text))
    return path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=tuple(SCALES), default="cpu", help="cpu (default) or gpu (one GPU, batches to 1024)")
    p.add_argument("--batches", type=int, nargs="+", default=None, help="batch sizes (default: the scale's)")
    p.add_argument("--epochs", type=float, default=None, help="epochs of the train split at every batch (default: the scale's)")
    p.add_argument("--warmup-images", type=int, default=None, help="warm-up length in images (default: the scale's)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds of the scaling runs (default: the scale's; cpu 0 1 2)")
    p.add_argument("--tau", type=int, default=2, help="τ of the scaling runs, iterations (default 2)")
    p.add_argument("--grid-alpha", type=float, nargs="*", default=None, help="α values at the largest batch (cpu: 0 0.9 0.97)")
    p.add_argument("--grid-tau", type=int, nargs="*", default=None, help="τ values at the largest batch (cpu: 2 10)")
    p.add_argument("--jobs", type=int, default=None, help="runs at once (default: cpu 2, gpu 4)")
    p.add_argument("--output-root", default=None, help="runs' output root (default output/reproduce_<scale>)")
    p.add_argument("--results", default="results/mini", help="report folder (default results/mini)")
    p.add_argument("--dry-run", action="store_true", help="print the plan's commands; run and write nothing")
    p.add_argument("--report-only", action="store_true", help="only write the report from existing runs")
    p.add_argument("opts", nargs="*", default=[], help="KEY VALUE overrides for every run (after --)")
    args = p.parse_args(argv)
    scale = SCALES[args.scale]
    args.batches = args.batches or list(scale["batches"])
    args.epochs = args.epochs or scale["epochs"]
    args.warmup_images = args.warmup_images or scale["warmup_images"]
    for key in ("seeds", "grid_alpha", "grid_tau", "jobs"):
        if getattr(args, key) is None:
            value = scale[key]
            setattr(args, key, list(value) if isinstance(value, tuple) else value)
    args.train_images = scale["train_images"]
    if len(args.opts) % 2:
        p.error(f"overrides must be KEY VALUE pairs, got {args.opts}")
    args.output_root = args.output_root or f"output/reproduce_{args.scale}"
    if args.scale == "gpu" and args.results == "results/mini":
        args.results = "results/gpu"
    args.results = os.path.join(ROOT, args.results)
    args.command_line = "python scripts/reproduce_mini.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    return args


def effective_batch(*flags: str) -> int:
    """Run experiment 3 (:data:`EFFECTIVE_BATCH`) with ``flags`` in a child process (the
    repository root its working folder, this interpreter, this environment); its exit status."""
    sys.stdout.flush()
    sys.stderr.flush()
    return subprocess.run([sys.executable, os.path.join(ROOT, EFFECTIVE_BATCH), *flags], cwd=ROOT).returncode


def main(argv=None) -> int:
    args = parse_args(argv)
    root = os.path.join(ROOT, args.output_root)
    os.environ["AGVM_SHAPES_NUM_TRAIN"] = str(args.train_images)  # the runs' shapes_train size
    runs = plan(args)
    effective = args.scale == "cpu"  # experiment 3 at --scale cpu, in its own output root
    try:
        check_plan(runs)
    except ValueError as e:
        print(f"reproduce_mini.py: error: {e}", file=sys.stderr)
        return 2
    if effective and effective_batch("--check-only") != 0:
        print(f"reproduce_mini.py: error: experiment 3's configs failed their check ({EFFECTIVE_BATCH} --check-only)",
              file=sys.stderr)
        return 2
    started = datetime.datetime.now().isoformat(timespec="minutes")
    t0 = time.time()
    if args.dry_run or not args.report_only:
        def prepare():
            from agvm.data.pretrained import ensure_pretrained

            ensure_pretrained()

        def describe(result: runner.Result) -> str:
            status, ap = outcome(result.run.path(result.run.out))
            return (f"{result.run.name}: {status}" + (f" (box AP {ap:.2f})" if ap is not None else "")
                    + f" in {result.record['wall_s'] / 60:.1f} min")

        runner.execute([job(r, args.output_root) for r in runs], args.jobs, dry_run=args.dry_run,
                       every_s=120.0, describe=describe, prepare=prepare)
        code = 0
        if effective:  # its runs (reused when finished) and its report, results/effective_batch/
            code = effective_batch("--jobs", str(args.jobs), *(["--dry-run"] if args.dry_run else []))
            if code != 0 and not args.dry_run:
                print(f"reproduce_mini.py: experiment 3 ({EFFECTIVE_BATCH}) exited {code}; its report says which run",
                      file=sys.stderr)
        if args.dry_run:
            return code
    path = write_report(args, runs, root, started, time.time() - t0)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
