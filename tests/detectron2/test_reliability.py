"""Nothing lost, nothing poisoned (issue 13): validate before writing, never step on non-finite
gradients, metrics that survive a kill, checkpoints that survive a crash."""

import json
import math
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from agvm.detectron2 import default_argument_parser, setup_cfg  # noqa: E402
import torch

from agvm.detectron2 import AGVMTrainer
from agvm.detectron2.checkpoint import SafeCheckpointer, nonfinite_entries
from test_train_e2e import ROOT, load_train_net, tiny_args
from test_trainer import _cfg

FINISHED = {"config.yaml": b"SOLVER:\n  AGVM:\n    MOMENTUM: 0.97\n", "log.txt": b"a finished run\n",
            "model_final.pth": b"\x00weights", "metrics.json": b'{"iteration": 0}\n', "last_checkpoint": b"model_final.pth"}


def _finished_run(folder):
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in FINISHED.items():
        (folder / name).write_bytes(data)


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# ------------------------------------------------------------------------------ validate, then write
BAD_INPUTS = [
    (["SOLVER.AGVM.MOMENTUM", "1.5"], "SOLVER.AGVM.MOMENTUM=1.5"),
    (["SOLVER.GRAD_ACCUM_STEPS", "0"], "SOLVER.GRAD_ACCUM_STEPS=0"),
    (["DATASETS.TRAIN", "('no_such_dataset',)"], "DATASETS.TRAIN names 'no_such_dataset'"),
    (["SOLVER.AGVM.START_ITER", "6"], "SOLVER.AGVM.START_ITER=6 .* SOLVER.MAX_ITER=6"),
    (["SOLVER.AGVM.EPS", "-1.0"], "SOLVER.AGVM.EPS=-1.0"),
    (["SOLVER.BASE_LR", "-0.02"], "SOLVER.BASE_LR=-0.02"),
    (["SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "global"], "SOLVER.CLIP_GRADIENTS.CLIP_TYPE='global'"),
]


@pytest.mark.parametrize("opts, message", BAD_INPUTS, ids=[o[0] for o, _ in BAD_INPUTS])
def test_rejected_config_leaves_a_finished_run_untouched(tiny_shapes, opts, message):
    """Each bad input fails before training, naming key and value, and every file of the
    finished run in OUTPUT_DIR is byte-identical afterwards (nothing added)."""
    out = tiny_shapes / "finished"
    _finished_run(out)
    before = _snapshot(out)
    train_net = load_train_net()
    args = tiny_args(train_net, out, "SOLVER.AGVM.ENABLED", "True", "SOLVER.AGVM.START_ITER", "1", *opts)
    with pytest.raises((ValueError, KeyError), match=message):
        train_net.main(args)
    assert _snapshot(out) == before


# ------------------------------------------------------------------------------ non-finite gradients
class Inject:
    """A gradient hook that turns one parameter's gradient into +inf on chosen passes."""

    def __init__(self, param, when):
        self.when, self.calls = when, 0
        param.register_hook(self)

    def __call__(self, grad):
        self.calls += 1
        return torch.full_like(grad, math.inf) if self.when(self.calls) else grad


def _all_finite(trainer):
    model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
    return not nonfinite_entries({"model": model.state_dict(), "opt": trainer.optimizer.state_dict()})


def test_nonfinite_gradient_is_skipped_and_never_checkpointed(tiny_shapes):
    """A +inf gradient in rpn_head.objectness_logits.weight on an ordinary iteration (the 2nd
    backward of the run) and in one half of an AGVM iteration: the ordinary step is skipped
    (parameters, momentum and μ untouched, counted), the half only costs that module's Φ; every
    checkpoint is finite and resume works."""
    out = tiny_shapes / "inf"
    cfg = _cfg(out, "SOLVER.CHECKPOINT_PERIOD", "2")
    trainer = AGVMTrainer(cfg)
    model = trainer.model
    weight = dict(model.named_parameters())["proposal_generator.rpn_head.objectness_logits.weight"]
    # passes: it0 = 1; it1 (AGVM, one process): halves 2, 3 then plain 4; it2 = 5 ...
    Inject(weight, lambda call: call in (2, 5))
    snapshots = {}

    from detectron2.engine import HookBase

    class Watch(HookBase):
        def before_step(self):
            snapshots[self.trainer.iter] = weight.detach().clone()

    trainer.register_hooks([Watch()])
    trainer.resume_or_load(resume=False)
    trainer.train()
    step = trainer.stepper
    assert step.nonfinite_total == 1
    assert torch.equal(snapshots[2], snapshots[3])  # iteration 2 took no step
    assert not torch.equal(snapshots[1], snapshots[2])
    assert _all_finite(trainer)
    assert trainer.optimizer.modulator.skipped >= 1  # the rpn's Φ of the poisoned half
    for name in os.listdir(out):
        if name.endswith(".pth"):
            assert not nonfinite_entries(torch.load(out / name, weights_only=False)), name
    # resume from the last checkpoint and finish
    resumed = AGVMTrainer(_cfg(out, "SOLVER.CHECKPOINT_PERIOD", "2", "SOLVER.MAX_ITER", "10"))
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 8
    resumed.train()
    assert _all_finite(resumed)


def test_consecutive_nonfinite_steps_stop_training(tiny_shapes):
    cfg = _cfg(tiny_shapes / "stop", "SOLVER.MAX_CONSECUTIVE_NONFINITE", "2", "SOLVER.AGVM.ENABLED", "False")
    trainer = AGVMTrainer(cfg)
    weight = dict(trainer.model.named_parameters())["roi_heads.box_predictor.cls_score.weight"]
    Inject(weight, lambda call: call >= 3)
    trainer.resume_or_load(resume=False)
    with pytest.raises(FloatingPointError, match="2 consecutive iterations .*MAX_CONSECUTIVE_NONFINITE=2"):
        trainer.train()
    assert _all_finite(trainer)


# ------------------------------------------------------------------------------ checkpoints
def test_truncated_newest_checkpoint_falls_back_with_a_warning(tiny_shapes):
    out = tiny_shapes / "trunc"
    opts = ["SOLVER.CHECKPOINT_PERIOD", "3"]
    t = AGVMTrainer(_cfg(out, *opts))
    t.resume_or_load(resume=False)
    t.train()
    newest = out / "model_final.pth"
    assert (out / "last_checkpoint").read_text().strip() == "model_final.pth"
    newest.write_bytes(newest.read_bytes()[:1000])  # a crash mid-write (before atomic writes)
    resumed = AGVMTrainer(_cfg(out, *opts))
    with pytest.warns(RuntimeWarning, match=r"resumed from .*model_0000005\.pth; skipped unreadable .*model_final\.pth"):
        resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 6  # model_0000005.pth: iteration 5


def test_failed_checkpoint_write_leaves_no_file_under_the_final_name(tmp_path, monkeypatch):
    model = torch.nn.Linear(2, 2)
    ckpt = SafeCheckpointer(model, str(tmp_path), save_to_disk=True)
    ckpt.save("model_0000001")

    def broken_save(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="No space left"):
        ckpt.save("model_0000002")
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"


def test_nonfinite_checkpoint_is_refused(tmp_path):
    model = torch.nn.Linear(2, 2)
    ckpt = SafeCheckpointer(model, str(tmp_path), save_to_disk=True)
    with torch.no_grad():
        model.weight[0, 0] = math.nan
    with pytest.raises(FloatingPointError, match="non-finite values in model.weight"):
        ckpt.save("model_0000001")
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------ metrics across kills
KILL_DRIVER = textwrap.dedent('''
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    import agvm  # noqa: F401
    from detectron2.engine import HookBase
    from agvm.detectron2 import AGVMTrainer
    from test_trainer import _cfg
    import pathlib
    out, kill_at, resume = pathlib.Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
    trainer = AGVMTrainer(_cfg(out, "SOLVER.CHECKPOINT_PERIOD", "3", "SOLVER.MAX_ITER", "12"))

    class Kill(HookBase):
        def after_step(self):
            if self.trainer.iter == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    trainer.register_hooks([Kill()])
    trainer.resume_or_load(resume=resume)
    trainer.train()
''')


def _run_driver(tmp_path, out, kill_at, resume):
    driver = tmp_path / "driver.py"
    driver.write_text(KILL_DRIVER.format(tests=os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, str(driver), str(out), str(kill_at), "1" if resume else "0"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("kill_at", [4, 8])
def test_metrics_survive_a_kill(tiny_shapes, tmp_path, kill_at):
    """SIGKILL after iteration 4 (one past a checkpoint) or 8 (just before one), then --resume:
    metrics.json is strict JSON with one row per iteration in order, no AGVM update missing or
    repeated, and μ re-derived from the logged Φ equals the logged μ."""
    out = tiny_shapes / f"kill{kill_at}"
    first = _run_driver(tmp_path, out, kill_at, resume=False)
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    second = _run_driver(tmp_path, out, -1, resume=True)
    assert second.returncode == 0, second.stderr[-3000:]
    lines = (out / "metrics.json").read_text().splitlines()
    rows = [json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON token {c}")) for line in lines]
    iters = [r["iteration"] for r in rows]
    assert iters == sorted(set(iters)), iters
    updates = [1, 3, 5, 7, 9, 11]  # START_ITER 1, INTERVAL 2
    modules = ["backbone", "neck", "rpn", "box_head"]
    phi = {r["iteration"]: r for r in rows if "agvm/phi/backbone" in r}
    assert sorted(phi) == updates
    mu = 1.0
    for it in updates:
        r = phi[it]
        ratio = min(10.0, max(0.5, (r["agvm/phi/backbone"] + 1e-6) / (r["agvm/phi/box_head"] + 1e-6)))
        mu = 0.97 * mu + 0.03 * math.sqrt(ratio)
        assert r["agvm/mu/box_head"] == pytest.approx(mu, rel=1e-9), it
        assert all(f"agvm/phi/{m}" in r for m in modules)


def test_large_finite_gradients_are_not_taken_for_nonfinite(tiny_shapes):
    """Gradients of 1e30 are finite (an L2 norm of them overflows float32): the step is taken."""
    trainer = AGVMTrainer(_cfg(tiny_shapes / "large", "SOLVER.AGVM.ENABLED", "False", "SOLVER.MAX_ITER", "2",
                               "SOLVER.BASE_LR", "1e-40"))
    weight = dict(trainer.model.named_parameters())["roi_heads.box_predictor.cls_score.weight"]
    weight.register_hook(lambda g: torch.full_like(g, 1e30))
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert trainer.stepper.nonfinite_total == 0
