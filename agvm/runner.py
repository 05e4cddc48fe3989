"""Running training commands into output folders, with records and progress (pure Python).

Shared by ``scripts/reproduce_table.py`` and ``scripts/sweep.py``: each run gets its console
output in ``<out>/stdout.log`` and ``<out>/agvm_run.json`` (the command, exit code, wall time in
seconds, start/finish time, machine), which :mod:`agvm.results` reads back.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, List, Optional, Sequence

__all__ = ["config_fingerprint", "grad_accum_steps", "machine", "parse_with_overrides", "progress_line", "run_logged",
           "run_all", "stale_reason"]


def machine() -> str:
    """A short description of this machine (architecture, CPUs, Python, torch, GPUs)."""
    desc = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    try:
        import torch

        desc += f", torch {torch.__version__}"
        if torch.cuda.is_available():
            desc += f", {torch.cuda.device_count()}× {torch.cuda.get_device_name(0)}"
    except ImportError:  # pragma: no cover
        pass
    return desc


def grad_accum_steps(batch: int, processes: int, max_images_per_gpu: Optional[int]):
    """``(images per process per micro-batch, SOLVER.GRAD_ACCUM_STEPS)`` that run a global
    ``batch`` on ``processes`` GPUs with at most ``max_images_per_gpu`` images per forward
    (None = no limit): the fewest micro-batches that divide the per-process batch. On one
    process the micro-batch is kept even or the count even (AGVM measures Φ on halves).

    Raises ValueError naming the batch when it cannot be split so."""
    if batch % processes:
        raise ValueError(f"the global batch {batch} (SOLVER.IMS_PER_BATCH) is not divisible by {processes} processes")
    per = batch // processes
    limit = per if max_images_per_gpu is None else max_images_per_gpu
    for k in range(1, per + 1):
        micro = per // k
        if per % k or micro > limit:
            continue
        if processes == 1 and k % 2 and micro % 2:
            continue
        return micro, k
    raise ValueError(
        f"the global batch {batch} on {processes} processes ({per} per process) cannot be cut into micro-batches of "
        f"at most {limit} images (--max-images-per-gpu); change the number of GPUs or the limit"
    )


def config_fingerprint(config_file: str, opts: Sequence[str] = ()) -> str:
    """sha256 of what a run's config is made of: the text of ``config_file`` and of every
    ``_BASE_`` file it inherits from, and the ``KEY VALUE`` overrides. A finished run whose
    recorded fingerprint differs was trained with another config (stale)."""
    import yaml

    h = hashlib.sha256()
    todo, seen = [os.path.abspath(config_file)], set()
    while todo:
        path = todo.pop()
        if path in seen or not os.path.isfile(path):
            continue
        seen.add(path)
        text = open(path, "rb").read()
        h.update(os.path.basename(path).encode() + b"\0" + text + b"\0")
        base = (yaml.safe_load(text) or {}).get("_BASE_") if text.strip() else None
        for b in [base] if isinstance(base, str) else (base or []):
            todo.append(os.path.normpath(os.path.join(os.path.dirname(path), b)))
    h.update(json.dumps([str(o) for o in opts]).encode())
    return h.hexdigest()


def stale_reason(out_dir: str, fingerprint: str) -> Optional[str]:
    """Why a finished run in ``out_dir`` cannot be reused for a config of ``fingerprint``, or
    None when it can (its recorded fingerprint matches)."""
    path = os.path.join(out_dir, "agvm_run.json")
    try:
        with open(path) as f:
            recorded = json.load(f).get("fingerprint")
    except (OSError, ValueError):
        return "no run record"
    if recorded is None:
        return "its record has no config fingerprint (run by an older version)"
    if recorded != fingerprint:
        return "its config or overrides changed since it finished"
    return None


def progress_line(out_dir: str, elapsed_s: float) -> Optional[str]:
    """``iter N/MAX, loss L, ETA M min`` of a running cell, from its metrics.json and
    config.yaml (None before the first logged iteration)."""
    last = None
    try:
        with open(os.path.join(out_dir, "metrics.json")) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if "total_loss" in row:
                    last = row
    except OSError:
        return None
    if last is None:
        return None
    it = last["iteration"] + 1
    max_iter = None
    try:
        import yaml

        with open(os.path.join(out_dir, "config.yaml")) as f:
            max_iter = int(yaml.safe_load(f)["SOLVER"]["MAX_ITER"])
    except (OSError, KeyError, TypeError, ValueError):
        pass
    loss = last["total_loss"]
    text = f"iter {it}" + (f"/{max_iter}" if max_iter else "") + (f", loss {loss:.3f}" if isinstance(loss, (int, float)) else "")
    if max_iter and it > 0:
        text += f", ETA {elapsed_s / it * (max_iter - it) / 60:.1f} min"
    return text


def parse_with_overrides(parser, argv=None):
    """Parse ``argv`` (default ``sys.argv[1:]``) with ``parser``; what follows ``--`` becomes
    ``args.opts``, config ``KEY VALUE`` pairs for every run (an odd count is a parser error)."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:cut])
    args.opts = argv[cut + 1:]
    if len(args.opts) % 2:
        parser.error(f"overrides after -- must be KEY VALUE pairs, got {args.opts}")
    return args


