"""Run detectron2 0.6 on today's numpy, Pillow and setuptools, and without its C++ ops.

detectron2 0.6 (the last release, and the pure-Python install route of
``scripts/install_detectron2.sh``) predates numpy 1.24, Pillow 10 and setuptools without
``pkg_resources``, and imports ``detectron2._C`` at module level in a few files. This module
fixes exactly those points, each only when the installed detectron2 needs it:

``numpy-aliases``
    modules whose source uses ``np.int``/``np.float``/``np.str``/``np.bool``/``np.object`` get a
    module-local view of numpy that has them (numpy itself is not modified).
``pillow-linear``
    ``PIL.Image.LINEAR`` (an old alias of ``BILINEAR``) exists while a module that names it
    is being executed (0.6 uses it only as a default argument), and is removed again.
``pkg-resources``
    modules that ``import pkg_resources`` get a minimal stand-in (``resource_filename``) while
    they are executed, when setuptools no longer provides it; nothing else sees the stand-in.
``groupnorm-probe``
    0.6's RetinaNet/FCOS head probes the norm type with ``get_norm(norm, 1)``, which today's
    ``nn.GroupNorm`` rejects (1 channel, 32 groups); the probe gets a valid channel count.
``local-process-group``
    ``detectron2.utils.comm.create_local_process_group(num_workers_per_machine)`` (detectron2
    main's way to set the per-machine process group behind ``comm.get_local_rank()``) is added
    where 0.6 lacks it, so a launcher sets that group the same way on both versions.
``missing-cpp-ops``
    ``detectron2._C`` becomes a placeholder whose attributes raise :class:`MissingCppOpError`
    (an ``AttributeError``) naming the op and the remedy; the fast COCO evaluation falls back
    to pycocotools' ``COCOeval``.

Import ``agvm`` (which calls :func:`apply`) before any ``detectron2`` submodule. On a
detectron2 that needs none of this, :func:`apply` changes nothing and returns an empty list.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import re
import sys
import types
from typing import Dict, List, Optional

__all__ = ["apply", "applied", "MissingCppOpError", "needed_patches"]

# --------------------------------------------------------------------------------------------
# what each patch looks for in a module's source
# --------------------------------------------------------------------------------------------
_NP_ALIASES = {"int": int, "float": float, "str": str, "bool": bool, "object": object}
_NP_ALIAS_RE = re.compile(r"\bnp\.(int|float|str|bool|object)\b(?![\w(])")
_PIL_LINEAR_RE = re.compile(r"\bImage\.LINEAR\b")
_PKG_RESOURCES_RE = re.compile(r"^\s*import pkg_resources\b", re.M)
_NORM_PROBE_RE = re.compile(r"\bget_norm\(norm, 1\)")

# detectron2._C functions -> the op a user would recognise
_CPP_OPS = {
    "deform_conv_forward": "deformable convolution (DeformConv)",
    "deform_conv_backward_input": "deformable convolution (DeformConv)",
    "deform_conv_backward_filter": "deformable convolution (DeformConv)",
    "modulated_deform_conv_forward": "modulated deformable convolution (ModulatedDeformConv)",
    "modulated_deform_conv_backward": "modulated deformable convolution (ModulatedDeformConv)",
    "box_iou_rotated": "rotated box IoU (pairwise_iou_rotated / RotatedBoxes)",
    "roi_align_rotated_forward": "rotated RoIAlign (ROIAlignRotated)",
    "roi_align_rotated_backward": "rotated RoIAlign (ROIAlignRotated)",
    "nms_rotated": "rotated NMS (batched_nms_rotated)",
    "InstanceAnnotation": "fast COCO evaluation (COCOeval_opt)",
    "COCOevalEvaluateImages": "fast COCO evaluation (COCOeval_opt)",
    "COCOevalAccumulate": "fast COCO evaluation (COCOeval_opt)",
}
_REMEDY = (
    "This detectron2 was installed without its C++ ops (the pure-Python route of "
    "scripts/install_detectron2.sh). Build detectron2 from source to use it: "
    "AGVM_D2_ROUTE=source scripts/install_detectron2.sh (needs access to github.com and a "
    "C++ compiler; CUDA ops need nvcc)."
)


class MissingCppOpError(AttributeError):
    """A detectron2 C++ op was used on an install that lacks ``detectron2._C``.

    Subclasses ``AttributeError`` so that code probing ``getattr(_C, name, default)`` keeps
    working, while a real use of the op fails with a message naming it and the remedy.
    """


class _MissingCppOps(types.ModuleType):
    """Placeholder for ``detectron2._C`` on a pure-Python detectron2."""

    def __init__(self) -> None:
        super().__init__("detectron2._C", "placeholder installed by agvm.compat: no C++ ops")
        self.__agvm_placeholder__ = True

    # utils/collect_env.py (run by default_setup) queries these three
    @staticmethod
    def get_compiler_version() -> str:
        return "not built (pure-Python detectron2)"

    @staticmethod
    def get_cuda_version() -> str:
        return "not built (pure-Python detectron2)"

    @staticmethod
    def has_cuda() -> bool:
        return False

    def __getattr__(self, name: str):
        if name.startswith("__"):  # inspect / torch.library probe __file__, __path__, ...
            raise AttributeError(name)
        op = _CPP_OPS.get(name, f"the C++ op detectron2._C.{name}")
        raise MissingCppOpError(f"{op} is not available. {_REMEDY}")


class _NumpyWithAliases(types.ModuleType):
    """A module-local view of numpy that also has the aliases removed in numpy 1.24."""

    def __init__(self, numpy_module: types.ModuleType) -> None:
        super().__init__("numpy")
        self.__dict__.update(_NP_ALIASES)
        self._numpy = numpy_module

    def __getattr__(self, name: str):
        return getattr(self._numpy, name)


class _PkgResourcesStandIn(types.ModuleType):
    """The one function of ``pkg_resources`` detectron2 0.6 uses (model_zoo config paths)."""

    def __init__(self) -> None:
        super().__init__("pkg_resources", "stand-in installed by agvm.compat")

    @staticmethod
    def resource_filename(package: str, resource: str) -> str:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError(f"package {package!r} not found")
        return os.path.join(list(spec.submodule_search_locations)[0], resource)


def _norm_probe_safe(get_norm):
    """``get_norm`` that answers a 1-channel type probe with a 32-channel layer of that type."""

    def get_norm_compat(norm, out_channels):
        if out_channels == 1:
            out_channels = 32
        return get_norm(norm, out_channels)

    get_norm_compat.__wrapped__ = get_norm
    return get_norm_compat


# --------------------------------------------------------------------------------------------
# feature detection
# --------------------------------------------------------------------------------------------
def _numpy_lacks_aliases() -> bool:
    import numpy as np

    return any(name not in np.__dict__ for name in _NP_ALIASES)


def _pillow_lacks_linear() -> bool:
    from PIL import Image

    return not hasattr(Image, "LINEAR")


def _pkg_resources_missing() -> bool:
    if "pkg_resources" in sys.modules:
        return False
    return importlib.util.find_spec("pkg_resources") is None


def _groupnorm_rejects_one_channel() -> bool:
    import torch

    try:
        torch.nn.GroupNorm(32, 1)
    except ValueError:
        return True
    return False


def _cpp_ops_missing(package: str) -> bool:
    pkg_spec = importlib.util.find_spec(package)
    if pkg_spec is None or not pkg_spec.submodule_search_locations:
        return False
    finder = importlib.machinery.PathFinder
    return finder.find_spec(f"{package}._C", list(pkg_spec.submodule_search_locations)) is None


def _comm_lacks_local_group(package: str) -> bool:
    pkg_spec = importlib.util.find_spec(package)  # (imports nothing of the package)
    for location in (pkg_spec.submodule_search_locations or []) if pkg_spec else []:
        path = os.path.join(location, "utils", "comm.py")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return "def create_local_process_group" not in f.read()
    return False


def _local_process_group_creator(comm: types.ModuleType):
    """detectron2 main's ``comm.create_local_process_group`` for 0.6's ``comm`` module: every
    rank creates every machine's group (``new_group`` is collective) and keeps its own machine's
    as the module's local group."""

    def create_local_process_group(num_workers_per_machine: int) -> None:
        import torch.distributed as dist

        world, rank = dist.get_world_size(), dist.get_rank()
        if world % num_workers_per_machine:
            raise ValueError(f"{world} processes do not split into machines of {num_workers_per_machine}")
        for machine in range(world // num_workers_per_machine):
            ranks = list(range(machine * num_workers_per_machine, (machine + 1) * num_workers_per_machine))
            group = dist.new_group(ranks)
            if rank in ranks:
                comm._LOCAL_PROCESS_GROUP = group

    return create_local_process_group


def needed_patches(package: str = "detectron2") -> List[str]:
    """Names of the patches the installed ``package`` needs in this environment.

    Empty when ``package`` is not installed or when nothing is missing. A source-level need
    (e.g. ``np.int``) is confirmed per module at import time, so a listed patch still touches
    only the modules that use the removed name.
    """
    if importlib.util.find_spec(package) is None:
        return []
    needed = []
    if _numpy_lacks_aliases():
        needed.append("numpy-aliases")
    if _pillow_lacks_linear():
        needed.append("pillow-linear")
    if _pkg_resources_missing():
        needed.append("pkg-resources")
    if _groupnorm_rejects_one_channel():
        needed.append("groupnorm-probe")
    if _cpp_ops_missing(package):
        needed.append("missing-cpp-ops")
    if _comm_lacks_local_group(package):
        needed.append("local-process-group")
    return needed


# --------------------------------------------------------------------------------------------
# the import hook that applies the source-level patches module by module
# --------------------------------------------------------------------------------------------
class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader, patches: List[str], package: str) -> None:
        self._loader = loader
        self._patches = patches
        self._package = package

    def __getattr__(self, name):  # get_source, get_resource_reader, is_package, ...
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        name = module.__name__
        try:
            source = self._loader.get_source(name) or ""
        except (ImportError, OSError):
            source = ""
        restore = []
        if "pillow-linear" in self._patches and _PIL_LINEAR_RE.search(source):
            from PIL import Image

            Image.LINEAR = Image.BILINEAR
            restore.append(lambda: delattr(Image, "LINEAR"))
        if "pkg-resources" in self._patches and _PKG_RESOURCES_RE.search(source):
            sys.modules["pkg_resources"] = _PkgResourcesStandIn()
            restore.append(lambda: sys.modules.pop("pkg_resources", None))
        try:
            self._loader.exec_module(module)
        finally:
            for undo in restore:
                undo()
        if "numpy-aliases" in self._patches and _NP_ALIAS_RE.search(source):
            np_module = module.__dict__.get("np")
            if isinstance(np_module, types.ModuleType) and np_module.__name__ == "numpy":
                module.np = _NumpyWithAliases(np_module)
        if "groupnorm-probe" in self._patches and _NORM_PROBE_RE.search(source):
            get_norm = module.__dict__.get("get_norm")
            if callable(get_norm):
                module.get_norm = _norm_probe_safe(get_norm)
        if "missing-cpp-ops" in self._patches and name == f"{self._package}.evaluation.fast_eval_api":
            from pycocotools.cocoeval import COCOeval

            # coco_evaluation imports this name afterwards and gets the official implementation
            module.COCOeval_opt = COCOeval
        if "local-process-group" in self._patches and name == f"{self._package}.utils.comm":
            if not hasattr(module, "create_local_process_group"):
                module.create_local_process_group = _local_process_group_creator(module)


