"""The effective-batch experiment (``projects/effective_batch``): its plan and its report (pure Python).

The paper's controlled experiment behind its effective-batch explanation, at mini scale: Φ of
RetinaNet's dense head against its backbone for four variants (``VARIANTS``, one config each in
``projects/effective_batch/configs/``), all ``EffectiveBatchRetinaNet`` in MEASURE_ONLY:
``shared`` (the stock head, reference), ``unshared`` (one head per FPN level), ``no_fpn``
(ResNet only, head on res4), ``masked`` (75 % of anchor locations' losses masked). :func:`plan`
gives the runs (``projects/effective_batch/train_net.py``, for :func:`agvm.runner.execute`),
:func:`check_runs` checks their configs before anything starts, :func:`write_report` writes
``README.md`` and ``phi.png`` from the runs' ``metrics.json``. Used by the project's
``run_experiment.py`` (which ``scripts/reproduce_mini.py`` runs as its experiment 3).

The module itself is pure Python (the runner and the results readers of :mod:`agvm`); importing
it through the package ``effective_batch`` also imports the project's model (detectron2).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import OrderedDict
from typing import List, Optional, Sequence

from agvm.results import curves, read_metrics, read_run
from agvm.runner import REPO_ROOT as ROOT
from agvm.runner import Result, Run

__all__ = ["VARIANTS", "check_runs", "plan", "progress", "summarize", "write_report"]

VARIANTS = ("shared", "unshared", "no_fpn", "masked")
PROJECT = "projects/effective_batch"
CONFIG_DIR = f"{PROJECT}/configs"
TRAIN_NET = f"{PROJECT}/train_net.py"
#: module names of the anchor (backbone) and the dense head in agvm's grouping
BACKBONE, HEAD, NECK = "backbone", "dense_head", "neck"


def config_path(variant: str) -> str:
    return f"{CONFIG_DIR}/{variant}.yaml"


def plan(output_root: str, python: str = sys.executable, max_iter: Optional[int] = None, opts: Sequence[str] = (),
         variants: Sequence[str] = VARIANTS) -> List[Run]:
    """One run per variant into ``<output_root>/<variant>`` (relative: to the repository root):
    ``python projects/effective_batch/train_net.py --config-file projects/effective_batch/configs/<variant>.yaml
    --num-gpus 1 OUTPUT_DIR <out> [SOLVER.MAX_ITER max_iter] [opts]``."""
    extra = (["SOLVER.MAX_ITER", str(max_iter)] if max_iter is not None else []) + list(opts)
    return [Run(v, config_path(v), os.path.join(output_root, v), TRAIN_NET, opts=list(extra), flags=["--num-gpus", "1"],
                python=python, info={"variant": v, "cell": v}, meta=v) for v in variants]


#: Run in the project's folder (its package ``effective_batch`` importable from there): builds
#: and checks each run's config as train_net.py would, with the project's keys.
_CHECK = """
import json, sys
import agvm  # noqa: F401  (compat patches first)
from agvm.detectron2.checks import build_run_config, validate_config  # (and its warning filters)
from agvm.data.register import register_shapes
from effective_batch import add_effective_batch_config, check_loss_keep
register_shapes()
for name, config, opts in json.loads(sys.argv[1]):
    try:
        cfg = build_run_config(config, opts, what=f"run {name}: ", config_adders=[add_effective_batch_config])
        validate_config(cfg, world_size=1)
        check_loss_keep(cfg.MODEL.EFFECTIVE_BATCH.LOSS_KEEP)
    except (KeyError, ValueError) as e:
        text = str(e.args[0] if e.args else e)
        print(text if text.startswith("run ") else f"run {name}: {text}")
        sys.exit(2)
"""


def check_runs(runs: Sequence[Run]) -> None:
    """Build every run's config (defaults, agvm's and the project's keys, the yaml, the
    overrides) and check it, in one child process in the project's folder (where its package
    imports); raises ValueError naming the run, key and value."""
    todo = [[r.name, r.path(r.config), ["OUTPUT_DIR", r.out, *r.opts]] for r in runs]
    if not todo:
        return
    proc = subprocess.run([sys.executable, "-c", _CHECK, json.dumps(todo)], cwd=os.path.join(ROOT, PROJECT),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        lines = proc.stdout.strip().splitlines() or proc.stderr.strip().splitlines()[-1:]
        raise ValueError(lines[-1] if lines else f"checking the effective-batch configs failed (exit {proc.returncode})")


def progress(result: Result) -> str:
    """The line :func:`agvm.runner.execute` prints when a variant's run ends."""
    s = summarize(result.run.path(result.run.out))
    return (f"{result.run.name}: exit {result.record['returncode']}, {s['estimates']} Φ estimates, "
            f"Φ_head/Φ_backbone {_f(s['ratio'])} in {result.record['wall_s'] / 60:.1f} min")


