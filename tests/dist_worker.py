"""Worker of tests/distributed/test_distributed.py: one gloo rank training a small two-module model.

Kept importable (not inside the test module) so that spawned processes can unpickle it.
"""

import contextlib
import os

import torch
import torch.distributed as dist
from torch import nn

PER_RANK = 4  # samples per rank and iteration


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, x):
        return self.head(self.backbone(x))


def global_batch(it, world):
    g = torch.Generator().manual_seed(1000 + it)
    x = torch.randn(world * PER_RANK, 8, generator=g)
    y = torch.sin(x[:, :1] * 2) + x[:, 1:2] ** 2
    return x, y


def make(seed=0):
    torch.manual_seed(seed)
    net = Net()
    groups = [
        {"params": list(net.backbone.parameters()), "agvm_module": "backbone"},
        {"params": list(net.head.parameters()), "agvm_module": "head"},
    ]
    return net, groups


def make_optimizer(groups, adam=False):
    if adam:
        return torch.optim.AdamW(groups, lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05)
    return torch.optim.SGD(groups, lr=0.05, momentum=0.9)


def phi_on_halves(opt, g1, g2, iteration, keep_state=False):
    """Φ per module as one process measures it on given halves: AGVM's own single-process
    measurement (:meth:`agvm.AGVM.stash_first_half`, :meth:`~agvm.AGVM.finish_second_half`) with
    each parameter's gradient set to its first half's mean ``g1[id(p)]``, then its second half's
    ``g2[id(p)]`` (a missing entry: a zero gradient). Adam-preconditioned when ``opt.precondition``,
    with the optimizer's current second moment (before this iteration's step) — the reference of
    the DDP tests with and without Adam. Every ``p.grad`` is None afterwards. ``keep_state``: μ
    and the modulator's counters are put back (a reference taken beside a real run, whose own
    step then updates them); otherwise μ is updated as the real run's would be."""
    saved = opt.modulator.state_dict() if keep_state else None
    params = [p for ps in opt.params_by_module().values() for p in ps]
    for p in params:
        p.grad = g1[id(p)].clone() if id(p) in g1 else torch.zeros_like(p)
    opt.stash_first_half()
    for p in params:
        p.grad = g2[id(p)].clone() if id(p) in g2 else torch.zeros_like(p)
    phi = opt.finish_second_half(iteration)["phi"]
    if saved is not None:
        opt.modulator.load_state_dict(saved)
    return phi


