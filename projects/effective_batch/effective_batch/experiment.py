"""The effective-batch experiment (``projects/effective_batch``): its plan and its report (pure Python).

The paper's controlled experiment behind its effective-batch explanation, at mini scale: Φ of
RetinaNet's dense head against its backbone for four variants (``VARIANTS``, one config each in
``projects/effective_batch/configs/``), all ``EffectiveBatchRetinaNet`` in MEASURE_ONLY:
``shared`` (the stock head, reference), ``unshared`` (one head per FPN level), ``no_fpn``
(ResNet only, head on res4), ``masked`` (75 % of anchor locations' losses masked). Each variant
runs once per seed (``SEEDS``, run ``<variant>_s<seed>``) in one regime for all (:data:`REGIME`:
64 px images of the 1,600-image shapes set, as the evidence experiment's r64_1600x8_late, from
the pretrained mini backbone). :func:`plan` gives the runs (``projects/effective_batch/train_net.py``,
for :func:`agvm.runner.execute`; their small records copied to ``<records>/<run>``),
:func:`check_runs` checks their configs before anything starts, :func:`write_report` writes
``README.md`` and ``phi.png`` from the records alone (no clock, no machine state beyond what the
records hold: the same records give the same text). :func:`mean_se` and :func:`difference` are
its statistics. Used by the project's ``run_experiment.py`` (which ``scripts/reproduce_mini.py``
runs as its experiment 3).

The module itself is pure Python (the runner and the results readers of :mod:`agvm`); importing
it through the package ``effective_batch`` also imports the project's model (detectron2).
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys
from collections import OrderedDict
from typing import Dict, List, Mapping, Optional, Sequence

from agvm.results import curves, read_metrics, read_run
from agvm.runner import REPO_ROOT as ROOT
from agvm.runner import Result, Run, config_fingerprint, outcome

__all__ = ["REGIME", "SEEDS", "VARIANTS", "check_runs", "difference", "mean_se", "plan", "progress",
           "reading", "recorded_seeds", "summarize", "t95", "variant_stats", "write_report"]

VARIANTS = ("shared", "unshared", "no_fpn", "masked")
#: The seeds of the experiment (each fixes the data order and the fresh layers' initialisation).
SEEDS = (0, 1, 2)
REFERENCE = "shared"
PROJECT = "projects/effective_batch"
CONFIG_DIR = f"{PROJECT}/configs"
TRAIN_NET = f"{PROJECT}/train_net.py"
#: module names of the anchor (backbone) and the dense head in agvm's grouping
BACKBONE, HEAD, NECK = "backbone", "dense_head", "neck"
#: The standard error each variant's mean Φ_head / Φ_backbone should reach (issue 21).
SE_TARGET = 0.02
#: Environment variable of the shapes training set's size, and the size of the regime's set.
ENV_TRAIN_IMAGES = "AGVM_SHAPES_NUM_TRAIN"
TRAIN_IMAGES = 1600
#: The regime, the same for every variant and seed (on top of each variant's yaml): 64 px images
#: (the evidence experiment's r64_1600x8_late size, its 1,600 training images), batch 16 as two
#: accumulated micro-batches of 8, which are the two halves Φ is measured on, so that an estimate
#: at every iteration costs no extra pass; 100 iterations (one epoch of the 1,600 images), an
#: estimate at each: 100 per run, 300 per variant over three seeds.
REGIME = ("SOLVER.MAX_ITER", "100", "SOLVER.GRAD_ACCUM_STEPS", "2", "SOLVER.AGVM.INTERVAL", "1",
          "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
          "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64", "DATALOADER.NUM_WORKERS", "0")


def config_path(variant: str) -> str:
    return f"{CONFIG_DIR}/{variant}.yaml"


def run_name(variant: str, seed: int) -> str:
    return f"{variant}_s{seed}"


def plan(output_root: str, python: str = sys.executable, max_iter: Optional[int] = None, opts: Sequence[str] = (),
         variants: Sequence[str] = VARIANTS, seeds: Sequence[int] = SEEDS, records: Optional[str] = None) -> List[Run]:
    """One run per seed and variant (seed-major, so that a seed's variants finish together),
    ``<variant>_s<seed>`` into ``<output_root>/<run>`` (relative: to the repository root):
    ``AGVM_SHAPES_NUM_TRAIN=1600 python projects/effective_batch/train_net.py --config-file
    projects/effective_batch/configs/<variant>.yaml --num-gpus 1 OUTPUT_DIR <out> <REGIME> SEED <seed>
    [SOLVER.MAX_ITER max_iter] [opts]``. With ``records``, each run's small records are copied
    to ``<records>/<run>`` and the reuse rule reads them there. The training-set size is part of
    the fingerprint (an environment variable, not a config key)."""
    extra = (["SOLVER.MAX_ITER", str(max_iter)] if max_iter is not None else []) + list(opts)
    shown_python = "python" if python == sys.executable else python
    out_root = os.path.relpath(output_root, ROOT) if os.path.isabs(output_root) and \
        output_root.startswith(ROOT + os.sep) else output_root
    runs = []
    for seed in seeds:
        for v in variants:
            name = run_name(v, seed)
            run_opts = [*REGIME, "SEED", str(seed), *extra]
            flags = ["--num-gpus", "1"]
            line = " ".join(shlex.quote(c) for c in (
                f"{ENV_TRAIN_IMAGES}={TRAIN_IMAGES}", shown_python, TRAIN_NET, "--config-file", config_path(v), *flags,
                "OUTPUT_DIR", os.path.join(out_root, name), *run_opts))
            runs.append(Run(
                name, config_path(v), os.path.join(output_root, name), TRAIN_NET, opts=run_opts, flags=flags,
                python=python, records=os.path.join(records, name) if records else None, line=line,
                info={"variant": v, "seed": seed, "cell": name, "train_images": TRAIN_IMAGES},
                env={ENV_TRAIN_IMAGES: str(TRAIN_IMAGES)}, meta=(v, seed),
                fingerprint=config_fingerprint(os.path.join(ROOT, config_path(v)),
                                               [*flags, *run_opts, f"{ENV_TRAIN_IMAGES}={TRAIN_IMAGES}"])))
    return runs


def recorded_seeds(records: str, variants: Sequence[str] = VARIANTS) -> List[int]:
    """The seeds of the run folders ``<variant>_s<seed>`` in ``records`` (sorted)."""
    if not os.path.isdir(records):
        return []
    pattern = re.compile(rf"^({'|'.join(map(re.escape, variants))})_s(\d+)$")
    return sorted({int(m.group(2)) for m in map(pattern.match, os.listdir(records)) if m})


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
    """The line :func:`agvm.runner.execute` prints when a run ends."""
    s = summarize(result.run.record_dir)
    return (f"{result.run.name}: exit {result.record['returncode']}, {s['estimates']} Φ estimates, "
            f"Φ_head/Φ_backbone {_f(s['ratio_each'])} in {result.record['wall_s'] / 60:.1f} min")


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


def mean_se(xs: Sequence[float]) -> tuple:
    """``(mean, standard error)`` of the finite values of ``xs``: the standard error is the
    sample standard deviation (n − 1) over √n; None where there are too few values (no value:
    both None; one value: no standard error)."""
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, None
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


def per_estimate_ratios(phi) -> List[tuple]:
    """``[(iteration, Φ_dense_head / Φ_backbone)]`` at the estimates where both are finite
    (and Φ_backbone > 0); ``phi`` is :func:`agvm.results.curves` of a run."""
    if BACKBONE not in phi or HEAD not in phi:
        return []
    back = {it: v for it, v in zip(*phi[BACKBONE]) if math.isfinite(v) and v > 0}
    return [(it, v / back[it]) for it, v in zip(*phi[HEAD]) if it in back and math.isfinite(v)]


def summarize(out_dir: str) -> dict:
    """Numbers of one run folder (or its copied records), from its metrics.json (and
    agvm_run.json, config.yaml):

    ``estimates`` (iterations with a backbone Φ), ``nonfinite`` (non-finite Φ values, left out
    of the means), ``phi`` / ``phi_last`` ({module: mean Φ} over all estimates / the last half,
    i.e. the last ⌈n/2⌉ of the n estimates), ``ratio`` / ``ratio_last`` (mean Φ_dense_head /
    mean Φ_backbone over the same estimates), ``ratios`` (:func:`per_estimate_ratios`),
    ``ratio_each`` / ``ratio_each_se`` (their mean and its standard error, std/√n; the
    estimates are autocorrelated, so it is a lower bound), ``curves`` ({module: (iterations, Φ)}),
    ``last_loss`` (the last logged total_loss), ``iterations`` (last logged iteration + 1),
    ``wall_s``, ``command``, ``returncode`` (None = no record or not finished), ``outcome``
    (:func:`agvm.runner.outcome`), ``record`` (agvm_run.json), ``config``."""
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
        wall_s=run.get("wall_s"), command=run.get("command"), returncode=run.get("returncode"),
        outcome=outcome(out_dir), record=run, config=None,
    )
    for module, (_, vals) in phi.items():
        out["phi"][module] = _mean(vals)
        out["phi_last"][module] = _mean(vals[len(vals) // 2:])
    out["ratio"] = _ratio(out["phi"].get(HEAD), out["phi"].get(BACKBONE))
    out["ratio_last"] = _ratio(out["phi_last"].get(HEAD), out["phi_last"].get(BACKBONE))
    out["ratios"] = per_estimate_ratios(phi)
    out["ratio_each"], out["ratio_each_se"] = mean_se([v for _, v in out["ratios"]])
    path = os.path.join(out_dir, "config.yaml")
    if os.path.exists(path):
        import yaml

        with open(path) as f:
            out["config"] = yaml.safe_load(f)
    return out


def _usable(s: dict) -> bool:
    """A finished run (exit 0) with at least one finite per-estimate ratio: it counts."""
    return s["returncode"] == 0 and bool(s["ratios"])


def variant_stats(runs: Mapping[int, dict]) -> dict:
    """One variant's numbers over its seeds; ``runs``: {seed: :func:`summarize`}. Runs that did
    not finish (or logged no ratio) are left out. ``seeds`` (those counted), ``estimates`` (all
    their ratios), ``run_means`` ({seed: the run's mean per-estimate ratio}), ``seed_mean`` /
    ``seed_se`` (:func:`mean_se` of the run means: the error over seeds, which the
    autocorrelation within a run does not shrink), ``pooled_mean`` / ``pooled_se``
    (:func:`mean_se` of all the seeds' per-estimate ratios together), ``phi`` ({module: mean Φ
    over all the estimates})."""
    ok = OrderedDict((seed, s) for seed, s in sorted(runs.items()) if _usable(s))
    pooled = [v for s in ok.values() for _, v in s["ratios"]]
    out = OrderedDict(seeds=list(ok), estimates=len(pooled),
                      run_means=OrderedDict((seed, s["ratio_each"]) for seed, s in ok.items()))
    out["seed_mean"], out["seed_se"] = mean_se(list(out["run_means"].values()))
    out["pooled_mean"], out["pooled_se"] = mean_se(pooled)
    modules = [m for m in (BACKBONE, NECK, HEAD) if any(m in s["curves"] for s in ok.values())]
    out["phi"] = OrderedDict((m, _mean([v for s in ok.values() for v in s["curves"].get(m, ([], []))[1]]))
                             for m in modules)
    return out


def difference(variant: dict, reference: dict) -> dict:
    """``variant`` − ``reference`` (two :func:`variant_stats`): ``per_seed`` ({seed: difference of
    the run means} on the seeds both have), ``paired_mean`` / ``paired_se`` (:func:`mean_se` of
    those differences, paired by seed), ``pooled`` / ``pooled_se`` (difference of the pooled
    means, s.e. √(s.e.₁² + s.e.₂²) as of independent estimates), ``above`` (seeds on which the
    variant's ratio is the larger)."""
    seeds = [s for s in variant["run_means"] if s in reference["run_means"]]
    per_seed = OrderedDict((s, variant["run_means"][s] - reference["run_means"][s]) for s in seeds)
    out = OrderedDict(per_seed=per_seed, above=sum(d > 0 for d in per_seed.values()))
    out["paired_mean"], out["paired_se"] = mean_se(list(per_seed.values()))
    a, b = variant["pooled_mean"], reference["pooled_mean"]
    out["pooled"] = a - b if a is not None and b is not None else None
    sa, sb = variant["pooled_se"], reference["pooled_se"]
    out["pooled_se"] = math.sqrt(sa ** 2 + sb ** 2) if sa is not None and sb is not None else None
    return out


#: Two-sided 95 % quantiles of Student's t for 1-10 degrees of freedom.
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def t95(df: int) -> float:
    """The two-sided 95 % quantile of Student's t with ``df`` ≥ 1 degrees of freedom (a table
    to 10, then the Cornish-Fisher expansion about the normal quantile, within 0.001)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be ≥ 1, got {df}")
    if df <= len(_T95):
        return _T95[df - 1]
    z = 1.959964
    return (z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3))


def reading(variant: str, d: dict) -> str:
    """One sentence on ``variant`` − the reference (:func:`difference`): the paired mean ± s.e.,
    its 95 % interval (t with n − 1 degrees of freedom over the n seeds) and what it says."""
    n = len(d["per_seed"])
    if n < 2 or d["paired_se"] is None:
        return f"- `{variant}`: fewer than two seeds with both runs, no error estimate."
    lo, hi = (d["paired_mean"] + k * t95(n - 1) * d["paired_se"] for k in (-1, 1))
    verdict = ("higher than `shared` (towards 1)" if lo > 0 else "lower than `shared`" if hi < 0 else
               "not distinguishable from `shared` at 95 %")
    return (f"- `{variant}` − `{REFERENCE}`: {_pm(d['paired_mean'], d['paired_se'], sign=True)} over {n} seeds, "
            f"95 % interval [{_f(lo, sign=True)}, {_f(hi, sign=True)}] (t, {n - 1} degrees of freedom), above on "
            f"{d['above']} of {n} seeds: {verdict}; pooled over the estimates "
            f"{_pm(d['pooled'], d['pooled_se'], sign=True)}.")


def _f(x, digits: int = 3, sign: bool = False) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    if round(x, digits) == 0:
        x = 0.0  # no "-0.000"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def _pm(m, se, sign: bool = False) -> str:
    return _f(m, sign=sign) + (f" ± {_f(se)}" if se is not None and m is not None else "")


def _status(s: dict) -> str:
    if s["record"] == {}:
        return "missing"
    if s["returncode"] is None:
        return "running or killed"
    if s["returncode"] != 0:
        return s["outcome"] if s["outcome"] in ("diverged", "failed") else f"exit {s['returncode']}"
    return "ok" if s["nonfinite"] == 0 else f"ok, {s['nonfinite']} non-finite Φ left out"


def _setup(cfg: Optional[dict], record: dict) -> str:
    """The run's settings that every variant shares, from its config.yaml and record."""
    cfg = cfg or {}
    s, inp = cfg.get("SOLVER") or {}, cfg.get("INPUT") or {}
    a = s.get("AGVM") or {}
    if not s:
        return "—"
    size = inp.get("MIN_SIZE_TRAIN")
    size = size[0] if isinstance(size, (list, tuple)) and len(size) == 1 else size
    images = record.get("train_images")
    every = "at every iteration" if a.get("INTERVAL") == 1 else f"every {a.get('INTERVAL', '?')} iterations"
    return (f"{s.get('OPTIMIZER', '?')} lr {s.get('BASE_LR', '?')}, momentum {s.get('MOMENTUM', '?')}, "
            f"batch {s.get('IMS_PER_BATCH', '?')} (as {s.get('GRAD_ACCUM_STEPS', '?')} accumulated micro-batches), "
            f"{s.get('MAX_ITER', '?')} iterations, warm-up {s.get('WARMUP_ITERS', '?')}, "
            f"images {size} px (max {inp.get('MAX_SIZE_TRAIN', '?')}), "
            f"{images if images is not None else 'the default number of'} training images, "
            f"weights `{(cfg.get('MODEL') or {}).get('WEIGHTS', '?')}`, "
            f"an estimate of Φ {every} from iteration {a.get('START_ITER', '?')}")


def _seed_cells(values: Mapping[int, Optional[float]], seeds: Sequence[int], sign: bool = False) -> str:
    return " / ".join(_f(values.get(s), sign=sign) for s in seeds)


def variant_table(rows: "OrderedDict[str, OrderedDict[int, dict]]", stats: Mapping[str, dict],
                  seeds: Sequence[int]) -> str:
    """Per variant: its change, seeds counted, estimates, mean Φ, per-seed run means, their mean ±
    s.e. over seeds, the pooled per-estimate mean ± s.e., and whether both s.e. are ≤ SE_TARGET."""
    lines = [f"| variant | change | seeds | estimates | Φ backbone | Φ neck | Φ dense_head "
             f"| Φ_head / Φ_backbone per seed ({' / '.join(f's{s}' for s in seeds)}) "
             f"| mean over seeds ± s.e. | pooled per-estimate mean ± s.e. | s.e. ≤ {SE_TARGET} (seeds / pooled) |",
             "|" + "---|" * 10]
    for variant, runs in rows.items():
        st = stats[variant]
        cfg = next((s["config"] for s in runs.values() if s["config"]), None)
        target = " / ".join("—" if se is None else ("yes" if se <= SE_TARGET else "no")
                            for se in (st["seed_se"], st["pooled_se"]))
        lines.append(
            f"| {variant} | {describe(variant, cfg)} | {len(st['seeds'])} | {st['estimates']} | "
            f"{_f(st['phi'].get(BACKBONE))} | {_f(st['phi'].get(NECK))} | {_f(st['phi'].get(HEAD))} | "
            f"{_seed_cells(st['run_means'], seeds)} | {_pm(st['seed_mean'], st['seed_se'])} | "
            f"{_pm(st['pooled_mean'], st['pooled_se'])} | {target} |")
    return "\n".join(lines) + "\n"


def difference_table(stats: Mapping[str, dict], seeds: Sequence[int]) -> str:
    """Per variant other than the reference: :func:`difference` from it."""
    lines = [f"| variant − {REFERENCE} | per seed ({' / '.join(f's{s}' for s in seeds)}) "
             "| paired by seed: mean ± s.e. | pooled: difference ± s.e. | seeds above shared |",
             "|---|---|---|---|---|"]
    for variant, st in stats.items():
        if variant == REFERENCE:
            continue
        d = difference(st, stats[REFERENCE])
        lines.append(f"| {variant} | {_seed_cells(d['per_seed'], seeds, sign=True)} | "
                     f"{_pm(d['paired_mean'], d['paired_se'], sign=True)} | {_pm(d['pooled'], d['pooled_se'], sign=True)} | "
                     f"{d['above']} of {len(d['per_seed'])} |")
    return "\n".join(lines) + "\n"


def run_table(rows: "OrderedDict[str, OrderedDict[int, dict]]") -> str:
    """One row per run: Φ per module, the ratio of the means (all and last half of the
    estimates), the per-estimate ratio's mean ± s.e. within the run, estimates, last loss, wall time, status."""
    lines = ["| run | Φ backbone | Φ neck | Φ dense_head | mean Φ_head / mean Φ_backbone | ditto, last half "
             "| per-estimate ratio, mean ± s.e. | estimates | last loss | wall | status |", "|" + "---|" * 11]
    for variant, runs in rows.items():
        for seed, s in runs.items():
            wall = f"{s['wall_s'] / 60:.1f} min" if s["wall_s"] is not None else "—"
            lines.append(
                f"| {run_name(variant, seed)} | {_f(s['phi'].get(BACKBONE))} | {_f(s['phi'].get(NECK))} | "
                f"{_f(s['phi'].get(HEAD))} | {_f(s['ratio'])} | {_f(s['ratio_last'])} | "
                f"{_pm(s['ratio_each'], s['ratio_each_se'])} | {s['estimates']} | {_f(s['last_loss'])} | {wall} | "
                f"{_status(s)} |")
    return "\n".join(lines) + "\n"


def criterion(stats: Mapping[str, dict]) -> str:
    """The sentence on the s.e. target: for which variants each kind of s.e. meets it."""
    parts = []
    for what, key in (("over seeds", "seed_se"), ("pooled per estimate", "pooled_se")):
        met = [v for v, st in stats.items() if st[key] is not None and st[key] <= SE_TARGET]
        missed = [f"{v} ({_f(st[key])})" if st[key] is not None else f"{v} (no s.e.)"
                  for v, st in stats.items() if v not in met]
        parts.append(f"{what}: " + ("met by every variant" if not missed else
                                    f"met by {', '.join(met) or 'none'}; not by {', '.join(missed)}"))
    return f"Target s.e. ≤ {SE_TARGET} of each variant's mean ratio — " + "; ".join(parts) + "."


def plot(rows: "OrderedDict[str, OrderedDict[int, dict]]", stats: Mapping[str, dict], path: str) -> Optional[str]:
    """``path`` (PNG): left, Φ_dense_head / Φ_backbone against iteration, the mean over seeds
    per variant (each seed faint); right, each variant's mean ratio ± s.e. over seeds (the run
    means as dots). None when no run logged a ratio."""
    if not any(s["ratios"] for runs in rows.values() for s in runs.values()):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_r, ax_m) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
    for i, (variant, runs) in enumerate(rows.items()):
        color = f"C{i}"
        by_it: Dict[int, List[float]] = {}
        for s in runs.values():
            if not _usable(s):
                continue
            ax_r.plot([p[0] for p in s["ratios"]], [p[1] for p in s["ratios"]], color=color, alpha=0.2, linewidth=0.7)
            for it, r in s["ratios"]:
                by_it.setdefault(it, []).append(r)
        its = sorted(by_it)
        ax_r.plot(its, [sum(by_it[it]) / len(by_it[it]) for it in its], color=color, label=variant)
        st = stats[variant]
        ax_m.plot([i] * len(st["run_means"]), list(st["run_means"].values()), "o", color=color, alpha=0.4)
        if st["seed_mean"] is not None:
            ax_m.errorbar([i], [st["seed_mean"]], yerr=[st["seed_se"] or 0.0], fmt="s", color=color, capsize=4)
    ax_r.axhline(1.0, color="gray", linewidth=0.8)
    ax_r.set_xlabel("iteration")
    ax_r.set_ylabel("Φ_dense_head / Φ_backbone")
    ax_r.legend(fontsize=7)
    ax_m.set_xticks(range(len(rows)))
    ax_m.set_xticklabels(list(rows), fontsize=8)
    ax_m.set_ylabel("mean ratio ± s.e. over seeds")
    for ax in (ax_r, ax_m):
        ax.grid(alpha=0.3)
    fig.suptitle("Effective batch: dense head vs backbone gradient variance")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return path


def write_report(records: str, results: str, variants: Sequence[str] = VARIANTS,
                 seeds: Sequence[int] = SEEDS) -> str:
    """Write ``<results>/README.md`` (and ``phi.png``) from the run records in
    ``<records>/<variant>_s<seed>`` alone, for ``seeds`` and the seeds recorded there; returns
    the README's path. The text depends on the records only (the same records, the same bytes)."""
    seeds = sorted(set(seeds) | set(recorded_seeds(records, variants)))
    rows = OrderedDict((v, OrderedDict((s, summarize(os.path.join(records, run_name(v, s)))) for s in seeds))
                       for v in variants)
    stats = OrderedDict((v, variant_stats(runs)) for v, runs in rows.items())
    os.makedirs(results, exist_ok=True)
    png = plot(rows, stats, os.path.join(results, "phi.png"))
    all_runs = [(run_name(v, seed), s) for v, runs in rows.items() for seed, s in runs.items()]
    machines = sorted({s["record"].get("machine") for _, s in all_runs} - {None})
    total = sum(s["wall_s"] or 0 for _, s in all_runs)
    setups: "OrderedDict[str, List[str]]" = OrderedDict()
    for name, s in all_runs:
        if s["config"]:
            setups.setdefault(_setup(s["config"], s["record"]), []).append(name)
    lines = [
        "# Effective batch: gradient variance of the dense head vs the backbone (mini RetinaNet, "
        f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''})",
        "",
        "The paper's controlled experiment behind its effective-batch explanation: a dense head sees many more "
        "samples per image than the backbone, so its gradient variance Φ is smaller; after each change that shrinks "
        "the head's effective batch (per-level heads, no FPN, masked location losses) Φ_dense_head / Φ_backbone "
        "should move towards 1. Φ = 1 − cos(g₁, g₂) of two half-batch gradients (AGVM in MEASURE_ONLY: plain SGD "
        "steps).",
        "",
        "Generated by `python projects/effective_batch/run_experiment.py --report-only` from the run records in "
        "[`runs/`](runs/) (each run's `config.yaml`, `metrics.json`, `agvm_run.json` and the end of its console "
        "output); `python projects/effective_batch/run_experiment.py` runs what is not recorded yet "
        f"(seeds: `--seeds`, default {' '.join(map(str, SEEDS))}) and rewrites this file.",
        "",
        "Statistics. The ratio of a run is the mean over its estimates of Φ_head / Φ_backbone at each estimate. "
        "*Mean over seeds ± s.e.*: the mean of the runs' ratios and its standard error over the seeds (std/√n, "
        "n seeds): the error this report judges by, since consecutive estimates of one run are correlated; with "
        "3 seeds it is itself rough (2 degrees of freedom). *Pooled*: the mean and std/√N over all N estimates "
        "of the seeds together (a lower bound, for the same reason). Differences from "
        f"`{REFERENCE}`: paired by seed (the seed fixes the data order and the fresh layers' initialisation), "
        "the mean ± s.e. over seeds of the per-seed difference of the runs' ratios; pooled, the difference of the "
        "pooled means with √(s.e.₁² + s.e.₂²).",
        "",
        f"Machine: {'; '.join(machines) if machines else 'no runs yet'}",
        "",
        f"Wall time of the runs, added up: {total / 60:.1f} min",
        "",
        "## Φ_head / Φ_backbone per variant",
        "",
        variant_table(rows, stats, seeds),
        criterion(stats),
        "",
        f"## Difference from `{REFERENCE}`",
        "",
        difference_table(stats, seeds),
        "Reading (generated; the interval is the paired one over seeds, which the correlation of the estimates "
        "within a run does not narrow):",
        "",
        *[reading(v, difference(st, stats[REFERENCE])) for v, st in stats.items() if v != REFERENCE],
        "",
    ]
    if png:
        lines += [f"![Φ_dense_head / Φ_backbone per variant]({os.path.basename(png)})", ""]
    lines += ["## Settings", ""]
    if setups:
        for text, names in setups.items():
            lines.append(f"- {'every run' if len(names) == len(all_runs) else ', '.join(names)}: {text}")
        lines.append("")
    else:
        lines += ["No run's config.yaml recorded yet.", ""]
    lines += ["## Runs", "", run_table(rows), "## Commands", "", "```bash"]
    for name, s in all_runs:
        if s["command"]:
            lines.append(f"{s['command']}   # exit {s['returncode']}, {s['wall_s']} s")
    lines += ["```", ""]
    text = "\n".join(lines).replace(ROOT + os.sep, "")
    path = os.path.join(results, "README.md")
    with open(path, "w") as f:
        f.write(text)
    return path
