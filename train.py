r"""Trains and evaluates torchvision detection models (Mask R-CNN by default) on COCO-format data.

One device (mixed precision: add --amp, float16 with gradient scaling on CUDA, bfloat16 on CPU):
    python train.py --data-path ./datasets/coco --dataset coco --model maskrcnn_resnet50_fpn \
        --lr 0.001 --batch-size 4

Eight GPUs on one node (torchrun --nproc_per_node=8 train.py ... works the same way):
    python -m torch.distributed.launch --nproc_per_node=8 --use_env train.py \
        --data-path ./datasets/coco --dataset coco --model maskrcnn_resnet50_fpn \
        --wd 0.000001 --lr 0.001 --batch-size 4
Two nodes: torchrun --nnodes=2 --node_rank=0 (1 on the other) --master_addr=NODE0 ...
SLURM, one task per GPU: srun python train.py ... (rank and master address from SLURM).

Evaluate a checkpoint:
    python train.py --data-path ./datasets/coco --dataset coco --model maskrcnn_resnet50_fpn \
        --test-only --resume output/checkpoint.pth

Re-submittable after any interruption: --resume auto (and --checkpoint-every N).
The learning rate 0.02 is for 8 GPUs x 2 images; scale it linearly with the total batch size.
"""

import argparse
import functools
import gc
import os
import random
import tempfile

import numpy as np
import torch

import checkpointing
import error_analysis
import models
import presets
import recipes
import tensorboard_log
import utils
from coco_eval import IOU_TYPES, STAT_NAMES, CocoEvaluator
from coco_utils import get_coco, label_to_category_id, num_classes_of, split_paths
from commands import add_debug_arg, add_device_arg, one_line_errors
from engine import NonFiniteLossError, cpu_emulates_bfloat16, evaluate, train_one_epoch
from errors import CheckpointError, ConfigError, DataError, TrainingStopped
from group_by_aspect_ratio import GroupedBatchSampler, aspect_ratio_group_ids
from instance_metrics import (
    NUCLEI_MEASURES,
    evaluated_instances,
    format_nuclei_table,
    image_counts,
    nuclei_metrics,
    write_nuclei_csv,
)
from mask_geometry import SCORE_THRESHOLD
from tiling import check_tiling
from transforms import copy_paste_collate_fn


def get_args_parser(add_help=True):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], add_help=add_help)
    add_data_args(parser)
    models.add_model_args(parser)
    add_optimization_args(parser)
    add_runtime_args(parser)
    add_evaluation_args(parser)
    models.add_inference_args(parser)
    add_distributed_args(parser)
    return parser


def add_data_args(parser):
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data-path", default="./datasets/coco", help="dataset root (COCO 2017 layout)"
    )
    data.add_argument("--dataset", default="coco", choices=["coco"], help="dataset format")
    for split in ("train", "val"):
        data.add_argument(
            f"--{split}-ann",
            help=f"{split} annotation file (default: COCO 2017's under --data-path)",
        )
        data.add_argument(
            f"--{split}-images",
            help=f"folder of the {split} file_names (default: <data-path>/{split}2017)",
        )
    data.add_argument("-j", "--workers", default=4, type=int, help="data loading processes")
    data.add_argument(
        "--skip-bad-images",
        action="store_true",
        help="skip unreadable or mis-sized images with a warning instead of stopping",
    )
    data.add_argument(
        "--train-pixel-size",
        type=float,
        help="microns per pixel of the training images, kept in the checkpoint so that "
        "predict.py rescales images of another pixel size to it",
    )
    data.add_argument(
        "--data-augmentation",
        default="hflip",
        choices=presets.DATA_AUGMENTATIONS,
        help="training augmentation recipe",
    )
    data.add_argument(
        "--crop-size",
        default=presets.DEFAULT_CROP_SIZE,
        type=int,
        help="--data-augmentation nuclei: side of the random training crops, in pixels of the "
        f"image ({presets.DEFAULT_CROP_SIZE})",
    )
    data.add_argument(
        "--use-copypaste", action="store_true", help="paste objects between images (needs lsj)"
    )
    data.add_argument(
        "--aspect-ratio-group-factor",
        default=3,
        type=int,
        help="batch images of similar aspect ratio, in 2k+2 groups; negative turns grouping off",
    )


