"""agvm.compat: each patch works where needed and changes nothing where not needed."""

import importlib
import sys
import textwrap
import types

import numpy as np
import pytest
import torch
from PIL import Image

import agvm  # noqa: F401  (applies compat to the installed detectron2)
from agvm import compat

# --------------------------------------------------------------------------------------------
# the installed detectron2 (0.6, pure-Python route): the real thing
# --------------------------------------------------------------------------------------------
D2_PATCHES = compat.applied("detectron2") or []
needs_cpp = pytest.mark.skipif(
    "missing-cpp-ops" not in D2_PATCHES, reason="installed detectron2 has its C++ ops"
)


def _environment_needs():
    """The environment-level patches, found independently of agvm.compat, in its order."""
    needs = []
    if "int" not in np.__dict__:
        needs.append("numpy-aliases")
    if not hasattr(Image, "LINEAR"):
        needs.append("pillow-linear")
    if importlib.util.find_spec("pkg_resources") is None:
        needs.append("pkg-resources")
    try:
        torch.nn.GroupNorm(32, 1)
    except ValueError:
        needs.append("groupnorm-probe")
    return needs


def test_patch_list_matches_environment():
    expected = _environment_needs()
    import detectron2

    d2_dir = detectron2.__path__[0]
    import glob

    if not glob.glob(f"{d2_dir}/_C*.so"):
        expected.append("missing-cpp-ops")
    with open(f"{d2_dir}/utils/comm.py") as f:
        if "def create_local_process_group" not in f.read():  # detectron2 0.6
            expected.append("local-process-group")
    assert D2_PATCHES == expected


def test_local_process_group_api_on_every_version():
    from detectron2.utils import comm

    assert callable(comm.create_local_process_group)


def test_numpy_aliases_are_module_local():
    import inspect

    import detectron2.data.build as build
    from detectron2.structures.masks import polygons_to_bitmask

    uses_alias = "np.int)" in inspect.getsource(build)  # detectron2 0.6 yes, main no
    if "numpy-aliases" not in D2_PATCHES or not uses_alias:
        assert build.np is np, "a module that does not need the aliases keeps numpy itself"
    else:
        assert build.np.int is int
        assert build.np.zeros is np.zeros  # everything else is numpy's
    assert "int" not in np.__dict__ or hasattr(np, "int") and "numpy-aliases" not in D2_PATCHES
    # the functions that used np.int / np.bool run
    build.print_instances_class_histogram([{"annotations": [{"category_id": 0}]}], ["a"])
    mask = polygons_to_bitmask([np.array([0, 0, 4, 0, 4, 4, 0, 4], dtype=float)], 6, 6)
    assert mask.dtype == bool and mask.sum() > 0


def test_pillow_linear_only_during_import():
    from detectron2.data.transforms.transform import ExtentTransform

    if "pillow-linear" in D2_PATCHES:
        assert not hasattr(Image, "LINEAR"), "Image.LINEAR must be removed again"
    t = ExtentTransform((0, 0, 4, 4), (2, 2))
    assert t.interp == Image.BILINEAR
    out = t.apply_image(np.zeros((4, 4, 3), dtype=np.uint8))
    assert out.shape == (2, 2, 3)


def test_model_zoo_config_paths_without_pkg_resources():
    from detectron2 import model_zoo

    path = model_zoo.get_config_file("COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml")
    assert path.endswith("faster_rcnn_R_50_FPN_1x.yaml")
    with open(path) as f:
        assert "_BASE_" in f.read()
    if "pkg-resources" in D2_PATCHES:
        assert "pkg_resources" not in sys.modules, "the stand-in must not leak"


@needs_cpp
@pytest.mark.parametrize(
    "attr, op_words",
    [
        ("deform_conv_forward", "deformable convolution"),
        ("modulated_deform_conv_forward", "modulated deformable convolution"),
        ("box_iou_rotated", "rotated box IoU"),
        ("roi_align_rotated_forward", "rotated RoIAlign"),
        ("COCOevalAccumulate", "fast COCO evaluation"),
    ],
)
def test_missing_cpp_op_names_op_and_remedy(attr, op_words):
    from detectron2 import _C

    with pytest.raises(compat.MissingCppOpError) as err:
        getattr(_C, attr)
    assert op_words in str(err.value)
    assert "source" in str(err.value) and "install_detectron2.sh" in str(err.value)
    assert isinstance(err.value, AttributeError)


@needs_cpp
def test_missing_cpp_op_through_public_api():
    import inspect

    import torch
    import detectron2.layers.rotated_boxes as rotated
    from detectron2.structures import RotatedBoxes, pairwise_iou_rotated

    if "_C.box_iou_rotated" not in inspect.getsource(rotated):
        pytest.skip("this detectron2 calls torch.ops.detectron2.* (main), not detectron2._C (0.6)")

    boxes = RotatedBoxes(torch.tensor([[5.0, 5.0, 2.0, 2.0, 0.0]]))
    with pytest.raises(compat.MissingCppOpError, match="rotated box IoU"):
        pairwise_iou_rotated(boxes, boxes)


@needs_cpp
def test_placeholder_probes_and_env_report():
    from detectron2 import _C
    from detectron2.utils.collect_env import collect_env_info

    assert getattr(_C, "__file__", None) is None  # probes get a plain AttributeError
    assert getattr(_C, "no_such_op", "default") == "default"
    assert "detectron2" in collect_env_info()


@needs_cpp
def test_coco_evaluation_falls_back_to_pycocotools():
    from pycocotools.cocoeval import COCOeval

    import detectron2.evaluation.coco_evaluation as coco_evaluation

    assert coco_evaluation.COCOeval_opt is COCOeval


