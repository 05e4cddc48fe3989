"""``--max-iter N``: a short run of any config with one flag (the schedule rescaled, valid)."""

import glob
import os

import pytest

from projects_util import project_config_adders

from agvm.solver import rescale_schedule

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MINI_CONFIGS = sorted(glob.glob(os.path.join(ROOT, "projects", "*", "configs", "mini", "**", "*.yaml"), recursive=True))
# the effective-batch experiment's configs are mini-scale too (CPU, shapes dataset)
MINI_CONFIGS += sorted(glob.glob(os.path.join(ROOT, "projects", "effective_batch", "configs", "*.yaml")))


def test_rescale_schedule_exact_values():
    # a full-scale AGVM cell: 90k iterations, steps 60k/80k, warm-up 1000, release start (-1), τ 10
    out = rescale_schedule(90000, 12, (60000, 80000), 1000, -1, -1, 10, (900, 1100), 5000, 5000)
    assert out == {"max_iter": 12, "steps": (8, 11), "warmup_iters": 1, "agvm_start": 0, "agvm_stop": -1,
                   "agvm_interval": 1, "clip_range": (0, 0), "eval_period": 1, "checkpoint_period": 1}
    # the mini base: 600 iterations; sentinels kept (no clip window, no periodic evaluation)
    out = rescale_schedule(600, 12, (450, 550), 100, -1, -1, 10, (-1, -1), 0, 100000)
    assert out == {"max_iter": 12, "steps": (9, 11), "warmup_iters": 2, "agvm_start": 4, "agvm_stop": -1,
                   "agvm_interval": 1, "clip_range": (-1, -1), "eval_period": 0, "checkpoint_period": 2000}
    # steps that collapse onto each other or onto the end are dropped, never out of range
    assert rescale_schedule(100, 3, (97, 98, 99))["steps"] == (2,)
    assert rescale_schedule(10, 20, (5,), agvm_start=4, agvm_stop=8)["agvm_stop"] == 16
    with pytest.raises(ValueError, match="new_max_iter=0"):
        rescale_schedule(100, 0)


@pytest.mark.parametrize("config", MINI_CONFIGS, ids=lambda p: os.path.relpath(p, os.path.join(ROOT, "projects")))
def test_max_iter_12_gives_a_valid_run_of_every_mini_config(config, tmp_path):
    """What `train_net.py --config-file <mini cfg> --max-iter 12` builds passes every check
    (the checks run before anything is written) and is 12 iterations long."""
    from agvm.detectron2 import default_argument_parser
    from agvm.detectron2.checks import validate_config
    from agvm.detectron2.config import rescale_config
    from detectron2.config import get_cfg

    from agvm.detectron2 import add_agvm_config

    args = default_argument_parser().parse_args(["--config-file", config, "--max-iter", "12"])
    cfg = get_cfg()
    add_agvm_config(cfg)
    for add in project_config_adders(config):
        add(cfg)
    cfg.merge_from_file(config)
    changes = rescale_config(cfg, args.max_iter)
    assert cfg.SOLVER.MAX_ITER == 12 and any(c.startswith("SOLVER.MAX_ITER") for c in changes)
    assert all(0 < s < 12 for s in cfg.SOLVER.STEPS)
    validate_config(cfg)


