"""The package's shape: no import cycle in agvm/, small detectron2 files, no patching of detectron2,
a config that adds only agvm's keys."""

import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGE = os.path.join(ROOT, "agvm")


def _modules(package_dir=PACKAGE, name="agvm"):
    """{module name: file} of every module of the package."""
    out = {}
    for folder, _, files in os.walk(package_dir):
        rel = os.path.relpath(folder, package_dir)
        prefix = name if rel == "." else name + "." + rel.replace(os.sep, ".")
        for file in files:
            if file.endswith(".py"):
                out[prefix if file == "__init__.py" else f"{prefix}.{file[:-3]}"] = os.path.join(folder, file)
    return out


def import_graph(modules):
    """{module: set of agvm modules it imports}, every import statement included (those inside
    functions too: a deferred import is still a dependency)."""
    graph = {}
    for name, path in modules.items():
        is_package = path.endswith("__init__.py")
        base = name.split(".") if is_package else name.split(".")[:-1]
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                origin = node.module or ""
                if node.level:
                    origin = ".".join(base[: len(base) - node.level + 1] + ([origin] if origin else []))
                targets = [f"{origin}.{a.name}" if f"{origin}.{a.name}" in modules else origin for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
    return graph


def cycles(graph):
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_in_agvm():
    graph = import_graph(_modules())
    # a package's __init__ re-exporting its submodules is no cycle unless a submodule imports it back
    assert cycles(graph) == []


def test_the_cycle_check_can_fail():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"pkg.one": {"pkg"}, "pkg": {"pkg.one"}}) == [["pkg", "pkg.one"]]


def test_the_import_graph_sees_deferred_and_relative_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .a import f\n")
    (pkg / "sub" / "a.py").write_text("def f():\n    from ..b import g\n")
    (pkg / "b.py").write_text("from pkg.sub import a\n")
    graph = import_graph(_modules(str(pkg), "pkg"))
    assert graph["pkg.sub.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.sub.a"}
    assert cycles(graph) == [["pkg.b", "pkg.sub.a"]]


def test_detectron2_files_are_small():
    folder = os.path.join(PACKAGE, "detectron2")
    sizes = {f: sum(1 for _ in open(os.path.join(folder, f), encoding="utf-8")) for f in os.listdir(folder)
             if f.endswith(".py")}
    assert {f: n for f, n in sizes.items() if n > 350} == {}


def _detectron2_names(tree):
    """Names bound by ``import detectron2...`` / ``from detectron2... import ...``."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name.startswith("detectron2")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("detectron2") and not node.level:
            names |= {a.asname or a.name for a in node.names}
    return names


def detectron2_assignments(source):
    """``line: target`` of every assignment to an attribute of something imported from detectron2."""
    tree = ast.parse(source)
    d2 = _detectron2_names(tree)
    found = []
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AugAssign, ast.AnnAssign)) else []
        for target in targets:
            root = target
            while isinstance(root, ast.Attribute):
                root = root.value
            if target is not root and isinstance(root, ast.Name) and root.id in d2:
                found.append(f"{node.lineno}: {ast.unparse(target)}")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr" and node.args:
            if isinstance(node.args[0], ast.Name) and node.args[0].id in d2:
                found.append(f"{node.lineno}: setattr({node.args[0].id}, ...)")
    return found


def test_no_patching_of_detectron2_in_the_integration():
    folder = os.path.join(PACKAGE, "detectron2")
    bad = {}
    for file in sorted(os.listdir(folder)):
        if not file.endswith(".py"):
            continue
        with open(os.path.join(folder, file), encoding="utf-8") as f:
            source = f.read()
        hits = detectron2_assignments(source)
        hits += [f"text: {m.group(0)}" for m in re.finditer(r"_trainer =|\b_writers\b", source)]
        if hits:
            bad[file] = hits
    assert bad == {}


def test_the_patching_check_can_fail():
    source = ("import detectron2.engine.defaults as defaults\nfrom detectron2.utils import comm\n"
              "defaults.create_ddp_model = None\ncomm._LOCAL_PROCESS_GROUP = 1\nx = comm.get_rank()\n")
    assert detectron2_assignments(source) == ["3: defaults.create_ddp_model", "4: comm._LOCAL_PROCESS_GROUP"]


def test_add_agvm_config_adds_no_model_key():
    import agvm  # noqa: F401
    from detectron2.config import get_cfg

    from agvm.detectron2 import KEYS, add_agvm_config

    stock, cfg = get_cfg(), get_cfg()
    add_agvm_config(cfg)
    assert cfg.MODEL == stock.MODEL
    assert all(k.name.startswith("SOLVER.") for k in KEYS)


def test_no_experiment_module_in_the_library():
    """An experiment's models are a project's (projects/<name>/<name>/, registered when that
    package is imported): no module of agvm/ registers a model or a backbone."""
    offenders = []
    for name, path in _modules().items():
        with open(path, encoding="utf-8") as f:
            if re.search(r"(META_ARCH|BACKBONE)_REGISTRY\.register", f.read()):
                offenders.append(name)
    assert offenders == []
