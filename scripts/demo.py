#!/usr/bin/env python
"""`make demo`: what AGVM does, in a few minutes on a CPU.

The mini Faster R-CNN (R-18-FPN, 128 px shapes) fine-tuned from the pretrained mini backbone
(``agvm-pretrained://shapes_r18``: FPN and heads start fresh, as in the paper's ImageNet regime)
at a large batch for this scale (32 images, 4× the mini baseline's 8), twice, side by side:

* ``baseline``: SGD at the square-root rule's LR (0.04) with AGVM in MEASURE_ONLY mode: Φ per
  module is logged and μ stays 1 — the misalignment AGVM corrects (MegDet's linear rule, LR
  0.08, diverged in this regime, so the baseline is AGVM's μ = 1 twin);
* ``agvm``: the same LR, warm-up, clipping, model and data with μ = sqrt(Φ_backbone / Φ_module).

Both go through ``agvm.runner.execute`` (the loop of every experiment script), always run afresh
(``rerun``: their folders cleared first): one thread each (fixed, so the same command gives the
same numbers), their log paths printed at start and a progress line every 30 s. At the end it prints a per-module table — Φ of the baseline (mean over its
estimates), μ of the AGVM run (final) — both box APs and wall times, and writes
``<output>/summary.md`` and a Figure-1 style PNG (``<output>/phi_mu.png``: Φ per module of the
baseline, μ per module of the AGVM run). The first call also generates the shapes dataset and
pretrains the backbone (cached; their time is printed separately).

    python scripts/demo.py [--output output/demo] [--max-iter N] [--sequential] [-- KEY VALUE ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from agvm.results import cell_result, curves, read_metrics
from agvm.runner import REPO_ROOT as ROOT
from agvm.runner import Run, execute, machine, parse_with_overrides

TRAIN_NET = "projects/faster_rcnn/train_net.py"
CONFIGS = "projects/faster_rcnn/configs/mini/pretrained"
#: run name -> config file (relative to the repository root)
RUNS = {"baseline": f"{CONFIGS}/b32_twin.yaml", "agvm": f"{CONFIGS}/b32_agvm.yaml"}


def prepare() -> float:
    """Generate the dataset and pretrain the backbone if they are not cached; seconds spent."""
    t0 = time.time()
    import agvm  # noqa: F401
    from agvm.data import ensure_shapes
    from agvm.data.pretrained import ensure_pretrained

    ensure_shapes()
    ensure_pretrained()
    return time.time() - t0


def summarize(outputs: dict) -> str:
    """The demo's summary (markdown) from the runs' output folders ``{name: folder}``: the
    per-module Φ (baseline, mean over its estimates) and μ (AGVM, final) table, box AP and time."""
    from agvm.results import read_run

    base = read_metrics(outputs["baseline"])
    agvm_records = read_metrics(outputs["agvm"])
    phi = curves(base, "phi")
    mu = curves(agvm_records, "mu")
    phi_agvm = curves(agvm_records, "phi")
    modules = list(phi) or list(mu)
    lines = ["| module | Φ baseline (mean) | Φ AGVM run (mean) | μ AGVM (final) |", "|---|---|---|---|"]
    for m in modules:
        p = phi.get(m, ([], []))[1]
        q = phi_agvm.get(m, ([], []))[1]
        u = mu.get(m, ([], []))[1]
        lines.append(f"| {m} | {sum(p) / len(p):.3f} | " if p else f"| {m} | — | ")
        lines[-1] += (f"{sum(q) / len(q):.3f} | " if q else "— | ") + (f"{u[-1]:.3f} |" if u else "— |")
    lines += ["", "| run | box AP | AP50 | status | wall time |", "|---|---|---|---|---|"]
    for name, out in outputs.items():
        res = cell_result(out, ("bbox", "AP"))
        ap50 = cell_result(out, ("bbox", "AP50"))["measured"]
        rec = read_run(out) or {}
        fmt = lambda x: "—" if x is None else f"{x:.2f}"  # noqa: E731
        lines.append(f"| {name} | {fmt(res['measured'])} | {fmt(ap50)} | {res['status']} | "
                     f"{(rec.get('wall_s') or 0) / 60:.1f} min |")
    return "\n".join(lines) + "\n"


def plot(outputs: dict, path: str) -> str:
    """Φ per module of the baseline beside μ per module of the AGVM run (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, (name, kind, label) in zip(axes, (("baseline", "phi", "Φ = 1 − cos(G₁, G₂), baseline (μ = 1)"),
                                                ("agvm", "mu", "μ per module, AGVM run"))):
        for module, (its, vals) in curves(read_metrics(outputs[name]), kind).items():
            ax.plot(its, vals, marker=".", label=module)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("mini Faster R-CNN, pretrained backbone, batch 32")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default=os.path.join(ROOT, "output", "demo"), help="output root (default output/demo)")
    p.add_argument("--max-iter", type=int, default=None, help="override SOLVER.MAX_ITER (default: the configs')")
    p.add_argument("--sequential", action="store_true", help="one run after the other (default: side by side)")
    args = parse_with_overrides(p, argv)
    t_prepare = prepare()
    print(f"dataset and pretrained backbone ready ({t_prepare:.0f} s; cached after the first call)", flush=True)
    outputs = {name: os.path.join(os.path.abspath(args.output), name) for name in RUNS}
    extra = (["SOLVER.MAX_ITER", str(args.max_iter)] if args.max_iter is not None else []) + list(args.opts)
    runs = [Run(name, config, outputs[name], TRAIN_NET, opts=list(extra)) for name, config in RUNS.items()]
    # every demo starts afresh (rerun; each folder cleared first: metrics.json appends), one thread per run
    execute(runs, jobs=1 if args.sequential else len(RUNS), rerun=True, threads=1, every_s=30.0)
    failed = [n for n, out in outputs.items() if cell_result(out, ("bbox", "AP"))["status"] != "ok"]
    text = summarize(outputs)
    png = plot(outputs, os.path.join(args.output, "phi_mu.png"))
    header = (f"# demo: mini Faster R-CNN, pretrained backbone, batch 32\n\nMachine: {machine()}; one thread per run. "
              f"Configs: {', '.join(f'`{c}`' for c in RUNS.values())}.\n\n")
    with open(os.path.join(args.output, "summary.md"), "w") as f:
        f.write(header + text + f"\n![Φ and μ](phi_mu.png)\n")
    print("\n" + text)
    print(f"figure: {png}\nsummary: {os.path.join(args.output, 'summary.md')}")
    if failed:
        print(f"failed runs: {', '.join(failed)} (see their stdout.log)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
