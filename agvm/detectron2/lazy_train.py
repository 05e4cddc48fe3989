"""Training with a LazyConfig (``.py``) config: detectron2's ``tools/lazyconfig_train_net.py``
with AGVM, from the yacs path's own parts.

:class:`LazyAGVMTrainer` is :class:`agvm.AGVMTrainer` built from a LazyConfig: ``instantiate``
of ``cfg.model``, ``cfg.optimizer`` (:func:`agvm.detectron2.lazy.build_lazy_agvm_optimizer`,
or any detectron2 optimizer node: then plain training), ``cfg.dataloader.train`` and
``cfg.lr_multiplier``; DDP with AGVM's comm hook (``AGVMTrainer.build_ddp_model``), the step
(:class:`AGVMStepTrainer`), the crash-safe checkpointer, resume, metrics truncation, writers and
``train()`` are ``AGVMTrainer``'s own. Those read a few yacs keys: the trainer holds them in
``self.cfg``, a yacs view of the LazyConfig (:func:`trainer_view`), which :func:`validate_lazy_config`
checks with the yacs path's ``validate_config`` (messages name the LazyConfig keys). The
LazyConfig itself is ``self.lazy``.

LazyConfig keys read besides detectron2's (``train.*`` of ``common/train.py``): ``optimizer.agvm``
and ``optimizer.warmup_iters`` (see :mod:`.lazy`), ``train.grad_accum_steps`` (default 1),
``train.max_consecutive_nonfinite`` (default 5) and ``train.clip_gradients``
(``SOLVER.CLIP_GRADIENTS.*`` in lower case, e.g. ``dict(enabled=True, clip_type="full_model",
clip_value=1.0, iter_range=(820, 1020))``: clipping in that window). ``train.ddp``: only
``fp16_compression`` is used (DDP runs with ``broadcast_buffers=False``, as the yacs path). The train loader is
detectron2's: a resumed run continues optimizer, μ, scheduler and RNG but not the data stream
(as stock detectron2).
"""

from __future__ import annotations

import logging

from detectron2.config import instantiate
from detectron2.engine import TrainerBase, hooks
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm

from .checkpoint import SafeCheckpointer
from .checks import validate_config
from .defaults import AGVMTrainer
from .lazy import _OPTIMIZERS, lazy_message, settings_view

__all__ = ["LazyAGVMTrainer", "do_test", "do_train", "trainer_view", "validate_lazy_config", "warmup_iters"]

logger = logging.getLogger(__name__)


def warmup_iters(cfg) -> int:
    """``optimizer.warmup_iters``, or when None ``lr_multiplier.warmup_length × train.max_iter``
    (detectron2's ``WarmupParamScheduler``; 0 without one)."""
    given = cfg.optimizer.get("warmup_iters", None)
    if given is not None:
        return int(given)
    length = cfg.get("lr_multiplier", {}).get("warmup_length", 0) or 0
    return int(round(float(length) * cfg.train.max_iter))


def _optimizer_name(cfg) -> str:
    name = cfg.optimizer.get("optimizer", None) or cfg.optimizer.get("_target_", "SGD")
    cls = _OPTIMIZERS.get(name, name) if isinstance(name, str) else name
    return "AdamW" if isinstance(cls, type) and issubclass(cls, _OPTIMIZERS["AdamW"]) else "SGD"


#: ``train.clip_gradients`` keys (SOLVER.CLIP_GRADIENTS.*, lower case; ``iter_range``: the window)
CLIP_KEYS = ("enabled", "clip_type", "clip_value", "norm_type", "iter_range")


def _clip_keys(train) -> dict:
    clip = dict(train.get("clip_gradients", None) or {})
    for key in clip:
        if key not in CLIP_KEYS:
            raise ValueError(f"train.clip_gradients.{key}: unknown key (known: {', '.join(CLIP_KEYS)})")
    return {f"CLIP_GRADIENTS.{k.upper()}": (tuple(v) if k == "iter_range" else v) for k, v in clip.items()}


