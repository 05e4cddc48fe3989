"""A pretrained ResNet-18 for the mini configs, built locally: a stand-in for ImageNet weights.

Full-scale detectron2 configs start the backbone from ImageNet classification weights
(``MODEL.WEIGHTS: detectron2://ImageNetPretrained/...``) and initialise FPN and heads afresh.
The mini configs (``configs/mini``: ResNet-18 with BN, ``RES2_OUT_CHANNELS`` 64, 128 px
images of :mod:`agvm.data.shapes`) cannot download anything, so this module produces the
analogue once, on CPU, and caches it like the dataset:

1. generate a *differently seeded* shapes set (seed :data:`DEFAULT_PRETRAIN_SEED` = 1;
   the detection / segmentation datasets use :data:`agvm.data.shapes.DEFAULT_SEED` = 0);
2. cut every thing instance out of its image (its box grown to a square with a context
   margin) and resize it to ``crop_size`` px (64); label = its thing class (5 classes);
3. train detectron2's own ResNet (:func:`build_mini_resnet`, exactly the mini backbone) +
   global average pooling + a linear classifier on the ``train`` crops, report the accuracy
   on the ``val`` crops (held-out images), and keep the ResNet part only.

The result, ``model_final.pth`` = ``{"model": {"backbone.bottom_up.<name>": tensor}, ...}``
(BN running statistics included, classifier dropped), loads with ``DetectionCheckpointer``
into every mini model (Faster/Mask R-CNN, RetinaNet, semantic and panoptic FPN hold the
ResNet at ``backbone.bottom_up``), leaving FPN and heads as initialised. Configs name it
without a machine-specific path: ``MODEL.WEIGHTS: "agvm-pretrained://shapes_r18"`` (this
module registers that prefix on detectron2's ``PathManager`` when :mod:`agvm.detectron2` is
imported; the first use builds the weights, ~2 min on one core, later uses verify the cache).
With the defaults the held-out crop accuracy is 0.913 (5 classes, majority class 0.252), built
in 121 s on one thread (12 s of it generating the 700 + 200 images); build (or verify) it with
``python -c "import logging; logging.basicConfig(level=logging.INFO); from
agvm.detectron2.pretrained import ensure_pretrained; print(ensure_pretrained())"``.

Disjointness: image ``i`` of a shapes split is drawn from
``numpy.random.default_rng([seed, split, i])``; seed 1 and seed 0 give independent streams,
so no detection image (train or val) is seen in pretraining. :func:`ensure_pretrained`
refuses seed 0. The held-out accuracy is on the pretraining set's own ``val`` split.

How it differs from ImageNet pretraining: the data are synthetic and tiny (~3k crops of
5 classes vs 1.28M photos of 1000), from the *same* shape/texture family as the detection
sets (only the images differ), the inputs are 64 px crops centred on one object (detection
sees 128 px scenes with 1-6 objects), training is a few epochs (minutes, not days), and BN
is trained as ``BN`` (the mini configs train BN too, ``FREEZE_AT`` 0) where ImageNet
backbones usually run frozen BN. It is a warm start with the right layout and statistics,
not a strong feature extractor. Pixels are normalised exactly as the mini models do
(RGB, ``(x - 127.5) / 64``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from detectron2.config import CfgNode, get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone.resnet import ResNet, build_resnet_backbone
from detectron2.utils.file_io import PathHandler, PathManager

from ..data import shapes as _shapes
from ..data.shapes import _sha256_file

__all__ = [
    "PRETRAINED_VERSION",
    "DEFAULT_PRETRAIN_SEED",
    "DEFAULT_CROP_SIZE",
    "DEFAULT_SETTINGS",
    "URL_PREFIX",
    "PRETRAINED",
    "PretrainedHandler",
    "mini_resnet_cfg",
    "build_mini_resnet",
    "shape_crops",
    "pretrain_resnet",
    "pretrained_dir",
    "verify_pretrained",
    "ensure_pretrained",
    "resolve_pretrained_url",
    "register_url_handler",
]

logger = logging.getLogger(__name__)

#: Bumped whenever the recipe's output changes; part of the cache folder name.
PRETRAINED_VERSION = 1
#: Seed of the pretraining shapes set and of the training run; differs from the detection
#: datasets' seed (:data:`agvm.data.shapes.DEFAULT_SEED`, 0).
DEFAULT_PRETRAIN_SEED = 1
DEFAULT_CROP_SIZE = 64  # px, side of the square classification crops
#: Training settings (part of the cache identity): images of the pretraining shapes set per
#: split (128 px), epochs over the train crops, crops per batch, peak AdamW learning rate,
#: AdamW weight decay (conv / linear weights only), and the context margin around each box
#: (fraction of its longer side, on each side).
DEFAULT_SETTINGS: Dict[str, Any] = {
    "num_train_images": 700,
    "num_val_images": 200,
    "epochs": 3,
    "batch_size": 32,
    "lr": 2e-3,
    "weight_decay": 0.05,
    "margin": 0.25,
}
#: The prefix of the URLs :class:`PretrainedHandler` resolves, e.g. ``agvm-pretrained://shapes_r18``.
URL_PREFIX = "agvm-pretrained://"
#: URL name -> :func:`ensure_pretrained` keyword arguments (empty: the defaults). The root is
#: always :func:`agvm.data.shapes.default_root` (``$AGVM_DATASETS``, read at resolve time).
PRETRAINED: Dict[str, Dict[str, Any]] = {"shapes_r18": {}}

_MODEL_FILE = "model_final.pth"
_PIXEL_MEAN, _PIXEL_STD = 127.5, 64.0  # as configs/mini (RGB)
_LOG_EVERY = 20  # iterations


# --------------------------------------------------------------------------------------------
# model and data
# --------------------------------------------------------------------------------------------
def mini_resnet_cfg() -> CfgNode:
    """A detectron2 config holding the mini configs' backbone settings.

    ``MODEL.RESNETS``: ``DEPTH`` 18, ``RES2_OUT_CHANNELS`` 64, ``NORM`` "BN", ``OUT_FEATURES``
    res2..res5 (other ResNet keys at detectron2's defaults, as in ``configs/mini``);
    ``MODEL.BACKBONE.FREEZE_AT`` 0; pixel mean / std 127.5 / 64 (RGB).
    """
    cfg = get_cfg()
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.PIXEL_MEAN = [_PIXEL_MEAN] * 3
    cfg.MODEL.PIXEL_STD = [_PIXEL_STD] * 3
    cfg.INPUT.FORMAT = "RGB"
    return cfg


def build_mini_resnet() -> ResNet:
    """The mini configs' ResNet-18 (``build_resnet_backbone`` on :func:`mini_resnet_cfg`, 3
    input channels), randomly initialised from torch's global RNG."""
    return build_resnet_backbone(mini_resnet_cfg(), ShapeSpec(channels=3))


