"""The cached, locally pretrained mini ResNet-18 (agvm.data.pretrained), its agvm-pretrained:// URLs
(agvm.detectron2.catalog) and its build before training (agvm.detectron2.cli), on tiny settings."""

import hashlib
import json
import logging
import os

import pytest
import torch

torch.set_num_threads(1)

from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.utils.file_io import PathManager  # noqa: E402

import agvm.detectron2  # noqa: E402,F401  (registers agvm-pretrained://)
from agvm.detectron2 import add_agvm_config  # noqa: E402
from agvm.data import pretrained as P  # noqa: E402
from agvm.detectron2 import catalog as C  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# every mini model holds the ResNet at backbone.bottom_up; Faster R-CNN first
MINI_CONFIGS = [
    "faster_rcnn/configs/mini/faster_rcnn_R18_FPN_shapes.yaml",
    "mask_rcnn/configs/mini/mask_rcnn_R18_FPN_shapes.yaml",
    "retinanet/configs/mini/retinanet_R18_FPN_shapes.yaml",
    "semantic_fpn/configs/mini/semantic_fpn_R18_shapes.yaml",
    "panoptic_fpn/configs/mini/panoptic_fpn_R18_FPN_shapes.yaml",
]
# ~20 crops of 32 px, 2 iterations: seconds, not minutes
TINY = dict(crop_size=32, num_train_images=6, num_val_images=3, epochs=1, batch_size=8)


def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _manifest(path):
    with open(os.path.join(os.path.dirname(path), "manifest.json")) as f:
        return json.load(f)


@pytest.fixture
def count_builds(monkeypatch):
    calls = []
    real = P.pretrain_resnet

    def counted(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(P, "pretrain_resnet", counted)
    return calls


def test_build_writes_verified_weights_and_reuses_them(tmp_path, count_builds):
    threads = torch.get_num_threads()
    path = P.ensure_pretrained(root=str(tmp_path), **TINY)
    assert torch.get_num_threads() == threads
    assert len(count_builds) == 1
    folder = os.path.dirname(path)
    assert folder == P.pretrained_dir(str(tmp_path), **TINY)
    assert os.path.basename(folder).startswith(f"pretrained_v{P.PRETRAINED_VERSION}_r18_seed1_32px_")
    assert os.path.basename(path) == "model_final.pth"

    m = _manifest(path)
    assert m["files"]["model_final.pth"] == {"size": os.path.getsize(path), "sha256": _sha256(path)}
    assert (m["version"], m["seed"], m["crop_size"]) == (P.PRETRAINED_VERSION, 1, 32)
    assert m["settings"]["num_train_images"] == 6 and m["settings"]["epochs"] == 1
    assert 0.0 <= m["heldout_accuracy"] <= 1.0 and m["num_val_crops"] > 0
    assert m["wall_seconds"] > 0
    assert P.verify_pretrained(folder, seed=1, crop_size=32) == []

    ckpt = torch.load(path, map_location="cpu")
    assert ckpt["__author__"] == "agvm"
    keys = set(ckpt["model"])
    assert keys and all(k.startswith("backbone.bottom_up.") for k in keys)  # no classifier
    assert "backbone.bottom_up.stem.conv1.norm.running_mean" in keys
    assert "backbone.bottom_up.res5.1.conv2.norm.running_var" in keys
    # BN statistics were actually trained (not the init values)
    assert not torch.equal(ckpt["model"]["backbone.bottom_up.stem.conv1.norm.running_mean"], torch.zeros(64))

    # second call: verified and reused, not rebuilt
    mtime = os.stat(path).st_mtime_ns
    assert P.ensure_pretrained(root=str(tmp_path), **TINY) == path
    assert len(count_builds) == 1
    assert os.stat(path).st_mtime_ns == mtime
    # other settings -> another folder, never the cached one
    assert P.pretrained_dir(str(tmp_path), **dict(TINY, epochs=2)) != folder


@pytest.mark.parametrize("damage", ["flip", "delete", "manifest"])
def test_corruption_is_rebuilt(tmp_path, count_builds, caplog, damage):
    path = P.ensure_pretrained(root=str(tmp_path), **TINY)
    sha = _sha256(path)
    folder = os.path.dirname(path)
    if damage == "flip":
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) // 2)
            b = f.read(4)
            f.seek(-4, 1)
            f.write(bytes(x ^ 0xFF for x in b))
        assert _sha256(path) != sha
    elif damage == "delete":
        os.remove(path)
    else:
        with open(os.path.join(folder, "manifest.json"), "w") as f:
            f.write("{not json")
    assert P.verify_pretrained(folder) != []

    with caplog.at_level(logging.WARNING, logger=P.__name__):
        assert P.ensure_pretrained(root=str(tmp_path), **TINY) == path
    assert len(count_builds) == 2
    assert any("failed verification" in r.getMessage() for r in caplog.records)
    assert P.verify_pretrained(folder) == []
    assert _manifest(path)["files"]["model_final.pth"]["sha256"] == _sha256(path)
    assert _sha256(path) == sha  # deterministic: the rebuild is bit-identical
    assert not [e for e in os.listdir(tmp_path) if ".tmp-" in e or ".old-" in e]


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("pretrained_root"))


