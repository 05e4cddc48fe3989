"""The full-scale LazyConfig files of projects/vitdet: ViTDet-B and LSJ R50-FPN Mask R-CNN at
batch 256 and 1024, AGVM beside its μ = 1 twin. Each loads, passes the trainer's checks at 8
processes, builds its model and optimizer on CPU (no training) and means what its name says;
a detectron2/timm lacking a piece is named in the error."""

import glob
import json
import math
import os
import sys

import pytest
import torch

import agvm  # noqa: F401
from agvm.core.optim import AGVM, MODULE_KEY
from agvm.detectron2.lazy_train import load_lazy_config, validate_lazy_config, warmup_iters
from detectron2.config import instantiate

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(ROOT, "projects", "vitdet", "configs")
sys.path.insert(0, os.path.join(ROOT, "projects", "vitdet"))

from vitdet import HAS_D2_VIT, vit_lr_decay_rate  # noqa: E402
from vitdet.large_batch import large_batch_schedule, require  # noqa: E402

#: name → (reference lr at batch 64, images per GPU per micro-batch, optimizer)
MODELS = {"vitdet_b": (1e-4, 4, torch.optim.AdamW), "lsj_r50": (0.1, 8, torch.optim.SGD)}
FULL = sorted(f"{m}_mask_rcnn_b{b}_{kind}" for m in MODELS for b in (256, 1024) for kind in ("agvm", "mu1"))
MODULES = ["backbone", "neck", "rpn", "box_head", "mask_head"]


def test_every_full_scale_config_is_listed():
    names = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(CONFIGS, "*.py"))}
    assert names - {"mini_mask_rcnn_vit_shapes"} == set(FULL)


def test_schedule_arithmetic():
    s = large_batch_schedule(256, 64, 1e-4, 184375, [163889, 177546], gpus=8, per_gpu=4)
    assert s == dict(lr=pytest.approx(2e-4), max_iter=46094, milestones=[40972, 44386], warmup_iters=920,
                     agvm_start=1020, clip_range=(820, 1020), interval=10, grad_accum_steps=8)
    s = large_batch_schedule(1024, 64, 0.1, 184375, [163889, 177546], gpus=8, per_gpu=8)
    assert (s["lr"], s["max_iter"], s["warmup_iters"], s["clip_range"], s["grad_accum_steps"]) == (
        pytest.approx(0.4), 11524, 230, (130, 330), 16)
    with pytest.raises(ValueError, match="not a multiple of 8 GPUs × 3 images"):
        large_batch_schedule(256, 64, 0.1, 1000, [], gpus=8, per_gpu=3)


@pytest.mark.parametrize("name", FULL)
def test_full_scale_config_loads_and_builds_on_cpu(name):
    model_name, batch, kind = name.split("_mask_rcnn_b")[0], int(name.split("_b")[-1].split("_")[0]), name.rsplit("_", 1)[1]
    reference_lr, per_gpu, optimizer_class = MODELS[model_name]
    cfg = load_lazy_config(os.path.join(CONFIGS, name + ".py"))
    view = validate_lazy_config(cfg, world_size=8)
    # what the name says: batch, square-root LR, 100 epochs, warm-up, AGVM window, clipping, accumulation
    assert cfg.dataloader.train.total_batch_size == batch
    assert cfg.optimizer.lr == pytest.approx(reference_lr * math.sqrt(batch / 64), rel=1e-12)
    assert cfg.train.max_iter == math.ceil(184375 * 64 / batch)
    warmup = {256: 920, 1024: 230}[batch]
    assert warmup_iters(cfg) == warmup == cfg.optimizer.warmup_iters
    assert view.SOLVER.AGVM.START_ITER == warmup + 100 and view.SOLVER.AGVM.INTERVAL == 10
    assert view.SOLVER.AGVM.MOMENTUM == 0.97 and view.SOLVER.AGVM.ENABLED
    assert view.SOLVER.AGVM.MEASURE_ONLY == (kind == "mu1")
    assert view.SOLVER.CLIP_GRADIENTS.ENABLED and view.SOLVER.CLIP_GRADIENTS.CLIP_TYPE == "full_model"
    assert tuple(view.SOLVER.CLIP_GRADIENTS.ITER_RANGE) == (warmup - 100, warmup + 100)
    assert 8 * per_gpu * cfg.train.grad_accum_steps == batch
    assert cfg.train.output_dir.endswith(name)
    schedule = instantiate(cfg.lr_multiplier)  # exponential warm-up from 0.001, then the recipe's steps
    assert schedule(0.0) == pytest.approx(0.001)
    assert schedule(warmup / 2 / cfg.train.max_iter) == pytest.approx(0.001 ** 0.5, rel=1e-6)
    assert schedule((warmup + 1) / cfg.train.max_iter) == 1.0
    assert schedule((cfg.train.max_iter - 1) / cfg.train.max_iter) == pytest.approx(0.01)
    # the model and its optimizer, on CPU
    cfg.train.device = "cpu"
    model = instantiate(cfg.model)
    cfg.optimizer.params.model = model
    opt = instantiate(cfg.optimizer)
    assert isinstance(opt, AGVM) and isinstance(opt.optimizer, optimizer_class)
    assert opt.modulator.modules == MODULES
    assert opt.modulator.measure_only == (kind == "mu1")
    if model_name == "vitdet_b":
        names = {p: n for n, p in model.named_parameters()}
        for g in opt.param_groups:
            factors = {vit_lr_decay_rate(names[p], 0.7, 12) for p in g["params"]}
            assert len(factors) == 1 and g["lr"] == pytest.approx(cfg.optimizer.lr * factors.pop(), rel=1e-12)
        backbone = [g for g in opt.param_groups if g[MODULE_KEY] == "backbone"]
        assert len({g["lr"] for g in backbone}) == 14  # embeddings, 12 blocks, the final norm (factor 1)
        n_params = sum(p.numel() for p in model.parameters())
        assert 100e6 < n_params < 130e6, n_params  # ViT-B/16 (86 M) + pyramid + Mask R-CNN heads
        assert model.backbone.net.output_shape()["last_feat"].stride == 16
    else:
        assert model.backbone.bottom_up.stem.conv1.norm.__class__.__name__ in ("SyncBatchNorm", "NaiveSyncBatchNorm")


