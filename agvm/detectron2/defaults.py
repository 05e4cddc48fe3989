"""AGVMTrainer: detectron2's DefaultTrainer with the AGVM optimizer, its step
(:mod:`agvm.detectron2.train_loop`), exact logging (:mod:`.writers`), exact and crash-safe
resume (:mod:`.resume`, :mod:`.checkpoint`), and the config checks (:mod:`.checks`).
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch
from detectron2.data import DatasetMapper, get_detection_dataset_dicts
from detectron2.data.samplers import TrainingSampler
from detectron2.engine import DefaultTrainer
from detectron2.engine.defaults import default_writers
from detectron2.engine.hooks import EvalHook, PeriodicCheckpointer, PeriodicWriter
from detectron2.utils import comm
from detectron2.utils.events import JSONWriter, TensorboardXWriter
from torch.nn.parallel import DistributedDataParallel

from ..core.optim import AGVM
from ..distributed import AGVMHookState, agvm_comm_hook
from ..solver import build_lr_scheduler
from .build import build_agvm_optimizer
from .checkpoint import SafeCheckpointer
from .checks import validate_config
from .cli import build_evaluator
from .loader import ResumableTrainLoader
from .resume import RankRNG, _share_iterator
from .train_loop import AGVMStepTrainer
from .writers import ExactJSONWriter, ExactTensorboardWriter, truncate_metrics

__all__ = ["AGVMTrainer", "Trainer", "install_agvm_hook"]

logger = logging.getLogger(__name__)


class Trainer(DefaultTrainer):
    """detectron2's ``DefaultTrainer`` with agvm's evaluators (:func:`agvm.detectron2.build_evaluator`)."""

    #: What to evaluate (keys of ``agvm.detectron2.cli.METRICS``: "box AP", "mask AP", "mIoU",
    #: "PQ"); None (default) = chosen by the test dataset's ``evaluator_type``.
    metrics = None

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_evaluator(cfg, dataset_name, output_folder, cls.metrics)


class AGVMTrainer(Trainer):
    """The trainer of every project: AGVM optimizer (``build_agvm_optimizer``), the AGVM step
    (:class:`AGVMStepTrainer`), exact Φ/μ/lr logging, and exact resume. With
    ``SOLVER.AGVM.ENABLED`` False it trains like detectron2's DefaultTrainer, plus
    ``SOLVER.OPTIMIZER``, ``GRAD_ACCUM_STEPS`` and the clipping window.

    Exact resume (``--resume`` from a checkpoint of the same world size and config, with
    detectron2's ``TrainingSampler``): every iteration after the checkpoint reads the same
    images in the same batches on every rank, with the same augmentations, whatever
    ``DATALOADER.NUM_WORKERS`` and ``ASPECT_RATIO_GROUPING`` (:mod:`.loader`); every rank
    continues its own RNG stream (:class:`.resume.RankRNG`); optimizer, μ, grad scaler and
    scheduler continue. Not covered: other samplers (``RepeatFactorTrainingSampler`` …: same
    images skipped by count, augmentations re-drawn; a warning says so), a resume at another
    world size or batch size (warned), and the RNG draws of anything that runs in a hook after
    the checkpoint hook of the same iteration (e.g. an evaluation on that iteration).
    """

    def __init__(self, cfg):
        validate_config(cfg)
        with _cpu_capable_ddp():
            super().__init__(cfg)
        stock = self._trainer
        clip = None
        if cfg.SOLVER.CLIP_GRADIENTS.ENABLED:
            clip = (_clip_fn(cfg), tuple(cfg.SOLVER.CLIP_GRADIENTS.ITER_RANGE))
        step = AGVMStepTrainer(
            stock.model, [], stock.optimizer,
            accum_steps=cfg.SOLVER.GRAD_ACCUM_STEPS, clip=clip, amp=cfg.SOLVER.AMP.ENABLED,
            grad_scaler=getattr(stock, "grad_scaler", None),
            sam_rho=cfg.SOLVER.SAM.RHO if cfg.SOLVER.OPTIMIZER == "SAM" else None,
            max_nonfinite=cfg.SOLVER.MAX_CONSECUTIVE_NONFINITE,
        )
        step.data_loader = stock.data_loader
        _share_iterator(step, stock)
        self._trainer = step
        if isinstance(step.model, DistributedDataParallel):
            fp16 = cfg.SOLVER.DDP_FP16_COMPRESSION
            if isinstance(step.optimizer, AGVM):
                step.hook_state = install_agvm_hook(step.model, step.optimizer, compress_fp16=fp16)
            elif fp16:
                from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

                step.model.register_comm_hook(None, default_hooks.fp16_compress_hook)

    def build_hooks(self):
        # crash-safe checkpoints (atomic, finite-only, fallback on resume), metrics on disk first
        old = self.checkpointer
        self.checkpointer = SafeCheckpointer(old.model, self.cfg.OUTPUT_DIR, save_to_disk=old.save_to_disk,
                                             **old.checkpointables)
        hooks_ = super().build_hooks()
        if not comm.is_main_process():
            # detectron2 checkpoints on rank 0 only; the other ranks save their own RNG files
            # (SafeCheckpointer.save without save_to_disk) at the same iterations, at the same
            # place among the hooks (before the evaluation)
            at = next((i for i, h in enumerate(hooks_) if isinstance(h, EvalHook)), len(hooks_))
            hooks_.insert(at, PeriodicCheckpointer(self.checkpointer, self.cfg.SOLVER.CHECKPOINT_PERIOD))
        self._periodic_writers = [h for h in hooks_ if isinstance(h, PeriodicWriter)]
        self.checkpointer.before_save = self._flush_metrics
        self.checkpointer.per_rank = RankRNG()
        return hooks_

    def _flush_metrics(self):
        """Write every metric up to now (JSON and tensorboard), before a checkpoint is declared."""
        for w in (w for h in self._periodic_writers for w in h._writers):
            if isinstance(w, (JSONWriter, TensorboardXWriter)):
                w.write()
            if isinstance(w, TensorboardXWriter):
                w._writer.flush()

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_agvm_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        return build_lr_scheduler(cfg, optimizer)

    @classmethod
    def build_train_mapper(cls, cfg):
        """The train mapper of :meth:`build_train_loader` (default detectron2's
        ``DatasetMapper(cfg, True)``, as stock)."""
        return DatasetMapper(cfg, True)

    @classmethod
    def build_train_loader(cls, cfg):
        """With ``DATALOADER.SAMPLER_TRAIN`` "TrainingSampler": a
        :class:`~agvm.detectron2.loader.ResumableTrainLoader` (stock detectron2's images and
        batches, exactly resumable; see :mod:`agvm.detectron2.loader`). Other samplers:
        detectron2's loader, whose resume is not exact (warned)."""
        if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
            logger.warning(f"DATALOADER.SAMPLER_TRAIN={cfg.DATALOADER.SAMPLER_TRAIN!r}: detectron2's train loader; a "
                           "resumed run starts that sampler's stream anew (not an exact resume)")
            return super().build_train_loader(cfg)
        dataset = get_detection_dataset_dicts(
            cfg.DATASETS.TRAIN,
            filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
            min_keypoints=cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON else 0,
            proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
        )
        world = comm.get_world_size()
        if cfg.SOLVER.IMS_PER_BATCH % world:
            raise ValueError(f"SOLVER.IMS_PER_BATCH={cfg.SOLVER.IMS_PER_BATCH} is not divisible by the {world} processes")
        mapper = cls.build_train_mapper(cfg)
        return ResumableTrainLoader(
            dataset, mapper, _stock_training_sampler(cfg, dataset, mapper), cfg.SOLVER.IMS_PER_BATCH // world,
            aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING, num_workers=cfg.DATALOADER.NUM_WORKERS,
        )

    def build_writers(self):
        writers = []
        for w in default_writers(self.cfg.OUTPUT_DIR, self.max_iter):
            if type(w) is JSONWriter:
                path = w._file_handle.name
                w.close()
                w = ExactJSONWriter(path)
            elif type(w) is TensorboardXWriter:
                log_dir = w._writer.log_dir
                w.close()
                w = ExactTensorboardWriter(log_dir)
            writers.append(w)
        return writers

    def state_dict(self):
        # detectron2 0.6's DefaultTrainer does not save its inner trainer (optimizer, μ, grad
        # scaler); main does. Save it either way.
        ret = super().state_dict()
        ret["_trainer"] = self._trainer.state_dict()
        loader = self._trainer.data_loader
        if isinstance(loader, ResumableTrainLoader):
            ret["data_loader"] = loader.state_dict()  # the seed: a new one is drawn when SEED < 0
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])
        else:
            logger.warning("the checkpoint has no optimizer/AGVM state (written by a stock detectron2 0.6 trainer?)")
        loader = self._trainer.data_loader
        if isinstance(loader, ResumableTrainLoader):
            if "data_loader" in state_dict:
                loader.load_state_dict(state_dict["data_loader"])
            else:
                logger.warning("the checkpoint has no train loader state (an older version): the data order after the "
                               "resume is the uninterrupted run's only if the sampler seed is the same (SEED ≥ 0)")

    def resume_or_load(self, resume=True):
        super().resume_or_load(resume=resume)
        if 0 < self.start_iter < self.max_iter and comm.is_main_process():  # a finished run re-runs nothing: rows kept
            # rows past the checkpoint were logged by the killed run: the resumed run logs them again
            dropped = truncate_metrics(os.path.join(self.cfg.OUTPUT_DIR, "metrics.json"), self.start_iter)
            if dropped:
                logger.info(f"metrics.json: dropped {dropped} rows past the checkpoint (iteration ≥ {self.start_iter})")
            for hook in self._periodic_writers:  # tensorboard: discard the events past the checkpoint
                for i, w in enumerate(hook._writers):
                    if isinstance(w, TensorboardXWriter):
                        log_dir = w._writer.log_dir
                        w.close()
                        hook._writers[i] = ExactTensorboardWriter(log_dir, purge_step=self.start_iter)
        loader = self._trainer.data_loader
        if isinstance(loader, ResumableTrainLoader):
            # the next batch is the uninterrupted run's batch start_iter (nothing mapped before it);
            # the iterator is lazy and draws nothing from the global RNG
            loader.start_batch = self.start_iter
            _share_iterator(self._trainer, None)
            if self.start_iter == 0:
                # stock's loader draws its DataLoader's base seed from the global torch RNG on a
                # run's first next(), before any forward; this one draws nothing: the same one
                # draw here, so that the model's draws (RPN/RoI sampling) are stock's
                torch.empty((), dtype=torch.int64).random_()
        elif self.start_iter > 0:
            logger.warning(f"resuming with DATALOADER.SAMPLER_TRAIN={self.cfg.DATALOADER.SAMPLER_TRAIN!r}: detectron2's loader "
                           "starts its stream anew (as stock detectron2 does); the data order differs from an "
                           "uninterrupted run")