def _mini_cfg(rel):
    cfg = get_cfg()
    add_agvm_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, "projects", rel))
    cfg.MODEL.DEVICE = "cpu"
    return cfg


@pytest.mark.parametrize("config", MINI_CONFIGS, ids=lambda c: c.split("/")[0])
def test_url_loads_backbone_under_fresh_heads(tiny_root, monkeypatch, config):
    monkeypatch.setenv("AGVM_DATASETS", tiny_root)
    monkeypatch.setitem(P.PRETRAINED, "tiny_r18", dict(TINY))
    url = C.URL_PREFIX + "tiny_r18"
    path = P.ensure_pretrained(root=tiny_root, **TINY)  # built (once for the module), then resolved
    assert PathManager.get_local_path(url) == path
    assert os.path.dirname(path).startswith(tiny_root)
    ckpt = torch.load(path, map_location="cpu")["model"]

    cfg = _mini_cfg(config)
    assert cfg.MODEL.RESNETS.DEPTH == 18 and cfg.MODEL.WEIGHTS == ""
    torch.manual_seed(0)
    plain = build_model(cfg)
    torch.manual_seed(0)
    model = build_model(cfg)
    DetectionCheckpointer(model).load(url)

    loaded, fresh = model.state_dict(), plain.state_dict()
    bottom_up = {k for k in loaded if k.startswith("backbone.bottom_up.")}
    assert bottom_up == set(ckpt)  # same layout: every ResNet tensor, nothing else
    assert any(k.endswith("running_var") for k in bottom_up)
    for k in bottom_up:
        assert torch.equal(loaded[k], ckpt[k]), k
    assert sum(not torch.equal(fresh[k], ckpt[k]) for k in bottom_up) > len(bottom_up) // 2
    others = [k for k in loaded if k not in bottom_up]
    assert any(k.startswith("backbone.fpn_") for k in others)
    assert any(not k.startswith("backbone.") for k in others)  # heads exist
    for k in others:  # FPN, RPN, RoI / dense / semantic heads: as freshly initialised
        assert torch.equal(loaded[k], fresh[k]), k
    for name, p in model.named_parameters():
        assert p.requires_grad, name


def test_url_handler_errors_and_idempotent_registration():
    with pytest.raises(ValueError, match="no_such_model") as e:
        PathManager.get_local_path(C.URL_PREFIX + "no_such_model")
    assert "shapes_r18" in str(e.value)
    assert C.register_url_handler() is False  # already registered on import: no error
    assert C.register_url_handler() is False
    with pytest.raises(ValueError, match="detection"):
        P.ensure_pretrained(seed=0)