def describe(variant: str, cfg: Optional[dict]) -> str:
    """What ``variant`` changes, with the values read from its run's config.yaml (``cfg``)."""
    eb = ((cfg or {}).get("MODEL") or {}).get("EFFECTIVE_BATCH") or {}
    if variant == "shared":
        return "stock head, shared by all FPN levels (reference)"
    if variant == "unshared":
        return "one head per FPN level"
    if variant == "no_fpn":
        feats = ((cfg or {}).get("MODEL") or {}).get("RETINANET", {}).get("IN_FEATURES")
        return f"no FPN: ResNet only, head on {', '.join(feats) if feats else 'one level'}"
    if variant == "masked":
        keep = eb.get("LOSS_KEEP")
        return f"losses of a random fraction {keep} of anchor locations kept" if keep is not None else "masked losses"
    return variant


def _mean(xs: Sequence[float]) -> Optional[float]:
    xs = [x for x in xs if math.isfinite(x)]
    return sum(xs) / len(xs) if xs else None


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def per_estimate_ratios(phi) -> List[tuple]:
    """``[(iteration, Φ_dense_head / Φ_backbone)]`` at the estimates where both are finite
    (and Φ_backbone > 0); ``phi`` is :func:`agvm.results.curves` of a run."""
    if BACKBONE not in phi or HEAD not in phi:
        return []
    back = {it: v for it, v in zip(*phi[BACKBONE]) if math.isfinite(v) and v > 0}
    return [(it, v / back[it]) for it, v in zip(*phi[HEAD]) if it in back and math.isfinite(v)]


