#!/usr/bin/env python
"""The evidence experiment: stage 1 chooses a regime from baseline runs only, stage 2 compares.

The protocol is ``results/evidence/protocol.md`` (written before any stage-2 run). Stage 1
trains only baselines (SGD, no AGVM, no twin) of the mini Faster R-CNN from the pretrained mini
backbone on the shapes dataset, for each candidate regime in :data:`REGIMES`: the small batch
B0 with the linear LR rule, and 16·B0 at the same epochs with the linear and the square-root
rule, on the given seeds. A regime is accepted when, on every seed, (a) B0's box AP at the end
is within 5 % of its AP at 75 % of training, (b) the better 16·B0 baseline loses ≥ 5 % and
≥ 3 standard deviations of B0 over seeds, and (c) 16·B0 gets ≥ 200 iterations
(:mod:`agvm.protocol`).

Each run trains into ``--output-root`` (checkpoints, events: not committed) and its small
records (``config.yaml``, ``metrics.json``, ``eval_results.json``, ``agvm_run.json``) are copied
to ``results/evidence/runs/stage1/<regime>/<run>/``, which are committed. The plan goes through
``agvm.runner.execute``, whose reuse rule reads those records: a run recorded with the same
config fingerprint that finished, or diverged (a non-finite loss stopped it: a result the
protocol counts), is not run again, so the plan resumes and a later call extends it; a failed
run runs again. ``--report-only`` rewrites ``results/evidence/stage1.md`` from the committed
records alone (byte-for-byte the same for the same records).

Stage 2 (``--stage 2 --regime NAME``, the regime stage 1 accepted, or the one that came
closest) runs once, with the stage-1 settings: B0 (MegDet), 4·B0 and 16·B0 (MegDet with the
linear rule; AGVM's μ = 1 twin and AGVM with the square-root rule, the same warm-up, clip window
(0, 2·warm-up) and τ; α = 0.97), on the given seeds; at 16·B0 also α × τ and the anchor
ablation (seed 0). Its records go to ``results/evidence/runs/stage2/<regime>/`` and its report
to ``results/evidence/stage2.md`` (per cell mean ± std, divergences, the paired AGVM − twin
difference per seed).

    python scripts/evidence.py [--regimes r64_1600x8] [--seeds 0 1 2] [--jobs 2] [--dry-run] [--report-only]
    python scripts/evidence.py --stage 2 --regime r64_1600x8_late [--seeds 0 1 2] [--dry-run] [--report-only]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from agvm import runner
from agvm.protocol import converged, degraded, mean_std, paired_difference, reading
from agvm.results import read_metrics, read_run
from agvm.runner import REPO_ROOT as ROOT

TRAIN_NET = "projects/faster_rcnn/train_net.py"
CONFIG = "projects/faster_rcnn/configs/mini/pretrained/megdet.yaml"  # SGD, linear rule from (8 images, 0.02)
PROTOCOL_SEEDS = (0, 1, 2)  # a regime is accepted only when every criterion holds on all of them

#: Candidate regimes, tried in this order. size: image side in px (train and test); images:
#: training images of the shapes set; epochs: passes over them at every batch; b0: the small
#: batch (images); factor: the large batch is factor·b0; warmup: linear warm-up in images;
#: steps: the LR decays ×0.1 at these fractions of training.
REGIMES: Dict[str, dict] = {
    # detectron2's 1x proportions (decays at 2/3 and 8/9): the AP at 75 % falls between them
    "r64_1600x8": dict(size=64, images=1600, epochs=8.0, b0=4, factor=16, warmup=1280, steps=(2 / 3, 8 / 9)),
    # both decays before 75 % (the last quarter at LR ×0.01 shows whether B0 has settled), and a
    # warm-up of a quarter of the images (r64_1600x8's 1280 images: 16·B0 diverged at its end)
    "r64_1600x8_late": dict(size=64, images=1600, epochs=8.0, b0=4, factor=16, warmup=3200, steps=(1 / 2, 2 / 3)),
    # the GPU tier (one GPU; not run on the CPU machine): r64_1600x8_late's proportions (8 epochs, a
    # quarter of the images as warm-up, decays at 1/2 and 2/3) at B0 = 32 up to 32·B0 = 1024, with
    # 25,600 images so that 1024 gets 200 iterations; on CUDA with 4 loader workers per run
    "gpu_r64_25600x8": dict(size=64, images=25600, epochs=8.0, b0=32, factor=32, warmup=51200, steps=(1 / 2, 2 / 3),
                            device="cuda", workers=4),
}


@dataclass
class Run:
    regime: str
    batch: int
    rule: str  # "linear" or "sqrt"
    seed: int
    opts: List[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"b{self.batch}_{self.rule}_s{self.seed}"

    @property
    def path(self) -> str:
        return f"stage1/{self.regime}/{self.name}"


def schedule(regime: dict, batch: int) -> dict:
    """Iterations, LR steps, warm-up and the 75 % evaluation point of ``batch`` in ``regime``."""
    iters = int(math.ceil(regime["epochs"] * regime["images"] / batch))
    return dict(iters=iters, steps=tuple(round(iters * f) for f in regime["steps"]),
                warmup=max(1, round(regime["warmup"] / batch)), eval_at=round(iters * 0.75))


def run_opts(regime: dict, batch: int, rule: str, seed: int) -> List[str]:
    s = schedule(regime, batch)
    size = str(regime["size"])
    return [
        "SOLVER.IMS_PER_BATCH", str(batch), "SOLVER.MAX_ITER", str(s["iters"]), "SOLVER.STEPS", str(s["steps"]),
        "SOLVER.WARMUP_ITERS", str(s["warmup"]), "SOLVER.GRAD_ACCUM_STEPS", "2", "SOLVER.LR_SCALING.RULE", rule,
        "SOLVER.AGVM.ENABLED", "False", "TEST.EVAL_PERIOD", str(s["eval_at"]), "SEED", str(seed),
        "INPUT.MIN_SIZE_TRAIN", f"({size},)", "INPUT.MAX_SIZE_TRAIN", size,
        "INPUT.MIN_SIZE_TEST", size, "INPUT.MAX_SIZE_TEST", size, "DATALOADER.NUM_WORKERS", str(regime.get("workers", 0)),
    ] + (["MODEL.DEVICE", regime["device"]] if "device" in regime else [])


def plan(regimes: Sequence[str], seeds: Sequence[int]) -> List[Run]:
    """B0 (linear) and factor·B0 (linear, sqrt) per seed, seed-major so that a seed's three
    runs finish together."""
    runs = []
    for name in regimes:
        r = REGIMES[name]
        for seed in seeds:
            for batch, rule in ((r["b0"], "linear"), (r["b0"] * r["factor"], "linear"), (r["b0"] * r["factor"], "sqrt")):
                runs.append(Run(name, batch, rule, seed, run_opts(r, batch, rule, seed)))
    return runs


# ------------------------------------------------------------------------------ stage 2
STAGE2_CONFIGS = {  # method -> config; the plan sets batch, schedule, LR rule, τ, α, the clip window
    "megdet": "projects/faster_rcnn/configs/mini/pretrained/megdet.yaml",
    "twin": "projects/faster_rcnn/configs/mini/pretrained/b32_twin.yaml",  # MEASURE_ONLY: μ = 1
    "agvm": "projects/faster_rcnn/configs/mini/pretrained/b32_agvm.yaml",
}
METHOD_LABELS = {"megdet": "MegDet (linear)", "twin": "μ = 1 twin (sqrt)", "agvm": "AGVM (sqrt)"}
TAU, ALPHA = 2, 0.97  # the comparison's τ (≥ 100 estimates at 16·B0) and α (the paper's)
GRID = [(a, t) for a in (0.0, 0.9, 0.97) for t in (2, 10)]  # α × τ at 16·B0, seed 0
ANCHORS = ("neck", "box_head")  # besides the backbone (the main runs), seed 0


@dataclass
class Run2:
    regime: str
    group: str  # "scaling", "grid" or "anchor"
    method: str
    batch: int
    seed: int
    alpha: float = ALPHA
    tau: int = TAU
    anchor: str = "backbone"
    opts: List[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        if self.group == "grid":
            return f"grid/b{self.batch}_a{self.alpha:g}_t{self.tau}_s{self.seed}"
        if self.group == "anchor":
            return f"anchor/b{self.batch}_{self.anchor}_s{self.seed}"
        return f"b{self.batch}_{self.method}_s{self.seed}"

    @property
    def path(self) -> str:
        return f"stage2/{self.regime}/{self.name}"

    @property
    def config(self) -> str:
        return STAGE2_CONFIGS[self.method]


def stage2_opts(regime: dict, batch: int, method: str, seed: int, alpha: float = ALPHA, tau: int = TAU,
                anchor: str = "backbone") -> List[str]:
    """Stage 1's settings (run_opts) plus the method's: MegDet without AGVM (as in stage 1); the
    twin and AGVM with the square-root rule, AGVM from the end of warm-up every τ iterations,
    whole-model clipping over (0, 2·warm-up), α and the anchor."""
    rule = "linear" if method == "megdet" else "sqrt"
    opts = run_opts(regime, batch, rule, seed)
    if method == "megdet":
        return opts
    warm = schedule(regime, batch)["warmup"]
    opts[opts.index("SOLVER.AGVM.ENABLED") + 1] = "True"
    return opts + ["SOLVER.AGVM.START_ITER", str(warm), "SOLVER.AGVM.INTERVAL", str(tau),
                   "SOLVER.AGVM.MOMENTUM", str(alpha), "SOLVER.AGVM.ANCHOR", anchor,
                   "SOLVER.CLIP_GRADIENTS.ITER_RANGE", f"(0, {2 * warm})"]


def plan2(name: str, seeds: Sequence[int]) -> List[Run2]:
    """The stage-2 runs of regime ``name``: the scaling grid (seed-major), then α × τ and the
    anchors at 16·B0 on the first seed (the grid point α = 0.97, τ = 2 is the main AGVM run)."""
    r = REGIMES[name]
    b0, big = r["b0"], r["b0"] * r["factor"]
    batches = (b0, b0 * r["factor"] // 4, big)
    runs: List[Run2] = []
    for seed in seeds:
        for batch in batches:
            for method in (["megdet"] if batch == b0 else ["megdet", "twin", "agvm"]):
                runs.append(Run2(name, "scaling", method, batch, seed, opts=stage2_opts(r, batch, method, seed)))
    first = min(seeds)
    for alpha, tau in GRID:
        if (alpha, tau) != (ALPHA, TAU):
            runs.append(Run2(name, "grid", "agvm", big, first, alpha, tau,
                             opts=stage2_opts(r, big, "agvm", first, alpha, tau)))
    for anchor in ANCHORS:
        runs.append(Run2(name, "anchor", "agvm", big, first, anchor=anchor,
                         opts=stage2_opts(r, big, "agvm", first, anchor=anchor)))
    return runs


def _ap(run, records_root: str) -> Optional[float]:
    """Box AP at the end for the statistics: a diverged run counts as 0, an unfinished one as None."""
    res = result(run, records_root)
    return res["ap"] if res["status"] == "ok" else (0.0 if res["status"] == "diverged" else None)


def _cell_lines(name: str, runs: Sequence[Run2], records_root: str) -> List[str]:
    """The per-cell table (box AP mean ± std over seeds, divergences) and the paired AGVM − twin
    table of the scaling grid."""
    r = REGIMES[name]
    scaling = [x for x in runs if x.group == "scaling"]
    lines = ["| batch | method | LR | iterations | box AP | diverged | finished |", "|---|---|---|---|---|---|---|"]
    cells: Dict[tuple, List[Run2]] = {}
    for x in scaling:
        cells.setdefault((x.batch, x.method), []).append(x)
    for (batch, method), xs in sorted(cells.items(), key=lambda kv: (kv[0][0], list(METHOD_LABELS).index(kv[0][1]))):
        res = [result(x, records_root) for x in xs]
        aps = [_ap(x, records_root) for x in xs]
        m, sd = mean_std([a for a in aps if a is not None])
        lr = next((q["lr"] for q in res if q["lr"] is not None), None)
        lines.append(f"| {batch} | {METHOD_LABELS[method]} | {_f(lr, 4)} | {schedule(r, batch)['iters']} | "
                     f"{_f(m)}{f' ± {_f(sd)}' if len([a for a in aps if a is not None]) > 1 else ''} | "
                     f"{sum(q['status'] == 'diverged' for q in res)}/{len(xs)} | "
                     f"{sum(a is not None for a in aps)}/{len(xs)} |")
    lines += ["", "AGVM − twin, paired by seed:", "",
              "| batch | per seed | mean ± std | AGVM ahead |", "|---|---|---|---|"]
    for batch in sorted({x.batch for x in scaling if x.method == "agvm"}):
        by = {m: {x.seed: _ap(x, records_root) for x in scaling if x.batch == batch and x.method == m} for m in ("agvm", "twin")}
        a = {k: v for k, v in by["agvm"].items() if v is not None}
        b = {k: v for k, v in by["twin"].items() if v is not None}
        d = paired_difference(a, b)
        per = ", ".join(f"s{k}: {v:+.2f}" for k, v in sorted(d["per_seed"].items())) or "—"
        lines.append(f"| {batch} | {per} | {_f(d['mean'])} ± {_f(d['std'])} | {d['ahead']}/{d['seeds']} |")
    return lines


README_BEGIN = "<!-- evidence:begin (written by scripts/evidence.py --stage 2; do not edit by hand) -->"
README_END = "<!-- evidence:end -->"


def readme_block(name: str, runs: Sequence[Run2], records_root: str) -> str:
    """The README's results block: the stage-2 tables of regime ``name`` and where they come from."""
    r = REGIMES[name]
    seeds = sorted({x.seed for x in runs})
    return "\n".join([
        f"Box AP of the mini Faster R-CNN ({r['size']} px shapes, {r['images']} training images, {r['epochs']:g} epochs at "
        f"every batch; pretrained mini backbone), seeds {', '.join(map(str, seeds))} planned; mean ± std over the "
        "finished seeds, a diverged run counted as AP 0. From "
        "[`results/evidence/stage2.md`](results/evidence/stage2.md) (protocol, every run's command and record), "
        f"written by `python scripts/evidence.py --stage 2 --regime {name} --report-only`:", "",
        *_cell_lines(name, runs, records_root)])