def install_agvm_hook(ddp: DistributedDataParallel, agvm: AGVM, compress_fp16: bool = False) -> AGVMHookState:
    """Register :func:`agvm.distributed.agvm_comm_hook` on ``ddp`` for ``agvm``'s modules
    (``compress_fp16``: fp16 all-reduce on ordinary iterations; default False). With
    ``agvm.precondition`` the hook measures Φ on Adam-preconditioned half means, as the
    authors' release does for AdamW."""
    module_of = {p: m for m, ps in agvm.params_by_module().items() for p in ps}
    state = AGVMHookState(
        module_of, agvm.modulator.modules, compress_fp16=compress_fp16,
        precondition=agvm.preconditioner() if agvm.precondition else None,
    )
    ddp.register_comm_hook(state, agvm_comm_hook)
    logger.info(
        f"AGVM comm hook installed: halves of {state.n_a} and {state.n_b} ranks"
        + ("; Φ on Adam-preconditioned gradients" if agvm.precondition else "")
    )
    return state


def _stock_training_sampler(cfg, dataset: list, mapper) -> TrainingSampler:
    """detectron2's own ``TrainingSampler`` for ``dataset``, built as its train loader builds it
    (``_train_loader_from_config``): on 0.6 seeded by ``comm.shared_random_seed()`` (one
    ``np.random`` draw per rank), on main by ``cfg.SEED`` (-1 included). ``TrainingSampler(len(dataset))``
    would draw a shared random seed on main too: other images than stock's, and one more numpy
    draw (other flips)."""
    from detectron2.data.build import _train_loader_from_config  # the same signature on 0.6 and main

    sampler = _train_loader_from_config(cfg, mapper, dataset=dataset)["sampler"]
    assert isinstance(sampler, TrainingSampler), type(sampler)
    return sampler


