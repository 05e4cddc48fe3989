"""scripts/gpu_check.py, the entry point that runs the CUDA tests of tests/gpu (``-m cuda``) and
writes the report (the GPU runs are recorded in benchmarks/results/gpu_check). Without CUDA
every check is collected and SKIPs (none errors) and the script exits 0; a FAIL exits 1. The
checks' own logic runs on CPU too: tests/gpu/test_cuda_hook.py's gloo-cpu cases (marked ddp)."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.py")
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")


def _run(*args, timeout=300):
    res = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    return res, [l for l in res.stdout.splitlines() if l.split(" ", 1)[0] in ("PASS", "FAIL", "SKIP")]


@no_gpu
def test_gpu_check_skips_every_check_without_cuda(tmp_path):
    res, lines = _run("--out", str(tmp_path))
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    assert lines and all(l.startswith("SKIP ") for l in lines), lines  # collected and skipped: no error
    assert {l.split(" ", 2)[1].split("::")[0] for l in lines} == {"stream", "amp", "hook", "nccl", "fullscale"}
    assert sum("stream::" in l for l in lines) == 2, "the stream check and its planted-old-future control"
    assert all("needs CUDA" in l or "GPU(s) visible" in l for l in lines), lines
    assert "ALL SKIPPED" in res.stdout
    report = (tmp_path / "cpu.txt").read_text().splitlines()
    assert report[0].startswith("# gpu_check ") and "; torch " in report[0] and "command: python scripts/gpu_check.py" in report[0]
    assert report[1:] == lines
    assert (tmp_path / "cpu.json").exists()


@no_gpu
def test_gpu_check_only_and_require_cuda(tmp_path):
    res, lines = _run("--only", "stream,nccl", "--out", str(tmp_path))
    assert res.returncode == 0 and lines, res.stdout + res.stderr[-3000:]
    assert {l.split(" ", 2)[1].split("::")[0] for l in lines} == {"stream", "nccl"}, lines
    res, _ = _run("--only", "nope", "--out", str(tmp_path))
    assert res.returncode == 2 and "unknown check" in res.stderr
    res, _ = _run("--require-cuda", "--out", str(tmp_path))
    assert res.returncode == 1 and "FAIL setup" in res.stdout


def test_gpu_check_reports_pass_fail_skip(tmp_path):
    """The report of a run with a PASS, a FAIL and a SKIP (stand-in tests), and exit code 1."""
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "test_cuda_fake.py").write_text(textwrap.dedent("""
        import pytest

        @pytest.mark.cuda
        def test_ok(record_property):
            record_property("detail", "the detail of a pass")

        @pytest.mark.cuda
        def test_broken():
            assert 1 == 2, "the reason of a fail"

        @pytest.mark.cuda
        @pytest.mark.skip(reason="the reason of a skip")
        def test_skipped():
            pass

        def test_not_cuda():  # deselected by -m cuda
            raise AssertionError("must not run")
        """))
    res, lines = _run("--tests", str(tests), "--out", str(tmp_path / "out"))
    assert res.returncode == 1, res.stdout + res.stderr[-3000:]
    assert lines[0] == "PASS fake::test_ok: the detail of a pass [0 s]", lines
    assert lines[1].startswith("FAIL fake::test_broken: AssertionError: the reason of a fail"), lines
    assert lines[2] == "SKIP fake::test_skipped: the reason of a skip", lines
    assert len(lines) == 3 and "FAILED (1 PASS, 1 FAIL, 1 SKIP)" in res.stdout, lines
    tag = "cuda" if torch.cuda.is_available() else "cpu"
    assert (tmp_path / "out" / f"{tag}.txt").read_text().splitlines()[1:] == lines
