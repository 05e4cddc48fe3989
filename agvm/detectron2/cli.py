"""Command-line and evaluation helpers shared by every ``projects/<table>/train_net.py``.

Each project's ``train_net.py`` stays thin (detectron2's convention: a Trainer subclass,
``setup()``, ``main()``, ``launch(...)``); what they have in common lives here.
"""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from typing import Callable, Iterable, Mapping, Optional, Sequence

import torch
from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.engine import default_argument_parser as _d2_argument_parser
from detectron2.engine import default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from detectron2.evaluation import (
    COCOEvaluator,
    DatasetEvaluator,
    DatasetEvaluators,
    SemSegEvaluator,
)

from ..data.builtin import check_datasets
from ..data.register import prepare_datasets, register_shapes
from ..evaluation import PanopticQualityEvaluator
from ..solver import scale_lr
from .checks import build_run_config, validate_config
from .config import help_lines, rescale_config

logger = logging.getLogger(__name__)

__all__ = ["build_evaluator", "default_argument_parser", "launch_cli", "preflight", "prepare_pretrained", "print_results",
           "register_datasets", "setup_cfg", "train_or_evaluate"]


def default_argument_parser(epilog: Optional[str] = None):
    """detectron2's argument parser (``--config-file``, ``--num-gpus``, ``--eval-only``,
    ``--resume``, ``--num-machines``, ``--machine-rank``, ``--dist-url``, trailing
    ``KEY VALUE`` overrides), with ``--dist-url`` defaulting to ``"auto"`` instead of
    detectron2's ``tcp://127.0.0.1:<port>``: then processes started by torchrun or srun join
    through their launcher's environment (MASTER_ADDR/MASTER_PORT, or the SLURM node list),
    and a single machine picks a free local port. An explicit ``--dist-url`` always wins."""
    parser = _d2_argument_parser(epilog if epilog is not None else _agvm_epilog())
    parser.set_defaults(dist_url="auto")
    parser.add_argument("--dataset", nargs=3, action="append", default=[], metavar=("NAME", "JSON", "IMAGE_DIR"),
                        help="register a COCO-format dataset (instances JSON, image folder) under NAME, for "
                             "DATASETS.TRAIN/TEST; repeatable. MODEL.*.NUM_CLASSES is checked against its categories")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of a configuration error (default: one line)")
    parser.add_argument("--max-iter", type=int, default=None, metavar="N",
                        help="a run of N iterations with the config's schedule rescaled to it: LR steps, warm-up, the "
                             "AGVM start, τ and stop, the clip window, the evaluation and checkpoint periods "
                             "(the rescaled values are logged); default: the config's SOLVER.MAX_ITER")
    for action in parser._actions:
        if action.dest == "dist_url":
            action.help = ("initialization URL of the process group (tcp://<machine 0>:<port>); default 'auto': "
                           "the launcher's environment (torchrun, SLURM) or a free local port")
    return parser


def _agvm_epilog() -> str:
    """The ``--help`` epilog: how to run, and the SOLVER.AGVM keys with their defaults and
    meanings (from :data:`agvm.detectron2.config.KEYS`)."""
    return (
        "Examples:\n"
        "  train_net.py --config-file <cfg.yaml> --num-gpus 8 [KEY VALUE ...]\n"
        "  train_net.py --config-file <cfg.yaml> --num-gpus 2 MODEL.DEVICE cpu      (CPU processes, gloo)\n"
        "  torchrun --nnodes 2 --nproc_per_node 8 ... train_net.py --config-file <cfg.yaml>\n"
        "  train_net.py --config-file <cfg.yaml> --eval-only MODEL.WEIGHTS <model.pth>\n\n"
        "AGVM config keys (KEY default  meaning; every key: docs/config.md):\n" + "\n".join(help_lines())
    )


