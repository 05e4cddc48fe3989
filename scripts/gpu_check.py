#!/usr/bin/env python
"""The checks that only a GPU can run, one PASS/FAIL/SKIP line each; exits 1 on any FAIL.

    python scripts/gpu_check.py [--only stream,amp,hook,nccl,fullscale] [--out DIR] [--require-cuda] [pytest args]

The checks are the pytest tests marked ``cuda`` in tests/gpu/test_cuda_<name>.py (their
docstrings say what each checks); this runs them (``pytest tests/gpu -m cuda``; other arguments,
such as ``-k`` or ``-x``, go to pytest) and writes the report: a header line (date, GPU, torch,
command), one line per test, to DIR/cuda.txt (cpu.txt without CUDA) plus JSON (default DIR:
benchmarks/results/gpu_check). Without CUDA every check SKIPs (exit 0), unless --require-cuda.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKS = ("stream", "amp", "hook", "nccl", "fullscale")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(CHECKS)} (default: all)")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "gpu_check"))
    parser.add_argument("--require-cuda", action="store_true", help="FAIL at once if CUDA is not available")
    parser.add_argument("--tests", default=os.path.join(ROOT, "tests", "gpu"), help="folder of the test_cuda_*.py")
    args, pytest_args = parser.parse_known_args(argv)
    only = args.only.split(",") if args.only else []
    if set(only) - set(CHECKS):
        parser.error(f"--only: unknown check(s) {sorted(set(only) - set(CHECKS))}; known: {','.join(CHECKS)}")
    import torch

    if args.require_cuda and not torch.cuda.is_available():
        print("FAIL setup: --require-cuda but torch.cuda.is_available() is False")
        return 1
    command = f"python scripts/gpu_check.py {' '.join(argv if argv is not None else sys.argv[1:])}".strip()
    started = time.strftime("%Y-%m-%d %H:%M")
    targets = [os.path.join(args.tests, f"test_cuda_{name}.py") for name in only] or [args.tests]
    with tempfile.TemporaryDirectory() as tmp:
        junit = os.path.join(tmp, "junit.xml")
        rc = subprocess.run([sys.executable, "-m", "pytest", *targets, "-m", "cuda", "-rs", "-p", "no:cacheprovider",
                             "-c", os.path.join(ROOT, "pyproject.toml"), "--rootdir", ROOT, "-o", "junit_family=xunit1",
                             f"--junitxml={junit}", *pytest_args], cwd=ROOT).returncode
        cases = list(ET.parse(junit).getroot().iter("testcase")) if os.path.exists(junit) else []
    cuda = torch.cuda.is_available()  # after the run: this process holds no GPU memory during it
    machine = torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()
    lines = [f"# gpu_check {started} on {machine}; torch {torch.__version__}; command: {command}"]
    results = {}
    for case in cases:
        module = case.get("classname", "").rsplit(".", 1)[-1]
        name = f"{module.removeprefix('test_cuda_')}::{case.get('name')}"
        props = {p.get("name"): p.get("value") for p in case.iter("property")}  # record_property
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        skipped = case.find("skipped")
        if bad is not None:
            status, detail = "FAIL", (bad.get("message") or "failed").strip().splitlines()[0]
        elif skipped is not None:
            status, detail = "SKIP", skipped.get("message") or "skipped"
        else:
            status, detail = "PASS", props.get("detail", "passed")
        seconds = float(case.get("time") or 0)  # the test's setup, call and teardown
        lines.append(f"{status} {name}: {detail}" + ("" if status == "SKIP" else f" [{seconds:.0f} s]"))
        results[name] = {"ok": None if status == "SKIP" else status == "PASS", "detail": detail, "time_s": seconds,
                         **{k: json.loads(v) for k, v in props.items() if k != "detail"}}
    failed = rc != 0 or not cases or any(r["ok"] is False for r in results.values())
    if failed and not any(r["ok"] is False for r in results.values()):
        lines.append(f"FAIL pytest: exit code {rc}")  # e.g. 5: no test collected; 4: a bad pytest argument
    print("\n".join(lines), flush=True)
    os.makedirs(args.out, exist_ok=True)
    tag = "cuda" if cuda else "cpu"
    with open(os.path.join(args.out, f"{tag}.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, f"{tag}.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    n = {s: sum(line.startswith(s) for line in lines[1:]) for s in ("PASS", "FAIL", "SKIP")}
    verdict = "FAILED" if failed else "ALL PASSED" if n["PASS"] else "ALL SKIPPED"
    print(f"{verdict} ({n['PASS']} PASS, {n['FAIL']} FAIL, {n['SKIP']} SKIP); written to {args.out}/{tag}.txt")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
