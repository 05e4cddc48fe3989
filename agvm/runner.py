"""Running training commands into output folders, with records and progress (pure Python).

The one orchestration loop of the experiment scripts (``scripts/reproduce_table.py``,
``sweep.py``, ``reproduce_mini.py``, ``evidence.py``, ``demo.py``, and the projects' own, e.g.
``projects/effective_batch/run_experiment.py``): each builds a plan, a list of :class:`Run`,
checks it, hands it to :func:`execute` and writes its report from the runs' folders. Each run
gets its console output in ``<out>/stdout.log`` and ``<out>/agvm_run.json`` (the command, config
fingerprint, exit code, wall time in seconds, start/finish time, machine), which
:mod:`agvm.results` reads back.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import platform
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional, Sequence

__all__ = ["REPO_ROOT", "Result", "Run", "clear_run", "config_fingerprint", "copy_records", "execute", "free_port",
           "grad_accum_steps", "machine", "outcome", "parse_with_overrides", "progress_line", "run_logged", "run_all",
           "stale_reason"]

#: The repository root (the scripts run their training commands from it).
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (for a process group's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


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
    record = _read_record(out_dir)
    if record is None:
        return "no run record"
    recorded = record.get("fingerprint")
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
    import yaml

    try:
        with open(os.path.join(out_dir, "config.yaml")) as f:
            max_iter = int(yaml.safe_load(f)["SOLVER"]["MAX_ITER"])
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):  # a LazyConfig's: python tags, no SOLVER
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
               every_s: float = 60.0, env: Optional[Dict[str, str]] = None) -> dict:
    """Run ``cmd`` (in ``cwd``) to completion with its output in ``<out_dir>/stdout.log``;
    ``record`` (plus command, machine, times, exit code, ``wall_s`` in seconds) is written to
    ``<out_dir>/agvm_run.json`` before (without an exit code) and after. ``threads`` sets
    OMP/MKL threads of the child, ``env`` more environment variables. With ``progress``, the
    log path is reported at the start and a :func:`progress_line` every ``every_s`` seconds
    (default 60). Returns the final record."""
    os.makedirs(out_dir, exist_ok=True)
    record = dict(record, command=line or " ".join(shlex.quote(c) for c in cmd), machine=machine(),
                  started=datetime.datetime.now().isoformat(timespec="seconds"))
    env = dict(os.environ, **(env or {}))
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


# ------------------------------------------------------------------------------ plans
#: The small records of a run that :func:`copy_records` keeps (besides the end of its console output).
RECORD_FILES = ("config.yaml", "metrics.json", "eval_results.json", "agvm_run.json")
#: Lines of the console output kept as ``stdout_tail.log`` with copied records (why it stopped).
TAIL_LINES = 15
#: What a training run leaves in its folder (detectron2 appends to metrics.json and log.txt).
RUN_FILES = RECORD_FILES + ("log.txt", "last_checkpoint", "stdout.log", "stdout_tail.log")
#: The exception detectron2 (and agvm's trainer) stop a run with when its loss, boxes or scores
#: are not finite: in the console output of a run that exited non-zero, the run diverged.
DIVERGED = "FloatingPointError"
#: Outcomes of a recorded run that :func:`execute` reuses (with the same config fingerprint).
REUSED = ("finished", "diverged")


def _read_record(folder: str) -> Optional[dict]:
    try:
        with open(os.path.join(folder, "agvm_run.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _tail(path: str, size: int = 65536) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - size))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def outcome(folder: str) -> str:
    """How the run recorded in ``folder`` ended, from its ``agvm_run.json`` and console output:

    * "missing": no record;
    * "unfinished": a record without an exit code (the run is going on, or was killed);
    * "finished": exit code 0;
    * "diverged": a non-zero exit code with :data:`DIVERGED` (``FloatingPointError``) at the end
      of its console output (``stdout.log``, or the ``stdout_tail.log`` kept with copied
      records): detectron2 stopped it on a non-finite loss, box or score, a result of its settings;
    * "failed": any other non-zero exit code (an error, a missing file, a signal)."""
    record = _read_record(folder)
    if record is None:
        return "missing"
    rc = record.get("returncode")
    if rc is None:
        return "unfinished"
    if rc == 0:
        return "finished"
    if any(DIVERGED in _tail(os.path.join(folder, name)) for name in ("stdout.log", "stdout_tail.log")):
        return "diverged"
    return "failed"


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


def copy_records(out_dir: str, records: str) -> None:
    """Copy the small records of the run in ``out_dir`` (:data:`RECORD_FILES`; one the run did
    not write is removed from ``records``) and the last :data:`TAIL_LINES` lines of its
    ``stdout.log`` (as ``stdout_tail.log``) to the folder ``records``."""
    os.makedirs(records, exist_ok=True)
    for name in RECORD_FILES:
        src, dst = os.path.join(out_dir, name), os.path.join(records, name)
        if os.path.exists(src):
            shutil.copyfile(src, dst)
        elif os.path.exists(dst):
            os.remove(dst)
    log = os.path.join(out_dir, "stdout.log")
    if os.path.exists(log):
        with open(log, errors="replace") as f:
            tail = f.read().splitlines()[-TAIL_LINES:]
        with open(os.path.join(records, "stdout_tail.log"), "w") as f:
            f.write("\n".join(tail) + "\n")


@dataclasses.dataclass
class Run:
    """One training run of a plan: the command
    ``[*launcher, python, train_net, "--config-file", config, *flags, "OUTPUT_DIR", out, *opts]``,
    run in ``cwd`` (relative paths are relative to it)."""

    name: str  #: unique in the plan: progress lines, the record's "cell" (unless ``info`` sets it)
    config: str  #: the config file
    out: str  #: the output folder (OUTPUT_DIR)
    train_net: str  #: the training script
    opts: List[str] = dataclasses.field(default_factory=list)  #: config KEY VALUE overrides
    flags: List[str] = dataclasses.field(default_factory=list)  #: train_net options: --num-gpus, --max-iter, ...
    launcher: List[str] = dataclasses.field(default_factory=list)  #: in front of the interpreter (srun ...)
    python: str = sys.executable
    cwd: str = REPO_ROOT
    #: a folder the run's small records are copied to after it ends (:func:`copy_records`); when
    #: set, whether the run is reused is decided from the records there, not from ``out``
    records: Optional[str] = None
    line: Optional[str] = None  #: the command as printed and recorded (default: shell-quoted)
    note: Optional[str] = None  #: printed (after "# ") before the command in a dry run
    info: Dict[str, Any] = dataclasses.field(default_factory=dict)  #: more fields of agvm_run.json
    env: Dict[str, str] = dataclasses.field(default_factory=dict)  #: more environment variables
    #: before the run, remove what an earlier run left in ``out`` (:func:`clear_run`; detectron2
    #: appends to metrics.json). Off where several machines share the folder.
    clean: bool = True
    #: sha256 of the config chain and ``flags + opts`` (:func:`config_fingerprint`), computed at
    #: construction unless given
    fingerprint: Optional[str] = None
    meta: Any = None  #: the plan's own description of the run, for its report

    def __post_init__(self):
        if self.fingerprint is None:
            self.fingerprint = config_fingerprint(self.path(self.config), [*self.flags, *self.opts])

    def path(self, p: str) -> str:
        """``p`` relative to :attr:`cwd` (unchanged when absolute)."""
        return os.path.join(self.cwd, p)

    @property
    def command(self) -> List[str]:
        return [*self.launcher, self.python, self.train_net, "--config-file", self.config, *self.flags,
                "OUTPUT_DIR", self.out, *self.opts]

    @property
    def display(self) -> str:
        """The command line as printed in a dry run and recorded (``line``, else shell-quoted)."""
        return self.line or " ".join(shlex.quote(c) for c in self.command)

    @property
    def record_dir(self) -> str:
        """Where the run's record is read to decide whether it is reused: ``records`` or ``out``."""
        return self.path(self.records or self.out)


