"""AGVMTrainer: a detectron2 trainer assembled from its public parts, with the AGVM optimizer, its step
(:mod:`agvm.detectron2.train_loop`), exact logging (:mod:`.writers`), exact and crash-safe
resume (:mod:`.resume`, :mod:`.checkpoint`), and the config checks (:mod:`.checks`).
"""

from __future__ import annotations

import logging
import os
import weakref
from collections import OrderedDict

import torch
from detectron2.data import (DatasetMapper, build_detection_test_loader, build_detection_train_loader,
                             get_detection_dataset_dicts)
from detectron2.data.samplers import TrainingSampler
from detectron2.engine import DefaultTrainer, TrainerBase, create_ddp_model, hooks
from detectron2.evaluation import inference_on_dataset, print_csv_format, verify_results
from detectron2.modeling import build_model
from detectron2.utils import comm
from detectron2.utils.events import CommonMetricPrinter
from detectron2.utils.logger import setup_logger
from fvcore.nn.precise_bn import get_bn_modules

from ..core.optim import AGVM
from ..distributed import install_agvm_hook
from ..solver import build_lr_scheduler
from .build import build_agvm_optimizer, build_clip_fn
from .checkpoint import SafeCheckpointer
from .checks import validate_config
from .cli import build_evaluator
from .loader import ResumableTrainLoader
from .resume import RankRNG
from .train_loop import AGVMStepTrainer
from .writers import ExactJSONWriter, ExactTensorboardWriter, truncate_metrics

__all__ = ["AGVMTrainer", "Trainer"]

logger = logging.getLogger(__name__)


class Trainer(DefaultTrainer):
    """detectron2's ``DefaultTrainer`` with agvm's evaluators (:func:`agvm.detectron2.build_evaluator`)."""

    #: What to evaluate (keys of ``agvm.detectron2.cli.METRICS``: "box AP", "mask AP", "mIoU",
    #: "PQ"); None (default) = chosen by the test dataset's ``evaluator_type``.
    metrics = None

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_evaluator(cfg, dataset_name, output_folder, cls.metrics)