def add_optimization_args(parser):
    optim = parser.add_argument_group("optimization")
    optim.add_argument("-b", "--batch-size", default=2, type=int, help="images per device")
    optim.add_argument("--epochs", default=26, type=int, help="epochs to train")
    optim.add_argument("--opt", default="sgd", choices=["sgd", "adamw"], help="optimizer")
    optim.add_argument("--lr", default=0.02, type=float, help="0.02 for 8 GPUs x 2 images")
    optim.add_argument("--momentum", default=0.9, type=float, help="SGD momentum")
    optim.add_argument(
        "--wd", "--weight-decay", default=1e-4, type=float, dest="weight_decay", help="weight decay"
    )
    optim.add_argument(
        "--norm-weight-decay", type=float, help="weight decay of normalization layers"
    )
    optim.add_argument(
        "--lr-scheduler",
        default="multisteplr",
        choices=["multisteplr", "cosineannealinglr"],
        help="schedule after the linear warmup",
    )
    optim.add_argument(
        "--warmup-iters",
        type=int,
        help="iterations of linear warmup from lr/1000 (default: the first epoch, at most 1000)",
    )
    optim.add_argument(
        "--lr-steps", default=[16, 22], nargs="+", type=int, help="epochs where lr drops"
    )
    optim.add_argument("--lr-gamma", default=0.1, type=float, help="lr factor at each step")
    optim.add_argument(
        "--clip-grad-norm", type=float, help="clip the gradient norm (helps from-scratch runs)"
    )
    optim.add_argument(
        "--amp",
        action="store_true",
        help="mixed precision: float16 on CUDA, bfloat16 on a CPU with bfloat16 instructions "
        "(on one without, float32 is faster and is used, with a notice)",
    )
    optim.add_argument(
        "--force-amp",
        action="store_true",
        help="with --amp: bfloat16 even on a CPU that emulates it (several times slower)",
    )


def add_runtime_args(parser):
    runtime = parser.add_argument_group("runtime")
    recipes.add_config_arg(runtime)
    add_device_arg(runtime)
    runtime.add_argument("--output-dir", default=".", help="checkpoints and log.jsonl go here")
    runtime.add_argument(
        "--resume",
        help="checkpoint to continue from; 'auto': <output-dir>/checkpoint.pth if it exists",
    )
    runtime.add_argument(
        "--keep-last", type=int, help="keep only the newest K model_<epoch>.pth (default: all)"
    )
    runtime.add_argument(
        "--checkpoint-every",
        type=int,
        help="also write checkpoint.pth every N iterations, to resume mid-epoch exactly",
    )
    runtime.add_argument(
        "--start-epoch", default=0, type=int, help="first epoch (without --resume)"
    )
    runtime.add_argument("--print-freq", default=20, type=int, help="iterations between log lines")
    runtime.add_argument("--test-only", action="store_true", help="only evaluate")
    runtime.add_argument("--seed", type=int, help="seed for weights, sampling and augmentation")
    runtime.add_argument(
        "--use-deterministic-algorithms", action="store_true", help="reproducible kernels"
    )
    add_debug_arg(runtime)
    runtime.add_argument(
        "--tensorboard",
        action="store_true",
        help="also log losses, evaluations, PR curves and predictions to <output-dir>/tensorboard",
    )


def add_evaluation_args(parser):
    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument(
        "--eval-every",
        default=1,
        type=int,
        help="evaluate every N epochs (the last epoch always evaluates)",
    )
    evaluation.add_argument(
        "--best-metric",
        help="what model_best.pth is best at: IOU_TYPE/STAT (segm/AP, bbox/AP50, ...), dsb, "
        "nuclei/MEASURE (nuclei/pq, nuclei/aji, ...) or errors/f1_iou50 (default: segm/AP for "
        "mask models, else bbox/AP)",
    )
    evaluation.add_argument(
        "--patience",
        type=int,
        help="stop when --best-metric has not improved for N evaluations",
    )
    evaluation.add_argument(
        "--nuclei-metrics",
        "--dsb-score",
        dest="dsb_score",
        action="store_true",
        help="mask models: also report the DSB2018 score, F1, precision and recall at IoU 0.5, "
        f"PQ and AJI of the masks predicted with score >= {SCORE_THRESHOLD}, overall and "
        "per image kind; nuclei.csv per image",
    )
    evaluation.add_argument(
        "--error-analysis",
        action="store_true",
        help="mask models: count true positive, missed, extra, split and merged objects (masks "
        f"with score >= {SCORE_THRESHOLD}) and F1 at IoU 0.5 and 0.7; errors.csv per image",
    )