class _Classifier(nn.Module):
    def __init__(self, num_classes: int):
        super().__init__()
        self.bottom_up = build_mini_resnet()
        self.head = nn.Linear(self.bottom_up.output_shape()["res5"].channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.float() - _PIXEL_MEAN) / _PIXEL_STD
        return self.head(self.bottom_up(x)["res5"].mean(dim=(2, 3)))


def shape_crops(
    folder: str, split: str, crop_size: int = DEFAULT_CROP_SIZE, margin: float = 0.25
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Square crops of every thing instance of a shapes dataset split, and their classes.

    Each instance's ``bbox`` is grown to a square of side ``max(w, h) * (1 + 2 * margin)``
    (capped at the image size) around its centre, shifted inside the image (so it still holds
    the whole object), and resized bilinearly to ``crop_size`` px.

    Args:
        folder: a dataset folder of :mod:`agvm.data.shapes` (e.g. from ``ensure_shapes``).
        split: ``"train"`` or ``"val"``.
        crop_size: output side in px; default 64.
        margin: context on each side, as a fraction of the box's longer side; default 0.25.

    Returns:
        ``(images, labels)``: uint8 ``(N, 3, crop_size, crop_size)`` RGB and int64 ``(N,)``
        thing-class indices (``category_id - 1``, see ``THING_CLASSES``), in annotation order.
    """
    with open(os.path.join(folder, "annotations", f"instances_{split}.json")) as f:
        coco = json.load(f)
    files = {img["id"]: img["file_name"] for img in coco["images"]}
    by_image: Dict[int, List[dict]] = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    crops, labels = [], []
    for image_id in sorted(by_image):
        with Image.open(os.path.join(folder, "images", split, files[image_id])) as im:
            im = im.convert("RGB")
            w_img, h_img = im.size
            for ann in by_image[image_id]:
                x, y, w, h = ann["bbox"]
                side = min(max(w, h) * (1.0 + 2.0 * margin), w_img, h_img)
                x0 = min(max(x + w / 2.0 - side / 2.0, 0.0), w_img - side)
                y0 = min(max(y + h / 2.0 - side / 2.0, 0.0), h_img - side)
                crop = im.resize((crop_size, crop_size), Image.BILINEAR,
                                 box=(x0, y0, x0 + side, y0 + side))
                crops.append(np.asarray(crop, dtype=np.uint8).transpose(2, 0, 1))
                labels.append(ann["category_id"] - 1)
    if not crops:
        raise ValueError(f"no instances in {folder} ({split})")
    return torch.from_numpy(np.stack(crops)), torch.tensor(labels, dtype=torch.int64)


def _dihedral(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random flips / transposes per sample (the shape classes are invariant to them)."""
    n = x.shape[0]
    for flip in (lambda t: t.flip(-1), lambda t: t.flip(-2), lambda t: t.transpose(-1, -2)):
        m = torch.rand(n, generator=g) < 0.5
        x = torch.where(m[:, None, None, None], flip(x), x)
    return x


@torch.no_grad()
def _accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, bs: int = 256) -> float:
    model.eval()
    correct = sum(
        int((model(images[i:i + bs]).argmax(1) == labels[i:i + bs]).sum())
        for i in range(0, len(images), bs)
    )
    model.train()
    return correct / len(images)


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def _settings(**overrides: Any) -> Dict[str, Any]:
    unknown = set(overrides) - set(DEFAULT_SETTINGS)
    if unknown:
        raise TypeError(f"unknown pretraining settings {sorted(unknown)}; known: {sorted(DEFAULT_SETTINGS)}")
    s = dict(DEFAULT_SETTINGS)
    s.update({k: v for k, v in overrides.items() if v is not None})
    for k in ("num_train_images", "num_val_images", "epochs", "batch_size"):
        s[k] = int(s[k])
        if s[k] < 1:
            raise ValueError(f"{k} must be >= 1, got {s[k]}")
    for k in ("lr", "weight_decay", "margin"):
        s[k] = float(s[k])
    return s