# --------------------------------------------------------------------------------------------
# a fake "detectron2" package, to test each patch in isolation and the no-op case
# --------------------------------------------------------------------------------------------
FAKE_SOURCES = {
    "__init__.py": "",
    "uses_np.py": """
        import numpy as np
        def histogram(n):
            return np.zeros((n,), dtype=np.int)
        def clean():
            return np.float64(1.5)
        """,
    "uses_pil.py": """
        from PIL import Image
        def resize(interp=Image.LINEAR):
            return interp
        """,
    "uses_pkg.py": """
        import pkg_resources
        def where():
            return pkg_resources.resource_filename("{pkg}", "configs/x.yaml")
        """,
    "layers.py": """
        from {pkg} import _C
        def rotated_iou():
            return _C.box_iou_rotated(None, None)
        """,
    "evaluation/__init__.py": "",
    "evaluation/fast_eval_api.py": """
        from pycocotools.cocoeval import COCOeval
        class COCOeval_opt(COCOeval):
            pass
        """,
    "uses_norm.py": """
        import torch
        def get_norm(norm, out_channels):
            return torch.nn.GroupNorm(32, out_channels)
        def probe(norm):
            return type(get_norm(norm, 1))
        """,
    "untouched.py": """
        import numpy as np
        def f():
            return np.int64(3)
        """,
}


@pytest.fixture
def fake_package(tmp_path, monkeypatch, request):
    """Write a fresh fake package; remove it, its modules and compat's hook afterwards."""
    name = "fake_d2_" + request.node.name.replace("[", "_").replace("]", "").replace("-", "_")
    pkg_dir = tmp_path / name
    for rel, src in FAKE_SOURCES.items():
        path = pkg_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(src).format(pkg=name))
    monkeypatch.syspath_prepend(str(tmp_path))
    meta_path_before = list(sys.meta_path)
    yield name, pkg_dir
    sys.meta_path[:] = meta_path_before
    compat._APPLIED.pop(name, None)
    for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[mod]


def _pretend_nothing_missing(monkeypatch, pkg_dir):
    monkeypatch.setattr(np, "int", int, raising=False)
    monkeypatch.setattr(np, "float", float, raising=False)
    monkeypatch.setattr(np, "str", str, raising=False)
    monkeypatch.setattr(np, "bool", bool, raising=False)
    monkeypatch.setattr(np, "object", object, raising=False)
    monkeypatch.setattr(Image, "LINEAR", Image.BILINEAR, raising=False)
    stand_in = types.ModuleType("pkg_resources")
    stand_in.resource_filename = lambda pkg, res: f"/real/{pkg}/{res}"
    monkeypatch.setitem(sys.modules, "pkg_resources", stand_in)
    real_init = torch.nn.GroupNorm.__init__

    def lenient_init(self, num_groups, num_channels, *args, **kwargs):  # an old torch
        real_init(self, 1 if num_channels % num_groups else num_groups, num_channels, *args, **kwargs)

    monkeypatch.setattr(torch.nn.GroupNorm, "__init__", lenient_init)
    (pkg_dir / "_C.py").write_text("def box_iou_rotated(a, b):\n    return 'real op'\n")


def test_fake_package_gets_every_patch(fake_package):
    name, pkg_dir = fake_package
    patches = compat.apply(name)
    assert patches == _environment_needs() + ["missing-cpp-ops"]

    uses_np = importlib.import_module(f"{name}.uses_np")
    assert uses_np.histogram(3).dtype == np.dtype(int)
    untouched = importlib.import_module(f"{name}.untouched")
    assert untouched.np is np, "a module that does not use the aliases keeps numpy itself"

    uses_pil = importlib.import_module(f"{name}.uses_pil")
    assert uses_pil.resize() == Image.BILINEAR

    uses_pkg = importlib.import_module(f"{name}.uses_pkg")
    assert uses_pkg.where() == str(pkg_dir / "configs/x.yaml")

    layers = importlib.import_module(f"{name}.layers")
    with pytest.raises(compat.MissingCppOpError, match="rotated box IoU"):
        layers.rotated_iou()

    fast = importlib.import_module(f"{name}.evaluation.fast_eval_api")
    from pycocotools.cocoeval import COCOeval

    assert fast.COCOeval_opt is COCOeval

    uses_norm = importlib.import_module(f"{name}.uses_norm")
    assert uses_norm.probe("GN") is torch.nn.GroupNorm
    assert uses_norm.get_norm("GN", 64).num_channels == 64


def test_fake_package_without_needs_is_untouched(fake_package, monkeypatch):
    name, pkg_dir = fake_package
    _pretend_nothing_missing(monkeypatch, pkg_dir)
    meta_path_before = list(sys.meta_path)
    assert compat.apply(name) == []
    assert sys.meta_path == meta_path_before, "no import hook when nothing is needed"
    uses_np = importlib.import_module(f"{name}.uses_np")
    assert uses_np.np is np
    layers = importlib.import_module(f"{name}.layers")
    assert layers.rotated_iou() == "real op"
    uses_pkg = importlib.import_module(f"{name}.uses_pkg")
    assert uses_pkg.where() == f"/real/{name}/configs/x.yaml"
    fast = importlib.import_module(f"{name}.evaluation.fast_eval_api")
    assert fast.COCOeval_opt.__name__ == "COCOeval_opt"
    uses_norm = importlib.import_module(f"{name}.uses_norm")
    assert not hasattr(uses_norm.get_norm, "__wrapped__")


def test_apply_is_idempotent(fake_package):
    name, _ = fake_package
    first = compat.apply(name)
    hooks = len(sys.meta_path)
    assert compat.apply(name) == first
    assert len(sys.meta_path) == hooks


def test_not_installed_package_needs_nothing():
    assert compat.needed_patches("no_such_package_xyz") == []