def add_distributed_args(parser):
    distributed = parser.add_argument_group("distributed")
    distributed.add_argument(
        "--dist-url", default="env://", help="process group init method (env:// or tcp://HOST:PORT)"
    )
    distributed.add_argument("--dist-backend", help="nccl on CUDA, gloo on CPU by default")
    distributed.add_argument(
        "--dist-timeout",
        default=1800,
        type=int,
        help="seconds a collective waits for the other ranks before the run fails (1800); "
        "must exceed what rank 0 does alone, such as writing a checkpoint",
    )
    distributed.add_argument(
        "--world-size",
        default=1,
        type=int,
        help="taken from the launcher (WORLD_SIZE or SLURM_NTASKS); kept for torchvision commands",
    )
    distributed.add_argument(
        "--local-rank",
        "--local_rank",
        dest="local_rank",
        type=int,
        help="set by torch.distributed.launch without --use_env",
    )


def check_args(args):
    """Rejects impossible combinations before anything is loaded."""
    problems = []
    if args.force_amp and not args.amp:
        problems.append("--force-amp works only with --amp")
    if args.use_copypaste and args.data_augmentation != "lsj":
        problems.append("--use-copypaste works only with --data-augmentation lsj")
    if args.image_scale is not None and (args.min_size or args.max_size):
        problems.append("--image-scale replaces --min-size and --max-size: give one or the other")
    for flag in ("batch_size", "epochs", "print_freq", "box_detections_per_img", "crop_size"):
        if getattr(args, flag) < 1:
            problems.append(f"--{flag.replace('_', '-')} must be at least 1")
    if args.lr <= 0:
        problems.append("--lr must be positive")
    if args.workers < 0:
        problems.append("--workers must not be negative")
    for flag in ("keep_last", "checkpoint_every", "patience", "eval_every", "warmup_iters"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            problems.append(f"--{flag.replace('_', '-')} must be at least 1")
    if args.num_classes is not None and args.num_classes < 2:
        problems.append("--num-classes must be at least 2 (background and one class)")
    if args.box_positive_fraction is not None and not 0 < args.box_positive_fraction <= 1:
        problems.append("--box-positive-fraction must be in (0, 1]")
    if args.anchor_sizes and (len(args.anchor_sizes) != 5 or min(args.anchor_sizes) < 1):
        problems.append("--anchor-sizes takes 5 positive sizes, one per FPN level")
    for flag in ("dsb_score", "error_analysis"):
        if getattr(args, flag) and not models.is_mask_model(args.model):
            problems.append(f"--{flag.replace('_', '-')} needs a mask model, not {args.model}")
    if args.best_metric is not None and not valid_metric_name(args.best_metric):
        problems.append(
            f"--best-metric {args.best_metric}: use IOU_TYPE/STAT (e.g. segm/AP, bbox/AP50), "
            "dsb, nuclei/MEASURE (e.g. nuclei/pq) or errors/f1_iou50"
        )
    if problems:
        raise ConfigError("; ".join(problems))
    if args.tile is not None:
        check_tiling(args.tile, args.tile_overlap)


def valid_metric_name(name):
    kind, _, stat = name.partition("/")
    if kind in IOU_TYPES:
        return stat in STAT_NAMES
    if kind == "nuclei":
        return stat in NUCLEI_MEASURES
    return name == "dsb" or (kind == "errors" and stat in ("f1_iou50", "f1_iou70"))


def best_metric_of(args):
    if args.best_metric:
        return args.best_metric
    return "segm/AP" if models.is_mask_model(args.model) else "bbox/AP"


def metric_value(record, name):
    """The value of metric `name` in an evaluation record, or None when it was not computed."""
    kind, _, stat = name.partition("/")
    if kind in IOU_TYPES:
        stats = record.get(kind)
        return None if stats is None else stats[STAT_NAMES.index(stat)]
    if kind in ("errors", "nuclei"):
        group = record.get(kind, {})
        return (group.get("all", {}) if kind == "nuclei" else group).get(stat)
    return record.get(name)


def seed_run(args, checkpoint):
    """Sets args.seed (--seed, else the resumed run's, else one drawn now and printed, the same
    on every rank) and seeds each rank's generators with seed + rank. The seed is saved with the
    args in every checkpoint, so a run can be resumed exactly and repeated."""
    if args.seed is None and checkpoint is not None:
        args.seed = checkpoint["args"].get("seed")
    if args.seed is None:
        args.seed = utils.broadcast_from_main(random.SystemRandom().randrange(2**31))
        utils.print_main(f"seed: {args.seed} (drawn for this run; --seed {args.seed} repeats it)")
    seed = args.seed + args.rank
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def get_dataset(args, split, label_offset=None):
    """A split's CocoDetection; `label_offset` (see coco_utils) defaults to its own file's.

    The annotation file is checked as a whole here, so broken data stops the run before the
    first training step.
    """
    image_dir, ann_file = split_paths(args, split)
    if not os.path.isdir(args.data_path) and not (
        getattr(args, f"{split}_ann") and getattr(args, f"{split}_images")
    ):
        raise ConfigError(f"--data-path {args.data_path}: no such folder")
    if not os.path.isdir(image_dir):
        raise DataError(f"{image_dir}: no such folder ({split} images)")
    if split == "train":
        transforms = presets.DetectionPresetTrain(
            args.data_augmentation,
            min_size=args.min_size or 800,
            max_size=args.max_size or 1333,
            crop_size=args.crop_size,
        )
        sample_seed = args.seed  # augmentations draw from per-sample seeds derived from it
    else:
        transforms, sample_seed = presets.DetectionPresetEval(), None
    try:
        dataset = get_coco(args, split, transforms, label_offset, sample_seed)
    except OSError as e:  # an image whose size the file leaves out, read from its header
        raise DataError(f"{ann_file}: {e}") from e
    if len(dataset) == 0:
        usable = " with a usable (non-crowd, non-empty) object" if split == "train" else ""
        raise DataError(f"{ann_file}: no image{usable} ({split} split)")
    return dataset


def get_optimizer(args, model):
    norm_params, other_params = [], []
    for module in model.modules():
        is_norm = isinstance(module, torch.nn.modules.batchnorm._NormBase | torch.nn.GroupNorm)
        for param in module.parameters(recurse=False):
            if param.requires_grad:
                (norm_params if is_norm else other_params).append(param)
    groups = [{"params": other_params}]
    if norm_params:
        norm_wd = args.weight_decay if args.norm_weight_decay is None else args.norm_weight_decay
        groups.append({"params": norm_params, "weight_decay": norm_wd})
    if args.opt == "sgd":
        return torch.optim.SGD(
            groups, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay
        )
    return torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)


