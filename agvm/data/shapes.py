"""A small, deterministic synthetic "shapes" dataset for detection and segmentation.

Every image shows two *stuff* regions ("sky" above, "ground" below a random wavy boundary),
each filled with its own random texture (smooth noise, stripes or a gradient), and 1 to 6
non-overlapping *thing* instances (circle, square, triangle, star, hexagon) of random size
(about 10-60 px at 128 px, scaled with the image size), colour and rotation.

The same annotations are written in every format detectron2 trains on:

* ``images/<split>/<id:06d>.png``: the RGB images (PNG, lossless).
* ``annotations/instances_<split>.json``: COCO instances (polygons, ``bbox``, ``area``).
* ``sem_seg/<split>/<id:06d>.png``: semantic labels, one uint8 channel, label =
  ``category_id - 1`` over *all* classes (things first, then stuff; see :data:`ALL_CLASSES`).
* ``panoptic/<split>/<id:06d>.png`` + ``annotations/panoptic_<split>.json``: COCO panoptic.
* ``panoptic_stuff/<split>/<id:06d>.png``: PanopticFPN's "separated" semantic labels
  (every thing pixel 0, stuff classes ``1..S``, 255 unlabeled), as detectron2's
  ``datasets/prepare_panoptic_fpn.py`` produces them for COCO.
* ``manifest.json``: version, seed, size, counts, class lists and the size and sha256 of
  every other file.

Exact agreement between the formats: each instance mask is rasterised with pycocotools from
the instance's own (rounded) polygon -- ``frPyObjects`` -> ``merge`` -> ``decode``, exactly
what ``COCO.annToMask`` does -- and that mask is used to paint the object and to write the
semantic and panoptic PNGs. Objects never touch (placement is rejection-sampled against the
already placed masks dilated by 1 px), so each polygon is exactly its instance's visible
region and ``COCO.annToMask(ann)`` equals the instance's panoptic segment pixel for pixel.

The dataset is generated on first use by :func:`ensure_shapes` into a cache folder (see
:func:`default_root`) and verified against its manifest once per process. This module
needs only numpy, Pillow and pycocotools; detectron2 registration lives in
:mod:`agvm.data.register`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
from PIL import Image
from pycocotools import mask as mask_util

try:  # pragma: no cover - always available on Linux/macOS
    import fcntl
except ImportError:  # pragma: no cover - Windows: no inter-process lock
    fcntl = None

__all__ = [
    "SHAPES_VERSION",
    "THING_CLASSES",
    "STUFF_CLASSES",
    "ALL_CLASSES",
    "THING_COLORS",
    "STUFF_COLORS",
    "SPLITS",
    "default_root",
    "shapes_dir",
    "generate_shapes",
    "verify_shapes",
    "ensure_shapes",
]

logger = logging.getLogger(__name__)

#: Bumped whenever the generator's output changes; part of the cache folder name.
SHAPES_VERSION = 1
#: Thing (instance) classes; COCO category ids ``1..len(THING_CLASSES)`` in this order.
THING_CLASSES: Tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon")
#: Stuff classes; category ids follow the thing ids, in this order.
STUFF_CLASSES: Tuple[str, ...] = ("sky", "ground")
#: All classes in semantic-label order: label ``i`` is ``ALL_CLASSES[i]`` (category id ``i+1``).
ALL_CLASSES: Tuple[str, ...] = THING_CLASSES + STUFF_CLASSES
#: Display colours (RGB) for visualisation / detectron2 metadata.
THING_COLORS: Tuple[Tuple[int, int, int], ...] = (
    (220, 20, 60),
    (0, 130, 200),
    (255, 190, 0),
    (60, 180, 75),
    (145, 30, 180),
)
STUFF_COLORS: Tuple[Tuple[int, int, int], ...] = ((135, 206, 235), (139, 90, 43))
#: Split name -> code mixed into the per-image seed (so each split has its own stream).
SPLITS: Dict[str, int] = {"train": 1, "val": 2}

DEFAULT_SEED = 0
DEFAULT_IMAGE_SIZE = 128  # px (square images)
DEFAULT_NUM_TRAIN = 1000  # images
DEFAULT_NUM_VAL = 200  # images

#: Environment variables read by :func:`default_root` and :func:`ensure_shapes`.
ENV_ROOT = "AGVM_DATASETS"
ENV_NUM_TRAIN = "AGVM_SHAPES_NUM_TRAIN"
ENV_NUM_VAL = "AGVM_SHAPES_NUM_VAL"

IGNORE_LABEL = 255
#: Panoptic segment id = ``category_id * PANOPTIC_LABEL_DIVISOR + k`` where ``k`` is the
#: 1-based index of the instance within its image for things and 0 for stuff.
PANOPTIC_LABEL_DIVISOR = 1000

_NUM_THINGS = len(THING_CLASSES)
_SKY_ID = _NUM_THINGS + 1  # category ids of the stuff classes
_GROUND_ID = _NUM_THINGS + 2
_CIRCLE_VERTICES = 32
_MIN_INSTANCE_AREA = 12  # px; rasterised masks smaller than this are re-drawn
_MAX_PLACEMENT_TRIES = 40
_PROGRESS_EVERY = 200  # images

# per-process memo of dataset folders that passed verification
_VERIFIED: set = set()


# --------------------------------------------------------------------------------------------
# paths
# --------------------------------------------------------------------------------------------
def default_root() -> str:
    """The cache root: ``$AGVM_DATASETS`` if set, else ``~/.cache/agvm/datasets``.

    Read at call time (not at import), returned as an absolute path.
    """
    root = os.environ.get(ENV_ROOT) or os.path.join("~", ".cache", "agvm", "datasets")
    return os.path.abspath(os.path.expanduser(root))


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    try:
        return int(value)
    except ValueError as e:
        raise ValueError(f"${name} must be an integer, got {value!r}") from e


def _resolve_counts(num_train: Optional[int], num_val: Optional[int]) -> Tuple[int, int]:
    if num_train is None:
        num_train = _env_int(ENV_NUM_TRAIN, DEFAULT_NUM_TRAIN)
    if num_val is None:
        num_val = _env_int(ENV_NUM_VAL, DEFAULT_NUM_VAL)
    return int(num_train), int(num_val)


def _check_params(seed: int, image_size: int, num_train: int, num_val: int) -> None:
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if int(image_size) != image_size or image_size < 32:
        raise ValueError(f"image_size must be an integer >= 32 (px), got {image_size!r}")
    if num_train < 1 or num_val < 1:
        raise ValueError(f"need at least one image per split, got {num_train=} {num_val=}")


def shapes_dir(
    root: Optional[str] = None,
    seed: int = DEFAULT_SEED,
    image_size: int = DEFAULT_IMAGE_SIZE,
    num_train: Optional[int] = None,
    num_val: Optional[int] = None,
) -> str:
    """The dataset folder for these parameters (nothing is generated or checked).

    ``<root>/shapes_v<SHAPES_VERSION>_seed<seed>_<image_size>px`` for the default counts
    (1000 train / 200 val images); other counts get a ``_n<num_train>-<num_val>`` suffix so
    that datasets of different sizes can share a root. ``root`` defaults to
    :func:`default_root` (``$AGVM_DATASETS`` or ``~/.cache/agvm/datasets``); ``num_train`` /
    ``num_val`` default to ``$AGVM_SHAPES_NUM_TRAIN`` / ``$AGVM_SHAPES_NUM_VAL`` or 1000 / 200.
    """
    num_train, num_val = _resolve_counts(num_train, num_val)
    root = default_root() if root is None else os.path.abspath(os.path.expanduser(root))
    name = f"shapes_v{SHAPES_VERSION}_seed{int(seed)}_{int(image_size)}px"
    if (num_train, num_val) != (DEFAULT_NUM_TRAIN, DEFAULT_NUM_VAL):
        name += f"_n{num_train}-{num_val}"
    return os.path.join(root, name)


# --------------------------------------------------------------------------------------------
# drawing
# --------------------------------------------------------------------------------------------
def _upsample_bilinear(coarse: np.ndarray, h: int, w: int) -> np.ndarray:
    ch, cw = coarse.shape
    gy = np.linspace(0.0, ch - 1.0, h)
    gx = np.linspace(0.0, cw - 1.0, w)
    y0 = np.floor(gy).astype(np.int64)
    x0 = np.floor(gx).astype(np.int64)
    y1 = np.minimum(y0 + 1, ch - 1)
    x1 = np.minimum(x0 + 1, cw - 1)
    fy = (gy - y0)[:, None]
    fx = (gx - x0)[None, :]
    top = coarse[y0][:, x0] * (1.0 - fx) + coarse[y0][:, x1] * fx
    bottom = coarse[y1][:, x0] * (1.0 - fx) + coarse[y1][:, x1] * fx
    return top * (1.0 - fy) + bottom * fy


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A random (h, w, 3) float texture in [0, 255]: smooth noise, stripes or a gradient."""
    c0 = rng.uniform(0.0, 255.0, 3)
    c1 = rng.uniform(0.0, 255.0, 3)
    kind = int(rng.integers(3))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    if kind == 0:  # smooth value noise + fine grain
        cells = int(rng.integers(3, 9))
        t = _upsample_bilinear(rng.random((cells + 1, cells + 1)), h, w)
    elif kind == 1:  # stripes
        theta = rng.uniform(0.0, np.pi)
        period = rng.uniform(6.0, 24.0) * h / 128.0
        phase = rng.uniform(0.0, 2.0 * np.pi)
        proj = xx * np.cos(theta) + yy * np.sin(theta)
        t = 0.5 + 0.5 * np.sin(2.0 * np.pi * proj / period + phase)
    else:  # linear gradient
        theta = rng.uniform(0.0, 2.0 * np.pi)
        proj = xx * np.cos(theta) + yy * np.sin(theta)
        t = (proj - proj.min()) / max(proj.max() - proj.min(), 1e-6)
    t = t + rng.normal(0.0, rng.uniform(0.02, 0.08), (h, w))
    tex = c0[None, None, :] * (1.0 - t[..., None]) + c1[None, None, :] * t[..., None]
    return np.clip(tex, 0.0, 255.0)


