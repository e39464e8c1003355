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
import traceback

import numpy as np
import torch
import torchvision
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.ops import FrozenBatchNorm2d

import presets
import utils
from coco_eval import CocoEvaluator
from coco_utils import DataError, get_coco, label_to_category_id, split_paths
from engine import NonFiniteLossError, evaluate, train_one_epoch
from group_by_aspect_ratio import GroupedBatchSampler, aspect_ratio_group_ids
from transforms import copy_paste_collate_fn

# Layers that depend on the number of classes; fine-tuning re-initialises them.
CLASS_DEPENDENT_PREFIXES = ("roi_heads.box_predictor.", "roi_heads.mask_predictor.mask_fcn_logits.")
# --dsb-score counts predicted masks from this score up, the default of predict.py's
# --score-thresh, so the score describes the instances predict.py writes.
DSB_SCORE_THRESH = 0.5


def get_args_parser(add_help=True):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], add_help=add_help)

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
        "--data-augmentation",
        default="hflip",
        choices=presets.DATA_AUGMENTATIONS,
        help="training augmentation recipe",
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

    model = parser.add_argument_group("model")
    model.add_argument("--model", default="maskrcnn_resnet50_fpn", help="torchvision model name")
    model.add_argument(
        "--weights", help="torchvision weights (MaskRCNN_ResNet50_FPN_Weights.COCO_V1) or a file"
    )
    model.add_argument("--weights-backbone", help="torchvision backbone weights name")
    model.add_argument(
        "--num-classes",
        type=int,
        help="classes including background (default: largest category id + 1; 91 for COCO)",
    )
    model.add_argument("--trainable-backbone-layers", type=int, help="0-5; with pretrained weights")
    model.add_argument("--min-size", type=int, help="shorter image side fed to the model (800)")
    model.add_argument("--max-size", type=int, help="longer image side limit (1333)")
    model.add_argument(
        "--box-detections-per-img", default=100, type=int, help="detections kept per image"
    )
    model.add_argument("--rpn-score-thresh", type=float, help="RPN proposal score threshold")
    model.add_argument(
        "--rpn-post-nms-top-n-train", type=int, help="RPN proposals kept in training (2000)"
    )
    model.add_argument(
        "--rpn-post-nms-top-n-test", type=int, help="RPN proposals kept at inference (1000)"
    )
    model.add_argument(
        "--box-batch-size-per-image", type=int, help="RoIs sampled per training image (512)"
    )
    model.add_argument(
        "--box-score-thresh", type=float, help="lowest score of a kept detection (0.05)"
    )
    model.add_argument(
        "--box-nms-thresh",
        type=float,
        help="IoU above which a detection suppresses another (0.5); higher keeps touching objects",
    )
    model.add_argument(
        "--anchor-sizes",
        type=int,
        nargs="+",
        help="RPN anchor size in pixels (of the resized image) for each of the 5 FPN levels "
        "(default 32 64 128 256 512); 8 16 32 64 128 for objects under about 32 px",
    )
    model.add_argument("--sync-bn", action="store_true", help="synchronised BatchNorm under DDP")

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
        help="schedule after the first epoch's linear warmup",
    )
    optim.add_argument(
        "--lr-steps", default=[16, 22], nargs="+", type=int, help="epochs where lr drops"
    )
    optim.add_argument("--lr-gamma", default=0.1, type=float, help="lr factor at each step")
    optim.add_argument(
        "--clip-grad-norm", type=float, help="clip the gradient norm (helps from-scratch runs)"
    )
    optim.add_argument("--amp", action="store_true", help="mixed precision training")

    runtime = parser.add_argument_group("runtime")
    runtime.add_argument("--device", help="cuda when available, else cpu")
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
    runtime.add_argument(
        "--dsb-score",
        action="store_true",
        help="mask models: also report the DSB2018 score of the masks predicted with score "
        f">= {DSB_SCORE_THRESH}",
    )
    runtime.add_argument("--seed", type=int, help="seed for weights, sampling and augmentation")
    runtime.add_argument(
        "--use-deterministic-algorithms", action="store_true", help="reproducible kernels"
    )
    runtime.add_argument(
        "--debug", action="store_true", help="print the traceback behind an error message"
    )

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
    return parser


