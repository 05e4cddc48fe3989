"""pyproject.toml's pytest warning filters ignore known-harmless dependency warnings by message,
never a whole category: agvm.compat's own import-order warning must still reach the test run."""

import sys
import types
import warnings

from agvm import compat


def test_compat_import_order_warning_is_not_filtered(monkeypatch):
    name = "fake_d2_warning_filters"
    monkeypatch.setattr(compat, "needed_patches", lambda package="detectron2": ["numpy-aliases"])
    monkeypatch.setattr(compat, "_APPLIED", dict(compat._APPLIED))
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))  # drops the finder apply() installs
    monkeypatch.setitem(sys.modules, f"{name}.early", types.ModuleType(f"{name}.early"))
    with warnings.catch_warnings(record=True) as seen:  # keeps the filters pytest applied
        compat.apply(name)
    messages = [str(w.message) for w in seen]
    assert any("imported before agvm" in m for m in messages), (
        f"agvm.compat's warning was filtered out (seen: {messages}); filters: {warnings.filters[:8]}")
