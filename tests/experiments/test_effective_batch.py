"""The effective-batch experiment (projects/effective_batch): EffectiveBatchRetinaNet's variants,
configs, train_net.py, the plan and report (its package's ``experiment`` module) and the script
that runs them all (projects/effective_batch/run_experiment.py)."""

import importlib
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from agvm.detectron2 import add_agvm_config, default_argument_parser, module_of_parameters

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROJECT = os.path.join(ROOT, "projects", "effective_batch")
CONFIGS = os.path.join(PROJECT, "configs")


def _import_project():
    """The project's package ``effective_batch`` as its train_net.py imports it (the project
    folder on sys.path), and its train_net.py as a module."""
    if PROJECT not in sys.path:
        sys.path.insert(0, PROJECT)
    loaded = sys.modules.get("effective_batch")
    if loaded is not None and not (getattr(loaded, "__file__", None) or "").startswith(PROJECT + os.sep):
        del sys.modules["effective_batch"]  # another module under that name
    package = importlib.import_module("effective_batch")
    spec = importlib.util.spec_from_file_location("effective_batch_train_net", os.path.join(PROJECT, "train_net.py"))
    train_net = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_net)
    return package, train_net


_package, _train_net = _import_project()
EffectiveBatchRetinaNet = _package.EffectiveBatchRetinaNet
UnsharedRetinaNetHead = _package.UnsharedRetinaNetHead
add_effective_batch_config = _package.add_effective_batch_config
check_loss_keep = _package.check_loss_keep
location_keep_mask = _package.location_keep_mask
main = _train_net.main

VARIANTS = ("shared", "unshared", "no_fpn", "masked")
NO_WEIGHTS = ("MODEL.WEIGHTS", "")


def _cfg(variant, *opts):
    cfg = get_cfg()
    add_agvm_config(cfg)
    add_effective_batch_config(cfg)
    add_effective_batch_config(cfg)  # idempotent
    cfg.merge_from_file(os.path.join(CONFIGS, f"{variant}.yaml"))
    cfg.merge_from_list(list(NO_WEIGHTS + opts))
    return cfg


def _model(variant, *opts, seed=0):
    torch.manual_seed(seed)
    return build_model(_cfg(variant, *opts))


def _batch(n=4, seed=1):
    """n synthetic 128 px images with 1-3 boxes each (the model's input format)."""
    g = torch.Generator().manual_seed(seed)
    batch = []
    for _ in range(n):
        k = int(torch.randint(1, 4, (1,), generator=g))
        xy = torch.rand(k, 2, generator=g) * 80
        wh = 12 + torch.rand(k, 2, generator=g) * 36
        inst = Instances((128, 128), gt_boxes=Boxes(torch.cat([xy, xy + wh], 1)),
                         gt_classes=torch.randint(0, 5, (k,), generator=g))
        image = (torch.rand(3, 128, 128, generator=g) * 255).to(torch.uint8)
        batch.append({"image": image, "instances": inst, "height": 128, "width": 128})
    return batch


def _losses(model, batch, seed=0):
    torch.manual_seed(seed)
    model.train()
    with EventStorage(0) as storage:
        losses = model(batch)
        return {k: float(v) for k, v in losses.items()}, storage.latest()


# ------------------------------------------------------------------------------ configs and models
def test_configs_change_one_thing_each():
    ref = _cfg("shared")
    assert ref.MODEL.META_ARCHITECTURE == "EffectiveBatchRetinaNet"
    assert ref.SOLVER.AGVM.ENABLED and ref.SOLVER.AGVM.MEASURE_ONLY and ref.SOLVER.AGVM.INTERVAL == 2
    assert ref.SOLVER.AGVM.START_ITER == 0 and ref.SOLVER.OPTIMIZER == "SGD" and ref.SOLVER.IMS_PER_BATCH == 16
    expected = {
        "unshared": {"MODEL.EFFECTIVE_BATCH.UNSHARED_HEADS"},
        "masked": {"MODEL.EFFECTIVE_BATCH.LOSS_KEEP"},
        "no_fpn": {"MODEL.BACKBONE.NAME", "MODEL.RESNETS.OUT_FEATURES", "MODEL.RETINANET.IN_FEATURES",
                   "MODEL.ANCHOR_GENERATOR.SIZES"},
    }

    def flat(node, prefix=""):
        out = {}
        for k, v in node.items():
            out.update(flat(v, f"{prefix}{k}.") if hasattr(v, "items") else {f"{prefix}{k}": v})
        return out

    base = flat(ref)
    for variant, keys in expected.items():
        cfg = flat(_cfg(variant))
        diff = {k for k in base if base[k] != cfg[k]} - {"OUTPUT_DIR"}
        assert diff == keys, variant
    assert _cfg("masked").MODEL.EFFECTIVE_BATCH.LOSS_KEEP == 0.25