def setup_cfg(args, config_adders: Iterable[Callable[[CfgNode], None]] = ()) -> CfgNode:
    """Build, freeze and return the config of a run, and set up logging and the output folder.

    Steps: detectron2 defaults, :func:`add_agvm_config`, each extra ``config_adders``
    function, then ``args.config_file`` and ``args.opts``. With ``SOLVER.LR_SCALING.RULE``
    other than "none", ``SOLVER.BASE_LR`` is set by :func:`agvm.solver.scale_lr` from the
    reference batch and lr to ``SOLVER.IMS_PER_BATCH``. When the config asks for CUDA and no GPU is
    present, ``MODEL.DEVICE`` falls back to ``"cpu"`` with a warning, so every config runs on a
    CPU-only machine. Registers the embedded ``shapes_*`` datasets, and raises
    :class:`agvm.data.builtin.DatasetNotFoundError` when a builtin dataset (COCO, ADE20K) of
    ``DATASETS.TRAIN``/``TEST`` is not on disk. Every check of :func:`validate_config` runs
    before detectron2's ``default_setup`` writes anything to ``OUTPUT_DIR``. A missing
    ``agvm-pretrained://`` backbone named by ``MODEL.WEIGHTS`` is then built
    (:func:`prepare_pretrained`). ``args`` is the namespace of :func:`default_argument_parser`.
    """
    register_shapes()
    register_datasets(getattr(args, "dataset", None) or [])
    cfg = build_run_config(args.config_file, args.opts or [], config_adders=config_adders)
    rescaled = rescale_config(cfg, getattr(args, "max_iter", None))
    scaling = cfg.SOLVER.LR_SCALING
    if scaling.RULE != "none":
        cfg.SOLVER.BASE_LR = scale_lr(
            scaling.REFERENCE_LR, scaling.REFERENCE_IMS_PER_BATCH, cfg.SOLVER.IMS_PER_BATCH, scaling.RULE
        )
    # a missing COCO / ADE20K fails here, saying where it was looked for and how to prepare it
    check_datasets(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))
    fell_back = cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available()
    if fell_back:
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    validate_config(cfg)  # before default_setup writes config.yaml and log.txt into OUTPUT_DIR
    default_setup(cfg, args)
    # agvm's own messages (module groups, modulator settings) in the console and log.txt
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="agvm", abbrev_name="agvm")
    if fell_back:
        logging.getLogger("agvm").warning("No CUDA device found: running on CPU (MODEL.DEVICE cpu).")
    if rescaled:
        logging.getLogger("agvm").info("--max-iter: schedule rescaled: " + ", ".join(rescaled))
    prepare_pretrained(cfg)  # a missing agvm-pretrained:// backbone is built here, visibly, once
    return cfg


def prepare_pretrained(cfg: CfgNode) -> Optional[str]:
    """Make the ``agvm-pretrained://`` backbone that ``MODEL.WEIGHTS`` names ready before the
    model loads it (:mod:`agvm.detectron2.catalog` only resolves, never builds): when it is
    missing or fails verification, log that it is being built and build it with a progress line
    per epoch (:func:`agvm.data.pretrained.ensure_pretrained`; about 2 min on one CPU core, once
    per cache), on the first process of each machine while the others wait. Returns the local
    path of the weights, or None when ``MODEL.WEIGHTS`` is not such a URL."""
    from .catalog import URL_PREFIX, locate_url, pretrained_name, resolve_pretrained_url

    url = cfg.MODEL.WEIGHTS
    if not url.startswith(URL_PREFIX):
        return None
    if comm.get_local_rank() == 0:
        path, problems = locate_url(url)
        if problems:
            from ..data.pretrained import PRETRAINED, build_command, ensure_pretrained

            log = logging.getLogger("agvm")
            name = pretrained_name(url)
            log.warning(f"building the mini pretrained backbone {url} into {os.path.dirname(path)} (about 2 min on "
                        f"one CPU core, once; `{build_command(name)}` builds it ahead): {'; '.join(problems)}")
            ensure_pretrained(**PRETRAINED[name])
            log.info(f"mini pretrained backbone ready: {path}")
    comm.synchronize()  # the other processes of the machine wait for the build
    return resolve_pretrained_url(url)


#: What a project can ask to be evaluated (its Trainer's ``metrics``) -> the evaluator kind.
METRICS = {"box AP": "coco", "mask AP": "coco", "mIoU": "sem_seg", "PQ": "panoptic"}