def _polygon(kind: int, cx: float, cy: float, r: float, theta: float) -> np.ndarray:
    """Vertices (K, 2) of thing class ``kind`` (index into THING_CLASSES), circumradius r."""
    name = THING_CLASSES[kind]
    if name == "circle":
        n, radii = _CIRCLE_VERTICES, np.full(_CIRCLE_VERTICES, r)
    elif name == "square":
        n, radii = 4, np.full(4, r)
    elif name == "triangle":
        n, radii = 3, np.full(3, r)
    elif name == "star":
        n, radii = 10, np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
    elif name == "hexagon":
        n, radii = 6, np.full(6, r)
    else:  # pragma: no cover
        raise AssertionError(name)
    ang = theta + 2.0 * np.pi * np.arange(n) / n
    return np.stack([cx + radii * np.cos(ang), cy + radii * np.sin(ang)], axis=1)


def _rasterize(poly: List[float], h: int, w: int) -> np.ndarray:
    """Bool (h, w) mask of one polygon, exactly as ``COCO.annToMask`` computes it."""
    rle = mask_util.merge(mask_util.frPyObjects([poly], h, w))
    return mask_util.decode(rle).astype(bool)


def _dilate1(m: np.ndarray) -> np.ndarray:
    """3x3 (8-neighbour) binary dilation."""
    d = m.copy()
    d[1:, :] |= m[:-1, :]
    d[:-1, :] |= m[1:, :]
    e = d.copy()
    e[:, 1:] |= d[:, :-1]
    e[:, :-1] |= d[:, 1:]
    return e