def test_missing_lsj_transforms_are_named(monkeypatch):
    import detectron2.data.transforms as T

    monkeypatch.delattr(T, "FixedSizeCrop")
    with pytest.raises(ImportError, match=r"LSJ R50-FPN Mask R-CNN .* needs detectron2 ≥ 0\.6 .*FixedSizeCrop"):
        load_lazy_config(os.path.join(CONFIGS, "lsj_r50_mask_rcnn_b256_agvm.py"))


@pytest.mark.skipif(HAS_D2_VIT, reason="detectron2 has its own ViT: timm is not needed")
def test_a_timm_without_dynamic_img_size_is_named(monkeypatch):
    import timm.models.vision_transformer as vt

    class OldViT:  # timm < 0.9: no dynamic_img_size
        def __init__(self, img_size=224, patch_size=16):
            pass

    monkeypatch.setattr(vt, "VisionTransformer", OldViT)
    with pytest.raises(ImportError, match=r"needs a ViT: detectron2 with detectron2\.modeling\.backbone\.vit .* "
                                          r"or timm ≥ 0\.9 \(VisionTransformer\(dynamic_img_size=\.\.\.\)\)"):
        require("ViTDet-B", vit=True)


def test_clip_gradients_node_is_checked_with_its_lazy_name():
    cfg = load_lazy_config(os.path.join(CONFIGS, "lsj_r50_mask_rcnn_b256_agvm.py"))
    cfg.train.clip_gradients.iter_range = [300, 100]
    with pytest.raises(ValueError, match=r"train\.clip_gradients\.iter_range=\(300, 100\) must be"):
        validate_lazy_config(cfg, world_size=8)
    cfg.train.clip_gradients = dict(enabled=True, clip_valu=1.0)
    with pytest.raises(ValueError, match=r"train\.clip_gradients\.clip_valu: unknown key"):
        validate_lazy_config(cfg, world_size=8)


# ------------------------------------------------------------------------------ the mini Φ experiment

def _phi_experiment():
    import importlib.util

    spec = importlib.util.spec_from_file_location("vitdet_phi_experiment", os.path.join(ROOT, "projects", "vitdet", "phi_experiment.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_phi_experiment_dry_run_checks_and_prints_the_lazy_commands(tmp_path, capsys):
    exp = _phi_experiment()
    rc = exp.main(["--dry-run", "--iters", "4", "--warmup", "1", "--output-root", str(tmp_path / "out"),
                   "--results", str(tmp_path / "results")])
    assert rc == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "train_net.py" in line]
    assert len(lines) == 2
    for batch, line in zip((8, 32), lines):
        assert f"train.output_dir={tmp_path / 'out'}/b{batch}" in line and "OUTPUT_DIR" not in line
        assert f"dataloader.train.total_batch_size={batch}" in line and "optimizer.agvm.measure_only=True" in line
    assert not (tmp_path / "results").exists()


def test_phi_experiment_report_from_records(tmp_path):
    exp = _phi_experiment()
    for batch, scale in ((8, 1.0), (32, 0.5)):
        folder = tmp_path / "runs" / f"b{batch}"
        folder.mkdir(parents=True)
        info = dict(returncode=0, batch=batch, iters=4, warmup=2, threads=1, wall_s=60.0, machine="test",
                    command=f"python projects/vitdet/train_net.py b{batch}")
        (folder / "agvm_run.json").write_text(json.dumps(info))
        rows = [{"iteration": i, **{f"agvm/phi/{m}": scale * (k + 1) * (0.9 if i < 2 else 0.1)
                                    for k, m in enumerate(MODULES)}} for i in range(4)]
        (folder / "metrics.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    path = exp.write_report(str(tmp_path))
    text = open(path).read()
    # the estimates after the warm-up: Φ = 0.1·(k+1)·scale; ratio to the backbone k+1
    assert "| backbone | 0.1000 | 0.0500 | 1.00 | 1.00 |" in text
    assert "| mask_head | 0.5000 | 0.2500 | 5.00 | 5.00 |" in text
    assert "--batches 8 32 --iters 4 --warmup 2 --threads 1" in text
    assert (tmp_path / "phi.png").stat().st_size > 0


def test_progress_line_reads_a_lazy_run(tmp_path):
    """A LazyConfig run's config.yaml holds python tags (partial, ...): the progress line says
    the iteration without the total instead of failing."""
    from agvm.runner import progress_line

    (tmp_path / "metrics.json").write_text(json.dumps({"iteration": 4, "total_loss": 1.5}) + "\n")
    (tmp_path / "config.yaml").write_text("optimizer:\n  f: !!python/object/apply:functools.partial\n  - 1\n")
    assert progress_line(str(tmp_path), 10.0) == "iter 5, loss 1.500"