def update_readme(path: str, block: str) -> bool:
    """Put ``block`` between README_BEGIN and README_END in ``path``; False (nothing written)
    when the file has no such markers."""
    with open(path) as f:
        text = f.read()
    if README_BEGIN not in text or README_END not in text:
        return False
    head, rest = text.split(README_BEGIN, 1)
    tail = rest.split(README_END, 1)[1]
    with open(path, "w") as f:
        f.write(f"{head}{README_BEGIN}\n{block}\n{README_END}{tail}")
    return True


def plot2(name: str, runs: Sequence[Run2], records_root: str, path: str) -> Optional[str]:
    """``ap_vs_batch.png`` beside ``path``: box AP against batch per method (mean ± std over the
    recorded seeds; a diverged run counts as 0, as in the tables). None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    scaling = [x for x in runs if x.group == "scaling"]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for method, label in METHOD_LABELS.items():
        points = []
        for batch in sorted({x.batch for x in scaling if x.method == method}):
            aps = [a for a in (_ap(x, records_root) for x in scaling if x.batch == batch and x.method == method)
                   if a is not None]
            if aps:
                m, sd = mean_std(aps)
                points.append((batch, m, sd if len(aps) > 1 else 0.0))
        if points:
            xs, ms, sds = zip(*points)
            ax.errorbar(xs, ms, yerr=sds, marker="o", capsize=3, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch (images per iteration), same epochs")
    ax.set_ylabel("box AP (diverged = 0)")
    ax.set_title(f"stage 2, {name}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = os.path.join(os.path.dirname(path), "ap_vs_batch.png")
    fig.savefig(out, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return out


def write_report2(name: str, runs: Sequence[Run2], records_root: str, path: str) -> str:
    """results/evidence/stage2.md from the stage-2 records alone (regenerable)."""
    r = REGIMES[name]
    seeds = sorted({x.seed for x in runs})
    scaling = [x for x in runs if x.group == "scaling"]
    lines = ["# Evidence, stage 2: AGVM against its μ = 1 twin and MegDet, paired seeds", "",
             "Generated by `python scripts/evidence.py --stage 2 --report-only --regime "
             f"{name}` from the run records in [`runs/stage2/{name}/`](runs/stage2/{name}/); the protocol is "
             "[`protocol.md`](protocol.md), the regime was chosen in [`stage1.md`](stage1.md). "
             f"τ = {TAU}, α = {ALPHA:g} unless stated; seeds {', '.join(map(str, seeds))}; a diverged run counts as AP 0 "
             "in the means and differences.", "",
             f"Machine(s): {'; '.join(_machines(runs, records_root)) or '—'}. The runs' own time adds up to "
             f"{_total_minutes(runs, records_root):.0f} min (2 at a time, one thread each; each run's minutes are in "
             "its record, `agvm_run.json`'s `wall_s`).", "",
             "## Box AP per cell (mean ± std over seeds)", "", *_cell_lines(name, runs, records_root)]
    if plot2(name, runs, records_root, path):
        lines += ["", "![box AP against batch](ap_vs_batch.png)"]
    missing = [x.name for x in runs if not (read_run(os.path.join(records_root, x.path)) or {}).get("returncode") is not None]
    if missing:
        lines += ["", f"Planned but not recorded ({len(missing)} of {len(runs)}): {', '.join(missing)}. See "
                  "[`protocol.md`](protocol.md)'s amendment for what was dropped and why; the same command runs them."]
    lines += ["", "## Reading (mechanical: `agvm.protocol.reading`)", "",
              "Per batch: AGVM − twin as mean ± standard error over the seeds that have both runs, its 95 % "
              "t-interval (n − 1 degrees of freedom), and whether that interval excludes 0. This reading was added "
              "to the report after seed 0 was recorded, first with a looser rule (|mean| > 2 s.e., about an 82 % "
              "interval with 3 seeds), and tightened to the t-interval after the seed-2 runs were seen; it "
              "describes the table and decides nothing the protocol did not fix.", ""]
    for batch in sorted({x.batch for x in scaling if x.method == "agvm"}):
        by = {m: {x.seed: _ap(x, records_root) for x in scaling if x.batch == batch and x.method == m}
              for m in ("agvm", "twin", "megdet")}
        d = paired_difference({k: v for k, v in by["agvm"].items() if v is not None},
                              {k: v for k, v in by["twin"].items() if v is not None})
        diverged = sum(result(x, records_root)["status"] == "diverged" for x in scaling
                       if x.batch == batch and x.method == "megdet")
        done = sum(v is not None for v in by["megdet"].values())
        lines.append(f"- batch {batch}: {reading(d)}; MegDet (linear rule) diverged on {diverged} of {done} recorded seeds.")
    big = r["b0"] * r["factor"]
    main = {(x.alpha, x.tau): x for x in scaling if x.method == "agvm" and x.batch == big and x.seed == min(seeds)}
    lines += ["", f"## α × τ at batch {big} (AGVM, seed {min(seeds)})", "", "| α | τ | box AP | status |", "|---|---|---|---|"]
    for alpha, tau in GRID:
        x = main.get((alpha, tau)) or next((g for g in runs if g.group == "grid" and (g.alpha, g.tau) == (alpha, tau)), None)
        res = result(x, records_root) if x else {"ap": None, "status": "not planned"}
        lines.append(f"| {alpha:g} | {tau} | {_f(res['ap'])} | {res['status']} |")
    lines += ["", f"## Anchor ablation at batch {big} (AGVM, seed {min(seeds)})", "", "| anchor | box AP | status |", "|---|---|---|"]
    for anchor in ("backbone",) + ANCHORS:
        x = next(iter(main.values()), None) if anchor == "backbone" else \
            next((g for g in runs if g.group == "anchor" and g.anchor == anchor), None)
        res = result(x, records_root) if x else {"ap": None, "status": "not planned"}
        lines.append(f"| {anchor} | {_f(res['ap'])} | {res['status']} |")
    return _write_with_commands(lines + [""], runs, records_root, path)


def _write_with_commands(lines: List[str], runs, records_root: str, path: str) -> str:
    """``lines`` plus a "Commands" section (each recorded run's command and exit code), written to ``path``."""
    lines = lines + ["## Commands", "", "```bash"]
    for x in runs:
        rec = read_run(os.path.join(records_root, x.path))
        if rec:
            lines.append(f"{rec.get('command', '')}   # exit {rec.get('returncode', '?')}")
    lines += ["```", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def job(x, args, records_root: str) -> runner.Run:
    """What ``agvm.runner.execute`` runs for the planned run ``x`` (stage 1 or 2): it trains into
    ``<output-root>/<path>`` and its small records are copied to ``<records>/runs/<path>``."""
    run = runner.Run(x.path, getattr(x, "config", CONFIG), os.path.join(args.output_root, x.path), TRAIN_NET,
                     opts=list(x.opts), records=os.path.join(records_root, x.path), info={"regime": x.regime}, meta=x)
    run.line = (run.display.replace(sys.executable, "python").replace(ROOT + os.sep, "")
                .replace(args.output_root, "output/evidence"))
    return run


def evaluations(records: str) -> Dict[int, float]:
    """``{iteration: box AP}`` of every evaluation a run logged (its metrics.json)."""
    return {int(r["iteration"]): float(r["bbox/AP"]) for r in read_metrics(records)
            if r.get("bbox/AP") is not None and "iteration" in r}


def result(run: Run, records_root: str) -> dict:
    """status ("ok", "diverged", "failed", "missing"), AP at 75 % and at the end, LR, wall time."""
    folder = os.path.join(records_root, run.path)
    rec = read_run(folder)
    out = {"status": "not run", "ap75": None, "ap": None, "lr": None, "wall_min": None}
    if rec is None or rec.get("returncode") is None:
        return out
    out["wall_min"] = (rec.get("wall_s") or 0) / 60
    s = schedule(REGIMES[run.regime], run.batch)
    evals = evaluations(folder)
    out["ap75"] = evals.get(s["eval_at"] - 1)
    # the final evaluation (detectron2's EvalHook after training) is logged at iteration MAX_ITER
    out["ap"] = evals.get(s["iters"], evals.get(s["iters"] - 1))
    try:
        import yaml

        with open(os.path.join(folder, "config.yaml")) as f:
            out["lr"] = float(yaml.safe_load(f)["SOLVER"]["BASE_LR"])
    except (OSError, KeyError, TypeError, ValueError):
        pass
    losses = [r.get("total_loss") for r in read_metrics(folder) if "total_loss" in r]
    tail_path = os.path.join(folder, "stdout_tail.log")
    tail = open(tail_path, errors="replace").read() if os.path.exists(tail_path) else ""
    if rec["returncode"] != 0:
        # detectron2 stops a diverged run with FloatingPointError (a non-finite loss or boxes)
        diverged = "FloatingPointError" in tail or any(x is None or not math.isfinite(x) for x in losses[-1:])
        out["status"] = "diverged" if diverged else "failed"
    else:
        out["status"] = "ok" if out["ap"] is not None and math.isfinite(out["ap"]) else "failed"
    return out


def _f(x, digits=2) -> str:
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def regime_section(name: str, runs: Sequence[Run], records_root: str) -> List[str]:
    r = REGIMES[name]
    mine = [x for x in runs if x.regime == name]
    results = {x.name: result(x, records_root) for x in mine}
    big = r["b0"] * r["factor"]
    s0, s1 = schedule(r, r["b0"]), schedule(r, big)
    lines = [f"### Regime `{name}`", "",
             f"{r['size']} px images, {r['images']} training images, {r['epochs']:g} epochs at every batch, B0 = {r['b0']}, "
             f"large batch {big} ({r['factor']}·B0), linear warm-up over {r['warmup']} images, LR ×0.1 at "
             f"{' and '.join(f'{x:.3g}' for x in r['steps'])} of training; B0: {s0['iters']} iterations, "
             f"{big}: {s1['iters']} iterations.", "",
             "| run | batch | LR rule | LR | iterations | AP at 75 % | AP at the end | status | minutes |",
             "|---|---|---|---|---|---|---|---|---|"]
    for x in mine:
        res = results[x.name]
        lines.append(f"| {x.name} | {x.batch} | {x.rule} | {_f(res['lr'], 4)} | {schedule(r, x.batch)['iters']} | "
                     f"{_f(res['ap75'])} | {_f(res['ap'])} | {res['status']} | {_f(res['wall_min'], 1)} |")
    seeds = sorted({x.seed for x in mine})
    done = lambda rule, batch: {x.seed: (results[x.name]["ap"] if results[x.name]["status"] == "ok" else  # noqa: E731
                                        (0.0 if results[x.name]["status"] == "diverged" else None))
                                for x in mine if x.rule == rule and x.batch == batch}
    small = {k: v for k, v in done("linear", r["b0"]).items() if v is not None}
    large = {rule: {k: v for k, v in done(rule, big).items() if v is not None} for rule in ("linear", "sqrt")}
    conv = {x.seed: converged(results[x.name]["ap75"], results[x.name]["ap"])
            for x in mine if x.batch == r["b0"] and results[x.name]["status"] == "ok"}
    deg = degraded(small, large)
    m, sd = mean_std(list(small.values()))
    complete = set(PROTOCOL_SEEDS) <= set(seeds) and all(
        x.seed not in PROTOCOL_SEEDS or results[x.name]["status"] in ("ok", "diverged") for x in mine)
    a_fail = any(v is False for v in conv.values())  # a finished B0 run that has not converged: final
    a_ok = complete and bool(conv) and all(conv.values())
    c_ok = s1["iters"] >= 200
    if a_fail or not c_ok or (complete and not deg["ok"]):
        verdict = "not accepted"
    elif a_ok and deg["ok"]:
        verdict = "accepted"
    else:
        verdict = f"met so far, pending the rest of seeds {', '.join(map(str, PROTOCOL_SEEDS))}"

    def state(ok: bool, failed: bool, so_far: bool) -> str:
        """A criterion's word: final once it failed or every seed ran, else how it stands so far."""
        return "met" if ok else "not met" if failed else ("met so far" if so_far else "not met so far")

    lines += ["", f"- (a) B0 converged (AP at the end within 5 % of AP at 75 %): "
              + (", ".join(f"seed {k}: {'yes' if v else 'no'}" for k, v in sorted(conv.items())) or "no finished B0 run")
              + f" → {state(a_ok, a_fail, bool(conv))}",
              f"- (b) B0 AP {_f(m)} ± {_f(sd)} over {len(small)} seed(s); per seed, the better of the two {big} "
              "baselines loses: " + (", ".join(
                  f"seed {k}: {_f(v['loss'])} AP ({_f(100 * v['relative'], 1) if v['relative'] is not None else '—'} %)"
                  for k, v in sorted(deg["per_seed"].items())) or "—")
              + f"; needed ≥ 5 % and ≥ 3 std = {_f(deg['threshold'])} AP → {state(complete and deg['ok'], complete and not deg['ok'], deg['ok'])}",
              f"- (c) {big} gets {s1['iters']} iterations (≥ 200) → {'met' if c_ok else 'not met'}",
              f"- **Verdict: {verdict}** (seeds {', '.join(map(str, seeds))}; the protocol's are "
              f"{', '.join(map(str, PROTOCOL_SEEDS))})", ""]
    return lines


def _machines(runs, records_root: str) -> List[str]:
    """The machines the recorded runs ran on."""
    return sorted({(read_run(os.path.join(records_root, x.path)) or {}).get("machine", "") for x in runs} - {""})


def _total_minutes(runs, records_root: str) -> float:
    """The recorded runs' wall time, summed, in minutes."""
    return sum((read_run(os.path.join(records_root, x.path)) or {}).get("wall_s") or 0 for x in runs) / 60


def write_report(runs: Sequence[Run], records_root: str, path: str, regimes: Sequence[str]) -> str:
    """The stage-1 report from the records alone (no clock, no machine state: regenerable)."""
    machines, total = _machines(runs, records_root), _total_minutes(runs, records_root)
    lines = ["# Evidence, stage 1: choosing the regime from baseline runs only", "",
             "Generated by `python scripts/evidence.py --report-only` from the run records in "
             "[`runs/stage1/`](runs/stage1/); the protocol is [`protocol.md`](protocol.md). Every pilot tried is listed, "
             "accepted or not. Baselines only: SGD (mini Faster R-CNN, pretrained mini backbone, shapes dataset), "
             "the LR from (8 images, 0.02) by the linear or the square-root rule, two micro-batches per iteration. "
             "Runs of a regime that was rejected before all its seeds ran are listed as they are.", "",
             f"Machine(s): {'; '.join(machines) or '—'}. The runs' own time adds up to {total:.0f} min "
             "(2 at a time, one thread each).", ""]
    for name in regimes:
        lines += regime_section(name, runs, records_root)
    return _write_with_commands(lines, runs, records_root, path)


def recorded_regimes(records_root: str) -> List[str]:
    base = os.path.join(records_root, "stage1")
    return [r for r in REGIMES if os.path.isdir(os.path.join(base, r))]


def recorded_seeds(records_root: str, regime: str) -> List[int]:
    base = os.path.join(records_root, "stage1", regime)
    seeds = set()
    for name in os.listdir(base) if os.path.isdir(base) else []:
        if "_s" in name:
            try:
                seeds.add(int(name.rsplit("_s", 1)[1]))
            except ValueError:
                pass
    return sorted(seeds)


def estimate(runs: Sequence[Run2], iters: int, jobs: int) -> str:
    """A measured time estimate of ``runs`` on this machine's device: each distinct batch trains
    ``iters`` iterations (MegDet's settings, no evaluation) on a 2,048-image set; the per-iteration
    time (detectron2's ``time`` of the last iterations, metrics.json) times each run's
    iterations, plus each run's measured start-up (wall time − iterations × per-iteration time).
    Returns the table and the total, serial and with ``jobs`` runs at a time (a lower bound:
    runs sharing one device slow each other)."""
    import subprocess
    import tempfile

    per_batch = {}
    for batch in sorted({x.batch for x in runs}):
        x = next(r for r in runs if r.batch == batch)
        with tempfile.TemporaryDirectory() as out:
            cmd = [sys.executable, TRAIN_NET, "--config-file", STAGE2_CONFIGS["megdet"], "OUTPUT_DIR", out,
                   *stage2_opts(REGIMES[x.regime], batch, "megdet", 0), "SOLVER.MAX_ITER", str(iters),
                   "TEST.EVAL_PERIOD", "0", "DATASETS.TEST", "()", "SOLVER.CHECKPOINT_PERIOD", "1000000"]
            env = dict(os.environ, AGVM_SHAPES_NUM_TRAIN="2048")
            t0 = time.time()
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            wall = time.time() - t0
            rows = [r for r in read_metrics(out) if "time" in r]
            if proc.returncode != 0 or not rows:
                raise RuntimeError(f"timing batch {batch} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
        step = float(rows[-1]["time"])
        per_batch[batch] = (step, max(0.0, wall - iters * step))
    lines = ["| batch | s / iteration | start-up s | runs | iterations per run | run time (min) |", "|---|---|---|---|---|---|"]
    total = 0.0
    for batch, (step, startup) in per_batch.items():
        n = sum(x.batch == batch for x in runs)
        its = schedule(REGIMES[runs[0].regime], batch)["iters"]
        minutes = (its * step + startup) / 60
        total += n * minutes
        lines.append(f"| {batch} | {step:.4f} | {startup:.0f} | {n} | {its} | {minutes:.1f} |")
    lines += ["", f"{len(runs)} runs: {total:.1f} min one at a time, ≥ {total / max(1, jobs):.1f} min with {jobs} at a time "
              f"(measured with {iters} iterations per batch on {runner.machine()})"]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--regimes", nargs="+", default=None, choices=sorted(REGIMES),
                   help="regimes to run (default: all of REGIMES)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
    p.add_argument("--jobs", type=int, default=2, help="runs at once, each with its share of the CPU threads (default 2)")
    p.add_argument("--output-root", default=os.path.join(ROOT, "output", "evidence"),
                   help="where runs train (default output/evidence; not committed)")
    p.add_argument("--records", default=os.path.join(ROOT, "results", "evidence"),
                   help="records and report folder (default results/evidence)")
    p.add_argument("--dry-run", action="store_true", help="print the plan's commands; run and write nothing")
    p.add_argument("--report-only", action="store_true", help="only rewrite the report from the committed records")
    p.add_argument("--stage", type=int, choices=(1, 2), default=1, help="1 (default): choose the regime; 2: compare")
    p.add_argument("--regime", choices=sorted(REGIMES), default=None, help="stage 2: the regime stage 1 chose")
    p.add_argument("--estimate", type=int, default=0, metavar="N",
                   help="stage 2: time N iterations of each batch of the plan on this machine's device and print the "
                        "plan's projected wall time; trains nothing of the plan (default 0: off)")
    p.add_argument("--readme", default=os.path.join(ROOT, "README.md"),
                   help="stage 2: the file whose results block (evidence:begin/end markers) gets the stage-2 tables "
                        "(default: the repository's README.md)")
    args = p.parse_args(argv)
    records_root = os.path.join(args.records, "runs")
    if args.stage == 2:
        if args.regime is None:
            p.error("--stage 2 needs --regime (the regime stage 1 accepted, or the one that came closest)")
        runs2 = plan2(args.regime, args.seeds)
        if args.estimate:
            print(estimate([x for x in runs2 if x.group == "scaling"], args.estimate, args.jobs))
            return 0
        report2 = os.path.join(args.records, "stage2.md")
        readme = args.readme

        def report2_and_readme():
            if update_readme(readme, readme_block(args.regime, runs2, records_root)):
                print("wrote the results block of", readme)
            return write_report2(args.regime, runs2, records_root, report2)

        if args.report_only:
            print("wrote", report2_and_readme())
            return 0
        return execute(args, runs2, records_root, report2_and_readme)
    if args.report_only:
        regimes = args.regimes or recorded_regimes(records_root)
        runs = [x for name in regimes for x in plan([name], recorded_seeds(records_root, name))]
        print("wrote", write_report(runs, records_root, os.path.join(args.records, "stage1.md"), regimes))
        return 0
    regimes = args.regimes or list(REGIMES)
    if len({REGIMES[r]["images"] for r in regimes}) > 1:
        p.error("run regimes with different training-set sizes in separate calls")

    def report1():
        done_regimes = recorded_regimes(records_root)
        all_runs = [x for name in done_regimes for x in plan([name], recorded_seeds(records_root, name))]
        return write_report(all_runs, records_root, os.path.join(args.records, "stage1.md"), done_regimes)

    return execute(args, plan(regimes, args.seeds), records_root, report1)


def execute(args, runs, records_root: str, report) -> int:
    """Check every run's config, then run what is not yet recorded (``agvm.runner.execute``),
    two at a time by default, and write the report."""
    from agvm.detectron2.checks import check_run_config

    for x in runs:  # every run's config built and checked before anything starts
        try:
            check_run_config(os.path.join(ROOT, getattr(x, "config", CONFIG)), x.opts, 1, what=f"run {x.path}: ")
        except ValueError as e:
            print(f"evidence.py: error: {e}", file=sys.stderr)
            return 2

    def prepare():
        from agvm.data.pretrained import ensure_pretrained

        ensure_pretrained()

    def describe(done: runner.Result) -> str:
        res = result(done.run.meta, records_root)
        return (f"{done.run.name}: {res['status']} AP75 {_f(res['ap75'])} AP {_f(res['ap'])} "
                f"in {done.record['wall_s'] / 60:.1f} min")

    if runs:
        os.environ["AGVM_SHAPES_NUM_TRAIN"] = str(REGIMES[runs[0].regime]["images"])
    runner.execute([job(x, args, records_root) for x in runs], args.jobs, dry_run=args.dry_run, every_s=300.0,
                   describe=describe, prepare=prepare)
    if not args.dry_run:
        print("wrote", report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