def test_unshared_heads_are_per_level_and_start_as_the_shared_head():
    shared, unshared = _model("shared"), _model("unshared")
    assert isinstance(unshared.head, UnsharedRetinaNetHead) and len(unshared.head.heads) == 5
    n_shared = sum(p.numel() for p in shared.head.parameters())
    n_unshared = sum(p.numel() for p in unshared.head.parameters())
    assert n_unshared == 5 * n_shared
    ids = [{id(p) for p in h.parameters()} for h in unshared.head.heads]
    assert all(not (a & b) for i, a in enumerate(ids) for b in ids[i + 1:])  # no tensor shared between levels
    for h in unshared.head.heads:  # each level's head starts from the shared head's weights
        for (name, p), q in zip(h.named_parameters(), shared.head.parameters()):
            assert torch.equal(p, q), name
    # same initial function, and the same RNG use as the stock model
    batch = _batch()
    a, _ = _losses(shared, batch)
    b, _ = _losses(unshared, batch)
    assert a == pytest.approx(b, rel=1e-5)
    # AGVM's grouping: heads → dense_head, ResNet → backbone, FPN → neck
    groups = module_of_parameters(unshared)
    assert {m for n, m in groups.items() if n.startswith("head.heads.4.")} == {"dense_head"}
    assert {m for n, m in groups.items() if n.startswith("backbone.bottom_up.")} == {"backbone"}
    assert {m for n, m in groups.items() if n.startswith("backbone.fpn_")} == {"neck"}
    # a backward pass reaches every level's head
    unshared.train()
    with EventStorage(0):
        sum(unshared(batch).values()).backward()
    assert all(h.cls_score.weight.grad is not None and h.cls_score.weight.grad.abs().sum() > 0 for h in unshared.head.heads)


def test_no_fpn_is_a_plain_resnet_with_one_level_and_loads_fpn_resnet_weights():
    from detectron2.modeling.backbone.resnet import ResNet

    model = _model("no_fpn")
    assert type(model.backbone) is ResNet and model.head_in_features == ["res4"]
    assert model.anchor_generator.num_anchors == [45] and model.anchor_generator.strides == [16]
    assert set(module_of_parameters(model).values()) == {"backbone", "dense_head"}
    losses, _ = _losses(model, _batch())
    assert all(math.isfinite(v) for v in losses.values())
    # ResNet weights saved from an FPN model (backbone.bottom_up.*) load into backbone.*
    state = {f"backbone.bottom_up.{k}": v + 1.0 if v.is_floating_point() else v
             for k, v in model.backbone.state_dict().items()}
    state["backbone.bottom_up.res5.0.conv1.weight"] = torch.zeros(1)  # a stage this backbone lacks
    expected = {k: v.clone() for k, v in state.items()}
    result = model.load_state_dict(state, strict=False)
    assert "backbone.res5.0.conv1.weight" in result.unexpected_keys
    assert not [k for k in result.missing_keys if k.startswith("backbone.")]
    assert torch.equal(model.backbone.res2[0].conv1.weight, expected["backbone.bottom_up.res2.0.conv1.weight"])