def get_lr_scheduler(args, optimizer, iters_per_epoch):
    """A per-iteration schedule: linear warmup over --warmup-iters (by default the first epoch, at
    most 1000 iterations), then the main one.

    Stepping per iteration keeps multi-step drops exactly at epoch boundaries and lets cosine
    annealing decay smoothly on short schedules.
    """
    warmup_iters = args.warmup_iters or max(1, min(1000, iters_per_epoch - 1))
    warmup = torch.optim.lr_scheduler.LinearLR(
        optimizer, start_factor=0.001, total_iters=warmup_iters
    )
    if args.lr_scheduler == "multisteplr":
        milestones = [max(step * iters_per_epoch - warmup_iters, 0) for step in args.lr_steps]
        main = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=args.lr_gamma)
    else:
        total = max(args.epochs * iters_per_epoch - warmup_iters, 1)
        main = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    return torch.optim.lr_scheduler.SequentialLR(
        optimizer, [warmup, main], milestones=[warmup_iters]
    )


def get_data_loaders(args, dataset, dataset_val):
    """Grouped, sharded training batches; one image per evaluation batch, sharded in order.

    Evaluation takes single images so that results do not depend on how images are batched
    (padding), which keeps distributed and single-process evaluation identical.
    """
    # Own generators: drawing the loaders' worker seeds leaves the global RNG (which RPN and
    # RoI sampling use) where a resumed run expects it.
    loader_options = {
        "num_workers": args.workers,
        "pin_memory": args.device.startswith("cuda"),
        "generator": torch.Generator(),
    }
    val_sampler = (
        torch.utils.data.DistributedSampler(dataset_val, shuffle=False)
        if args.distributed
        else torch.utils.data.SequentialSampler(dataset_val)
    )
    data_loader_val = torch.utils.data.DataLoader(
        dataset_val,
        batch_size=1,
        sampler=val_sampler,
        collate_fn=utils.collate_fn,
        **loader_options,
    )
    if dataset is None:
        return None, data_loader_val
    group_ids = aspect_ratio_group_ids(dataset.aspect_ratios(), args.aspect_ratio_group_factor)
    batch_sampler = GroupedBatchSampler(
        group_ids,
        args.batch_size,
        num_replicas=args.world_size,
        rank=args.rank,
        seed=args.seed,
    )
    data_loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        collate_fn=copy_paste_collate_fn if args.use_copypaste else utils.collate_fn,
        **loader_options,
    )
    return data_loader, data_loader_val