@contextlib.contextmanager
def _cpu_capable_ddp():
    """detectron2's ``create_ddp_model`` passes ``device_ids=[local_rank]``, which DDP rejects
    for CPU modules: inside this block CPU models get ``device_ids=None``."""
    import detectron2.engine.defaults as defaults

    original = defaults.create_ddp_model

    def create_ddp_model(model, **kwargs):
        if comm.get_world_size() > 1 and next(model.parameters()).device.type == "cpu":
            kwargs["device_ids"] = None
        return original(model, **kwargs)

    defaults.create_ddp_model = create_ddp_model
    try:
        yield
    finally:
        defaults.create_ddp_model = original


def _clip_fn(cfg):
    """The clipping of ``SOLVER.CLIP_GRADIENTS``: detectron2's ``"value"`` (each element to
    ±CLIP_VALUE) and ``"norm"`` (each parameter tensor separately to L-NORM_TYPE norm ≤
    CLIP_VALUE), plus ``"full_model"`` (one norm over all parameters together, the authors'
    release and Mask2Former's name for it)."""
    c = cfg.SOLVER.CLIP_GRADIENTS
    if c.CLIP_TYPE == "value":
        return lambda params: torch.nn.utils.clip_grad_value_(params, c.CLIP_VALUE)
    if c.CLIP_TYPE == "norm":
        def per_parameter(params):
            for p in params:
                if p.grad is not None:
                    torch.nn.utils.clip_grad_norm_(p, c.CLIP_VALUE, c.NORM_TYPE)
        return per_parameter
    if c.CLIP_TYPE == "full_model":
        return lambda params: torch.nn.utils.clip_grad_norm_(params, c.CLIP_VALUE, c.NORM_TYPE)
    raise ValueError(
        f"SOLVER.CLIP_GRADIENTS.CLIP_TYPE={c.CLIP_TYPE!r} must be 'value', 'norm' (per parameter, detectron2's "
        "meaning) or 'full_model' (one norm over the whole model)"
    )
