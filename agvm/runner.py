"""Running training commands into output folders, with records and progress (pure Python).

Shared by ``scripts/reproduce_table.py`` and ``scripts/sweep.py``: each run gets its console
output in ``<out>/stdout.log`` and ``<out>/agvm_run.json`` (the command, exit code, wall time in
seconds, start/finish time, machine), which :mod:`agvm.results` reads back.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, List, Optional, Sequence

__all__ = ["grad_accum_steps", "machine", "parse_with_overrides", "run_logged", "run_all"]


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
               line: Optional[str] = None) -> dict:
    """Run ``cmd`` (in ``cwd``) to completion with its output in ``<out_dir>/stdout.log``;
    ``record`` (plus command, machine, times, exit code, ``wall_s`` in seconds) is written to
    ``<out_dir>/agvm_run.json`` before (without an exit code) and after. ``threads`` sets
    OMP/MKL threads of the child. Returns the final record."""
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
    with open(os.path.join(out_dir, "stdout.log"), "w") as log:
        rc = subprocess.call(list(cmd), cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env)
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