def test_location_keep_mask_keeps_a_quarter_of_the_positions():
    positions, anchors = [16 * 16, 8 * 8, 4 * 4], [9, 9, 9]
    torch.manual_seed(0)
    mask = location_keep_mask(6, positions, anchors, 0.25)
    assert mask.shape == (6, sum(p * a for p, a in zip(positions, anchors))) and mask.dtype == torch.bool
    start = 0
    for p, a, kept in zip(positions, anchors, (64, 16, 4)):
        level = mask[:, start:start + p * a].reshape(6, p, a)
        start += p * a
        assert (level.all(dim=2) == level.any(dim=2)).all()  # whole locations: all anchors or none
        assert level[:, :, 0].sum(dim=1).tolist() == [kept] * 6  # exactly round(0.25 · H·W) per image
    assert mask.float().mean().item() == pytest.approx(0.25, abs=0.005)
    assert not torch.equal(mask[0], mask[1])  # drawn per image
    torch.manual_seed(0)
    assert torch.equal(location_keep_mask(6, positions, anchors, 0.25), mask)  # torch's generator
    assert location_keep_mask(2, [1, 4], [3, 3], 0.25).sum(dim=1).tolist() == [6, 6]  # at least one per level


def test_masked_losses_differ_and_the_normaliser_counts_kept_foreground():
    full, masked = _model("shared"), _model("masked")
    masked.load_state_dict(full.state_dict())
    batch = _batch()
    a, sa = _losses(full, batch)
    b, sb = _losses(masked, batch)
    assert all(math.isfinite(v) for v in b.values())
    assert a["loss_cls"] != pytest.approx(b["loss_cls"], rel=1e-3)
    assert a["loss_box_reg"] != pytest.approx(b["loss_box_reg"], rel=1e-3)
    # 128 px, P3-P7: 256+64+16+4+1 positions, 64+16+4+1+1 kept (at least one per level)
    assert sb["effective_batch/kept_anchors"][0] == pytest.approx(86 / 341, abs=1e-6)
    assert "effective_batch/kept_anchors" not in sa
    assert 0 < sb["num_pos_anchors"][0] < sa["num_pos_anchors"][0]
    # LOSS_KEEP 1.0 draws nothing from torch's generator (the stock model); 0.25 draws the masks
    torch.manual_seed(3)
    untouched = torch.rand(1)
    _losses(full, batch, seed=3)
    assert torch.equal(torch.rand(1), untouched)
    _losses(masked, batch, seed=3)
    assert not torch.equal(torch.rand(1), untouched)


@pytest.mark.parametrize("bad", [0.0, 1.5, -0.25, float("nan")])
def test_invalid_loss_keep_is_rejected_naming_the_key(bad):
    with pytest.raises(ValueError, match=r"MODEL\.EFFECTIVE_BATCH\.LOSS_KEEP=" + repr(bad).replace(".", r"\.") + r" .*\(0, 1\]"):
        _model("shared", "MODEL.EFFECTIVE_BATCH.LOSS_KEEP", bad)
    for value in (bad, 0, True, "0.5"):
        with pytest.raises(ValueError, match=r"LOSS_KEEP=" + repr(value).replace(".", r"\.")):
            check_loss_keep(value)
    assert check_loss_keep(1) == 1.0 and check_loss_keep(0.25) == 0.25


def test_stock_model_without_the_keys():
    cfg = get_cfg()
    add_agvm_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, "projects", "retinanet", "configs", "mini", "retinanet_R18_FPN_shapes.yaml"))
    cfg.MODEL.META_ARCHITECTURE = "EffectiveBatchRetinaNet"
    model = build_model(cfg)
    assert isinstance(model, EffectiveBatchRetinaNet) and model.loss_keep == 1.0
    assert not isinstance(model.head, UnsharedRetinaNetHead)