@dataclasses.dataclass
class Result:
    """What :func:`execute` did with one run."""

    run: Run
    outcome: str  #: :func:`outcome` of its record after the call (before it, on a dry run)
    record: Optional[dict]  #: its agvm_run.json (None: no record, or a dry run that would run it)
    reused: bool  #: True when it was reused, not run by this call


def _default_describe(result: Result) -> str:
    rec = result.record or {}
    return (f"{result.run.name}: {result.outcome} (exit {rec.get('returncode')}) in "
            f"{(rec.get('wall_s') or 0) / 60:.1f} min")


def execute(runs: Sequence[Run], jobs: int = 1, dry_run: bool = False, rerun: bool = False, *,
            threads: Optional[int] = None, every_s: float = 60.0,
            describe: Optional[Callable[[Result], str]] = None, prepare: Optional[Callable[[], None]] = None,
            print_fn: Optional[Callable[[str], None]] = None) -> List[Result]:
    """Run the plan ``runs``: what it has not done yet, ``jobs`` at a time. Returns one
    :class:`Result` per run, in plan order.

    **Reuse rule** (the one of every experiment script): a run is reused, not run again, when its
    record (``agvm_run.json`` in ``Run.records`` if set, else in ``Run.out``) carries the same
    config fingerprint (:func:`stale_reason`: the same config chain, flags and overrides) and
    its :func:`outcome` is "finished" (exit code 0) or "diverged" (a non-zero exit code that
    training stopped with ``FloatingPointError``: a non-finite loss is a result of the
    settings, which the reports count, and running it again gives it again). A "failed" run
    (any other non-zero exit), an "unfinished" one (no exit code: killed, or going on
    elsewhere) and one of another fingerprint ("stale") run again, each with a line saying
    why. ``rerun=True`` runs every run.

    Checks only what is generic (``jobs`` ≥ 1, unique names and output folders; ValueError):
    each script checks its runs' configs before calling. ``dry_run``: prints each run that
    would run (its ``note`` after "# ", then its command line) on stdout, the reused ones and
    the count on stderr, and runs and writes nothing. Otherwise ``prepare()`` (if given) is
    called once when anything is to run; each run (its folder cleared first when
    ``Run.clean``) goes through :func:`run_logged` (console output in ``stdout.log``, the
    record with ``cell``, ``fingerprint`` and ``Run.info``; its log path at the start and a
    progress line every ``every_s`` seconds), its records are copied to ``Run.records``, and
    :func:`run_all` prints ``[done/total] describe(result); ETA``. ``threads``: OMP/MKL threads
    per run (default: the CPUs shared among ``jobs``)."""
    say = print_fn or (lambda s: print(s, flush=True))
    if jobs < 1:
        raise ValueError(f"jobs must be ≥ 1, got {jobs}")
    for what, key in (("name", lambda r: r.name), ("output folder", lambda r: os.path.abspath(r.path(r.out)))):
        seen = set()
        for r in runs:
            if key(r) in seen:
                raise ValueError(f"two runs of the plan have the {what} {key(r)}")
            seen.add(key(r))
    note = (lambda s: print(f"# {s}", file=sys.stderr, flush=True)) if dry_run else say
    results: Dict[str, Result] = {}
    todo: List[Run] = []
    for run in runs:
        folder = run.record_dir
        state = outcome(folder)
        record = _read_record(folder)
        stale = stale_reason(folder, run.fingerprint) if record is not None else None
        if not rerun and state in REUSED and stale is None:
            results[run.name] = Result(run, state, record, True)
            note(f"skip {run.name}: {state} (exit {record.get('returncode')}), same config")
            continue
        if not rerun and stale is not None:
            note(f"stale {run.name}: {state}, but {stale}; running it again")
        elif not rerun and state == "failed":
            note(f"rerun {run.name}: failed (exit {record.get('returncode')}; see {os.path.join(folder, 'stdout.log')}); "
                 "running it again")
        elif not rerun and state == "unfinished":
            note(f"rerun {run.name}: its record has no exit code (killed, or running elsewhere); running it again")
        results[run.name] = Result(run, state, None, False)
        todo.append(run)
    if dry_run:
        for run in todo:
            if run.note:
                print(f"# {run.note}")
            print(run.display)
        print(f"# {len(todo)} of {len(runs)} run(s) to do; dry run: nothing run or written", file=sys.stderr, flush=True)
        return [results[r.name] for r in runs]
    if todo and prepare is not None:
        prepare()

    def one(run: Run, share: Optional[int]) -> str:
        out = run.path(run.out)
        if run.clean:
            clear_run(out)
        record = {"cell": run.name, "fingerprint": run.fingerprint, **run.info}
        rec = run_logged(run.command, out, record, cwd=run.cwd, threads=threads or share, line=run.display,
                         progress=say, every_s=every_s, env=run.env)
        if run.records:
            copy_records(out, run.path(run.records))
        result = results[run.name] = Result(run, outcome(run.record_dir), rec, False)
        return (describe or _default_describe)(result)

    run_all(todo, one, jobs, print_fn=say)
    return [results[r.name] for r in runs]