def _check_seed(seed: int, crop_size: int) -> None:
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if seed == _shapes.DEFAULT_SEED:
        raise ValueError(
            f"seed {seed} is the detection datasets' seed (agvm.data.shapes.DEFAULT_SEED); "
            "pretraining must use other images"
        )
    if int(crop_size) != crop_size or crop_size < 16:
        raise ValueError(f"crop_size must be an integer >= 16 (px), got {crop_size!r}")


def pretrain_resnet(
    root: Optional[str] = None,
    seed: int = DEFAULT_PRETRAIN_SEED,
    crop_size: int = DEFAULT_CROP_SIZE,
    *,
    num_threads: int = 1,
    **settings: Any,
) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Pretrain the mini ResNet-18 on shape-crop classification (no caching; see
    :func:`ensure_pretrained`).

    Args:
        root: dataset cache root for the pretraining shapes set; default
            ``agvm.data.shapes.default_root()`` (``$AGVM_DATASETS`` or ``~/.cache/agvm/datasets``).
        seed: seed of the shapes set (``ensure_shapes(seed=...)``, 128 px images) and of the
            initialisation / shuffling / augmentation; default 1; 0 (the detection seed) is refused.
        crop_size: side of the classification crops in px; default 64.
        num_threads: torch threads while training (restored afterwards); default 1.
        **settings: overrides of :data:`DEFAULT_SETTINGS`: ``num_train_images`` (700),
            ``num_val_images`` (200), ``epochs`` (3), ``batch_size`` (32 crops), ``lr`` (2e-3,
            peak; AdamW, linear warm-up over <= 20 iterations then cosine to 0),
            ``weight_decay`` (0.05, on conv / linear weights), ``margin`` (0.25 of the box's
            longer side). Training batches are randomly flipped / transposed per crop.

    Deterministic for fixed arguments on one thread; the global torch RNG state is restored.
    Defaults take about 2 minutes on one CPU core (121 s measured, 12 s of it data generation).

    Returns:
        ``(model, stats)``: ``model`` maps ``backbone.bottom_up.<name>`` to every ResNet
        parameter and buffer (BN running statistics included, classifier dropped); ``stats``
        holds crop counts, the last epoch's mean train loss and accuracy (augmented batches,
        train mode), ``heldout_accuracy`` (fraction of the val crops, eval mode),
        ``chance_accuracy`` (majority class of the val crops) and timings (s).
    """
    _check_seed(seed, crop_size)
    s = _settings(**settings)
    t0 = time.perf_counter()
    data_dir = _shapes.ensure_shapes(
        root, seed=int(seed), image_size=_shapes.DEFAULT_IMAGE_SIZE,
        num_train=s["num_train_images"], num_val=s["num_val_images"],
    )
    train_x, train_y = shape_crops(data_dir, "train", int(crop_size), s["margin"])
    val_x, val_y = shape_crops(data_dir, "val", int(crop_size), s["margin"])
    data_seconds = time.perf_counter() - t0
    num_classes = len(_shapes.THING_CLASSES)
    logger.info(
        "pretrain: %d train / %d held-out crops of %d px, %d classes, from %s (%.1f s)",
        len(train_y), len(val_y), crop_size, num_classes, data_dir, data_seconds,
    )

    bs = s["batch_size"]
    steps_per_epoch = max(len(train_y) // bs, 1)  # drop the last partial batch
    total = steps_per_epoch * s["epochs"]
    warmup = min(20, max(total // 10, 1))
    with _torch_threads(int(num_threads)), torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        g = torch.Generator().manual_seed(int(seed))
        model = _Classifier(num_classes)
        decay = [p for n, p in model.named_parameters() if p.ndim > 1]
        no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": s["weight_decay"]},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=s["lr"],
        )
        t1 = time.perf_counter()
        it, loss_sum, correct, seen = 0, 0.0, 0, 0
        for epoch in range(s["epochs"]):
            order = torch.randperm(len(train_y), generator=g)
            for b in range(steps_per_epoch):
                idx = order[b * bs:(b + 1) * bs]
                x, y = _dihedral(train_x[idx], g), train_y[idx]
                if it < warmup:
                    lr = s["lr"] * (0.1 + 0.9 * it / warmup)
                else:
                    lr = 0.5 * s["lr"] * (1.0 + np.cos(np.pi * (it - warmup) / max(total - warmup, 1)))
                for group in opt.param_groups:
                    group["lr"] = lr
                logits = model(x)
                loss = F.cross_entropy(logits, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                it += 1
                loss_sum += loss.item() * len(y)
                correct += int((logits.argmax(1) == y).sum())
                seen += len(y)
                if it % _LOG_EVERY == 0:
                    logger.info("pretrain: iter %d/%d, loss %.3f, lr %.2e, %.1f s",
                                it, total, loss.item(), lr, time.perf_counter() - t0)
            heldout = _accuracy(model, val_x, val_y)
            logger.info(
                "pretrain: epoch %d/%d, loss %.3f, train acc %.3f (augmented), held-out acc %.3f, %.1f s",
                epoch + 1, s["epochs"], loss_sum / seen, correct / seen, heldout, time.perf_counter() - t0,
            )
            epoch_loss, epoch_acc = loss_sum / seen, correct / seen
            loss_sum, correct, seen = 0.0, 0, 0
        train_seconds = time.perf_counter() - t1
        state = {f"backbone.bottom_up.{k}": v.detach().clone() for k, v in model.bottom_up.state_dict().items()}
    stats = {
        "num_train_crops": len(train_y),
        "num_val_crops": len(val_y),
        "num_classes": num_classes,
        "classes": list(_shapes.THING_CLASSES),
        "iterations": total,
        "final_epoch_loss": round(epoch_loss, 5),
        "final_epoch_train_accuracy": round(epoch_acc, 5),
        "heldout_accuracy": round(heldout, 5),
        "chance_accuracy": round(float(torch.bincount(val_y).max()) / len(val_y), 5),
        "data_seconds": round(data_seconds, 2),
        "train_seconds": round(train_seconds, 2),
        "num_threads": int(num_threads),
        "shapes_dir": os.path.basename(data_dir),
    }
    logger.info("pretrain: held-out accuracy %.3f (majority class %.3f), %.1f s in all",
                heldout, stats["chance_accuracy"], time.perf_counter() - t0)
    return state, stats


# --------------------------------------------------------------------------------------------
# cache
# --------------------------------------------------------------------------------------------
def pretrained_dir(
    root: Optional[str] = None,
    seed: int = DEFAULT_PRETRAIN_SEED,
    crop_size: int = DEFAULT_CROP_SIZE,
    **settings: Any,
) -> str:
    """The cache folder for these arguments (nothing is built or checked).

    ``<root>/pretrained_v<PRETRAINED_VERSION>_r18_seed<seed>_<crop_size>px`` for the
    :data:`DEFAULT_SETTINGS`; other settings add ``_<8 hex digits of their hash>``. ``root``
    defaults to ``agvm.data.shapes.default_root()``; ``settings`` as in :func:`pretrain_resnet`.
    """
    s = _settings(**settings)
    root = _shapes.default_root() if root is None else os.path.abspath(os.path.expanduser(root))
    name = f"pretrained_v{PRETRAINED_VERSION}_r18_seed{int(seed)}_{int(crop_size)}px"
    if s != _settings():
        name += "_" + hashlib.sha256(json.dumps(s, sort_keys=True).encode()).hexdigest()[:8]
    return os.path.join(root, name)


def verify_pretrained(
    folder: str,
    seed: Optional[int] = None,
    crop_size: Optional[int] = None,
    settings: Optional[Dict[str, Any]] = None,
) -> List[str]:
    """Check a pretrained folder against its ``manifest.json``.

    Checks the version, (where given) seed, crop size in px and the full settings dict, and
    that ``model_final.pth`` exists with the recorded size and sha256.

    Returns:
        A list of problems; empty if the folder is intact.
    """
    path = os.path.join(folder, "manifest.json")
    try:
        with open(path, "rb") as f:
            manifest = json.loads(f.read().decode("utf-8"))
        rec = manifest["files"][_MODEL_FILE]
    except FileNotFoundError:
        return [f"{path} is missing"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"{path} is unreadable: {e!r}"]
    expected = {"version": PRETRAINED_VERSION, "seed": seed, "crop_size": crop_size, "settings": settings}
    problems = [
        f"manifest {k}={manifest.get(k)!r}, expected {v!r}"
        for k, v in expected.items() if v is not None and manifest.get(k) != v
    ]
    if problems:
        return problems
    weights = os.path.join(folder, _MODEL_FILE)
    try:
        size = os.path.getsize(weights)
    except OSError:
        return [f"{_MODEL_FILE} is missing"]
    if size != rec["size"]:
        return [f"{_MODEL_FILE} has {size} bytes, expected {rec['size']}"]
    if _sha256_file(weights) != rec["sha256"]:
        return [f"{_MODEL_FILE} has a wrong sha256"]
    return []


def ensure_pretrained(
    root: Optional[str] = None,
    seed: int = DEFAULT_PRETRAIN_SEED,
    crop_size: int = DEFAULT_CROP_SIZE,
    *,
    num_threads: int = 1,
    **settings: Any,
) -> str:
    """Return the path of the cached pretrained weights, building or repairing them first.

    Args:
        root: cache root; default ``agvm.data.shapes.default_root()`` (``$AGVM_DATASETS`` or
            ``~/.cache/agvm/datasets``, read at call time). The weights live in
            ``<root>/pretrained_v1_r18_seed<seed>_<crop_size>px/model_final.pth`` (see
            :func:`pretrained_dir`); the pretraining shapes set in ``<root>`` too.
        seed: pretraining seed (data and training); default 1; 0 is refused (detection seed).
        crop_size: classification crop side in px; default 64.
        num_threads: torch threads used if training is needed; default 1 (not part of the
            cache identity).
        **settings: overrides of :data:`DEFAULT_SETTINGS` (see :func:`pretrain_resnet`).

    The folder is verified against its ``manifest.json`` (version, seed, settings, size and
    sha256 of the weights) on every call (~0.1 s). If it is missing or fails, the weights are
    (re)built by :func:`pretrain_resnet` (a warning says why when a folder was there) into a
    temporary sibling folder renamed into place, under an exclusive lock on
    ``<root>/.<name>.lock``, so that concurrent processes build it once. The default build
    takes about 2 minutes on one CPU core.

    Returns:
        Absolute path of ``model_final.pth``: ``{"model": {"backbone.bottom_up.<name>": tensor},
        "__author__": "agvm"}``, loadable with ``DetectionCheckpointer(model).load(path)``.
    """
    _check_seed(seed, crop_size)
    s = _settings(**settings)
    folder = pretrained_dir(root, seed, crop_size, **s)
    weights = os.path.join(folder, _MODEL_FILE)
    expected = dict(seed=int(seed), crop_size=int(crop_size), settings=s)
    built = {}

    def build(tmp: str) -> None:
        t0 = time.perf_counter()
        state, stats = pretrain_resnet(os.path.dirname(folder), int(seed), int(crop_size), num_threads=num_threads, **s)
        with open(os.path.join(tmp, _MODEL_FILE), "wb") as f:
            torch.save({"model": state, "__author__": "agvm"}, f)
            f.flush()
            os.fsync(f.fileno())
        manifest = {
            "name": "agvm-pretrained",
            "version": PRETRAINED_VERSION,
            "arch": "detectron2 ResNet-18 (BN, RES2_OUT_CHANNELS 64), keys backbone.bottom_up.*",
            "seed": int(seed),
            "crop_size": int(crop_size),
            "settings": s,
            "shapes_version": _shapes.SHAPES_VERSION,
            "detection_seed": _shapes.DEFAULT_SEED,
            **stats,
            "wall_seconds": round(time.perf_counter() - t0, 2),
            "torch": torch.__version__,
            "files": {_MODEL_FILE: {"size": os.path.getsize(os.path.join(tmp, _MODEL_FILE)),
                                    "sha256": _sha256_file(os.path.join(tmp, _MODEL_FILE))}},
        }
        with open(os.path.join(tmp, "manifest.json"), "wb") as f:
            f.write(json.dumps(manifest, indent=1).encode("utf-8"))
        built.update(manifest)

    _shapes.build_cached(folder, lambda: verify_pretrained(folder, **expected), build, "pretrained weights")
    if built:
        logger.info("pretrained weights: %s (held-out accuracy %.3f, %.1f s)",
                    weights, built["heldout_accuracy"], built["wall_seconds"])
    return weights


# --------------------------------------------------------------------------------------------
# agvm-pretrained:// URLs
# --------------------------------------------------------------------------------------------
def resolve_pretrained_url(url: str) -> str:
    """Local path of ``agvm-pretrained://<name>`` (built on first use by :func:`ensure_pretrained`
    with ``PRETRAINED[name]`` as arguments, under ``agvm.data.shapes.default_root()``).

    Raises:
        ValueError: ``url`` lacks the prefix, or ``name`` is not in :data:`PRETRAINED`.
    """
    if not url.startswith(URL_PREFIX):
        raise ValueError(f"{url!r} does not start with {URL_PREFIX!r}")
    name = url[len(URL_PREFIX):]
    if name not in PRETRAINED:
        raise ValueError(
            f"unknown pretrained model {name!r} in {url!r}; known: "
            + ", ".join(URL_PREFIX + k for k in sorted(PRETRAINED))
        )
    return ensure_pretrained(**PRETRAINED[name])


class PretrainedHandler(PathHandler):
    """iopath handler resolving ``agvm-pretrained://<name>`` (see :func:`resolve_pretrained_url`)."""

    _agvm_pretrained = True  # marks the handler across module reloads

    def _get_supported_prefixes(self) -> List[str]:
        return [URL_PREFIX]

    def _get_local_path(self, path: str, force: bool = False, **kwargs: Any) -> str:
        self._check_kwargs(kwargs)
        return resolve_pretrained_url(path)

    def _open(self, path: str, mode: str = "r", buffering: int = -1, **kwargs: Any):
        self._check_kwargs(kwargs)
        return open(self._get_local_path(path), mode, buffering=buffering)

    def _isfile(self, path: str, **kwargs: Any) -> bool:
        self._check_kwargs(kwargs)
        return os.path.isfile(self._get_local_path(path))

    def _exists(self, path: str, **kwargs: Any) -> bool:
        return self._isfile(path, **kwargs)


def register_url_handler() -> bool:
    """Register :class:`PretrainedHandler` on ``detectron2.utils.file_io.PathManager``.

    Idempotent. Returns True if it registered now, False if an agvm handler already was;
    raises ``KeyError`` if another handler owns the prefix.
    """
    try:
        PathManager.register_handler(PretrainedHandler(), allow_override=False)
        return True
    except KeyError:
        current = getattr(PathManager, "_path_handlers", {}).get(URL_PREFIX)
        if getattr(current, "_agvm_pretrained", False):
            return False
        raise


register_url_handler()