def _mask_bbox(m: np.ndarray) -> List[int]:
    """Tight pixel box [x, y, w, h] of a non-empty mask (w = x_max - x_min + 1)."""
    ys = np.flatnonzero(m.any(axis=1))
    xs = np.flatnonzero(m.any(axis=0))
    return [int(xs[0]), int(ys[0]), int(xs[-1] - xs[0] + 1), int(ys[-1] - ys[0] + 1)]


def _pick_color(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """A random colour at least ~110 (RGB distance) away from the mean local background."""
    mean = background.reshape(-1, 3).mean(axis=0)
    best, best_d = None, -1.0
    for _ in range(12):
        c = rng.uniform(0.0, 255.0, 3)
        d = float(np.linalg.norm(c - mean))
        if d >= 110.0:
            return c
        if d > best_d:
            best, best_d = c, d
    # fall back to the far corner of the RGB cube, nudged by the best random draw
    far = np.where(mean < 128.0, 255.0, 0.0)
    return 0.7 * far + 0.3 * best


def _render_image(rng: np.random.Generator, size: int):
    """One image: returns (rgb uint8 HxWx3, list of instances, stuff category map HxW)."""
    h = w = size
    scale = size / 128.0

    # stuff: sky above a wavy boundary, ground below
    xs = np.arange(w, dtype=np.float64)
    boundary = np.full(w, rng.uniform(0.3, 0.7) * h)
    for k in range(1, 4):
        amp = rng.uniform(0.0, 0.08 * h) / k
        freq = rng.uniform(0.5, 3.0) * k
        boundary += amp * np.sin(2.0 * np.pi * freq * xs / w + rng.uniform(0.0, 2.0 * np.pi))
    boundary = np.clip(boundary, 2.0, h - 3.0)
    sky = np.arange(h, dtype=np.float64)[:, None] < boundary[None, :]
    image = np.where(sky[..., None], _texture(rng, h, w), _texture(rng, h, w))

    # things: rejection-sampled, 1-px apart
    occupied = np.zeros((h, w), dtype=bool)
    blocked = np.zeros((h, w), dtype=bool)  # occupied, dilated by 1 px
    instances = []
    num = int(rng.integers(1, 7))
    for _ in range(num):
        kind = int(rng.integers(_NUM_THINGS))
        for _try in range(_MAX_PLACEMENT_TRIES):
            extent = float(np.exp(rng.uniform(np.log(10.0), np.log(60.0)))) * scale
            r = min(extent / 2.0, 0.3 * size)
            theta = rng.uniform(0.0, 2.0 * np.pi)
            cx = rng.uniform(r + 1.0, w - 1.0 - r)
            cy = rng.uniform(r + 1.0, h - 1.0 - r)
            poly = [round(float(v), 2) for v in _polygon(kind, cx, cy, r, theta).reshape(-1)]
            mask = _rasterize(poly, h, w)
            area = int(mask.sum())
            if area < _MIN_INSTANCE_AREA * scale * scale or (mask & blocked).any():
                continue
            color = _pick_color(rng, image[mask])
            grain = rng.normal(0.0, 6.0, (area, 3))
            image[mask] = np.clip(color[None, :] + grain, 0.0, 255.0)
            occupied |= mask
            blocked = _dilate1(occupied)
            instances.append(
                {"category_id": kind + 1, "polygon": poly, "mask": mask, "area": area,
                 "bbox": _mask_bbox(mask)}
            )
            break
    stuff = np.where(sky, _SKY_ID, _GROUND_ID).astype(np.int64)
    return np.round(image).astype(np.uint8), instances, stuff


def _png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _categories() -> Tuple[List[dict], List[dict]]:
    """(instances categories, panoptic categories) with shared ids (things 1..T, stuff T+1..)."""
    inst = [
        {"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(THING_CLASSES)
    ]
    pan = [
        {"id": i + 1, "name": n, "supercategory": "shape", "isthing": 1,
         "color": list(THING_COLORS[i])}
        for i, n in enumerate(THING_CLASSES)
    ] + [
        {"id": _NUM_THINGS + j + 1, "name": n, "supercategory": "background", "isthing": 0,
         "color": list(STUFF_COLORS[j])}
        for j, n in enumerate(STUFF_CLASSES)
    ]
    return inst, pan


# --------------------------------------------------------------------------------------------
# generation
# --------------------------------------------------------------------------------------------
class _Writer:
    """Writes files under a folder and records their size and sha256 for the manifest."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.files: Dict[str, Dict[str, object]] = {}

    def write(self, rel: str, data: bytes) -> None:
        path = os.path.join(self.out_dir, *rel.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        self.files[rel] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _json_bytes(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=False).encode("utf-8")


def _generate_split(writer: _Writer, split: str, seed: int, size: int, num: int) -> None:
    t0 = time.perf_counter()
    inst_cats, pan_cats = _categories()
    images, annotations, pan_annotations = [], [], []
    stuff_to_separated = {_NUM_THINGS + j + 1: j + 1 for j in range(len(STUFF_CLASSES))}
    ann_id = 0
    for index in range(num):
        image_id = index + 1
        fname = f"{image_id:06d}.png"
        rng = np.random.default_rng([int(seed), SPLITS[split], index])
        rgb, instances, stuff = _render_image(rng, size)

        sem = (stuff - 1).astype(np.uint8)  # label = category_id - 1
        pan = (stuff * PANOPTIC_LABEL_DIVISOR).astype(np.int64)
        sep = np.full((size, size), IGNORE_LABEL, dtype=np.uint8)
        for cat_id, label in stuff_to_separated.items():
            sep[stuff == cat_id] = label
        segments = []
        for k, inst in enumerate(instances, start=1):
            m = inst["mask"]
            sem[m] = inst["category_id"] - 1
            seg_id = inst["category_id"] * PANOPTIC_LABEL_DIVISOR + k
            pan[m] = seg_id
            sep[m] = 0
            ann_id += 1
            annotations.append(
                {"id": ann_id, "image_id": image_id, "category_id": inst["category_id"],
                 "segmentation": [inst["polygon"]], "area": inst["area"],
                 "bbox": inst["bbox"], "iscrowd": 0}
            )
            segments.append(
                {"id": seg_id, "category_id": inst["category_id"], "area": inst["area"],
                 "bbox": inst["bbox"], "iscrowd": 0, "isthing": 1}
            )
        occupied = np.zeros((size, size), dtype=bool)
        for inst in instances:
            occupied |= inst["mask"]
        for j in range(len(STUFF_CLASSES)):
            cat_id = _NUM_THINGS + j + 1
            m = (stuff == cat_id) & ~occupied
            area = int(m.sum())
            if area == 0:
                continue
            segments.append(
                {"id": cat_id * PANOPTIC_LABEL_DIVISOR, "category_id": cat_id, "area": area,
                 "bbox": _mask_bbox(m), "iscrowd": 0, "isthing": 0}
            )
        pan_rgb = np.stack([pan % 256, (pan // 256) % 256, pan // 65536], axis=-1)

        writer.write(f"images/{split}/{fname}", _png_bytes(rgb))
        writer.write(f"sem_seg/{split}/{fname}", _png_bytes(sem))
        writer.write(f"panoptic/{split}/{fname}", _png_bytes(pan_rgb.astype(np.uint8)))
        writer.write(f"panoptic_stuff/{split}/{fname}", _png_bytes(sep))
        images.append({"id": image_id, "file_name": fname, "width": size, "height": size})
        pan_annotations.append(
            {"image_id": image_id, "file_name": fname, "segments_info": segments}
        )
        if (index + 1) % _PROGRESS_EVERY == 0 or index + 1 == num:
            logger.info(
                "shapes %s: %d/%d images (%.1f s)", split, index + 1, num,
                time.perf_counter() - t0,
            )

    info = {"description": f"agvm synthetic shapes v{SHAPES_VERSION}, seed {seed}, {split}",
            "version": str(SHAPES_VERSION)}
    writer.write(
        f"annotations/instances_{split}.json",
        _json_bytes({"info": info, "licenses": [], "images": images,
                     "annotations": annotations, "categories": inst_cats}),
    )
    writer.write(
        f"annotations/panoptic_{split}.json",
        _json_bytes({"info": info, "licenses": [], "images": images,
                     "annotations": pan_annotations, "categories": pan_cats}),
    )


def generate_shapes(
    out_dir: str,
    seed: int = DEFAULT_SEED,
    image_size: int = DEFAULT_IMAGE_SIZE,
    num_train: int = DEFAULT_NUM_TRAIN,
    num_val: int = DEFAULT_NUM_VAL,
) -> str:
    """Generate the dataset into ``out_dir`` (created; existing files are overwritten).

    The raw generator: no cache logic, no locking, no verification (see
    :func:`ensure_shapes`). Output is byte-identical for the same ``seed`` / ``image_size``
    / :data:`SHAPES_VERSION` (and numpy, Pillow, zlib). Image ``i`` of a split depends only
    on ``(seed, split, i)`` (``numpy.random.default_rng([seed, SPLITS[split], i])``), so a
    smaller dataset is a prefix of a larger one.

    Args:
        out_dir: target folder.
        seed: non-negative int; default 0.
        image_size: side of the square images in px; default 128 (object sizes scale with it).
        num_train: number of ``train`` images; default 1000.
        num_val: number of ``val`` images; default 200.

    Annotations: ``bbox`` is the tight box ``[x, y, w, h]`` of the rasterised *mask* (in
    pixel units, ``w = x_max - x_min + 1``) in both the instances and the panoptic json;
    ``area`` is the mask's pixel count. Image ids, annotation ids and category ids start at 1;
    file names are ``<image_id:06d>.png``.

    Returns:
        ``out_dir``.
    """
    num_train, num_val = int(num_train), int(num_val)
    _check_params(seed, image_size, num_train, num_val)
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    writer = _Writer(out_dir)
    _generate_split(writer, "train", int(seed), int(image_size), num_train)
    _generate_split(writer, "val", int(seed), int(image_size), num_val)
    manifest = {
        "name": "shapes",
        "version": SHAPES_VERSION,
        "seed": int(seed),
        "image_size": int(image_size),
        "num_images": {"train": num_train, "val": num_val},
        "thing_classes": list(THING_CLASSES),
        "stuff_classes": list(STUFF_CLASSES),
        "sem_seg_labels": "category_id - 1 (things first, then stuff); 255 = ignore",
        "files": {k: writer.files[k] for k in sorted(writer.files)},
    }
    with open(os.path.join(out_dir, "manifest.json"), "wb") as f:
        f.write(json.dumps(manifest, indent=1).encode("utf-8"))
    logger.info(
        "shapes: generated %d + %d images of %d px into %s in %.1f s",
        num_train, num_val, image_size, out_dir, time.perf_counter() - t0,
    )
    return out_dir


# --------------------------------------------------------------------------------------------
# cache
# --------------------------------------------------------------------------------------------
def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_shapes(
    folder: str,
    seed: Optional[int] = None,
    image_size: Optional[int] = None,
    num_train: Optional[int] = None,
    num_val: Optional[int] = None,
    max_problems: int = 5,
) -> List[str]:
    """Check a dataset folder against its ``manifest.json``.

    Checks the manifest's version (and, where given, seed, image size in px and image
    counts) and that every listed file exists with the recorded size and sha256.

    Returns:
        A list of problems (at most ``max_problems``); empty if the folder is intact.
    """
    path = os.path.join(folder, "manifest.json")
    try:
        with open(path, "rb") as f:
            manifest = json.loads(f.read().decode("utf-8"))
        files = manifest["files"]
        counts = manifest["num_images"]
    except FileNotFoundError:
        return [f"{path} is missing"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"{path} is unreadable: {e!r}"]
    expected = {"version": SHAPES_VERSION, "seed": seed, "image_size": image_size}
    problems = []
    for key, value in expected.items():
        if value is not None and manifest.get(key) != value:
            problems.append(f"manifest {key}={manifest.get(key)!r}, expected {value!r}")
    for split, value in (("train", num_train), ("val", num_val)):
        if value is not None and counts.get(split) != value:
            problems.append(f"manifest has {counts.get(split)} {split} images, expected {value}")
    if problems:
        return problems
    for rel, rec in files.items():
        p = os.path.join(folder, *rel.split("/"))
        try:
            size = os.path.getsize(p)
        except OSError:
            problems.append(f"{rel} is missing")
        else:
            if size != rec["size"]:
                problems.append(f"{rel} has {size} bytes, expected {rec['size']}")
            elif _sha256_file(p) != rec["sha256"]:
                problems.append(f"{rel} has a wrong sha256")
        if len(problems) >= max_problems:
            break
    return problems


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    with open(path, "a+b") as fh:
        if fcntl is not None:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def build_cached(folder: str, verify: Callable[[], List[str]], build: Callable[[str], None], what: str) -> None:
    """Make the cache folder ``folder`` pass ``verify`` (which returns its problems, [] = intact):
    when it does not, ``build(tmp)`` fills a temporary sibling folder that then replaces it,
    under an exclusive ``fcntl.flock`` on ``<root>/.<name>.lock`` (concurrent processes build it
    once; ``verify`` runs again under the lock). A failed verification is logged as a warning
    naming ``what`` and the problems. Shared by the dataset and the pretrained-weights caches."""
    if not verify():
        return
    root_dir, name = os.path.split(folder)
    os.makedirs(root_dir, exist_ok=True)
    with _file_lock(os.path.join(root_dir, f".{name}.lock")):
        problems = verify()  # another process may have finished it
        if not problems:
            return
        if os.path.exists(folder):
            logger.warning("%s %s failed verification (%s); regenerating it", what, folder, "; ".join(problems))
        else:
            logger.info("%s %s not found; generating it", what, folder)
        _remove_stale(root_dir, name)
        tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root_dir)
        try:
            build(tmp)
            _swap_into_place(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _swap_into_place(tmp: str, folder: str) -> None:
    """Rename the finished ``tmp`` folder to ``folder``, replacing an existing one (moved aside
    first, then deleted), so that ``folder`` is never half-written."""
    root_dir, name = os.path.split(folder)
    if os.path.lexists(folder):
        old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=root_dir)
        os.rename(folder, os.path.join(old, name))
        os.rename(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, folder)


def _remove_stale(root: str, name: str) -> None:
    for entry in os.listdir(root):
        if entry.startswith(f".{name}.tmp-") or entry.startswith(f".{name}.old-"):
            shutil.rmtree(os.path.join(root, entry), ignore_errors=True)


def ensure_shapes(
    root: Optional[str] = None,
    seed: int = DEFAULT_SEED,
    image_size: int = DEFAULT_IMAGE_SIZE,
    num_train: Optional[int] = None,
    num_val: Optional[int] = None,
    *,
    recheck: bool = False,
) -> str:
    """Return the dataset folder, generating or repairing it first if needed.

    Args:
        root: cache root; default ``$AGVM_DATASETS`` if set, else ``~/.cache/agvm/datasets``
            (read at call time). The dataset lives in ``<root>/shapes_v1_seed<seed>_<size>px``
            (see :func:`shapes_dir`).
        seed: non-negative int; default 0.
        image_size: side of the square images in px; default 128.
        num_train: ``train`` images; default ``$AGVM_SHAPES_NUM_TRAIN`` or 1000.
        num_val: ``val`` images; default ``$AGVM_SHAPES_NUM_VAL`` or 200.
        recheck: verify again even if this process already verified the folder.

    The folder is verified against ``manifest.json`` (existence, size and sha256 of every
    file) once per process. If anything is missing, truncated or corrupted, a warning is
    logged and the whole dataset is regenerated: into a temporary sibling folder that is
    renamed into place at the end, under an exclusive ``fcntl.flock`` on
    ``<root>/.<name>.lock``, so that concurrent processes (e.g. DDP ranks) generate it once.
    Generating the defaults (1000 + 200 images of 128 px) takes about 10 s on 2 CPU cores
    (single process; 9.6 s measured); verifying an intact cache about 0.1 s.
    """
    num_train, num_val = _resolve_counts(num_train, num_val)
    _check_params(seed, image_size, num_train, num_val)
    folder = shapes_dir(root, seed, image_size, num_train, num_val)
    if folder in _VERIFIED and not recheck:
        return folder
    _VERIFIED.discard(folder)
    params = dict(seed=int(seed), image_size=int(image_size), num_train=num_train,
                  num_val=num_val)
    build_cached(folder, lambda: verify_shapes(folder, **params), lambda tmp: generate_shapes(tmp, **params),
                 "shapes dataset")
    _VERIFIED.add(folder)
    return folder
