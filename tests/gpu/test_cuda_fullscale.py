"""One process, the full-scale Faster R-CNN R50-FPN config (800 × 1216 input, 2 images, SyncBN
→ BN on one process) for a few iterations with AGVM estimate iterations every other iteration,
fp32 and AMP: parameters, losses and Φ stay finite, μ is updated on every estimate iteration,
no step is non-finite. The report gets the time per iteration and the peak GPU memory."""

import time

import pytest
import torch
from gpu_helpers import CUDA, FULL, assert_check, synthetic_batch

pytestmark = CUDA


def fullscale_check(amp: bool, iters: int = 6, device: str = "cuda", size=(800, 1216)) -> tuple:
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from agvm.detectron2 import AGVMStepTrainer, add_agvm_config, build_agvm_optimizer
    from agvm.detectron2.resume import set_data_iterator

    cfg = get_cfg()
    add_agvm_config(cfg)
    cfg.merge_from_file(FULL)
    cfg.merge_from_list([
        "MODEL.DEVICE", device, "MODEL.WEIGHTS", "", "SOLVER.AMP.ENABLED", str(amp), "SOLVER.IMS_PER_BATCH", "2",
        "SOLVER.AGVM.START_ITER", "0", "SOLVER.AGVM.INTERVAL", "2", "SOLVER.BASE_LR", "0.01",
        # no pretrained weights on the device (no downloads): the released configs start from
        # ImageNet weights with no FPN norm; from random weights a BN in the FPN keeps the
        # untrained network finite over these few iterations
        "MODEL.FPN.NORM", "BN",
    ])
    torch.manual_seed(0)
    model = build_model(cfg)
    optimizer = build_agvm_optimizer(cfg, model)
    batches = [synthetic_batch(it, 2, size, num_classes=80) for it in range(iters)]
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 10) if amp else None  # few overflows in 6 iterations
    step = AGVMStepTrainer(model, batches, optimizer, amp=amp, grad_scaler=scaler)
    set_data_iterator(step, iter(step.data_loader))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = {"estimate": [], "ordinary": []}
    with EventStorage(0) as storage:
        for it in range(iters):
            storage.iter = step.iter = it
            sync()
            t0 = time.perf_counter()
            step.run_step()
            sync()
            if it >= 2:  # the first two iterations warm up cuDNN and the allocator
                times["estimate" if optimizer.should_estimate(it) else "ordinary"].append(time.perf_counter() - t0)
        losses = storage.history("total_loss").values()
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    phi = dict(optimizer.modulator.phi)
    finite = all(torch.isfinite(p).all() for p in model.parameters()) and all(v == v for v, _ in losses)
    ok = (finite and optimizer.modulator.num_updates == (iters + 1) // 2 and all(v == v for v in phi.values())
          and step.nonfinite_total == 0)
    med = {k: sorted(v)[len(v) // 2] if v else float("nan") for k, v in times.items()}
    detail = (f"R50-FPN 2 × {size[0]}×{size[1]}, {iters} iters: ordinary {med['ordinary'] * 1000:.0f} ms, estimate "
              f"{med['estimate'] * 1000:.0f} ms, peak {peak:.2f} GiB, Φ {', '.join(f'{m} {v:.3g}' for m, v in phi.items())}, "
              f"μ {', '.join(f'{m} {v:.4f}' for m, v in optimizer.mu.items())}")
    return ok, detail, {"median_s": med, "peak_gib": peak, "phi": phi, "mu": dict(optimizer.mu)}


@pytest.mark.parametrize("amp", [pytest.param(False, id="fp32"), pytest.param(True, id="amp")])
def test_fullscale_trains_finite(amp, record_property):
    assert_check(fullscale_check(amp), record_property)
