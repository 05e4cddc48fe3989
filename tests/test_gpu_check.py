"""scripts/gpu_check.py's two-process hook check, run on CPU gloo (the GPU run is recorded in
benchmarks/results/gpu_check): Φ and μ equal a reference from gathered local gradients, SGD and
AdamW (preconditioned), ranks bit-identical, and the script's exit code reports it."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.ddp
def test_gpu_check_hook_part_passes_on_cpu(tmp_path):
    res = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "gpu_check.py"), "--device", "cpu", "--only", "hook",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    lines = [l for l in res.stdout.splitlines() if l.split(" ", 1)[0] in ("PASS", "FAIL", "SKIP")]
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    assert len(lines) == 2 and all(l.startswith("PASS hook[gloo, world=2") for l in lines), lines
    assert "AdamW, preconditioned" in lines[1]
    assert (tmp_path / "cpu.txt").read_text().count("PASS") == 2


def test_gpu_check_refuses_cuda_without_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    res = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "gpu_check.py"), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 1 and "FAIL setup" in res.stdout


def test_gpu_check_stream_part_skips_without_cuda(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    res = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "gpu_check.py"), "--device", "cpu", "--only", "stream",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0 and "SKIP stream: needs CUDA" in res.stdout, res.stdout + res.stderr[-3000:]
