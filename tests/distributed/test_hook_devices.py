"""Device follows data, and streams follow futures: the code of agvm/ that issues collectives
creates no tensor without an explicit ``device=`` (NCCL has no CPU backend) and no
``torch.futures.Future`` without ``devices=`` (a hand-made future records no CUDA events, so DDP
may read a bucket before NCCL wrote it; return ``then`` child futures instead). CI has no GPU, so
these static checks are the guard it can hold; scripts/gpu_check.py runs the real thing on a GPU
(``--only stream`` for the futures)."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2] / "agvm"
FACTORIES = {"zeros", "ones", "empty", "full", "tensor", "as_tensor", "arange", "linspace", "eye", "rand", "randn", "stack_empty"}
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "broadcast", "reduce",
               "gather", "scatter", "all_to_all", "reduce_scatter_tensor"}


def _collective_files():
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        tree = ast.parse(path.read_text())
        calls = {n.func.attr for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}
        if calls & COLLECTIVES:
            out.append((path, tree))
    return out


def _undeviced_factories(tree):
    bad = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in FACTORIES
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
                and not any(k.arg == "device" for k in node.keywords)):
            bad.append(f"line {node.lineno}: torch.{node.func.attr}(...)")
    return bad


def _deviceless_futures(tree):
    bad = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
        if name == "Future" and not any(k.arg == "devices" for k in node.keywords):
            bad.append(f"line {node.lineno}: Future(...)")
    return bad


def test_collective_code_is_found():
    names = {p.relative_to(ROOT).as_posix() for p, _ in _collective_files()}
    assert "distributed/hook.py" in names, names


@pytest.mark.parametrize("path, tree", _collective_files(), ids=lambda v: getattr(v, "name", ""))
def test_every_tensor_factory_names_its_device(path, tree):
    assert _undeviced_factories(tree) == [], f"{path}: tensor factories without device="


def test_the_check_can_fail():
    tree = ast.parse("import torch\nt = torch.zeros(3, dtype=torch.float64)\nu = torch.zeros(3, device=x.device)\n")
    assert _undeviced_factories(tree) == ["line 2: torch.zeros(...)"]


@pytest.mark.parametrize("path, tree", _collective_files(), ids=lambda v: getattr(v, "name", ""))
def test_no_future_without_devices(path, tree):
    assert _deviceless_futures(tree) == [], f"{path}: hand-made futures without devices= (return a then child)"


def test_the_future_check_can_fail():
    tree = ast.parse("import torch\nfrom torch.futures import Future\na = torch.futures.Future()\nb = Future()\n"
                     "c = torch.futures.Future(devices=[buf.device])\nd = fut.then(f)\n")
    assert _deviceless_futures(tree) == ["line 3: Future(...)", "line 4: Future(...)"]