def check_args(args):
    """Rejects impossible combinations before anything is loaded."""
    problems = []
    if args.use_copypaste and args.data_augmentation != "lsj":
        problems.append("--use-copypaste works only with --data-augmentation lsj")
    for flag in ("batch_size", "epochs", "print_freq", "box_detections_per_img"):
        if getattr(args, flag) < 1:
            problems.append(f"--{flag.replace('_', '-')} must be at least 1")
    if args.lr <= 0:
        problems.append("--lr must be positive")
    if args.workers < 0:
        problems.append("--workers must not be negative")
    for flag in ("keep_last", "checkpoint_every"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            problems.append(f"--{flag.replace('_', '-')} must be at least 1")
    if args.num_classes is not None and args.num_classes < 2:
        problems.append("--num-classes must be at least 2 (background and one class)")
    if args.anchor_sizes and (len(args.anchor_sizes) != 5 or min(args.anchor_sizes) < 1):
        problems.append("--anchor-sizes takes 5 positive sizes, one per FPN level")
    if args.dsb_score and "maskrcnn" not in args.model:
        problems.append("--dsb-score needs a mask model (maskrcnn_*)")
    if problems:
        raise SystemExit("error: " + "; ".join(problems))


def seed_everything(seed):
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
        raise SystemExit(f"error: --data-path {args.data_path}: no such folder")
    if not os.path.isdir(image_dir):
        raise SystemExit(f"error: {image_dir}: no such folder ({split} images)")
    if split == "train":
        transforms = presets.DetectionPresetTrain(
            args.data_augmentation, min_size=args.min_size or 800, max_size=args.max_size or 1333
        )
        # Augmentations draw from per-sample seeds; without --seed, from a fresh one per run.
        sample_seed = args.seed if args.seed is not None else random.randrange(2**31)
    else:
        transforms, sample_seed = presets.DetectionPresetEval(), None
    try:
        dataset = get_coco(args, split, transforms, label_offset, sample_seed)
    except DataError as e:
        raise SystemExit(f"error: {e}") from e
    except OSError as e:  # an image whose size the file leaves out, read from its header
        raise SystemExit(f"error: {ann_file}: {e}") from e
    if len(dataset) == 0:
        usable = " with a usable (non-crowd, non-empty) object" if split == "train" else ""
        raise SystemExit(f"error: {ann_file}: no image{usable} ({split} split)")
    return dataset


def model_kwargs(args):
    """Keyword arguments for the torchvision builder; unset options keep torchvision's defaults."""
    kwargs = {"min_size": args.min_size, "max_size": args.max_size}
    if args.trainable_backbone_layers is not None:
        kwargs["trainable_backbone_layers"] = args.trainable_backbone_layers
    if "rcnn" in args.model:
        kwargs.update(
            box_detections_per_img=args.box_detections_per_img,
            rpn_score_thresh=args.rpn_score_thresh,
            rpn_post_nms_top_n_train=args.rpn_post_nms_top_n_train,
            rpn_post_nms_top_n_test=args.rpn_post_nms_top_n_test,
            box_batch_size_per_image=args.box_batch_size_per_image,
            box_score_thresh=args.box_score_thresh,
            box_nms_thresh=args.box_nms_thresh,
        )
        if args.anchor_sizes:
            kwargs["rpn_anchor_generator"] = AnchorGenerator(
                sizes=tuple((s,) for s in args.anchor_sizes),
                aspect_ratios=((0.5, 1.0, 2.0),) * len(args.anchor_sizes),
            )
    return {k: v for k, v in kwargs.items() if v is not None}


def get_model(args, num_classes):
    """Builds `args.model`; `--weights` may name torchvision weights or a local file."""
    kwargs = model_kwargs(args)
    if args.weights and not os.path.isfile(args.weights):
        try:
            weights = torchvision.models.get_weight(args.weights)
        except (ValueError, KeyError):
            raise SystemExit(
                f"error: --weights {args.weights}: neither a file nor a torchvision weights name"
            ) from None
        model = torchvision.models.get_model(args.model, weights=weights, **kwargs)
        if len(weights.meta["categories"]) != num_classes:
            replace_predictors(model, num_classes)
        return model
    model = torchvision.models.get_model(
        args.model,
        weights=None,
        weights_backbone=args.weights_backbone,
        num_classes=num_classes,
        **kwargs,
    )
    if args.weights:
        load_fitting_weights(model, args.weights)
    return model


def replace_predictors(model, num_classes):
    """Fresh class-dependent layers of an R-CNN model, for fine-tuning to another class count.

    The mask predictor keeps its class-independent upsampling layer (conv5_mask).
    """
    heads = getattr(model, "roi_heads", None)
    if heads is None:
        raise SystemExit("error: fine-tuning to another number of classes needs an R-CNN model")
    heads.box_predictor = FastRCNNPredictor(heads.box_predictor.cls_score.in_features, num_classes)
    replaced = ["roi_heads.box_predictor.cls_score", "roi_heads.box_predictor.bbox_pred"]
    if heads.has_mask():
        logits = torch.nn.Conv2d(heads.mask_predictor.conv5_mask.out_channels, num_classes, 1)
        # MaskRCNNPredictor's initialisation.
        torch.nn.init.kaiming_normal_(logits.weight, mode="fan_out", nonlinearity="relu")
        torch.nn.init.zeros_(logits.bias)
        heads.mask_predictor.mask_fcn_logits = logits
        replaced.append("roi_heads.mask_predictor.mask_fcn_logits")
    print_reinitialised(replaced)


def print_reinitialised(layers):
    utils.print_main(f"re-initialised (class count differs): {', '.join(layers)}")


def freeze_batch_norm(module):
    """Swaps BatchNorm2d layers for FrozenBatchNorm2d, as torchvision builds pretrained models."""
    for name, child in module.named_children():
        if isinstance(child, torch.nn.BatchNorm2d):
            setattr(module, name, FrozenBatchNorm2d(child.num_features, eps=child.eps))
        else:
            freeze_batch_norm(child)


def load_fitting_weights(model, path):
    """Loads a state dict or checkpoint file, re-initialising class-dependent layers that differ.

    Any other difference is an error naming the tensor.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SystemExit(f"error: --weights {path}: not a loadable checkpoint ({e})") from None
    state = state.get("model", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise SystemExit(f"error: --weights {path}: holds no state dict (or 'model' entry)")
    if not any(k.endswith("num_batches_tracked") for k in state):
        freeze_batch_norm(model)  # saved from a model with frozen BatchNorm (pretrained)
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise SystemExit(
            f"error: --weights {path}: not weights of this {type(model).__name__}: "
            f"{len(missing)} tensors missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    reinitialised = []
    for key, value in state.items():
        if value.shape == own[key].shape:
            continue
        if not key.startswith(CLASS_DEPENDENT_PREFIXES):
            raise SystemExit(
                f"error: --weights {path}: tensor {key} has shape {tuple(value.shape)}, "
                f"the model expects {tuple(own[key].shape)}"
            )
        reinitialised.append(key)
    model.load_state_dict({k: v for k, v in state.items() if k not in reinitialised}, strict=False)
    if reinitialised:
        print_reinitialised(list(dict.fromkeys(k.rsplit(".", 1)[0] for k in reinitialised)))


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
    """A per-iteration schedule: linear warmup over (at most) the first epoch, then the main one.

    Stepping per iteration keeps multi-step drops exactly at epoch boundaries and lets cosine
    annealing decay smoothly on short schedules.
    """
    warmup_iters = max(1, min(1000, iters_per_epoch - 1))
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
        seed=args.seed or 0,
    )
    data_loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        collate_fn=copy_paste_collate_fn if args.use_copypaste else utils.collate_fn,
        **loader_options,
    )
    return data_loader, data_loader_val


def default_num_classes(dataset):
    return max(dataset.category_names(), default=0) + dataset.label_offset + 1


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
    largest = max(dataset.category_names(), default=0) + dataset.label_offset
    if num_classes <= largest:
        raise SystemExit(
            f"error: --num-classes {num_classes} is too small: category label {largest} needs "
            f"at least {largest + 1} (background included)"
        )


def iou_types_of(model):
    heads = getattr(model, "roi_heads", None)
    return ["bbox", "segm"] if heads is not None and heads.has_mask() else ["bbox"]


def make_evaluator(args, model, dataset_val, num_classes):
    max_dets = (1, 10, max(100, args.box_detections_per_img))
    return CocoEvaluator(
        dataset_val.coco,
        iou_types_of(model),
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
        checkpoint = utils.read_checkpoint(path)
    except utils.CheckpointError as e:
        raise SystemExit(f"error: --resume {e}") from e
    saved_model = checkpoint["args"].get("model")
    if saved_model != args.model:
        raise SystemExit(f"error: --resume {path}: a {saved_model} checkpoint, not {args.model}")
    saved_classes = checkpoint.get("num_classes")
    if args.num_classes is not None and saved_classes != args.num_classes:
        raise SystemExit(
            f"error: --resume {path}: trained for {saved_classes} classes, "
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
        raise SystemExit(
            "error: a mid-epoch checkpoint resumes only with the world size and batch size "
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
        raise SystemExit(f"error: --output-dir {path}: cannot write there ({e.strerror})") from e


def one_line(error):
    """The message of a DataError, also when a DataLoader worker re-raised it with its trace."""
    return str(error).strip().splitlines()[-1].split("DataError: ", 1)[-1]


def setup(args):
    """Checks the flags, joins the process group, prints the run's settings; returns the device."""
    check_args(args)
    cpu_fallback = args.device is None and not torch.cuda.is_available()
    if args.device is None:
        args.device = "cpu" if cpu_fallback else "cuda"
    if args.sync_bn and not args.device.startswith("cuda"):
        raise SystemExit("error: --sync-bn needs CUDA devices (SyncBatchNorm has no CPU kernel)")
    check_output_dir(args.output_dir)
    utils.init_distributed_mode(args)
    if cpu_fallback:
        utils.print_main("no CUDA device found: training on the CPU")
    utils.print_main(f"git revision: {utils.git_revision()}")
    utils.print_main(args)
    if args.use_deterministic_algorithms:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    if args.seed is not None:
        seed_everything(args.seed + args.rank)
    return torch.device(args.device)


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
    model = get_model(args, num_classes).to(device)
    if args.distributed and args.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
    if not args.distributed:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def evaluate_and_report(args, model, data_loader_val, num_classes, device):
    """Evaluates, prints AP per category and writes the results files; returns the stats."""
    dataset_val = data_loader_val.dataset
    bare_model = getattr(model, "module", model)
    evaluator = make_evaluator(args, bare_model, dataset_val, num_classes)
    dsb_thresh = DSB_SCORE_THRESH if args.dsb_score else None
    stats = evaluate(
        model, data_loader_val, device, evaluator, args.amp, dsb_score_thresh=dsb_thresh
    )
    if utils.is_main_process():
        print(evaluator.per_category_table())
        evaluator.write_results(args.output_dir)
    return stats


def train(args, model, data_loader, num_classes, device, checkpoint, run_evaluation):
    """The epochs: training, checkpoints (at epoch ends, every --checkpoint-every iterations and
    on SIGTERM/SIGUSR1), evaluation and log.jsonl."""
    model_without_ddp = getattr(model, "module", model)
    dataset = data_loader.dataset
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
            utils.set_rng_states(checkpoint["rng"])

    def training_state(epoch, iteration=None):
        state = {
            "model": model_without_ddp.state_dict(),
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": lr_scheduler.state_dict(),
            "epoch": epoch,
            "args": vars(args),
            "iters_per_epoch": iters_per_epoch,
            "num_classes": num_classes,
            "category_names": dataset.category_names(),
            "label_offset": dataset.label_offset,
            "rng": utils.rng_states(),
        }
        if iteration is not None:
            state["iteration"] = iteration
        if scaler is not None:
            state["scaler"] = scaler.state_dict()
        return state

    checkpoint_path = os.path.join(args.output_dir, "checkpoint.pth")
    stop = utils.StopSignal()  # from here on, SIGTERM/SIGUSR1 stop after a checkpoint

    def exit_if_stopped():
        if stop.requested():
            utils.print_main(f"stopped by a signal; exit code {stop.exit_code()}")
            utils.destroy_distributed()
            raise SystemExit(stop.exit_code())

    try:
        for epoch in range(start_epoch, args.epochs):
            exit_if_stopped()

            def end_of_step(done, epoch=epoch):
                every = args.checkpoint_every
                stopping = stop.requested()
                if stopping or (every and done % every == 0 and done < iters_per_epoch):
                    utils.save_on_master(training_state(epoch, done), checkpoint_path)
                if stopping:
                    exit_if_stopped()

            dataset.set_epoch(epoch)
            first = start_iteration if epoch == start_epoch else 0
            data_loader.batch_sampler.set_epoch(epoch, start_batch=first)
            lr = optimizer.param_groups[0]["lr"]
            try:
                train_stats = train_one_epoch(
                    model, optimizer, lr_scheduler, data_loader, device, epoch, args, scaler,
                    start_iteration=first, end_of_step=end_of_step,
                )  # fmt: skip
            except NonFiniteLossError as e:
                raise SystemExit(f"error: {e}; earlier checkpoints are intact") from e
            except DataError as e:
                raise SystemExit(f"error: {one_line(e)}") from e
            utils.save_on_master(training_state(epoch), checkpoint_path)
            utils.link_or_copy_on_master(
                checkpoint_path, os.path.join(args.output_dir, f"model_{epoch}.pth")
            )
            utils.prune_epoch_checkpoints(args.output_dir, args.keep_last)

            record = {"epoch": epoch, "lr": lr, "train": train_stats, **run_evaluation()}
            utils.append_jsonl(os.path.join(args.output_dir, "log.jsonl"), record)
    finally:
        stop.restore()


def main(args):
    device = setup(args)
    resume_path = resolve_resume(args)
    checkpoint = load_checkpoint(resume_path, args) if resume_path else None
    dataset, dataset_val, num_classes = get_datasets(args, checkpoint)
    data_loader, data_loader_val = get_data_loaders(args, dataset, dataset_val)
    model = build_model(args, num_classes, device, checkpoint)
    run_evaluation = functools.partial(
        evaluate_and_report, args, model, data_loader_val, num_classes, device
    )
    # The loaders fork their workers from this process. A full garbage collection in a worker
    # writes to every object that exists now, which copies its memory page into the worker
    # (75 MB each, see benchmarks/memory_bench.py): the collector leaves these alone until the end.
    gc.collect()
    gc.freeze()
    try:
        if args.test_only:
            record = {"checkpoint": resume_path, "weights": args.weights, **run_evaluation()}
            if checkpoint is not None:
                record["epoch"] = checkpoint["epoch"]
            utils.write_json_on_master(os.path.join(args.output_dir, "eval.json"), record)
        else:
            train(args, model, data_loader, num_classes, device, checkpoint, run_evaluation)
    finally:
        gc.unfreeze()
    utils.destroy_distributed()


def run(args):
    """main(args); one-line errors, with the traceback behind them under --debug."""
    try:
        main(args)
    except SystemExit as e:
        if args.debug and isinstance(e.code, str):
            traceback.print_exception(e)
        raise


if __name__ == "__main__":
    run(get_args_parser().parse_args())
