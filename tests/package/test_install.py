"""`pip install .` into a fresh virtual environment, then scripts/install_detectron2.sh, gives a
working `agvm.AGVMTrainer` (pyproject's dependencies are complete). Minutes and network (PyPI):
marked `install`, run by `make test-install` and by CI after `make test`."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.install


def test_pip_install_in_a_fresh_venv_imports_the_trainer(tmp_path):
    import shutil

    # a copy of the source tree: pip's setuptools build writes build/ and *.egg-info beside it
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", ".devsite", "output", "build", "*.egg-info",
                                                              "__pycache__", "results", "benchmarks", "projects"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    res = subprocess.run([py, "-m", "pip", "install", "--quiet", str(src)], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    res = subprocess.run(["bash", os.path.join(ROOT, "scripts", "install_detectron2.sh")], capture_output=True, text=True,
                         env=dict(env, PYTHON=py, AGVM_D2_PROBE_TIMEOUT="3"))
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    code = ("import agvm, detectron2; from agvm import AGVMTrainer; from agvm.detectron2 import add_agvm_config; "
            "import timm.optim; print(AGVMTrainer.__name__, os.path.dirname(agvm.__file__))")
    res = subprocess.run([py, "-c", "import os; " + code], capture_output=True, text=True, env=env, cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    name, where = res.stdout.split()
    assert name == "AGVMTrainer" and where.startswith(str(venv))  # the installed copy, not the checkout