def test_the_library_knows_nothing_of_the_project():
    """agvm adds no MODEL.* key and registers no model: importing the project's package does."""
    cfg = get_cfg()
    model_keys = set(cfg.MODEL.keys())
    add_agvm_config(cfg)
    assert set(cfg.MODEL.keys()) == model_keys and "EFFECTIVE_BATCH" not in cfg.MODEL
    code = ("import agvm.detectron2; from detectron2.modeling import META_ARCH_REGISTRY; "
            "assert 'EffectiveBatchRetinaNet' not in META_ARCH_REGISTRY; "
            "import effective_batch; assert 'EffectiveBatchRetinaNet' in META_ARCH_REGISTRY; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=PROJECT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_train_net_runs_as_a_script():
    """`python projects/effective_batch/train_net.py` finds its package with no sys.path edit."""
    out = subprocess.run([sys.executable, os.path.join(PROJECT, "train_net.py"), "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--config-file" in out.stdout


# ------------------------------------------------------------------------------ training
@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_trains_and_logs_phi(variant, tiny_shapes):
    out = tiny_shapes / variant
    args = default_argument_parser().parse_args([
        "--config-file", os.path.join(CONFIGS, f"{variant}.yaml"),
        "OUTPUT_DIR", str(out), "MODEL.WEIGHTS", "", "SOLVER.MAX_ITER", "4", "SOLVER.IMS_PER_BATCH", "4",
        "SOLVER.WARMUP_ITERS", "1", "DATALOADER.NUM_WORKERS", "0",
    ])
    main(args)
    with open(out / "metrics.json") as f:
        records = [json.loads(line) for line in f if line.strip()]
    phi = [r for r in records if "agvm/phi/backbone" in r]
    assert [r["iteration"] for r in phi] == [0, 2]
    for r in phi:
        for module in ("backbone", "dense_head"):
            assert math.isfinite(r[f"agvm/phi/{module}"]) and 0.0 < r[f"agvm/phi/{module}"] <= 2.0
            assert r[f"agvm/mu/{module}"] == 1.0  # MEASURE_ONLY
        assert ("agvm/phi/neck" in r) == (variant != "no_fpn")
    losses = [r["total_loss"] for r in records if "total_loss" in r]
    assert losses and all(math.isfinite(v) for v in losses)
    kept = [r["effective_batch/kept_anchors"] for r in records if "effective_batch/kept_anchors" in r]
    assert (kept == [pytest.approx(86 / 341)]) if variant == "masked" else not kept


# ------------------------------------------------------------------------------ the script
def _experiment():
    """The plan and report: the project's ``effective_batch.experiment``."""
    _import_project()
    return importlib.import_module("effective_batch.experiment")


def _script():
    """``projects/effective_batch/run_experiment.py`` as a module (its package importable: _import_project)."""
    _import_project()
    spec = importlib.util.spec_from_file_location("effective_batch_run_experiment", os.path.join(PROJECT, "run_experiment.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_run_experiment_runs_as_a_script():
    """`python projects/effective_batch/run_experiment.py` finds its package with no sys.path edit;
    --check-only checks the four configs and runs nothing."""
    out = subprocess.run([sys.executable, os.path.join(PROJECT, "run_experiment.py"), "--check-only"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout == "", out.stderr[-2000:]
    bad = subprocess.run([sys.executable, os.path.join(PROJECT, "run_experiment.py"), "--check-only", "--",
                          "MODEL.EFFECTIVE_BATCH.LOSS_KEEP", "0"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "LOSS_KEEP" in bad.stderr, bad.stderr[-2000:]


def test_script_dry_run_lists_a_run_per_seed_and_variant(capsys, tmp_path):
    script = _script()
    assert script.main(["--dry-run", "--python", "python", "--max-iter", "7", "--results", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 12  # seed-major: a seed's four variants finish together
    regime = ("SOLVER.MAX_ITER 100 SOLVER.GRAD_ACCUM_STEPS 2 SOLVER.AGVM.INTERVAL 1 INPUT.MIN_SIZE_TRAIN '(64,)' "
              "INPUT.MAX_SIZE_TRAIN 64 INPUT.MIN_SIZE_TEST 64 INPUT.MAX_SIZE_TEST 64 DATALOADER.NUM_WORKERS 0")
    for line, (seed, v) in zip(lines, [(s, v) for s in (0, 1, 2) for v in VARIANTS]):
        assert line == (f"AGVM_SHAPES_NUM_TRAIN=1600 python projects/effective_batch/train_net.py --config-file "
                        f"projects/effective_batch/configs/{v}.yaml --num-gpus 1 "
                        f"OUTPUT_DIR output/effective_batch/{v}_s{seed} {regime} SEED {seed} SOLVER.MAX_ITER 7")
    assert script.main(["--dry-run", "--python", "python", "--seeds", "4", "--results", str(tmp_path), "masked"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[0].endswith("OUTPUT_DIR output/effective_batch/masked_s4 "
                                                                    f"{regime} SEED 4")
    with pytest.raises(SystemExit) as e:
        script.main(["--dry-run", "nope"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        script.main(["--dry-run", "--seeds", "1", "1"])
    assert e.value.code == 2
    assert script.main(["--dry-run", "--results", str(tmp_path), "--", "MODEL.EFFECTIVE_BATCH.LOSS_KEEP", "1.5"]) == 2


def test_a_later_run_extends_the_recorded_runs(capsys, tmp_path):
    """A run recorded in <results>/runs/<run> with the plan's fingerprint is not run again; one
    recorded with other settings is (the training-set size counts, though it is no config key)."""
    exp, script = _experiment(), _script()
    runs = exp.plan("output/effective_batch", records=str(tmp_path / "runs"))
    assert runs[0].name == "shared_s0" and runs[0].records == str(tmp_path / "runs" / "shared_s0")
    assert runs[0].env == {"AGVM_SHAPES_NUM_TRAIN": "1600"} and runs[0].info["seed"] == 0
    from agvm.runner import config_fingerprint

    assert runs[0].fingerprint != config_fingerprint(os.path.join(ROOT, runs[0].config), [*runs[0].flags, *runs[0].opts])
    for run, fingerprint in ((runs[0], runs[0].fingerprint), (runs[1], "another config")):
        os.makedirs(run.records)
        with open(os.path.join(run.records, "agvm_run.json"), "w") as f:
            json.dump({"returncode": 0, "fingerprint": fingerprint, "wall_s": 1.0}, f)
    assert script.main(["--dry-run", "--python", "python", "--results", str(tmp_path)]) == 0
    out = capsys.readouterr()
    lines = out.out.strip().splitlines()
    assert len(lines) == 11 and not any("OUTPUT_DIR output/effective_batch/shared_s0 " in x for x in lines)
    assert "skip shared_s0: finished" in out.err and "stale unshared_s0" in out.err
    assert exp.recorded_seeds(str(tmp_path / "runs")) == [0]


def _fake_run(folder, backbone, head, neck=None, wall_s=12.5, loss=1.25, returncode=0):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "metrics.json"), "w") as f:
        for i, (b, h) in enumerate(zip(backbone, head)):
            row = {"iteration": 2 * i, "agvm/phi/backbone": b, "agvm/phi/dense_head": h}
            if neck is not None:
                row["agvm/phi/neck"] = neck
            f.write(json.dumps(row) + "\n")
        f.write(json.dumps({"iteration": 2 * len(backbone) - 1, "total_loss": loss}) + "\n")
    with open(os.path.join(folder, "agvm_run.json"), "w") as f:
        json.dump({"command": f"python train {os.path.basename(folder)}", "returncode": returncode, "wall_s": wall_s,
                   "machine": "test machine", "train_images": 1600}, f)


def test_summary_of_one_run_from_fake_metrics(tmp_path):
    script = _experiment()  # the plan and report run_experiment.py runs

    _fake_run(tmp_path / "shared_s0", [0.8, 0.6, 0.4, 0.2], [0.2, 0.2, 0.1, 0.1], neck=0.5)
    _fake_run(tmp_path / "masked_s0", [0.5, 0.5, 0.5], [0.25, 0.5, 0.4], neck=0.7, wall_s=90.0)
    s = script.summarize(str(tmp_path / "shared_s0"))
    assert s["estimates"] == 4 and s["iterations"] == 8 and s["last_loss"] == 1.25 and s["outcome"] == "finished"
    assert s["phi"]["backbone"] == pytest.approx(0.5) and s["phi"]["dense_head"] == pytest.approx(0.15)
    assert s["ratio"] == pytest.approx(0.3) and s["ratio_last"] == pytest.approx(0.1 / 0.3)
    each = [0.25, 1 / 3, 0.25, 0.5]  # Φ_head / Φ_backbone at each estimate
    assert [r for _, r in s["ratios"]] == pytest.approx(each) and s["ratio_each"] == pytest.approx(sum(each) / 4)
    mean = sum(each) / 4
    assert s["ratio_each_se"] == pytest.approx(math.sqrt(sum((r - mean) ** 2 for r in each) / 3 / 4))
    m = script.summarize(str(tmp_path / "masked_s0"))  # last half of 3 estimates: the last 2
    assert m["ratio"] == pytest.approx(((0.25 + 0.5 + 0.4) / 3) / 0.5)
    assert m["ratio_last"] == pytest.approx(0.45 / 0.5)
    assert script.summarize(str(tmp_path / "absent"))["outcome"] == "missing"


def test_mean_se():
    mean_se = _experiment().mean_se
    assert mean_se([]) == (None, None) and mean_se([2.0]) == (2.0, None)
    m, se = mean_se([1.0, 2.0, 3.0, float("nan"), None])
    assert m == 2.0 and se == pytest.approx(1 / math.sqrt(3))


def test_t95():
    t95 = _experiment().t95
    assert t95(1) == 12.706 and t95(2) == 4.303 and t95(10) == 2.228
    for df, expected in ((11, 2.2010), (20, 2.0860), (30, 2.0423), (60, 2.0003), (1000, 1.9623)):
        assert t95(df) == pytest.approx(expected, abs=1e-3)
    with pytest.raises(ValueError):
        t95(0)


def _fake_grid(records):
    """Three seeds of shared, masked, unshared (its seed 2 failed); backbone Φ 1, so the ratios are the head's Φ."""
    heads = {"shared": [[0.5, 0.7], [0.6, 0.8], [0.7, 0.9]],  # run means 0.6, 0.7, 0.8
             "masked": [[0.8, 0.8], [0.9, 0.9], [0.8, 1.0]],  # 0.8, 0.9, 0.9
             "unshared": [[0.6, 0.6], [0.8, 0.8], [0.1, 0.1]]}  # 0.6, 0.8, (failed)
    for variant, per_seed in heads.items():
        for seed, head in enumerate(per_seed):
            _fake_run(records / f"{variant}_s{seed}", [1.0, 1.0], head, neck=0.5,
                      returncode=1 if (variant, seed) == ("unshared", 2) else 0)


def test_difference_from_the_shared_head_on_fake_numbers(tmp_path):
    exp = _experiment()
    _fake_grid(tmp_path)
    stats = {v: exp.variant_stats({s: exp.summarize(str(tmp_path / f"{v}_s{s}")) for s in (0, 1, 2)})
             for v in ("shared", "masked", "unshared")}
    shared, masked, unshared = stats["shared"], stats["masked"], stats["unshared"]
    assert list(shared["run_means"].values()) == pytest.approx([0.6, 0.7, 0.8])
    assert shared["seed_mean"] == pytest.approx(0.7) and shared["seed_se"] == pytest.approx(0.1 / math.sqrt(3))
    # pooled: 0.5 0.7 0.6 0.8 0.7 0.9, squared deviations sum to 0.1: s.e. = √(0.1 / 5 / 6)
    assert shared["pooled_mean"] == pytest.approx(0.7) and shared["pooled_se"] == pytest.approx(math.sqrt(0.1 / 30))
    assert shared["estimates"] == 6 and shared["phi"]["backbone"] == 1.0 and shared["phi"]["neck"] == 0.5
    assert unshared["seeds"] == [0, 1] and unshared["estimates"] == 4  # the failed seed 2 is left out
    d = exp.difference(masked, shared)
    assert list(d["per_seed"]) == [0, 1, 2] and list(d["per_seed"].values()) == pytest.approx([0.2, 0.2, 0.1])
    assert d["paired_mean"] == pytest.approx(0.5 / 3) and d["paired_se"] == pytest.approx(1 / 30)
    assert d["pooled"] == pytest.approx(5.2 / 6 - 0.7) and d["above"] == 3
    # masked pooled: squared deviations from 5.2/6 sum to 1/30, so s.e.² = 1/30/5/6; shared's 0.1/30
    assert d["pooled_se"] == pytest.approx(math.sqrt(1 / 900 + 0.1 / 30)) and d["pooled_se"] == pytest.approx(1 / 15)
    u = exp.difference(unshared, shared)  # paired on the seeds both have
    assert list(u["per_seed"].values()) == pytest.approx([0.0, 0.1]) and u["above"] == 1
    assert u["paired_mean"] == pytest.approx(0.05) and u["paired_se"] == pytest.approx(0.05)


def test_report_from_fake_records(tmp_path):
    exp = _experiment()
    records = tmp_path / "runs"
    _fake_grid(records)
    path = exp.write_report(str(records), str(tmp_path))
    text = open(path).read()
    lines = text.splitlines()
    row = next(x for x in lines if x.startswith("| masked |"))
    assert row.endswith("| 3 | 6 | 1.000 | 0.500 | 0.867 | 0.800 / 0.900 / 0.900 | 0.867 ± 0.033 | 0.867 ± 0.033 | no / no |")
    assert "| masked | +0.200 / +0.200 / +0.100 | +0.167 ± 0.033 | +0.167 ± 0.067 | 3 of 3 |" in lines
    assert "| unshared | +0.000 / +0.100 / — | +0.050 ± 0.050 | +0.000 ± 0.082 | 1 of 2 |" in lines
    assert ("- `masked` − `shared`: +0.167 ± 0.033 over 3 seeds, 95 % interval [+0.023, +0.310] (t, 2 degrees of "
            "freedom), above on 3 of 3 seeds: higher than `shared` (towards 1); pooled over the estimates "
            "+0.167 ± 0.067.") in lines
    assert ("- `unshared` − `shared`: +0.050 ± 0.050 over 2 seeds, 95 % interval [-0.585, +0.685] (t, 1 degrees of "
            "freedom), above on 1 of 2 seeds: not distinguishable from `shared` at 95 %; pooled over the "
            "estimates +0.000 ± 0.082.") in lines
    assert "- `no_fpn`: fewer than two seeds with both runs, no error estimate." in lines
    assert next(x for x in lines if x.startswith("| no_fpn |")).startswith("| no_fpn | no FPN: ResNet only, head on one level | 0 | 0 |")
    assert next(x for x in lines if x.startswith("| unshared_s2 |")).endswith("| failed |")
    assert next(x for x in lines if x.startswith("| no_fpn_s1 |")).endswith("| missing |")
    assert "Target s.e. ≤ 0.02 of each variant's mean ratio — over seeds: met by none; not by shared (0.058)" in text
    assert "python train shared_s0   # exit 0, 12.5 s" in lines and "Machine: test machine" in lines and "No run's config.yaml recorded yet." in text
    assert os.path.getsize(tmp_path / "phi.png") > 1000
    again = tmp_path / "again"
    assert open(exp.write_report(str(records), str(again))).read() == text  # the records alone decide the text


def test_report_regenerates_from_the_committed_records(tmp_path):
    """`run_experiment.py --report-only` on a copy of the committed run records
    (results/effective_batch/runs/) writes the committed results/effective_batch/README.md byte for byte."""
    import shutil

    committed = os.path.join(ROOT, "results", "effective_batch")
    assert os.path.isdir(os.path.join(committed, "runs")), "no run records under results/effective_batch/runs"
    copy = tmp_path / "effective_batch"
    shutil.copytree(os.path.join(committed, "runs"), copy / "runs")
    out = subprocess.run([sys.executable, os.path.join(PROJECT, "run_experiment.py"), "--report-only", "--results",
                          str(copy)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    with open(os.path.join(committed, "README.md")) as f:
        assert (copy / "README.md").read_text() == f.read()


def test_a_new_run_starts_from_a_clean_folder(tmp_path):
    from agvm.runner import clear_run  # what agvm.runner.execute does before a run

    names = ["metrics.json", "log.txt", "model_final.pth", "model_0000099.pth", "events.out.tfevents.1.vm.2.0",
             "last_checkpoint", "agvm_run.json", "notes.txt"]
    for name in names:
        (tmp_path / name).write_text("x")
    assert clear_run(str(tmp_path)) == sorted(names[:-1])
    assert os.listdir(tmp_path) == ["notes.txt"]
    assert clear_run(str(tmp_path / "absent")) == []