def trainer_view(cfg):
    """The yacs view of LazyConfig ``cfg``: the keys the yacs path's checks and
    ``AGVMTrainer``'s methods read, from their LazyConfig counterparts (:data:`.lazy.LAZY_NAMES`;
    ``train.clip_gradients``: SOLVER.CLIP_GRADIENTS.*)."""
    train = cfg.train
    return settings_view(
        cfg.optimizer.get("agvm", None), warmup_iters(cfg), _optimizer_name(cfg),
        BASE_LR=cfg.optimizer.get("lr", 1.0), MAX_ITER=train.max_iter,
        IMS_PER_BATCH=cfg.dataloader.train.get("total_batch_size", 1),
        GRAD_ACCUM_STEPS=train.get("grad_accum_steps", 1),
        MAX_CONSECUTIVE_NONFINITE=train.get("max_consecutive_nonfinite", 5),
        **{"AMP.ENABLED": train.get("amp", {}).get("enabled", False),
           "DDP_FP16_COMPRESSION": train.get("ddp", {}).get("fp16_compression", False),
           "MODEL.DEVICE": train.get("device", "cuda"), "MODEL.WEIGHTS": train.get("init_checkpoint", "") or "",
           "OUTPUT_DIR": train.output_dir, **_clip_keys(train)},
    )


def validate_lazy_config(cfg, world_size=None):
    """The yacs path's checks (:func:`agvm.detectron2.validate_config`: AGVM settings, batch
    against world size and accumulation, schedule, AMP device) on ``cfg``'s view. Returns the
    view. Raises ValueError naming the LazyConfig key and value."""
    view = trainer_view(cfg)
    try:
        validate_config(view, world_size=world_size)
    except (ValueError, KeyError) as e:
        raise ValueError(lazy_message(str(e.args[0] if e.args else e))) from None
    return view


def do_test(cfg, model):
    """Evaluate ``model`` on ``cfg.dataloader.test`` with ``cfg.dataloader.evaluator`` (as
    detectron2's ``lazyconfig_train_net.py``); ``{}`` without an evaluator (none, or
    ``dataloader.evaluator=null``: no evaluation)."""
    if cfg.dataloader.get("evaluator", None) is None:
        return {}
    results = inference_on_dataset(model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator))
    if comm.is_main_process():
        print_csv_format(results)
    return results


class LazyAGVMTrainer(AGVMTrainer):
    """:class:`agvm.AGVMTrainer` from a LazyConfig (see the module docstring)."""

    def __init__(self, cfg):
        TrainerBase.__init__(self)
        self.lazy = cfg
        self.cfg = view = validate_lazy_config(cfg)
        model = instantiate(cfg.model)
        model.to(cfg.train.device)
        cfg.optimizer.params.model = model
        if "warmup_iters" in cfg.optimizer and cfg.optimizer.warmup_iters is None:
            cfg.optimizer.warmup_iters = view.SOLVER.WARMUP_ITERS
        optimizer = instantiate(cfg.optimizer)
        self.assemble(view, model, optimizer, instantiate(cfg.dataloader.train), instantiate(cfg.lr_multiplier))

    def build_hooks(self):
        """``lazyconfig_train_net.py``'s hooks, in its order: iteration timer, the LR schedule
        ``lr_multiplier``, periodic checkpoints (``train.checkpointer``), evaluation every
        ``train.eval_period`` and at the end, and on rank 0 the writers of
        :meth:`build_writers` every ``train.log_period``."""
        cfg = self.lazy
        ret = [hooks.IterationTimer(), hooks.LRScheduler(scheduler=self.scheduler),
               hooks.PeriodicCheckpointer(self.checkpointer, **cfg.train.checkpointer)]

        def test_and_save_results():
            self._last_eval_results = do_test(cfg, self.model)
            return self._last_eval_results

        ret.append(hooks.EvalHook(cfg.train.eval_period, test_and_save_results))
        if comm.is_main_process():
            self.writers = self.build_writers()
            ret.append(hooks.PeriodicWriter(self.writers, period=cfg.train.log_period))
        return ret

    def test(self, cfg=None, model=None, evaluators=None):
        """:func:`do_test` of the LazyConfig (default: this trainer's) and model."""
        return do_test(self.lazy if cfg is None else cfg, self.model if model is None else model)