def default_num_classes(dataset):
    return num_classes_of(dataset.category_names(), dataset.label_offset)


def describe_categories(dataset, num_classes):
    """One line for the log: the categories by id and name, and how model labels map to them."""
    names = dataset.category_names()
    shown = ", ".join(f"{i} {name}" for i, name in sorted(names.items())[:20])
    more = f", ... ({len(names)} in all)" if len(names) > 20 else ""
    if dataset.label_offset == 0:
        rule = "model label = category id"
    else:
        rule = f"model label = category id + {dataset.label_offset} (label 0 is background)"
    return f"categories: {shown}{more}; {rule}; {num_classes} classes"


def check_num_classes(num_classes, dataset):
    largest = default_num_classes(dataset) - 1
    if num_classes <= largest:
        raise ConfigError(
            f"--num-classes {num_classes} is too small: category label {largest} needs "
            f"at least {largest + 1} (background included)"
        )


def make_evaluator(args, model, dataset_val, num_classes):
    max_dets = (1, 10, max(100, args.box_detections_per_img))
    return CocoEvaluator(
        dataset_val.coco,
        models.iou_types_of(model),
        max_dets=max_dets,
        label_to_category_id=label_to_category_id(dataset_val.label_offset, num_classes),
    )


def resolve_resume(args):
    """The checkpoint path to resume from: --resume itself, or with 'auto' the output folder's
    checkpoint.pth when there is one (so a re-submitted job continues), else None."""
    if args.resume != "auto":
        return args.resume
    path = os.path.join(args.output_dir, "checkpoint.pth")
    if os.path.isfile(path):
        utils.print_main(f"resuming from {path}")
        return path
    utils.print_main(f"no {path} yet: starting from scratch")
    return None


def load_checkpoint(path, args):
    """A checkpoint of this repo for args.model, or a one-line error saying what it is not."""
    try:
        checkpoint = checkpointing.read_checkpoint(path)
    except CheckpointError as e:
        raise CheckpointError(f"--resume {e.message}") from e
    saved_model = checkpoint["args"].get("model")
    if saved_model != args.model:
        raise CheckpointError(f"--resume {path}: a {saved_model} checkpoint, not {args.model}")
    saved_classes = checkpoint.get("num_classes")
    if args.num_classes is not None and saved_classes != args.num_classes:
        raise CheckpointError(
            f"--resume {path}: trained for {saved_classes} classes, "
            f"--num-classes is {args.num_classes}"
        )
    return checkpoint