class AGVMTrainer(TrainerBase):
    """The trainer of every project, assembled from detectron2's public parts (the shape of its
    ``tools/lazyconfig_train_net.py``): the model, the optimizer of :func:`build_agvm_optimizer`
    (AGVM-wrapped when ``SOLVER.AGVM.ENABLED``), the train loader, DDP with AGVM's comm hook, the
    step (:class:`AGVMStepTrainer`), the LR scheduler, a crash-safe checkpointer and the hooks of
    :meth:`build_hooks`. With ``SOLVER.AGVM.ENABLED`` False it trains like detectron2's
    ``DefaultTrainer``, plus ``SOLVER.OPTIMIZER``, ``GRAD_ACCUM_STEPS`` and the clipping window.
    The same overridable builders as ``DefaultTrainer`` (``build_model``, ``build_optimizer``,
    ``build_lr_scheduler``, ``build_train_loader``, ``build_test_loader``, ``build_evaluator``,
    ``test``); ``metrics`` chooses the evaluators (:func:`agvm.detectron2.build_evaluator`).

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

    #: What to evaluate (keys of ``agvm.detectron2.cli.METRICS``: "box AP", "mask AP", "mIoU",
    #: "PQ"); None (default) = chosen by the test dataset's ``evaluator_type``.
    metrics = None

    def __init__(self, cfg):
        super().__init__()
        validate_config(cfg)
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        self.cfg = cfg
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        self.assemble(cfg, model, optimizer, self.build_train_loader(cfg), self.build_lr_scheduler(cfg, optimizer))

    def assemble(self, cfg, model, optimizer, data_loader, scheduler):
        """Put the parts together (every constructor of this class and its subclasses ends here):
        DDP with AGVM's comm hook (:meth:`build_ddp_model`), the step (:class:`AGVMStepTrainer`
        with the accumulation, clipping window, AMP, SAM and non-finite settings of ``cfg``), the
        crash-safe checkpointer (each rank's RNG beside every checkpoint, the metrics written
        before a checkpoint is declared), and the hooks of :meth:`build_hooks`."""
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):  # as DefaultTrainer
            setup_logger()
        self.optimizer, self.scheduler = optimizer, scheduler
        self.model, hook_state = self.build_ddp_model(cfg, model, optimizer)
        s = cfg.SOLVER
        clip = (build_clip_fn(cfg), tuple(s.CLIP_GRADIENTS.ITER_RANGE)) if s.CLIP_GRADIENTS.ENABLED else None
        self.stepper = AGVMStepTrainer(
            self.model, data_loader, optimizer, accum_steps=s.GRAD_ACCUM_STEPS, clip=clip, amp=s.AMP.ENABLED,
            sam_rho=s.SAM.RHO if s.OPTIMIZER == "SAM" else None, max_nonfinite=s.MAX_CONSECUTIVE_NONFINITE,
        )
        self.stepper.hook_state = hook_state
        self.checkpointer = SafeCheckpointer(self.model, cfg.OUTPUT_DIR, per_rank=RankRNG(),
                                             before_save=self.flush_metrics, trainer=weakref.proxy(self))
        self.writers = []
        self.start_iter = 0
        self.max_iter = s.MAX_ITER
        self.register_hooks(self.build_hooks())

    @staticmethod
    def build_ddp_model(cfg, model, optimizer):
        """``(model, hook_state)``: under several processes, ``model`` in DDP (detectron2's
        ``create_ddp_model``; ``device_ids`` only for CUDA models) with AGVM's comm hook when
        ``optimizer`` is :class:`agvm.AGVM` (its state returned), or fp16 compression with
        ``SOLVER.DDP_FP16_COMPRESSION``; one process: ``(model, None)``."""
        if comm.get_world_size() == 1:
            return model, None
        cuda = next(model.parameters()).device.type == "cuda"
        agvm = isinstance(optimizer, AGVM)
        fp16 = cfg.SOLVER.DDP_FP16_COMPRESSION
        ddp = create_ddp_model(model, broadcast_buffers=False, fp16_compression=fp16 and not agvm,
                               device_ids=[comm.get_local_rank()] if cuda else None)
        return ddp, install_agvm_hook(ddp, optimizer, compress_fp16=fp16) if agvm else None

    def build_hooks(self):
        """detectron2's default hooks, in its order: iteration timer, LR scheduler, precise BN
        (``TEST.PRECISE_BN``), periodic checkpoints (every rank: rank 0 writes the checkpoint,
        each rank its RNG file), evaluation every ``TEST.EVAL_PERIOD``, and on rank 0 the writers
        of :meth:`build_writers` every 20 iterations."""
        cfg = self.cfg
        ret = [hooks.IterationTimer(), hooks.LRScheduler(self.optimizer, self.scheduler)]
        if cfg.TEST.PRECISE_BN.ENABLED and get_bn_modules(self.model):
            loader_cfg = cfg.clone()
            loader_cfg.defrost()
            loader_cfg.DATALOADER.NUM_WORKERS = 0
            ret.append(hooks.PreciseBN(cfg.TEST.EVAL_PERIOD, self.model, self.build_train_loader(loader_cfg),
                                       cfg.TEST.PRECISE_BN.NUM_ITER))
        ret.append(hooks.PeriodicCheckpointer(self.checkpointer, cfg.SOLVER.CHECKPOINT_PERIOD))

        def test_and_save_results():
            self._last_eval_results = self.test(self.cfg, self.model)
            return self._last_eval_results

        ret.append(hooks.EvalHook(cfg.TEST.EVAL_PERIOD, test_and_save_results))
        if comm.is_main_process():
            self.writers = self.build_writers()
            ret.append(hooks.PeriodicWriter(self.writers, period=20))
        return ret

    def build_writers(self):
        """detectron2's default writers, with metrics.json and tensorboard keeping every AGVM
        update (:class:`.writers.ExactJSONWriter`, :class:`.writers.ExactTensorboardWriter`)."""
        os.makedirs(self.cfg.OUTPUT_DIR, exist_ok=True)
        return [CommonMetricPrinter(self.max_iter), ExactJSONWriter(os.path.join(self.cfg.OUTPUT_DIR, "metrics.json")),
                ExactTensorboardWriter(self.cfg.OUTPUT_DIR)]

    def flush_metrics(self):
        """Write every metric up to now (metrics.json and tensorboard, on disk), before a
        checkpoint is declared."""
        for w in self.writers:
            if isinstance(w, (ExactJSONWriter, ExactTensorboardWriter)):
                w.write()  # metrics.json: flushed and fsync'ed by its write
            if isinstance(w, ExactTensorboardWriter):
                w.flush()

    @property
    def data_loader(self):
        """The train loader (the step's)."""
        return self.stepper.data_loader

    def run_step(self):
        self.stepper.iter = self.iter
        self.stepper.run_step()

    def train(self):
        """Train from ``start_iter`` to ``max_iter``; returns the last evaluation's results
        (checked against ``TEST.EXPECTED_RESULTS`` when given, as detectron2 does)."""
        super().train(self.start_iter, self.max_iter)
        if len(self.cfg.TEST.EXPECTED_RESULTS) and comm.is_main_process():
            assert hasattr(self, "_last_eval_results"), "No evaluation results obtained during training!"
            verify_results(self.cfg, self._last_eval_results)
        return getattr(self, "_last_eval_results", None)

    @classmethod
    def build_model(cls, cfg):
        model = build_model(cfg)
        logger.info(f"Model:\n{model}")
        return model

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_agvm_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        return build_lr_scheduler(cfg, optimizer)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(cfg, dataset_name)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_evaluator(cfg, dataset_name, output_folder, cls.metrics)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """Evaluate ``model`` on every ``DATASETS.TEST`` set (evaluators: one per set, default
        :meth:`build_evaluator`'s); returns ``{dataset: results}``, or the results alone for one set."""
        if evaluators is not None and not isinstance(evaluators, (list, tuple)):
            evaluators = [evaluators]
        results = OrderedDict()
        for i, name in enumerate(cfg.DATASETS.TEST):
            evaluator = evaluators[i] if evaluators is not None else cls.build_evaluator(cfg, name)
            results[name] = inference_on_dataset(model, cls.build_test_loader(cfg, name), evaluator)
            if comm.is_main_process():
                logger.info(f"Evaluation results for {name} in csv format:")
                print_csv_format(results[name])
        return next(iter(results.values())) if len(results) == 1 else results

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
            return build_detection_train_loader(cfg)
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

    def state_dict(self):
        # the step's state (optimizer, μ, grad scaler, counters) under the key detectron2's
        # DefaultTrainer uses, and the loader's seed (a new one is drawn when SEED < 0)
        ret = super().state_dict()
        ret["_trainer"] = self.stepper.state_dict()
        loader = self.stepper.data_loader
        if isinstance(loader, ResumableTrainLoader):
            ret["data_loader"] = loader.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if "_trainer" in state_dict:
            self.stepper.load_state_dict(state_dict["_trainer"])
        else:
            logger.warning("the checkpoint has no optimizer/AGVM state (written by a stock detectron2 0.6 trainer?)")
        loader = self.stepper.data_loader
        if isinstance(loader, ResumableTrainLoader):
            if "data_loader" in state_dict:
                loader.load_state_dict(state_dict["data_loader"])
            else:
                logger.warning("the checkpoint has no train loader state (an older version): the data order after the "
                               "resume is the uninterrupted run's only if the sampler seed is the same (SEED ≥ 0)")

    def resume_or_load(self, resume=True):
        """With ``resume`` and a checkpoint in OUTPUT_DIR, continue it (every state, the next
        iteration, the data stream at its batch, metrics past it dropped); otherwise load
        ``MODEL.WEIGHTS`` and start at iteration 0."""
        self.checkpointer.resume_or_load(self.cfg.MODEL.WEIGHTS, resume=resume)
        if resume and self.checkpointer.has_checkpoint():
            self.start_iter = self.iter + 1
        if 0 < self.start_iter < self.max_iter and comm.is_main_process():  # a finished run re-runs nothing: rows kept
            # rows past the checkpoint were logged by the killed run: the resumed run logs them again
            dropped = truncate_metrics(os.path.join(self.cfg.OUTPUT_DIR, "metrics.json"), self.start_iter)
            if dropped:
                logger.info(f"metrics.json: dropped {dropped} rows past the checkpoint (iteration ≥ {self.start_iter})")
            for w in self.writers:
                if isinstance(w, ExactTensorboardWriter):
                    w.purge_from(self.start_iter)
        loader = self.stepper.data_loader
        if isinstance(loader, ResumableTrainLoader):
            # the next batch is the uninterrupted run's batch start_iter; the step's iterator is
            # lazy (it reads start_batch at its first batch) and draws nothing from the global RNG
            loader.start_batch = self.start_iter
            if self.start_iter == 0:
                # stock's loader draws its DataLoader's base seed from the global torch RNG on a
                # run's first next(), before any forward; this one draws nothing: the same one
                # draw here, so that the model's draws (RPN/RoI sampling) are stock's
                torch.empty((), dtype=torch.int64).random_()
        elif self.start_iter > 0:
            logger.warning(f"resuming with DATALOADER.SAMPLER_TRAIN={self.cfg.DATALOADER.SAMPLER_TRAIN!r}: detectron2's loader "
                           "starts its stream anew (as stock detectron2 does); the data order differs from an "
                           "uninterrupted run")


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
