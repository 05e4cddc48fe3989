"""Test helper: a project's own config keys, as its train_net.py adds them."""

import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def project_config_adders(config):
    """The config adders a project's train_net passes to setup_cfg: ``add_<name>_config`` of the
    project's own package ``projects/<name>/<name>/`` (detectron2's project layout; only the
    effective-batch experiment has one), imported as its train_net.py does."""
    import importlib
    import sys

    name = os.path.relpath(config, os.path.join(ROOT, "projects")).split(os.sep)[0]
    folder = os.path.join(ROOT, "projects", name)
    if not os.path.isfile(os.path.join(folder, name, "__init__.py")):
        return []
    if folder not in sys.path:
        sys.path.insert(0, folder)
    loaded = sys.modules.get(name)
    if loaded is not None and not (getattr(loaded, "__file__", None) or "").startswith(folder + os.sep):
        del sys.modules[name]  # another module under that name
    return [getattr(importlib.import_module(name), f"add_{name}_config")]


def load_script(name: str):
    """``scripts/<name>.py`` as a module (registered in ``sys.modules``: dataclasses look their
    module up there)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
