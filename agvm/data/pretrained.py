"""The mini pretrained backbone: a data asset next to the shapes dataset, built locally once.

Full-scale detectron2 configs start the backbone from ImageNet classification weights; the
mini configs (ResNet-18 with BN, ``RES2_OUT_CHANNELS`` 64, 128 px shapes images) download
nothing, so this module produces the analogue on CPU and caches it like the dataset:

1. generate a *differently seeded* shapes set (seed :data:`DEFAULT_PRETRAIN_SEED` = 1; the
   detection / segmentation datasets use :data:`agvm.data.shapes.DEFAULT_SEED` = 0: image ``i``
   of a split comes from ``numpy.random.default_rng([seed, split, i])``, so no detection image
   is seen; seed 0 is refused);
2. cut every thing instance out (its box grown to a square with a context margin), resize it
   to ``crop_size`` px (64); label = its thing class (5 classes);
3. train detectron2's ResNet (:func:`agvm.data.mini_resnet.build_mini_resnet`, exactly the mini
   backbone) + pooling + a linear classifier on the ``train`` crops, report the accuracy on the
   ``val`` crops (held-out images), keep the ResNet only.

The result, ``<root>/pretrained_v1_r18_seed1_64px/model_final.pth`` =
``{"model": {"backbone.bottom_up.<name>": tensor}, "__author__": "agvm"}`` (BN statistics
included) + ``manifest.json`` (settings, accuracy, size and sha256), loads with
``DetectionCheckpointer`` into every mini model, leaving FPN and heads as initialised. Configs
name it ``MODEL.WEIGHTS: "agvm-pretrained://shapes_r18"`` (:mod:`agvm.detectron2.catalog` maps
the URL to this file and never builds; ``train_net.py`` builds it before training when it is
missing). Build it explicitly (prints the path; ~2 min on one core, held-out accuracy 0.913
vs 0.252 for the majority class)::

    python -m agvm.data.pretrained          # or: make pretrained

Unlike ImageNet weights: synthetic, tiny (~3k crops of 5 classes), the detection sets' shape
family, minutes of training, BN trained: a warm start with the right layout, not a strong
feature extractor. Pixels are normalised as the mini models do (RGB, ``(x - 127.5) / 64``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from . import shapes as _shapes
from .mini_resnet import Classifier, accuracy, build_mini_resnet, dihedral, mini_resnet_cfg, shape_crops, torch_threads
from .shapes import _sha256_file

__all__ = ["BUILD_COMMAND", "DEFAULT_CROP_SIZE", "DEFAULT_PRETRAIN_SEED", "DEFAULT_SETTINGS", "PRETRAINED",
           "PRETRAINED_VERSION", "build_command", "build_mini_resnet", "ensure_pretrained", "locate_pretrained", "main",
           "mini_resnet_cfg", "pretrain_resnet", "pretrained_dir", "shape_crops", "verify_pretrained"]

logger = logging.getLogger(__name__)

#: Bumped whenever the recipe's output changes; part of the cache folder name.
PRETRAINED_VERSION = 1
#: Seed of the pretraining shapes set and of the training run (not the detection seed, 0).
DEFAULT_PRETRAIN_SEED = 1
DEFAULT_CROP_SIZE = 64  # px, side of the square classification crops
#: Training settings (part of the cache identity): images per split of the pretraining shapes
#: set (128 px), epochs, crops per batch, peak AdamW lr, AdamW weight decay (conv / linear
#: weights only), context margin around each box (fraction of its longer side, each side).
DEFAULT_SETTINGS: Dict[str, Any] = {
    "num_train_images": 700,
    "num_val_images": 200,
    "epochs": 3,
    "batch_size": 32,
    "lr": 2e-3,
    "weight_decay": 0.05,
    "margin": 0.25,
}
#: The named assets (``agvm-pretrained://<name>``) -> :func:`ensure_pretrained` keyword
#: arguments (empty: the defaults). The root is always ``agvm.data.shapes.default_root()``.
PRETRAINED: Dict[str, Dict[str, Any]] = {"shapes_r18": {}}
#: The command that builds a named asset (``{name}``; the default one needs no argument).
BUILD_COMMAND = "python -m agvm.data.pretrained"

_MODEL_FILE = "model_final.pth"
_LOG_EVERY = 20  # iterations


def build_command(name: str = "shapes_r18") -> str:
    """The shell command that builds the named asset of :data:`PRETRAINED`."""
    return BUILD_COMMAND + ("" if name == "shapes_r18" else f" {name}")


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


def pretrain_resnet(root: Optional[str] = None, seed: int = DEFAULT_PRETRAIN_SEED, crop_size: int = DEFAULT_CROP_SIZE,
                    *, num_threads: int = 1, **settings: Any) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Pretrain the mini ResNet-18 on shape-crop classification (no caching; see
    :func:`ensure_pretrained`). Logs one line per epoch (loss, accuracies, elapsed seconds).

    Args:
        root: dataset cache root for the pretraining shapes set; default
            ``agvm.data.shapes.default_root()`` (``$AGVM_DATASETS`` or ``~/.cache/agvm/datasets``).
        seed: seed of the shapes set (128 px images) and of the initialisation / shuffling /
            augmentation; default 1; 0 (the detection seed) is refused.
        crop_size: side of the classification crops in px; default 64.
        num_threads: torch threads while training (restored afterwards); default 1.
        **settings: overrides of :data:`DEFAULT_SETTINGS` (AdamW, linear warm-up over <= 20
            iterations then cosine to 0; batches randomly flipped / transposed per crop).

    Deterministic for fixed arguments on one thread; the global torch RNG state is restored.

    Returns:
        ``(model, stats)``: ``model`` maps ``backbone.bottom_up.<name>`` to every ResNet
        parameter and buffer (classifier dropped); ``stats``: crop counts, the last epoch's
        mean train loss and accuracy (augmented batches), ``heldout_accuracy`` (val crops, eval
        mode), ``chance_accuracy`` (majority class of the val crops), timings (s).
    """
    _check_seed(seed, crop_size)
    s = _settings(**settings)
    t0 = time.perf_counter()
    data_dir = _shapes.ensure_shapes(root, seed=int(seed), image_size=_shapes.DEFAULT_IMAGE_SIZE,
                                     num_train=s["num_train_images"], num_val=s["num_val_images"])
    train_x, train_y = shape_crops(data_dir, "train", int(crop_size), s["margin"])
    val_x, val_y = shape_crops(data_dir, "val", int(crop_size), s["margin"])
    data_seconds = time.perf_counter() - t0
    num_classes = len(_shapes.THING_CLASSES)
    logger.info("pretrain: %d train / %d held-out crops of %d px, %d classes, from %s (%.1f s)",
                len(train_y), len(val_y), crop_size, num_classes, data_dir, data_seconds)

    bs = s["batch_size"]
    steps_per_epoch = max(len(train_y) // bs, 1)  # drop the last partial batch
    total = steps_per_epoch * s["epochs"]
    warmup = min(20, max(total // 10, 1))
    with torch_threads(int(num_threads)), torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        g = torch.Generator().manual_seed(int(seed))
        model = Classifier(num_classes)
        decay = [p for n, p in model.named_parameters() if p.ndim > 1]
        no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": s["weight_decay"]},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=s["lr"])
        t1 = time.perf_counter()
        it, loss_sum, correct, seen = 0, 0.0, 0, 0
        for epoch in range(s["epochs"]):
            order = torch.randperm(len(train_y), generator=g)
            for b in range(steps_per_epoch):
                idx = order[b * bs:(b + 1) * bs]
                x, y = dihedral(train_x[idx], g), train_y[idx]
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
                    logger.debug("pretrain: iter %d/%d, loss %.3f, lr %.2e, %.1f s",
                                 it, total, loss.item(), lr, time.perf_counter() - t0)
            heldout = accuracy(model, val_x, val_y)
            epoch_loss, epoch_acc = loss_sum / seen, correct / seen
            logger.info("pretrain: epoch %d/%d, loss %.3f, train acc %.3f (augmented), held-out acc %.3f, %.1f s",
                        epoch + 1, s["epochs"], epoch_loss, epoch_acc, heldout, time.perf_counter() - t0)
            loss_sum, correct, seen = 0.0, 0, 0
        train_seconds = time.perf_counter() - t1
        state = {f"backbone.bottom_up.{k}": v.detach().clone() for k, v in model.bottom_up.state_dict().items()}
    stats = {
        "num_train_crops": len(train_y), "num_val_crops": len(val_y), "num_classes": num_classes,
        "classes": list(_shapes.THING_CLASSES), "iterations": total,
        "final_epoch_loss": round(epoch_loss, 5), "final_epoch_train_accuracy": round(epoch_acc, 5),
        "heldout_accuracy": round(heldout, 5),
        "chance_accuracy": round(float(torch.bincount(val_y).max()) / len(val_y), 5),
        "data_seconds": round(data_seconds, 2), "train_seconds": round(train_seconds, 2),
        "num_threads": int(num_threads), "shapes_dir": os.path.basename(data_dir),
    }
    logger.info("pretrain: held-out accuracy %.3f (majority class %.3f), %.1f s in all",
                heldout, stats["chance_accuracy"], time.perf_counter() - t0)
    return state, stats


def pretrained_dir(root: Optional[str] = None, seed: int = DEFAULT_PRETRAIN_SEED, crop_size: int = DEFAULT_CROP_SIZE,
                   **settings: Any) -> str:
    """The cache folder for these arguments (nothing is built or checked):
    ``<root>/pretrained_v<PRETRAINED_VERSION>_r18_seed<seed>_<crop_size>px`` for the
    :data:`DEFAULT_SETTINGS`, other settings add ``_<8 hex digits of their hash>``; ``root``
    defaults to ``agvm.data.shapes.default_root()`` (read at call time)."""
    s = _settings(**settings)
    root = _shapes.default_root() if root is None else os.path.abspath(os.path.expanduser(root))
    name = f"pretrained_v{PRETRAINED_VERSION}_r18_seed{int(seed)}_{int(crop_size)}px"
    if s != _settings():
        name += "_" + hashlib.sha256(json.dumps(s, sort_keys=True).encode()).hexdigest()[:8]
    return os.path.join(root, name)


def verify_pretrained(folder: str, seed: Optional[int] = None, crop_size: Optional[int] = None,
                      settings: Optional[Dict[str, Any]] = None) -> List[str]:
    """Check a pretrained folder against its ``manifest.json``: the version, (where given) seed,
    crop size in px and the full settings dict, and that ``model_final.pth`` exists with the
    recorded size and sha256. Returns the problems; empty if the folder is intact."""
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
    problems = [f"manifest {k}={manifest.get(k)!r}, expected {v!r}"
                for k, v in expected.items() if v is not None and manifest.get(k) != v]
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


def locate_pretrained(root: Optional[str] = None, seed: int = DEFAULT_PRETRAIN_SEED,
                      crop_size: int = DEFAULT_CROP_SIZE, **settings: Any) -> Tuple[str, List[str]]:
    """``(path of model_final.pth, problems)`` for these arguments (as :func:`ensure_pretrained`'s),
    checked by :func:`verify_pretrained` and never built; problems empty = ready to load."""
    _check_seed(seed, crop_size)
    s = _settings(**settings)
    folder = pretrained_dir(root, seed, crop_size, **s)
    return os.path.join(folder, _MODEL_FILE), verify_pretrained(folder, int(seed), int(crop_size), s)


def ensure_pretrained(root: Optional[str] = None, seed: int = DEFAULT_PRETRAIN_SEED,
                      crop_size: int = DEFAULT_CROP_SIZE, *, num_threads: int = 1, **settings: Any) -> str:
    """Return the path of the cached pretrained weights, building or repairing them first.

    Args:
        root: cache root; default ``agvm.data.shapes.default_root()`` (``$AGVM_DATASETS`` or
            ``~/.cache/agvm/datasets``, read at call time); the weights live in
            :func:`pretrained_dir`, the pretraining shapes set in ``<root>`` too.
        seed: pretraining seed (data and training); default 1; 0 is refused (detection seed).
        crop_size: classification crop side in px; default 64.
        num_threads: torch threads if training is needed; default 1 (not part of the identity).
        **settings: overrides of :data:`DEFAULT_SETTINGS` (see :func:`pretrain_resnet`).

    The folder is verified against its ``manifest.json`` on every call (~0.1 s); when missing or
    failing (a warning says why), :func:`pretrain_resnet` (re)builds it (~2 min, one core) into a
    temporary folder renamed into place, under a lock: concurrent processes build it once.

    Returns:
        Absolute path of ``model_final.pth``, loadable with ``DetectionCheckpointer(model).load``.
    """
    _check_seed(seed, crop_size)
    s = _settings(**settings)
    folder = pretrained_dir(root, seed, crop_size, **s)
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
            "name": "agvm-pretrained", "version": PRETRAINED_VERSION,
            "arch": "detectron2 ResNet-18 (BN, RES2_OUT_CHANNELS 64), keys backbone.bottom_up.*",
            "seed": int(seed), "crop_size": int(crop_size), "settings": s,
            "shapes_version": _shapes.SHAPES_VERSION, "detection_seed": _shapes.DEFAULT_SEED, **stats,
            "wall_seconds": round(time.perf_counter() - t0, 2), "torch": torch.__version__,
            "files": {_MODEL_FILE: {"size": os.path.getsize(os.path.join(tmp, _MODEL_FILE)),
                                    "sha256": _sha256_file(os.path.join(tmp, _MODEL_FILE))}},
        }
        with open(os.path.join(tmp, "manifest.json"), "wb") as f:
            f.write(json.dumps(manifest, indent=1).encode("utf-8"))
        built.update(manifest)

    _shapes.build_cached(folder, lambda: verify_pretrained(folder, **expected), build, "pretrained weights")
    weights = os.path.join(folder, _MODEL_FILE)
    if built:
        logger.info("pretrained weights: %s (held-out accuracy %.3f, %.1f s)",
                    weights, built["heldout_accuracy"], built["wall_seconds"])
    return weights


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m agvm.data.pretrained [NAME] [--root DIR]``: build (or verify) a named asset
    of :data:`PRETRAINED`, with a progress line per epoch on stderr; print its path."""
    p = argparse.ArgumentParser(prog=BUILD_COMMAND, description="Build (or verify) the mini pretrained backbone "
                                "behind agvm-pretrained://NAME and print the path of its weights.")
    p.add_argument("name", nargs="?", default="shapes_r18", help=f"one of {', '.join(sorted(PRETRAINED))}; "
                   "default shapes_r18")
    p.add_argument("--root", default=None, help="cache root; default $AGVM_DATASETS or ~/.cache/agvm/datasets")
    args = p.parse_args(argv)
    if args.name not in PRETRAINED:
        p.error(f"unknown pretrained asset {args.name!r}; known: {', '.join(sorted(PRETRAINED))}")
    log = logging.getLogger(__package__)  # agvm.data: this module's and the shapes set's progress
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    previous = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        path = ensure_pretrained(root=args.root, **PRETRAINED[args.name])
    finally:
        log.removeHandler(handler)
        log.setLevel(previous)
    print(path, flush=True)
    return 0


if __name__ == "__main__":
    from agvm.data.pretrained import main as _main  # the importable module, not a second copy

    raise SystemExit(_main())