def do_train(cfg, args):
    """Train the LazyConfig ``cfg`` (``args.resume``: continue the checkpoint in
    ``train.output_dir``, else load ``train.init_checkpoint``); returns the last evaluation's
    results (a finished run is evaluated instead)."""
    trainer = LazyAGVMTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    if trainer.start_iter >= trainer.max_iter:
        logger.info(f"training is complete (checkpoint at iteration {trainer.start_iter} = train.max_iter); evaluating")
        return do_test(cfg, trainer.model)
    return trainer.train() or {}


def do_eval_only(cfg, args):
    """``--eval-only``: the model of ``cfg`` with ``train.init_checkpoint`` (or with
    ``args.resume`` the last checkpoint of ``train.output_dir``), evaluated."""
    from detectron2.engine import create_ddp_model

    model = instantiate(cfg.model)
    model.to(cfg.train.device)
    cuda = cfg.train.device.startswith("cuda")
    model = create_ddp_model(model, device_ids=[comm.get_local_rank()] if cuda else None) if comm.get_world_size() > 1 else model
    SafeCheckpointer(model, cfg.train.output_dir).resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    return do_test(cfg, model)


def load_lazy_config(config_file: str, opts=()):
    """``config_file`` (a LazyConfig ``.py``/``.yaml``) with the ``key=value`` ``opts`` applied;
    the shapes datasets registered (they are named by the mini configs)."""
    from detectron2.config import LazyConfig

    from ..data.register import register_shapes

    register_shapes()
    return LazyConfig.apply_overrides(LazyConfig.load(config_file), list(opts))


def lazy_main(args):
    """Every process's body: load and check the config, detectron2's ``default_setup`` (after the
    checks: a rejected config writes nothing), then train (:func:`do_train`) or, with
    ``--eval-only``, evaluate (:func:`do_eval_only`). Returns the results."""
    from detectron2.engine import default_setup

    from .cli import print_results

    cfg = load_lazy_config(args.config_file, args.opts)
    validate_lazy_config(cfg)
    default_setup(cfg, args)
    results = do_eval_only(cfg, args) if args.eval_only else do_train(cfg, args)
    if comm.is_main_process():
        print_results(results)
    return results


def launch_lazy_cli(main=lazy_main, argv=None):
    """The ``__main__`` body of a LazyConfig ``train_net.py``: detectron2's arguments
    (``--config-file``, ``--num-gpus``, ``--resume``, ``--eval-only``, ``--num-machines``,
    ``--machine-rank``, ``--dist-url`` (default "auto", as :func:`agvm.detectron2.default_argument_parser`),
    trailing ``key=value`` overrides); the config checked once here (a bad one exits with status
    2 and one line naming the key), then ``main(args)`` in every process
    (:func:`agvm.detectron2.launch`) on ``train.device``'s kind."""
    import os
    import sys

    from detectron2.engine import default_argument_parser

    from .launch import launch

    parser = default_argument_parser()
    parser.set_defaults(dist_url="auto")
    args = parser.parse_args(argv)
    try:
        cfg = load_lazy_config(args.config_file, args.opts)
        validate_lazy_config(cfg, world_size=args.num_gpus * args.num_machines)
    except ValueError as e:
        prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "train_net.py"
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    device = "cuda" if str(cfg.train.device).startswith("cuda") else "cpu"
    return launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
                  dist_url=args.dist_url, args=(args,), device=device)
