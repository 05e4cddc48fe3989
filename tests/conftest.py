import os
import sys

import agvm  # noqa: F401  (first: compat patches must precede any detectron2 import)

# tests share helpers (tests/zoo.py) by plain import
sys.path.insert(0, os.path.dirname(__file__))


import pytest  # noqa: E402


@pytest.fixture
def tiny_shapes(tmp_path, monkeypatch):
    """A 16 + 8 image shapes dataset generated under ``tmp_path`` (AGVM_DATASETS)."""
    monkeypatch.setenv("AGVM_DATASETS", str(tmp_path / "datasets"))
    monkeypatch.setenv("AGVM_SHAPES_NUM_TRAIN", "16")
    monkeypatch.setenv("AGVM_SHAPES_NUM_VAL", "8")
    return tmp_path