def run(rank, world, port, out_dir, iters, interval, mode):
    """mode: "hook" (AGVM with the comm hook), "hook_plain" (hook, never estimating),
    "hook_measure" (hook estimating on AGVM iterations, AGVM with ``measure_only``: μ stays 1),
    "hook_fp16" (AGVM, fp16-compressed ordinary iterations), "hook_adam" (AdamW, Φ on
    Adam-preconditioned half means), "hook_sub" (as "hook" on the sub-group of global ranks
    1..W−1 of a world of W; rank 0 only waits), "ddp" (plain DDP, no hook). Writes
    ``{mode}_{group rank}.pt``."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from agvm.core.optim import AGVM
    from agvm.distributed import AGVMHookState, agvm_comm_hook

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    group = None
    if mode == "hook_sub":
        group = dist.new_group(list(range(1, world)))  # every rank of the job enters new_group
        if rank == 0:  # outside the group: never builds the hook, only waits for the others
            dist.barrier()
            dist.destroy_process_group()
            return
        rank, world = dist.get_rank(group), world - 1
    net, groups = make()
    # tiny buckets: several buckets per backward, so the ordering hazard would show
    ddp = DDP(net, bucket_cap_mb=0.002, process_group=group)
    opt = AGVM(make_optimizer(groups, mode == "hook_adam"), interval=interval, clamp=None,
               measure_only=mode == "hook_measure")
    state = None
    if mode != "ddp":
        module_of = {p: g["agvm_module"] for g in groups for p in g["params"]}
        state = AGVMHookState(module_of, ["backbone", "head"], process_group=group, compress_fp16=mode == "hook_fp16",
                              precondition=opt.preconditioner() if opt.precondition else None)
        ddp.register_comm_hook(state, agvm_comm_hook)
    phis, mus, extra = {}, {}, []
    for it in range(iters):
        x, y = global_batch(it, world)
        xs, ys = x[rank * PER_RANK:(rank + 1) * PER_RANK], y[rank * PER_RANK:(rank + 1) * PER_RANK]
        opt.zero_grad()
        estimate = mode not in ("ddp", "hook_plain") and opt.should_estimate(it)
        if state is not None:
            state.estimate = estimate
        nn.functional.mse_loss(ddp(xs), ys).backward()
        if estimate:
            out = opt.update_from_stats(it, state.finish())
            phis[it], mus[it] = out["phi"], out["mu"]
            extra.append(state.last_bytes_extra)
        opt.step()
    torch.save(
        {"params": [p.detach().clone() for p in net.parameters()], "phis": phis, "mus": mus, "extra": extra},
        os.path.join(out_dir, f"{mode}_{rank}.pt"),
    )
    dist.barrier()
    dist.destroy_process_group()


MINI_AGVM = "projects/faster_rcnn/configs/mini/faster_rcnn_R18_FPN_shapes_agvm.yaml"


@contextlib.contextmanager
def _stock_ddp_on_cpu():
    """detectron2's DefaultTrainer (the reference here) passes ``device_ids=[local_rank]`` to DDP,
    which CPU modules reject: inside this block its ``create_ddp_model`` gets ``device_ids=None``.
    (The test's reference only: AGVMTrainer builds its DDP model itself.)"""
    import detectron2.engine.defaults as defaults

    original = defaults.create_ddp_model
    defaults.create_ddp_model = lambda model, **kw: original(model, **{**kw, "device_ids": None})
    try:
        yield
    finally:
        defaults.create_ddp_model = original


def run_detector(rank, world, port, out_dir, mode, datasets):
    """The mini detector for 4 iterations under DDP (gloo). mode: "agvm" (comm hook), "plain"
    (AGVMTrainer, AGVM disabled), "stock" (detectron2's DefaultTrainer), "agvm_inf" (AGVM, with
    +inf injected into one parameter's gradient on rank 1 only, at iterations 1 (an AGVM
    iteration) and 2; checkpoints every iteration)."""
    os.environ.update(AGVM_DATASETS=datasets, AGVM_SHAPES_NUM_TRAIN="16", AGVM_SHAPES_NUM_VAL="8")
    import agvm  # noqa: F401
    from detectron2.engine import DefaultTrainer
    from detectron2.utils import comm

    from agvm.detectron2 import AGVMTrainer, default_argument_parser, setup_cfg
    from agvm.detectron2.launch import _init

    _init("gloo", f"tcp://127.0.0.1:{port}", world, rank, rank, world, DEFAULT_TIMEOUT)
    torch.set_num_threads(1)
    out = os.path.join(out_dir, mode)
    opts = [
        "OUTPUT_DIR", out, "SOLVER.IMS_PER_BATCH", str(2 * world), "SOLVER.MAX_ITER", "4",
        "SOLVER.WARMUP_ITERS", "1", "SOLVER.STEPS", "(3,)", "DATALOADER.NUM_WORKERS", "0",
        "SOLVER.AGVM.START_ITER", "1", "SOLVER.AGVM.INTERVAL", "2", "TEST.EVAL_PERIOD", "0",
        "DATASETS.TEST", "()", "SOLVER.CHECKPOINT_PERIOD", "1000",
        "SOLVER.AGVM.ENABLED", str(mode in ("agvm", "agvm_inf")),
    ]
    if mode == "agvm_inf":
        opts[opts.index("SOLVER.CHECKPOINT_PERIOD") + 1] = "1"
    if mode in ("plain", "stock"):
        # AGVMTrainer's loader draws each image's augmentation from its own seed (exact resume),
        # not stock's flips; without flips the images are stock's
        opts += ["INPUT.RANDOM_FLIP", "none"]
    cfg = setup_cfg(default_argument_parser().parse_args(["--config-file", MINI_AGVM, *opts]))
    if mode == "stock":
        with _stock_ddp_on_cpu():
            trainer = DefaultTrainer(cfg)
    else:
        trainer = AGVMTrainer(cfg)
    checks = []
    if mode == "agvm":
        checks = _check_phi_against_gathered_gradients(trainer)
    if mode == "agvm_inf" and rank == 1:
        model = trainer.model.module
        weight = dict(model.named_parameters())["proposal_generator.rpn_head.objectness_logits.weight"]
        calls = [0]

        def poison(grad):  # one backward per iteration under DDP: calls 2 and 3 = iterations 1 and 2
            calls[0] += 1
            return torch.full_like(grad, float("inf")) if calls[0] in (2, 3) else grad

        weight.register_hook(poison)
    trainer.resume_or_load(resume=False)
    trainer.train()
    model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
    inner = getattr(trainer, "stepper", None) or trainer._trainer  # AGVMTrainer or the stock reference
    hook = getattr(inner, "hook_state", None)
    torch.save(
        {"params": [p.detach().clone() for p in model.parameters()], "hook": hook is not None, "checks": checks,
         "skipped": getattr(getattr(trainer.optimizer, "modulator", None), "skipped", None),
         "nonfinite_total": getattr(inner, "nonfinite_total", None),
         "optimizer": trainer.optimizer.state_dict()},
        os.path.join(out_dir, f"det_{mode}_{rank}.pt"),
    )
    comm.synchronize()
    dist.destroy_process_group()


from datetime import timedelta  # noqa: E402

DEFAULT_TIMEOUT = timedelta(minutes=5)


def die_on_rank_one():
    """main_func for the launcher test: rank 1 dies, rank 0 waits in a collective."""
    if dist.get_rank() == 1:
        raise RuntimeError("rank 1 died on purpose")
    dist.all_reduce(torch.ones(1))


def _check_phi_against_gathered_gradients(trainer):
    """Before each AGVM step, compute every rank's local gradient on the same data and RNG
    state without DDP, gather them, and Φ per module from the two halves' means; after the
    step, record (reference Φ, hook Φ) pairs. The reference holds per module ``m``: the cosine
    of the raw half means (float64), ``m + "_meandiff"`` (the gathered mean against the step's
    gradient), and with an Adam-preconditioning AGVM (``precondition``) ``m + "_adam"``: Φ as
    one process measures it on the same two half means (:func:`phi_on_halves`, with the run's
    optimizer and so its second moment at this iteration; μ left to the real step)."""
    from agvm.detectron2.resume import set_data_iterator
    from agvm.distributed import half_sizes

    step = trainer.stepper
    ddp, agvm = step.model, step.optimizer
    world = dist.get_world_size()
    n_a, _ = half_sizes(world)
    checks = []
    real_run_step = step.run_step

    def replay(data):
        real = step._data_loader_iter
        set_data_iterator(step, iter([data]))
        try:
            real_run_step()
        finally:
            set_data_iterator(step, real)

    def run_step():
        data = next(step._data_loader_iter)
        if not agvm.should_estimate(step.iter):
            return replay(data)
        rng = torch.get_rng_state()
        # The first forward/backward after a step gives slightly different gradients from the
        # following ones on the same data and RNG state (seen on detectron2 0.6 on CPU); the
        # real step is a following one, so one discarded pass precedes the reference pass.
        local = None
        for _ in range(2):
            with ddp.no_sync():
                sum(ddp(data).values()).backward()
            local = {m: [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in ps]
                     for m, ps in agvm.params_by_module().items()}
            agvm.zero_grad()
            torch.set_rng_state(rng)
        reference, means = {}, {}
        halves = ({}, {})  # id(p) → the half's mean gradient (float32), for the Adam reference
        for m, grads in local.items():
            flat = torch.cat([g.reshape(-1) for g in grads])
            gathered = [torch.empty_like(flat) for _ in range(world)]
            dist.all_gather(gathered, flat)
            means[m] = sum(gathered) / world
            h1, h2 = sum(gathered[:n_a]) / n_a, sum(gathered[n_a:]) / (world - n_a)
            g1, g2 = h1.double(), h2.double()  # an exact reference: float64 throughout
            reference[m] = 1.0 - float(g1 @ g2 / (g1.norm() * g2.norm()))
            for half, h in zip(halves, (h1, h2)):
                half.update((id(p), part.view_as(p)) for p, part in zip(agvm.params_by_module()[m],
                                                                        h.split([g.numel() for g in grads])))
        if agvm.precondition:
            for m, phi in phi_on_halves(agvm, *halves, step.iter, keep_state=True).items():
                reference[m + "_adam"] = phi
        # the step's own mean gradient vs the mean of the gathered local gradients
        saved_step = agvm.step
        captured = {}

        def capture_step(*a, **k):
            for m, ps in agvm.params_by_module().items():
                captured[m] = torch.cat([p.grad.reshape(-1) for p in ps])
            return saved_step(*a, **k)

        agvm.step = capture_step
        replay(data)
        del agvm.step
        for m, mean in means.items():
            reference[m + "_meandiff"] = float((mean - captured[m]).abs().max())
        checks.append((step.iter, reference, dict(agvm.modulator.phi)))

    step.run_step = run_step
    return checks
