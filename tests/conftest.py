import os
import sys

import agvm  # noqa: F401  (first: compat patches must precede any detectron2 import)

# tests share helpers (tests/zoo.py, the *_worker.py process entry points) and a few test modules
# (tests/detectron2/test_train_e2e.py's tiny run) by plain import, across the layer folders
_TESTS = os.path.dirname(os.path.abspath(__file__))
for _folder in sorted(f for f in os.listdir(_TESTS) if os.path.isdir(os.path.join(_TESTS, f)) and not f.startswith(("_", "."))):
    sys.path.insert(0, os.path.join(_TESTS, _folder))
sys.path.insert(0, _TESTS)


import pytest  # noqa: E402


@pytest.fixture
def tiny_shapes(tmp_path, monkeypatch):
    """A 16 + 8 image shapes dataset generated under ``tmp_path`` (AGVM_DATASETS)."""
    monkeypatch.setenv("AGVM_DATASETS", str(tmp_path / "datasets"))
    monkeypatch.setenv("AGVM_SHAPES_NUM_TRAIN", "16")
    monkeypatch.setenv("AGVM_SHAPES_NUM_VAL", "8")
    return tmp_path


#: ``make test-fast`` (``pytest -m fast``): the layers below whole, and from the detectron2 layer
#: the grouping, launcher and config tests; single tests elsewhere opt in with ``@pytest.mark.fast``.
FAST_FOLDERS = ("core", "solver", "data", "evaluation", "package")
FAST_FILES = ("detectron2/test_groups.py", "detectron2/test_launch.py", "detectron2/test_max_iter.py")


def pytest_collection_modifyitems(config, items):
    for item in items:
        rel = os.path.relpath(str(item.fspath), _TESTS).replace(os.sep, "/")
        if rel.split("/")[0] in FAST_FOLDERS or rel in FAST_FILES:
            item.add_marker(pytest.mark.fast)