def build_evaluator(cfg: CfgNode, dataset_name: str, output_folder: Optional[str] = None,
                    metrics: Optional[Sequence[str]] = None) -> DatasetEvaluator:
    """The evaluator(s) for ``dataset_name``.

    ``metrics`` (keys of :data:`METRICS`; default None = by the dataset metadata's
    ``evaluator_type``): "box AP"/"mask AP" → COCO AP of what the model predicts (boxes,
    masks, keypoints); "mIoU" → semantic segmentation; "PQ" → panoptic quality
    (:class:`agvm.evaluation.PanopticQualityEvaluator`, the COCO panoptic rules without
    ``panopticapi``). By ``evaluator_type``: ``coco`` → COCO AP, ``sem_seg`` → mIoU,
    ``coco_panoptic_seg`` → PQ with COCO AP and mIoU of its parts.
    Results go to ``output_folder`` (default ``<OUTPUT_DIR>/inference``).
    """
    prepare_datasets([dataset_name])
    check_datasets([dataset_name])
    if output_folder is None:
        output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
    evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", None)
    if metrics is None:
        kinds = {"coco": {"coco"}, "sem_seg": {"sem_seg"}, "coco_panoptic_seg": {"sem_seg", "coco", "panoptic"}}.get(evaluator_type, set())
    else:
        unknown = [m for m in metrics if m not in METRICS]
        if unknown:
            raise ValueError(f"unknown metrics {unknown}; known: {list(METRICS)}")
        kinds = {METRICS[m] for m in metrics}
    evaluators = []
    if "sem_seg" in kinds:
        evaluators.append(SemSegEvaluator(dataset_name, distributed=True, output_dir=output_folder))
    if "coco" in kinds:
        evaluators.append(COCOEvaluator(dataset_name, output_dir=output_folder))
    if "panoptic" in kinds:
        evaluators.append(PanopticQualityEvaluator(dataset_name, output_folder))
    if not evaluators:
        raise ValueError(
            f"no evaluator for dataset {dataset_name!r} with evaluator_type={evaluator_type!r}; "
            "known types: 'coco', 'sem_seg', 'coco_panoptic_seg'"
        )
    return evaluators[0] if len(evaluators) == 1 else DatasetEvaluators(evaluators)


def print_results(results: Mapping, metrics=("AP", "mIoU", "PQ")) -> str:
    """Print (and return) one line per task with its headline metric, e.g. ``bbox AP = 41.2``.

    ``results`` is what ``DefaultTrainer.test`` returns: ``{task: {metric: value}}``, possibly
    nested one level deeper per dataset.
    """
    if results and all(isinstance(v, Mapping) and all(isinstance(x, Mapping) for x in v.values()) for v in results.values()):
        flat = OrderedDict()
        for per_dataset in results.values():
            flat.update(per_dataset)
        results = flat
    lines = []
    for task, values in results.items():
        for metric in metrics:
            if isinstance(values, Mapping) and metric in values:
                lines.append(f"{task} {metric} = {values[metric]:.2f}")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def train_or_evaluate(cfg: CfgNode, args, trainer_cls) -> Mapping:
    """The body of every project's ``main()``: with ``args.eval_only``, load ``MODEL.WEIGHTS``
    and evaluate; otherwise train with ``trainer_cls`` (resuming with ``args.resume``) and
    evaluate at the end; with ``SOLVER.AGVM.ENABLED`` (MEASURE_ONLY included) logs the per-module
    Φ/μ table of the whole run (:func:`agvm.results.phi_mu_summary`) to the console and log.txt.
    Prints one line per metric and writes ``<OUTPUT_DIR>/eval_results.json``
    (``{task: {metric: value}}``, main process). Returns the results."""
    from detectron2.checkpoint import DetectionCheckpointer

    if args.eval_only:
        model = trainer_cls.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        results = trainer_cls.test(cfg, model)
    else:
        trainer = trainer_cls(cfg)
        trainer.resume_or_load(resume=args.resume)
        if trainer.start_iter >= trainer.max_iter:
            logger.info(f"training is complete: the checkpoint is at iteration {trainer.start_iter} = SOLVER.MAX_ITER; "
                        "evaluating its model (raise SOLVER.MAX_ITER to train further)")
            results = trainer.test(cfg, trainer.model) if cfg.DATASETS.TEST else {}
        else:
            trainer.train()
            results = getattr(trainer, "_last_eval_results", None) or {}
        if cfg.SOLVER.AGVM.ENABLED and comm.is_main_process() and cfg.OUTPUT_DIR:
            from ..results import phi_mu_summary, read_metrics

            table = phi_mu_summary(read_metrics(cfg.OUTPUT_DIR))  # every estimate of the run, resumes included
            if table:
                logger.info("AGVM per module over the run (Φ = 1 − cos of the half-batch gradients; μ scales the "
                            "module's learning rate):\n" + table)
    if comm.is_main_process():
        print_results(results)
        if cfg.OUTPUT_DIR:
            os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
            with open(os.path.join(cfg.OUTPUT_DIR, "eval_results.json"), "w") as f:
                json.dump(results, f, indent=1)
    return results