def _write(path: str, record: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, path)


def run_logged(cmd: Sequence[str], out_dir: str, record: Dict, cwd: str, threads: Optional[int] = None,
               line: Optional[str] = None, progress: Optional[Callable[[str], None]] = None,
               every_s: float = 60.0) -> dict:
    """Run ``cmd`` (in ``cwd``) to completion with its output in ``<out_dir>/stdout.log``;
    ``record`` (plus command, machine, times, exit code, ``wall_s`` in seconds) is written to
    ``<out_dir>/agvm_run.json`` before (without an exit code) and after. ``threads`` sets
    OMP/MKL threads of the child. With ``progress``, the log path is reported at the start and
    a :func:`progress_line` every ``every_s`` seconds (default 60). Returns the final record."""
    import shlex

    os.makedirs(out_dir, exist_ok=True)
    record = dict(record, command=line or " ".join(shlex.quote(c) for c in cmd), machine=machine(),
                  started=datetime.datetime.now().isoformat(timespec="seconds"))
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    path = os.path.join(out_dir, "agvm_run.json")
    _write(path, record)
    t0 = time.time()
    name = record.get("cell", os.path.basename(out_dir))
    log_path = os.path.join(out_dir, "stdout.log")
    if progress is not None:
        progress(f"start {name}: log {log_path}")
    with open(log_path, "w") as log:
        child = subprocess.Popen(list(cmd), cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env)
        while True:
            try:
                rc = child.wait(timeout=every_s if progress is not None else None)
                break
            except subprocess.TimeoutExpired:
                text = progress_line(out_dir, time.time() - t0)
                progress(f"  {name}: {text or 'starting'} ({(time.time() - t0) / 60:.1f} min)")
    record.update(returncode=rc, wall_s=round(time.time() - t0, 1),
                  finished=datetime.datetime.now().isoformat(timespec="seconds"))
    _write(path, record)
    return record


def run_all(items: Sequence, run: Callable[[object, Optional[int]], str], jobs: int = 1,
            print_fn: Callable[[str], None] = print) -> List[str]:
    """Call ``run(item, threads)`` for every item, ``jobs`` at a time (each with its share of
    the CPU threads when jobs > 1), printing ``[done/total] <what run returned>; ETA``. Returns
    the returned strings in completion order."""
    jobs = max(1, min(jobs, len(items))) if items else 1
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None
    lock, t0, lines = threading.Lock(), time.time(), []

    def one(item):
        text = run(item, threads)
        with lock:
            lines.append(text)
            done = len(lines)
            eta = (time.time() - t0) / done * (len(items) - done)
            print_fn(f"[{done}/{len(items)}] {text}; ETA {eta / 60:.1f} min")

    print_fn(f"{len(items)} run(s) to do, {jobs} at a time")
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(one, items))
    return lines