def test_missing_asset_raises_naming_the_command_and_builds_nothing(tmp_path, monkeypatch, count_builds):
    """Resolving a URL never builds: a missing asset is an error that names the build command."""
    monkeypatch.setenv("AGVM_DATASETS", str(tmp_path))  # an empty cache (the cache root is read at resolve time)
    monkeypatch.setitem(P.PRETRAINED, "tiny_r18", dict(TINY))
    for name, command in (("shapes_r18", "`python -m agvm.data.pretrained`"),
                          ("tiny_r18", "`python -m agvm.data.pretrained tiny_r18`")):
        url = C.URL_PREFIX + name
        with pytest.raises(C.PretrainedNotFoundError, match="is not built") as e:
            PathManager.get_local_path(url)
        assert isinstance(e.value, FileNotFoundError) and command in str(e.value) and url in str(e.value)
        assert str(tmp_path) in str(e.value)  # where it was looked for
        assert PathManager.exists(url) is False and PathManager.isfile(url) is False
    with pytest.raises(C.PretrainedNotFoundError):
        DetectionCheckpointer(torch.nn.Linear(1, 1)).load(C.URL_PREFIX + "shapes_r18")
    assert count_builds == [] and os.listdir(tmp_path) == []  # nothing built, not even the shapes set


def test_damaged_asset_raises_fails_verification(tiny_root, tmp_path, monkeypatch):
    """A damaged file is reported (not silently rebuilt) when resolved."""
    monkeypatch.setenv("AGVM_DATASETS", str(tmp_path))
    monkeypatch.setitem(P.PRETRAINED, "tiny_r18", dict(TINY))
    src = os.path.dirname(P.ensure_pretrained(root=tiny_root, **TINY))
    folder = os.path.join(tmp_path, os.path.basename(src))
    os.makedirs(folder)
    for name in ("manifest.json", "model_final.pth"):
        with open(os.path.join(src, name), "rb") as f:
            data = f.read()
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data[:-1] + bytes([data[-1] ^ 0xFF]) if name == "model_final.pth" else data)
    with pytest.raises(C.PretrainedNotFoundError, match="fails verification.*wrong sha256"):
        PathManager.get_local_path(C.URL_PREFIX + "tiny_r18")


def test_training_setup_builds_a_missing_asset_visibly_once(tiny_root, tmp_path, monkeypatch, count_builds):
    """setup_cfg's preparation step (prepare_pretrained) builds a missing asset of MODEL.WEIGHTS,
    saying so, and reuses it afterwards; other weights are left alone."""
    from agvm.detectron2.cli import prepare_pretrained

    monkeypatch.setenv("AGVM_DATASETS", str(tmp_path))
    monkeypatch.setitem(P.PRETRAINED, "tiny_r18", dict(TINY))
    cfg = get_cfg()
    cfg.MODEL.WEIGHTS = C.URL_PREFIX + "tiny_r18"
    records = []
    handler = logging.Handler()
    handler.emit = records.append  # on the "agvm" logger itself: detectron2's setup_logger stops its propagation
    log = logging.getLogger("agvm")
    level = log.level
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    try:
        path = prepare_pretrained(cfg)
        assert len(count_builds) == 1 and path == PathManager.get_local_path(cfg.MODEL.WEIGHTS)
        assert os.path.dirname(path).startswith(str(tmp_path))
        messages = [r.getMessage() for r in records]
        assert any(m.startswith("building the mini pretrained backbone agvm-pretrained://tiny_r18") and "once" in m
                   for m in messages), messages
        assert any(m.startswith("pretrain: epoch 1/1,") and "held-out acc" in m for m in messages)  # progress
        records.clear()
        assert prepare_pretrained(cfg) == path and len(count_builds) == 1  # built once
        assert not [r for r in records if "building" in r.getMessage()]
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    cfg.MODEL.WEIGHTS = ""
    assert prepare_pretrained(cfg) is None


def test_build_command_prints_the_path(tiny_root, monkeypatch, capsys, count_builds):
    """`python -m agvm.data.pretrained [NAME] [--root DIR]` builds (here: verifies) and prints the path."""
    monkeypatch.setitem(P.PRETRAINED, "tiny_r18", dict(TINY))
    path = P.ensure_pretrained(root=tiny_root, **TINY)
    builds = len(count_builds)
    assert P.main(["tiny_r18", "--root", tiny_root]) == 0
    assert capsys.readouterr().out.strip() == path and len(count_builds) == builds
    with pytest.raises(SystemExit) as e:
        P.main(["no_such_model"])
    assert e.value.code == 2