class _PatchingFinder(importlib.abc.MetaPathFinder):
    def __init__(self, package: str, patches: List[str]) -> None:
        self.package = package
        self.patches = patches

    def find_spec(self, fullname, path, target=None):
        if not fullname.startswith(self.package + "."):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "get_source"):
            return spec
        spec.loader = _PatchingLoader(spec.loader, self.patches, self.package)
        return spec


_APPLIED: Dict[str, List[str]] = {}


def apply(package: str = "detectron2") -> List[str]:
    """Install the patches ``package`` needs (idempotent); returns their names.

    ``package`` is the import name of detectron2 (parameterised for the tests). Modules of
    ``package`` imported before this call are not patched retroactively; a warning says so.
    """
    if package in _APPLIED:
        return list(_APPLIED[package])
    patches = needed_patches(package)
    _APPLIED[package] = patches
    if not patches:
        return []
    early = sorted(m for m in sys.modules if m.startswith(package + ".") and m != f"{package}._C")
    if early:
        import warnings

        warnings.warn(
            f"agvm.compat: {len(early)} {package} modules were imported before agvm "
            f"(e.g. {early[0]}); import agvm first so that they get the compatibility patches "
            f"{patches}.",
            stacklevel=2,
        )
    if "missing-cpp-ops" in patches:
        placeholder = _MissingCppOps()
        sys.modules[f"{package}._C"] = placeholder
        parent = importlib.import_module(package)
        setattr(parent, "_C", placeholder)
    sys.meta_path.insert(0, _PatchingFinder(package, patches))
    return list(patches)


def applied(package: str = "detectron2") -> Optional[List[str]]:
    """The patches :func:`apply` installed for ``package``, or None if it was not called."""
    return None if package not in _APPLIED else list(_APPLIED[package])
