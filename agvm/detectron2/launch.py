"""``launch``: detectron2's launcher, working everywhere; it knows nothing of configs.

detectron2 0.6's ``launch`` asserts CUDA and hard-codes NCCL for several processes. This one
starts ``num_gpus_per_machine`` processes per machine on GPUs (NCCL) or, with ``device="cpu"``
(or "auto" and no GPU), CPU processes (gloo). Multi-machine jobs use
``--num-machines/--machine-rank/--dist-url`` as in detectron2. Processes started by
``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``LOCAL_WORLD_SIZE``) or by SLURM's ``srun``
(``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``/``SLURM_NTASKS_PER_NODE``) join directly,
one process each. Collectives time out after ``timeout`` (default 30 min, env
``AGVM_DIST_TIMEOUT_S``): a rank that dies makes the others fail instead of hanging.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.utils import comm

from ..runner import free_port as _free_port

__all__ = ["DEFAULT_TIMEOUT", "launch"]

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = timedelta(seconds=float(os.environ.get("AGVM_DIST_TIMEOUT_S", 1800)))


def _first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``"gpu[03-05,09],cpu1"`` → ``"gpu03"``."""
    head = nodelist.strip()
    depth = 0
    for i, c in enumerate(head):  # the first comma outside brackets ends the first entry
        depth += c == "["
        depth -= c == "]"
        if c == "," and depth == 0:
            head = head[:i]
            break
    if "[" not in head:
        return head
    prefix, ranges = head.split("[", 1)
    first = ranges.rstrip("]").split(",")[0].split("-")[0]
    return prefix + first


#: Port of the process group when SLURM starts the processes and MASTER_PORT is not set.
SLURM_DEFAULT_PORT = 29500


def _cluster_env():
    """``(rank, world, local_rank, local_world, init_url)`` when torchrun (RANK, WORLD_SIZE,
    LOCAL_RANK; MASTER_ADDR/MASTER_PORT → ``env://``) or SLURM's srun (SLURM_PROCID,
    SLURM_NTASKS > 1, SLURM_LOCALID; MASTER_ADDR or the first host of SLURM_JOB_NODELIST,
    MASTER_PORT or 29500) started this process; None otherwise."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env and "LOCAL_RANK" in env:
        return (int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"]),
                int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])), "env://")
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        per_node = int(env.get("SLURM_NTASKS_PER_NODE", env["SLURM_NTASKS"]).split("(")[0])
        nodelist = env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", ""))
        addr = env.get("MASTER_ADDR") or (_first_host(nodelist) if nodelist else "127.0.0.1")
        port = env.get("MASTER_PORT", str(SLURM_DEFAULT_PORT))
        return (int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env["SLURM_LOCALID"]), per_node,
                f"tcp://{addr}:{port}")
    return None


def launch(
    main_func: Callable,
    num_gpus_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: Optional[str] = None,
    args=(),
    timeout: timedelta = DEFAULT_TIMEOUT,
    device: str = "auto",
):
    """Run ``main_func(*args)`` in every process of the job (see the module docstring).

    Args:
        main_func: the per-process entry point.
        num_gpus_per_machine: processes per machine (GPUs, or CPU processes on CPU).
        num_machines, machine_rank, dist_url: as in detectron2 (``dist_url`` "auto" or None
            picks a free local port on one machine; processes of torchrun/SLURM join through
            the launcher's environment, see :func:`_cluster_env`, unless a URL is given).
        args: arguments of ``main_func``.
        timeout: collective timeout.
        device: "cuda" (NCCL; several processes need as many visible GPUs per machine), "cpu"
            (gloo) or "auto" (default: "cuda" when a GPU is visible, else "cpu"). One process
            with "cuda" and no GPU runs anyway (the caller decides what to do about it).
    """
    if device not in ("cuda", "cpu", "auto"):
        raise ValueError(f"device={device!r} must be 'cuda', 'cpu' or 'auto'")
    world = num_machines * num_gpus_per_machine
    cluster = _cluster_env()
    if device == "cuda" and not torch.cuda.is_available() and (world > 1 or (cluster and cluster[1] > 1)):
        raise ValueError(
            f"CUDA processes were asked for ({max(world, cluster[1] if cluster else 0)}; MODEL.DEVICE cuda), but no "
            "GPU is visible; to train on CPU processes on purpose, add MODEL.DEVICE cpu (gloo), e.g. "
            "`train_net.py --config-file <cfg> --num-gpus 2 MODEL.DEVICE cpu`"
        )
    device = "cuda" if device in ("cuda", "auto") and torch.cuda.is_available() else "cpu"
    backend = "nccl" if device == "cuda" else "gloo"
    if cluster is not None:
        rank, cworld, local_rank, local_world, cluster_url = cluster
        url = dist_url if dist_url not in (None, "auto") else cluster_url
        _init(backend, url, cworld, rank, local_rank, local_world, timeout)
        return main_func(*args)
    if world <= 1:
        return main_func(*args)
    if device == "cuda" and num_gpus_per_machine > torch.cuda.device_count():
        raise ValueError(
            f"--num-gpus {num_gpus_per_machine} but only {torch.cuda.device_count()} CUDA devices are visible; "
            "use MODEL.DEVICE cpu for CPU processes"
        )
    if dist_url in (None, "auto"):
        if num_machines > 1:
            raise ValueError("--dist-url must name the first machine (tcp://host:port) for multi-machine jobs")
        dist_url = f"tcp://127.0.0.1:{_free_port()}"
    mp.start_processes(
        _worker,
        nprocs=num_gpus_per_machine,
        args=(main_func, backend, dist_url, world, num_gpus_per_machine, machine_rank, args, timeout),
        daemon=False,
        start_method="spawn",
    )


def _worker(local_rank, main_func, backend, dist_url, world, per_machine, machine_rank, args, timeout):
    rank = machine_rank * per_machine + local_rank
    _init(backend, dist_url, world, rank, local_rank, per_machine, timeout)
    main_func(*args)
    dist.barrier()
    dist.destroy_process_group()


def _init(backend, url, world, rank, local_rank, local_world, timeout):
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, init_method=url, world_size=world, rank=rank, timeout=timeout)
    comm.create_local_process_group(local_world)  # on detectron2 0.6 from agvm.compat
    comm.synchronize()
