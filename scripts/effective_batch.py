#!/usr/bin/env python
"""The paper's effective-batch experiment at mini scale: Φ of the dense head vs the backbone.

    python scripts/effective_batch.py                      # run the 4 variants (2 at a time), write the report
    python scripts/effective_batch.py --jobs 1 shared masked
    python scripts/effective_batch.py --dry-run            # print the training commands
    python scripts/effective_batch.py --max-iter 20        # shorter runs (their own fingerprint: not reused for full ones)
    python scripts/effective_batch.py --report-only        # report from existing runs
    python scripts/effective_batch.py train --config-file projects/retinanet/configs/effective_batch/shared.yaml \\
        OUTPUT_DIR output/effective_batch/shared            # train one config (what the runs execute)

Variants (``projects/retinanet/configs/effective_batch/<variant>.yaml``, all
``EffectiveBatchRetinaNet`` in MEASURE_ONLY, see :mod:`agvm.detectron2.effective_batch`):
``shared`` (the stock head, reference), ``unshared`` (one head per FPN level), ``no_fpn``
(ResNet only, head on res4), ``masked`` (75 % of anchor locations' losses masked). Each runs into
``<output-root>/<variant>`` (default ``output/effective_batch``) with ``stdout.log`` and
``agvm_run.json``; a finished run (exit 0, same config fingerprint) is reused unless
``--rerun``; before a run starts, what an earlier one left in its folder is removed. Then
``<results>/README.md`` (default ``results/effective_batch``) gets a table per variant,
computed from each run's ``metrics.json`` only: mean Φ of backbone, neck, dense_head,
Φ_head/Φ_backbone over the run and over its last half, the per-estimate ratio (mean ± s.e.),
the number of estimates, the wall time, the command; and ``<results>/phi.png`` the curves. ``-- KEY VALUE ...`` at the end overrides
every variant's config. Relative paths are taken from the repository root.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from agvm.results import curves, read_metrics, read_run  # noqa: E402
from agvm.runner import config_fingerprint, parse_with_overrides, run_all, run_logged, stale_reason  # noqa: E402

VARIANTS = ("shared", "unshared", "no_fpn", "masked")
CONFIG_DIR = "projects/retinanet/configs/effective_batch"
#: module names of the anchor (backbone) and the dense head in agvm's grouping
BACKBONE, HEAD, NECK = "backbone", "dense_head", "neck"


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


# ------------------------------------------------------------------------------ arguments
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variants", nargs="*", metavar="VARIANT", help=f"variants to run (default all: {' '.join(VARIANTS)})")
    p.add_argument("--jobs", type=int, default=2, help="runs at once, each with its share of the CPU threads; default 2")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing, write nothing")
    p.add_argument("--report-only", action="store_true", help="run nothing; write the report from existing runs")
    p.add_argument("--max-iter", type=int, default=None, help="override SOLVER.MAX_ITER (iterations) of every variant")
    p.add_argument("--rerun", action="store_true", help="run variants that already finished again")
    p.add_argument("--output-root", default="output/effective_batch", help="runs go to <root>/<variant>; default output/effective_batch")
    p.add_argument("--results", default="results/effective_batch", help="folder of README.md and phi.png; default results/effective_batch")
    p.add_argument("--python", default=sys.executable, help="interpreter of the training runs; default this one")
    args = parse_with_overrides(p, argv)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    args.variants = args.variants or list(VARIANTS)
    if args.jobs < 1:
        p.error(f"--jobs must be ≥ 1, got {args.jobs}")
    if args.max_iter is not None and args.max_iter < 1:
        p.error(f"--max-iter must be ≥ 1 (iterations), got {args.max_iter}")
    return args


def _abs(path: str) -> str:
    return path if os.path.isabs(path) else os.path.join(ROOT, path)


def config_path(variant: str) -> str:
    return f"{CONFIG_DIR}/{variant}.yaml"


def variant_command(args, variant: str) -> List[str]:
    """The command line that trains ``variant`` (run from the repository root)."""
    cmd = [args.python, "scripts/effective_batch.py", "train", "--config-file", config_path(variant), "--num-gpus", "1",
           "OUTPUT_DIR", os.path.join(args.output_root, variant)]
    if args.max_iter is not None:
        cmd += ["SOLVER.MAX_ITER", str(args.max_iter)]
    return cmd + list(args.opts)


def variant_fingerprint(args, variant: str) -> str:
    cmd = variant_command(args, variant)
    i = cmd.index("--config-file")
    return config_fingerprint(_abs(cmd[i + 1]), cmd[i + 2:])


def load_config(variant: str, opts: Sequence[str] = ()):
    """The config ``variant`` trains with (defaults, agvm and effective-batch keys, the yaml,
    ``opts``); raises KeyError/ValueError on an unknown key or a bad value."""
    import agvm  # noqa: F401  (compat patches first)
    from detectron2.config import get_cfg

    from agvm.detectron2 import add_agvm_config, check_agvm_config
    from agvm.detectron2.effective_batch import add_effective_batch_config, check_loss_keep

    cfg = get_cfg()
    add_agvm_config(cfg)
    add_effective_batch_config(cfg)
    cfg.merge_from_file(_abs(config_path(variant)))
    cfg.merge_from_list(list(opts))
    check_agvm_config(cfg)
    check_loss_keep(cfg.MODEL.EFFECTIVE_BATCH.LOSS_KEEP)
    return cfg


# ------------------------------------------------------------------------------ report
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
        "steps). Written by `scripts/effective_batch.py` from each run's `metrics.json`; the ratio is mean Φ_head / "
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


# ------------------------------------------------------------------------------ main
#: What a training run leaves in its folder (detectron2 appends to metrics.json and log.txt).
RUN_FILES = ("metrics.json", "log.txt", "config.yaml", "last_checkpoint", "eval_results.json", "agvm_run.json",
             "stdout.log")


def clear_run(out_dir: str) -> List[str]:
    """Remove what an earlier run left in ``out_dir`` (:data:`RUN_FILES`, checkpoints
    ``model_*.pth``, tensorboard ``events.out.tfevents.*``), so that a new run's metrics.json
    holds its own rows only; returns the names removed. Other files are kept."""
    if not os.path.isdir(out_dir):
        return []
    removed = []
    for name in sorted(os.listdir(out_dir)):
        if name in RUN_FILES or name.startswith("events.out.tfevents.") or (name.startswith("model_") and name.endswith(".pth")):
            os.remove(os.path.join(out_dir, name))
            removed.append(name)
    return removed


def train(argv: Sequence[str]):
    """``train`` command: one training run (detectron2's arguments, MODEL.EFFECTIVE_BATCH.* known)."""
    import agvm  # noqa: F401  (compat patches first)
    from agvm.detectron2.effective_batch import launch_training

    return launch_training(argv)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        train(argv[1:])
        return 0
    args = parse_args(argv)
    threads = "".join(f"{k}={os.environ[k]} " for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ)
    argv_line = threads + "python scripts/effective_batch.py " + " ".join(shlex.quote(a) for a in argv)
    output_abs, results_abs = _abs(args.output_root), _abs(args.results)
    try:
        for v in args.variants:
            load_config(v, variant_command(args, v)[variant_command(args, v).index("OUTPUT_DIR"):])
    except (KeyError, ValueError) as e:
        print(f"effective_batch.py: error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        for v in args.variants:
            print(" ".join(shlex.quote(c) for c in variant_command(args, v)))
        print(f"# {len(args.variants)} run(s); dry run: nothing run or written", file=sys.stderr)
        return 0
    failed: List[str] = []
    if not args.report_only:
        pending = []
        for v in args.variants:
            out = os.path.join(output_abs, v)
            run = read_run(out) or {}
            stale = stale_reason(out, variant_fingerprint(args, v))
            if run.get("returncode") == 0 and stale is None and not args.rerun:
                print(f"skip {v}: finished ({out})", flush=True)
                continue
            if run.get("returncode") == 0 and stale and not args.rerun:
                print(f"stale {v}: finished, but {stale}; running it again", flush=True)
            pending.append(v)

        def one(variant: str, threads: Optional[int]) -> str:
            out = os.path.join(output_abs, variant)
            cmd = variant_command(args, variant)
            record = {"variant": variant, "cell": variant, "fingerprint": variant_fingerprint(args, variant)}
            clear_run(out)
            rec = run_logged(cmd, out, record, cwd=ROOT, threads=threads, line=" ".join(shlex.quote(c) for c in cmd),
                             progress=lambda t: print(t, flush=True))
            s = summarize(out)
            if rec["returncode"] != 0:
                failed.append(f"{variant} (exit {rec['returncode']}, see {out}/stdout.log)")
            return (f"{variant}: exit {rec['returncode']}, {s['estimates']} Φ estimates, "
                    f"Φ_head/Φ_backbone {_f(s['ratio'])} in {rec['wall_s'] / 60:.1f} min")

        run_all(pending, one, args.jobs, print_fn=lambda s: print(s, flush=True))
    print(f"wrote {write_report(output_abs, results_abs, argv_line)}")
    if failed:
        print("FAILED runs:\n  " + "\n  ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