def summarize(out_dir: str) -> dict:
    """Numbers of one run folder, from its metrics.json (and agvm_run.json, config.yaml):

    ``estimates`` (iterations with a backbone Φ), ``nonfinite`` (non-finite Φ values, left out
    of the means), ``phi`` / ``phi_last`` ({module: mean Φ} over all estimates / the last half,
    i.e. the last ⌈n/2⌉ of the n estimates), ``ratio`` / ``ratio_last`` (mean Φ_dense_head /
    mean Φ_backbone over the same estimates), ``ratios`` (:func:`per_estimate_ratios`),
    ``ratio_each`` / ``ratio_each_se`` (their mean and its standard error, std/√n; the
    estimates are autocorrelated, so it is a lower bound), ``curves`` ({module: (iterations, Φ)}),
    ``last_loss`` (the last logged total_loss), ``iterations`` (last logged iteration + 1),
    ``wall_s``, ``command``, ``returncode`` (None = no record or not finished), ``config``."""
    records = read_metrics(out_dir)
    phi = curves(records, "phi")
    its = [r["iteration"] for r in records if "iteration" in r]
    losses = [r["total_loss"] for r in records if "total_loss" in r]
    run = read_run(out_dir) or {}
    out = OrderedDict(
        estimates=len(phi.get(BACKBONE, ([], []))[0]),
        nonfinite=sum(1 for _, vals in phi.values() for v in vals if not math.isfinite(v)),
        phi=OrderedDict(), phi_last=OrderedDict(), curves=phi,
        last_loss=losses[-1] if losses else None, iterations=max(its) + 1 if its else None,
        wall_s=run.get("wall_s"), command=run.get("command"), returncode=run.get("returncode"), config=None,
    )
    for module, (_, vals) in phi.items():
        out["phi"][module] = _mean(vals)
        out["phi_last"][module] = _mean(vals[len(vals) // 2:])
    out["ratio"] = _ratio(out["phi"].get(HEAD), out["phi"].get(BACKBONE))
    out["ratio_last"] = _ratio(out["phi_last"].get(HEAD), out["phi_last"].get(BACKBONE))
    out["ratios"] = per_estimate_ratios(phi)
    r = [v for _, v in out["ratios"]]
    out["ratio_each"] = _mean(r)
    out["ratio_each_se"] = (math.sqrt(sum((v - out["ratio_each"]) ** 2 for v in r) / (len(r) - 1) / len(r))
                            if len(r) > 1 else None)
    path = os.path.join(out_dir, "config.yaml")
    if os.path.exists(path):
        import yaml

        with open(path) as f:
            out["config"] = yaml.safe_load(f)
    return out


def _f(x, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _setup(cfg: Optional[dict]) -> str:
    s = (cfg or {}).get("SOLVER") or {}
    a = s.get("AGVM") or {}
    if not s:
        return "—"
    return (f"{s.get('OPTIMIZER', '?')} lr {s.get('BASE_LR', '?')}, batch {s.get('IMS_PER_BATCH', '?')}, "
            f"{s.get('MAX_ITER', '?')} it, Φ every {a.get('INTERVAL', '?')} from it {a.get('START_ITER', '?')}")


def markdown_table(rows: "OrderedDict[str, dict]") -> str:
    """The table of :func:`summarize` results, one row per variant."""
    head = ("| variant | change | Φ backbone | Φ neck | Φ dense_head | Φ_head / Φ_backbone | ditto, last half "
            "| per-estimate ratio, mean ± s.e. | estimates | last loss | wall | status |")
    lines = [head, "|" + "---|" * 12]
    for variant, s in rows.items():
        status = ("missing" if s["iterations"] is None and s["returncode"] is None else
                  "running or killed" if s["returncode"] is None else
                  "ok" if s["returncode"] == 0 and s["nonfinite"] == 0 else
                  f"exit {s['returncode']}" if s["returncode"] != 0 else f"{s['nonfinite']} non-finite Φ")
        wall = f"{s['wall_s'] / 60:.1f} min" if s["wall_s"] is not None else "—"
        lines.append(
            f"| {variant} | {describe(variant, s['config'])} | {_f(s['phi'].get(BACKBONE))} | {_f(s['phi'].get(NECK))} | "
            f"{_f(s['phi'].get(HEAD))} | {_f(s['ratio'])} | {_f(s['ratio_last'])} | "
            f"{_f(s['ratio_each'])}{' ± ' + _f(s['ratio_each_se']) if s['ratio_each_se'] is not None else ''} | {s['estimates']} | "
            f"{_f(s['last_loss'])} | {wall} | {status} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: "OrderedDict[str, dict]", path: str) -> Optional[str]:
    """``path`` (PNG): left, Φ_dense_head / Φ_backbone per estimate against iteration, one line
    per variant; right, both Φ curves per variant (backbone solid, head dashed). None when no
    run logged Φ."""
    if not any(s["curves"] for s in rows.values()):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_r, ax_p) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (variant, s) in enumerate(rows.items()):
        color = f"C{i}"
        b, h = s["curves"].get(BACKBONE), s["curves"].get(HEAD)
        if not (b and h):
            continue
        pairs = s["ratios"]
        ax_r.plot([p[0] for p in pairs], [p[1] for p in pairs], color=color, label=variant)
        ax_p.plot(*b, color=color, label=f"{variant}: backbone")
        ax_p.plot(*h, color=color, linestyle="--", label=f"{variant}: dense_head")
    ax_r.axhline(1.0, color="gray", linewidth=0.8)
    ax_r.set_ylabel("Φ_dense_head / Φ_backbone")
    ax_p.set_ylabel("Φ = 1 − cos(g₁, g₂)")
    for ax in (ax_r, ax_p):
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Effective batch: dense head vs backbone gradient variance")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(output_root: str, results: str, argv_line: str, variants: Sequence[str] = VARIANTS) -> str:
    """Write ``<results>/README.md`` (and ``phi.png``) from the runs in ``<output_root>/<variant>``;
    returns the README's path."""
    rows = OrderedDict((v, summarize(os.path.join(output_root, v))) for v in variants)
    os.makedirs(results, exist_ok=True)
    png = plot(rows, os.path.join(results, "phi.png"))
    machines = sorted({(read_run(os.path.join(output_root, v)) or {}).get("machine") for v in variants} - {None})
    total = sum(s["wall_s"] or 0 for s in rows.values())
    setups = OrderedDict((v, _setup(s["config"])) for v, s in rows.items() if s["config"])
    lines = [
        "# Effective batch: gradient variance of the dense head vs the backbone (mini RetinaNet)",
        "",
        "The paper's controlled experiment behind its effective-batch explanation: a dense head sees many more "
        "samples per image than the backbone, so its gradient variance Φ is smaller; after each change that shrinks "
        "the head's effective batch (per-level heads, no FPN, masked location losses) Φ_dense_head / Φ_backbone "
        "should move towards 1. Φ = 1 − cos(g₁, g₂) of two half-batch gradients (AGVM in MEASURE_ONLY: plain SGD "
        "steps). Written by `projects/effective_batch/run_experiment.py` from each run's `metrics.json`; the ratio is mean Φ_head / "
        "mean Φ_backbone over the estimates (last half: the later half of them); the per-estimate ratio is the mean of "
        "Φ_head / Φ_backbone at each estimate, with its standard error (std/√n; the estimates are autocorrelated, so "
        "the true uncertainty is larger).",
        "",
        f"Command: `{argv_line}`",
        "",
        f"Machine: {'; '.join(machines) if machines else 'no runs yet'}",
        "",
        f"Total wall time of the runs: {total / 60:.1f} min",
        "",
        markdown_table(rows),
    ]
    if setups:
        lines += ["Setup (from each run's config.yaml):", ""]
        lines += [f"- `{v}`: {text}" for v, text in setups.items()]
        lines.append("")
    if png:
        lines += ["![Φ_dense_head / Φ_backbone and Φ per variant](phi.png)", ""]
    lines += ["Runs:", ""]
    for v, s in rows.items():
        if s["command"]:
            lines.append(f"- `{v}`: `{s['command']}` (exit {s['returncode']}, {s['wall_s']} s)")
        else:
            lines.append(f"- `{v}`: no run record")
    text = ("\n".join(lines) + "\n").replace(ROOT + os.sep, "")
    path = os.path.join(results, "README.md")
    with open(path, "w") as f:
        f.write(text)
    return path