def resume_training_state(checkpoint, optimizer, lr_scheduler, scaler, iters_per_epoch):
    """Restores optimizer, scheduler and scaler; returns (epoch, iteration) to continue at.

    A mid-epoch checkpoint (--checkpoint-every, a stop signal) continues inside its epoch.
    """
    optimizer.load_state_dict(checkpoint["optimizer"])
    if "iteration" in checkpoint:
        start = (checkpoint["epoch"], checkpoint["iteration"])
    else:
        start = (checkpoint["epoch"] + 1, 0)
    if checkpoint.get("iters_per_epoch") == iters_per_epoch:
        lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
    elif start[1] > 0:
        raise CheckpointError(
            "a mid-epoch checkpoint resumes only with the world size and batch size "
            f"that wrote it ({checkpoint.get('iters_per_epoch')} iterations per epoch, "
            f"now {iters_per_epoch})"
        )
    else:
        # Another world size or batch size: replay the schedule up to the resumed epoch.
        utils.print_main(
            f"iterations per epoch changed ({checkpoint.get('iters_per_epoch')} -> "
            f"{iters_per_epoch}): learning-rate schedule replayed to epoch {start[0]}"
        )
        for _ in range(start[0] * iters_per_epoch):
            lr_scheduler.step()
    if scaler is not None and "scaler" in checkpoint:
        scaler.load_state_dict(checkpoint["scaler"])
    return start


def check_output_dir(path):
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        raise ConfigError(f"--output-dir {path}: cannot write there ({e.strerror})") from e


def setup(args):
    """Checks the flags, joins the process group, prints the run's settings; returns the device."""
    check_args(args)
    cpu_fallback = args.device is None and not torch.cuda.is_available()
    args.device = utils.device_or_default(args.device)
    if args.sync_bn and not args.device.startswith("cuda"):
        raise ConfigError("--sync-bn needs CUDA devices (SyncBatchNorm has no CPU kernel)")
    check_output_dir(args.output_dir)
    utils.init_distributed_mode(args)
    if cpu_fallback:
        utils.print_main("no CUDA device found: training on the CPU")
    choose_precision(args)
    utils.print_main(f"git revision: {utils.git_revision()}")
    utils.print_main(args)
    if args.use_deterministic_algorithms:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    return torch.device(args.device)


def choose_precision(args):
    """Turns --amp off on a CPU that emulates bfloat16 (unless --force-amp), saying so: there
    float32 is several times faster, and mixed precision brings nothing else on a CPU."""
    on_cpu = torch.device(args.device).type == "cpu"
    if args.amp and on_cpu and not args.force_amp and cpu_emulates_bfloat16():
        utils.print_main(
            "--amp: this CPU has no bfloat16 instructions (AVX512-BF16 or AMX), so bfloat16 "
            "would run several times slower than float32: training in float32 (--force-amp "
            "insists on bfloat16)"
        )
        args.amp = False


def get_datasets(args, checkpoint):
    """Training set (None with --test-only), validation set and the number of classes."""
    saved = checkpoint or {}
    dataset = None if args.test_only else get_dataset(args, "train")
    # Model labels follow the training categories, or those the checkpoint was trained on.
    label_offset = dataset.label_offset if dataset else saved.get("label_offset")
    dataset_val = get_dataset(args, "val", label_offset)
    reference = dataset or dataset_val
    num_classes = args.num_classes or saved.get("num_classes") or default_num_classes(reference)
    check_num_classes(num_classes, reference)
    utils.print_main(describe_categories(reference, num_classes))
    return dataset, dataset_val, num_classes


def build_model(args, num_classes, device, checkpoint):
    """The model on `device`, wrapped in DDP when distributed (the bare model is `.module`)."""
    model = models.get_model(args, num_classes).to(device)
    if args.distributed and args.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
    if not args.distributed:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def evaluate_and_report(args, model, data_loader_val, num_classes, device, board=None):
    """Evaluates, prints AP per category and the DSB score and error summary when asked, writes
    the results files (and the epoch's TensorBoard entries to `board`); returns the stats."""
    dataset_val = data_loader_val.dataset
    bare_model = getattr(model, "module", model)
    evaluator = make_evaluator(args, bare_model, dataset_val, num_classes)
    stats = evaluate(
        models.inference_model(args, model), data_loader_val, device, evaluator, args.amp,
        image_metrics=image_metrics(args),
    )  # fmt: skip
    if "nuclei" in stats:
        stats["nuclei"] = report_nuclei(args, dataset_val, stats["nuclei"])
        stats["dsb"] = stats["nuclei"]["all"]["dsb"]
    if "errors" in stats:
        stats["errors"] = report_errors(args, dataset_val, stats["errors"])
    if utils.is_main_process():
        print(evaluator.per_category_table())
        evaluator.write_results(args.output_dir)
    if board is not None:
        board.log_evaluation(stats, evaluator, getattr(model, "module", model), dataset_val)
    return stats


