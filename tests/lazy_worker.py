"""Worker of tests/detectron2/test_lazy.py's DDP test: one gloo rank training the mini ViT detector
through the LazyConfig path (importable, so that spawned processes can unpickle it)."""

import os

import torch
import torch.distributed as dist

from dist_worker import DEFAULT_TIMEOUT, _check_phi_against_gathered_gradients

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MINI = os.path.join(ROOT, "projects", "vitdet", "configs", "mini_mask_rcnn_vit_shapes.py")


def run_lazy_detector(rank, world, port, out_dir, datasets, precondition="off"):
    """4 iterations, AGVM estimates at iterations 1 and 3 through the comm hook; saves the
    parameters and the (reference Φ, hook Φ) pairs of each estimate
    (:func:`dist_worker._check_phi_against_gathered_gradients`). ``precondition``: the value of
    ``optimizer.agvm.precondition`` ("off": Φ of raw gradients; None: the config's default,
    "auto", Adam-preconditioned for its AdamW). Writes ``<out_dir>/lazy_<rank>.pt`` and the run
    into ``<out_dir>/lazy``."""
    os.environ.update(AGVM_DATASETS=datasets, AGVM_SHAPES_NUM_TRAIN="16", AGVM_SHAPES_NUM_VAL="8")
    import agvm  # noqa: F401
    from detectron2.utils import comm

    from agvm.detectron2.launch import _init
    from agvm.detectron2.lazy_train import LazyAGVMTrainer, load_lazy_config

    _init("gloo", f"tcp://127.0.0.1:{port}", world, rank, rank, world, DEFAULT_TIMEOUT)
    torch.set_num_threads(1)
    out = os.path.join(out_dir, "lazy")
    cfg = load_lazy_config(MINI, [
        f"train.output_dir={out}", "train.max_iter=4", "train.log_period=1", "optimizer.agvm.start_iter=1",
        "optimizer.agvm.interval=2", f"dataloader.train.total_batch_size={2 * world}",
        "model.proposal_generator.post_nms_topk=[64,32]",
    ] + ([] if precondition is None else [f"optimizer.agvm.precondition={precondition}"]))
    del cfg.dataloader.evaluator
    trainer = LazyAGVMTrainer(cfg)
    checks = _check_phi_against_gathered_gradients(trainer)
    trainer.resume_or_load(resume=False)
    trainer.train()
    model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
    torch.save({"params": [p.detach().clone() for p in model.parameters()], "checks": checks,
                "hook": trainer.stepper.hook_state is not None, "precondition": trainer.optimizer.precondition,
                "hook_precondition": getattr(trainer.stepper.hook_state, "precondition", None) is not None},
               os.path.join(out_dir, f"lazy_{rank}.pt"))
    comm.synchronize()
    dist.destroy_process_group()
