"""Multi-node launch: torchrun and SLURM environments of several ranks on several machines join
through the launcher's address (the process-group init is stubbed: no network), an explicit
--dist-url wins, and a CUDA config of several processes without a GPU fails before spawning."""

import sys

import pytest

from agvm.detectron2 import default_argument_parser
from agvm.detectron2.launch import _first_host, launch

launch_mod = sys.modules["agvm.detectron2.launch"]  # the package re-exports the function launch

CLUSTER_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE",
                "SLURM_JOB_NODELIST", "SLURM_NODELIST")


@pytest.fixture
def calls(monkeypatch):
    for k in CLUSTER_KEYS:
        monkeypatch.delenv(k, raising=False)
    seen = []

    def fake_init(backend, url, world, rank, local_rank, local_world, timeout):
        seen.append({"backend": backend, "url": url, "world": world, "rank": rank,
                     "local_rank": local_rank, "local_world": local_world})

    monkeypatch.setattr(launch_mod, "_init", fake_init)
    return seen


def _args(*argv):
    return default_argument_parser().parse_args(["--config-file", "", *argv, "MODEL.DEVICE", "cpu"])


@pytest.mark.parametrize("rank, local_rank", [(0, 0), (3, 3), (13, 5)])
def test_torchrun_across_nodes_joins_master(calls, monkeypatch, rank, local_rank):
    """16 ranks on 2 nodes of 8: the default --dist-url (no flag) gives env:// (MASTER_ADDR)."""
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setenv("MASTER_ADDR", "node0")
    monkeypatch.setenv("MASTER_PORT", "29500")
    args = _args()
    assert args.dist_url == "auto"
    assert launch(lambda a: "ran", 1, dist_url=args.dist_url, args=(args,)) == "ran"
    assert calls == [{"backend": "gloo", "url": "env://", "world": 16, "rank": rank,
                      "local_rank": local_rank, "local_world": 8}]


def test_slurm_across_nodes_derives_master_from_nodelist(calls, monkeypatch):
    """srun with 4 nodes × 4 tasks: rank, world and local rank from SLURM_*, the master from the
    first host of the node list, MASTER_PORT when set."""
    monkeypatch.setenv("SLURM_PROCID", "6")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_LOCALID", "2")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4(x4)")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[07-09,12]")
    args = _args()
    launch(lambda a: None, 1, dist_url=args.dist_url, args=(args,))
    monkeypatch.setenv("MASTER_PORT", "31000")
    launch(lambda a: None, 1, dist_url=args.dist_url, args=(args,))
    assert [c["url"] for c in calls] == ["tcp://gpu07:29500", "tcp://gpu07:31000"]
    assert all((c["rank"], c["world"], c["local_rank"], c["local_world"]) == (6, 16, 2, 4) for c in calls)


def test_explicit_dist_url_wins(calls, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "node0")
    args = _args("--dist-url", "tcp://10.0.0.5:1234")
    launch(lambda a: None, 1, dist_url=args.dist_url, args=(args,))
    assert calls[0]["url"] == "tcp://10.0.0.5:1234"


def test_first_host():
    assert _first_host("gpu[03-05,09],cpu1") == "gpu03"
    assert _first_host("node17") == "node17"
    assert _first_host("a1,b[2-3]") == "a1"


def test_cuda_config_without_gpu_fails_before_spawning(calls, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = default_argument_parser().parse_args(["--config-file", "", "MODEL.DEVICE", "cuda"])
    spawned = []
    monkeypatch.setattr(launch_mod.mp, "start_processes", lambda *a, **k: spawned.append(a))
    with pytest.raises(ValueError, match="no GPU is visible.*MODEL.DEVICE cpu"):
        launch(lambda a: None, 2, dist_url="auto", args=(args,), device="cuda")
    assert spawned == [] and calls == []
    # one process: the documented CPU fallback of setup_cfg still applies
    assert launch(lambda a: "single", 1, dist_url="auto", args=(args,), device="cuda") == "single"
    with pytest.raises(ValueError, match="device='gpu' must be 'cuda', 'cpu' or 'auto'"):
        launch(lambda a: None, 1, device="gpu")