def image_metrics(args):
    """The per-image metrics evaluation computes: {name: function of (target, output)}."""

    def nuclei(target, output):
        return image_counts(*evaluated_instances(target, output, SCORE_THRESHOLD))

    def errors(target, output):
        return error_analysis.classify(*evaluated_instances(target, output)).counts()

    metrics = {"nuclei": nuclei} if args.dsb_score else {}
    if args.error_analysis:
        metrics["errors"] = errors
    return metrics


def report_nuclei(args, dataset_val, per_image):
    """Prints the nuclei measures overall and per image kind (the image records' "kind", as
    datasets/dsb2018.py writes them) and writes nuclei.csv; returns them by group."""
    images = dataset_val.coco.imgs
    kinds = {image_id: images[image_id].get("kind") for image_id in per_image}
    metrics = nuclei_metrics(per_image, kinds)
    if utils.is_main_process():
        print(f"masks with score >= {SCORE_THRESHOLD}; {format_nuclei_table(metrics)}")
        print(
            f"DSB2018 score (masks with score >= {SCORE_THRESHOLD}, {len(per_image)} images): "
            f"{metrics['all']['dsb']:.4f}"
        )
        names = {image_id: dataset_val.file_name(image_id) for image_id in per_image}
        write_nuclei_csv(os.path.join(args.output_dir, "nuclei.csv"), names, kinds, per_image)
    return metrics


def report_errors(args, dataset_val, per_image):
    """Prints the error summary and writes errors.csv (per image, by file name); returns the
    summary."""
    summary = error_analysis.summarize(list(per_image.values()))
    if utils.is_main_process():
        print(error_analysis.format_summary(summary))
        names = [dataset_val.file_name(image_id) for image_id in per_image]
        path = os.path.join(args.output_dir, "errors.csv")
        error_analysis.write_csv(path, names, list(per_image.values()))
    return summary


def train(args, model, data_loader, num_classes, device, checkpoint, run_evaluation):
    """The epochs: train, save, evaluate, log. Checkpoints are written at epoch ends, every
    --checkpoint-every iterations and on SIGTERM/SIGUSR1 (see checkpointing.Checkpointer); the best
    evaluated epoch is kept as model_best.pth, and --patience ends a run that stopped improving."""
    model_without_ddp = getattr(model, "module", model)
    optimizer = get_optimizer(args, model_without_ddp)
    iters_per_epoch = data_loader.batch_sampler.batches_per_epoch()
    lr_scheduler = get_lr_scheduler(args, optimizer, iters_per_epoch)
    scaler = torch.amp.GradScaler("cuda") if args.amp and device.type == "cuda" else None
    start_epoch, start_iteration = args.start_epoch, 0
    if checkpoint is not None:
        start_epoch, start_iteration = resume_training_state(
            checkpoint, optimizer, lr_scheduler, scaler, iters_per_epoch
        )
        if "rng" in checkpoint:
            checkpointing.set_rng_states(checkpoint["rng"])
    training = {"model": model_without_ddp, "optimizer": optimizer, "lr_scheduler": lr_scheduler}
    training["scaler"] = scaler
    metadata = checkpoint_metadata(args, data_loader.dataset, num_classes, iters_per_epoch)
    log_path = os.path.join(args.output_dir, "log.jsonl")
    best = best_so_far(args, log_path, start_epoch)
    board = tensorboard_log.TrainingBoard(args, iters_per_epoch)
    with checkpointing.StopSignal() as stop, board:
        checkpointer = checkpointing.Checkpointer(
            args.output_dir, training, metadata, iters_per_epoch, stop,
            every=args.checkpoint_every, keep_last=args.keep_last,
        )  # fmt: skip
        for epoch in range(start_epoch, args.epochs):
            stop.exit_if_requested()
            first = start_iteration if epoch == start_epoch else 0
            lr = optimizer.param_groups[0]["lr"]
            train_stats = train_epoch(
                args, model, optimizer, lr_scheduler, data_loader, device, epoch, scaler, first,
                stop, checkpointer, board,
            )  # fmt: skip
            checkpointer.end_of_epoch(epoch)
            record = {"epoch": epoch, "lr": lr, "train": train_stats}
            if evaluates_at(args, epoch):
                record.update(run_evaluation(board=board.at_epoch(epoch)))
                record["best"] = best.update(epoch, metric_value(record, best.name))
                if record["best"]["epoch"] == epoch:
                    checkpointer.keep_as_best()
            utils.append_jsonl(log_path, record)
            if best.exhausted():
                utils.print_main(best.stop_message())
                return