def launch_cli(main: Callable, argv=None, config_adders: Iterable[Callable[[CfgNode], None]] = ()):
    """The ``if __name__ == "__main__":`` body of every ``train_net.py``: parse the command line
    (:func:`default_argument_parser`), check it (:func:`preflight`, with the project's own
    ``config_adders``, as given to :func:`setup_cfg`), and run ``main(args)`` in every process
    of the job (:func:`agvm.detectron2.launch`: GPUs, CPU processes, several machines, torchrun,
    srun) on the device the config names (``MODEL.DEVICE``), decided here once."""
    import sys

    from .launch import launch

    args = default_argument_parser().parse_args(argv)
    try:
        cfg = preflight(args, config_adders)
    except ValueError as e:
        if args.debug:
            raise
        prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "train_net.py"
        print(f"{prog}: error: {e} (--debug shows the traceback)", file=sys.stderr)
        raise SystemExit(2)
    device = "cuda" if cfg.MODEL.DEVICE.startswith("cuda") else "cpu"
    world = args.num_gpus * args.num_machines
    if world > 1 and device == "cpu":
        print(f"note: MODEL.DEVICE is cpu: starting {world} CPU processes (gloo), not GPUs", file=sys.stderr, flush=True)
    return launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
                  dist_url=args.dist_url, args=(args,), device=device)


def register_datasets(datasets: Sequence[Sequence[str]]) -> None:
    """Register ``--dataset NAME JSON IMAGE_DIR`` entries: COCO-format instance sets (detectron2's
    ``register_coco_instances``), their ``thing_classes`` read from the JSON's categories (sorted
    by id, as detectron2 orders them) so that the class count is checked before training. A name
    registered already with the same files is left alone. Raises ValueError for a missing file
    or folder, or a name registered with other files."""
    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets import register_coco_instances

    for name, json_file, image_root in datasets:
        if not os.path.isfile(json_file):
            raise ValueError(f"--dataset {name}: annotations {json_file}: no such file")
        if not os.path.isdir(image_root):
            raise ValueError(f"--dataset {name}: image folder {image_root}: no such folder")
        meta = MetadataCatalog.get(name)
        if name in DatasetCatalog.list():
            if meta.get("json_file") == json_file and meta.get("image_root") == image_root:
                continue
            raise ValueError(f"--dataset {name}: the name is registered already (with {meta.get('json_file')!r}); "
                             "choose another name")
        with open(json_file) as f:
            categories = sorted(json.load(f).get("categories", []), key=lambda c: c["id"])
        register_coco_instances(name, {}, json_file, image_root)
        if categories:
            MetadataCatalog.get(name).set(thing_classes=[c["name"] for c in categories])


def preflight(args, config_adders: Iterable[Callable[[CfgNode], None]] = ()) -> CfgNode:
    """What :func:`launch_cli` checks before any process starts, from the command line alone:
    the config file exists, every key exists (with a "did you mean"), values merge, ``--max-iter``
    applies, ``SOLVER.IMS_PER_BATCH`` splits over ``--num-gpus × --num-machines`` processes
    (:func:`agvm.detectron2.checks.check_split_batch`), the class counts match the datasets, and
    several CUDA processes have GPUs. Raises ValueError with a one-line message. Returns the
    (unfrozen) config it built: the launcher takes the device from it."""
    from .checks import build_run_config, check_num_classes, check_split_batch

    register_shapes()
    register_datasets(getattr(args, "dataset", None) or [])
    cfg = build_run_config(args.config_file, args.opts or [], getattr(args, "max_iter", None),
                           config_adders=config_adders)
    world = args.num_gpus * args.num_machines
    check_split_batch(cfg, world)
    check_num_classes(cfg)
    if world > 1 and cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--num-gpus {args.num_gpus} with MODEL.DEVICE {cfg.MODEL.DEVICE}, but no GPU is visible "
                         "(add MODEL.DEVICE cpu to run CPU processes on purpose)")
    return cfg
