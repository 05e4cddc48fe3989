"""scripts/install_detectron2.sh route selection, offline: the interpreter is a stub that logs
its calls and fails them, the "official repository" a local git repository."""

import os
import stat
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "install_detectron2.sh")
STUB = """#!/usr/bin/env bash
echo "$*" >> "$STUB_LOG"
exit 1   # detectron2 does not import, the source build fails, the sdist download fails
"""


@pytest.fixture
def env(tmp_path):
    stub = tmp_path / "python"
    stub.write_text(STUB)
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    repo = tmp_path / "detectron2.git"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(["git", "-C", str(repo), "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q",
                    "--allow-empty", "-m", "x"], check=True)
    return {**os.environ, "PYTHON": str(stub), "STUB_LOG": str(tmp_path / "calls.log"),
            "AGVM_D2_REPO": str(repo), "AGVM_D2_PROBE_TIMEOUT": "5"}, tmp_path


def _run(env, **extra):
    return subprocess.run(["bash", SCRIPT], env={**env, **extra}, capture_output=True, text=True, timeout=120)


def test_reachable_repo_builds_the_pinned_commit_then_falls_back_to_the_sdist(env):
    environ, tmp = env
    res = _run(environ)
    out = res.stdout + res.stderr
    assert "building detectron2 from" in out and "@02b5c4e295e990042a714712c21dc79b731e8833" in out
    assert "falling back to the verified sdist route" in out
    assert out.index("falling back") < out.index("downloading pb1-detectron2==0.6")
    calls = (tmp / "calls.log").read_text()
    assert "pip install --no-build-isolation git+" in calls and "@02b5c4e295e990042a714712c21dc79b731e8833" in calls
    assert "pip download" in calls
    assert res.returncode != 0  # the stub's download fails too: the script says so and stops


def test_user_ref_overrides_the_pin(env):
    environ, tmp = env
    _run(environ, AGVM_D2_REF="v0.6")
    assert "@v0.6" in (tmp / "calls.log").read_text()


def test_forced_source_route_does_not_fall_back(env):
    environ, tmp = env
    res = _run(environ, AGVM_D2_ROUTE="source")
    assert res.returncode != 0 and "no fallback" in res.stderr
    assert "pip download" not in (tmp / "calls.log").read_text()


def test_unreachable_repo_goes_straight_to_the_sdist(env):
    environ, tmp = env
    res = _run(environ, AGVM_D2_REPO=str(tmp / "missing.git"))
    assert "not reachable" in res.stdout and "building detectron2" not in res.stdout
    assert "pip download" in (tmp / "calls.log").read_text()