def best_so_far(args, log_path, start_epoch):
    """The --best-metric tracker, with the evaluations a resumed run made before `start_epoch`
    replayed from its log."""
    metric = best_metric_of(args)
    history = [
        (r["epoch"], metric_value(r, metric))
        for r in utils.read_jsonl(log_path)
        if "best" in r and r["epoch"] < start_epoch
    ]
    return checkpointing.BestMetric(metric, args.patience, history)


def evaluates_at(args, epoch):
    return (epoch + 1) % args.eval_every == 0 or epoch == args.epochs - 1


def checkpoint_metadata(args, dataset, num_classes, iters_per_epoch):
    """What a checkpoint holds besides the training state: enough to rebuild the model and map
    its labels back to the data's categories."""
    return {
        "args": vars(args),
        "iters_per_epoch": iters_per_epoch,
        "num_classes": num_classes,
        "category_names": dataset.category_names(),
        "label_offset": dataset.label_offset,
    }


def train_epoch(
    args, model, optimizer, lr_scheduler, data_loader, device, epoch, scaler, first, stop,
    checkpointer, board,
):  # fmt: skip
    """One epoch from its `first` iteration, as engine.train_one_epoch with this run's
    checkpoints, stop signal and TensorBoard."""
    data_loader.dataset.set_epoch(epoch)
    data_loader.batch_sampler.set_epoch(epoch, start_batch=first)
    try:
        return train_one_epoch(
            model, optimizer, lr_scheduler, data_loader, device, epoch, args, scaler,
            start_iteration=first, stop_flag=stop.received_here,
            after_step=functools.partial(checkpointer.after_step, epoch),
            log_step=board.step_logger(epoch),
        )  # fmt: skip
    except NonFiniteLossError as e:
        advice = recipes.non_finite_advice(args, args.world_size)
        causes = f"; likely causes: {'; '.join(advice)}" if advice else ""
        raise NonFiniteLossError(f"{e.message}; earlier checkpoints are intact{causes}") from e


def main(args):
    device = setup(args)
    resume_path = resolve_resume(args)
    checkpoint = load_checkpoint(resume_path, args) if resume_path else None
    seed_run(args, checkpoint)
    dataset, dataset_val, num_classes = get_datasets(args, checkpoint)
    data_loader, data_loader_val = get_data_loaders(args, dataset, dataset_val)
    model = build_model(args, num_classes, device, checkpoint)
    run_evaluation = functools.partial(
        evaluate_and_report, args, model, data_loader_val, num_classes, device
    )
    # The loaders fork their workers from this process. A full garbage collection in a worker
    # writes to every object that exists now, which copies its memory page into the worker: the
    # collector leaves these alone until the end (benchmarks/memory_bench.py measures it).
    gc.collect()
    gc.freeze()
    try:
        if args.test_only:
            record = {"checkpoint": resume_path, "weights": args.weights, **run_evaluation()}
            if checkpoint is not None:
                record["epoch"] = checkpoint["epoch"]
            utils.write_json_on_master(os.path.join(args.output_dir, "eval.json"), record)
        else:
            if utils.is_main_process():
                config = os.path.join(args.output_dir, "config.toml")
                recipes.write_config(args, config, get_args_parser())
            train(args, model, data_loader, num_classes, device, checkpoint, run_evaluation)
    except TrainingStopped as e:
        utils.print_main(e, flush=True)
        utils.destroy_distributed()
        raise
    finally:
        gc.unfreeze()
    utils.destroy_distributed()


def cli(argv=None):
    """train.py as a command: flags from argv over those of a --config recipe, then main();
    errors become one line (after the traceback with --debug), a stop signal exits 128 + its
    number after the checkpoint."""
    with one_line_errors("train.py"):
        args = recipes.parse_args(get_args_parser(), argv)
    with one_line_errors("train.py", debug=args.debug):
        main(args)


if __name__ == "__main__":
    cli()
