"""The training and evaluation loops: `train_one_epoch` and `evaluate`, for any model that speaks
torchvision's detection interface (losses from `model(images, targets)`, predictions from
`model(images)`)."""

import contextlib
import math

import torch
from torchvision.transforms.v2 import functional as F

import utils
from errors import CommandError


class NonFiniteLossError(CommandError):
    """A loss that is NaN or infinite; the message names the epoch, iteration and losses."""


def autocast(device, enabled):
    """Mixed precision: float16 on CUDA (with a GradScaler), bfloat16 on CPU (needs none)."""
    if not enabled:
        return contextlib.nullcontext()
    device_type = torch.device(device).type
    dtype = torch.float16 if device_type == "cuda" else torch.bfloat16
    return torch.amp.autocast(device_type, dtype=dtype)


def cpu_emulates_bfloat16():
    """Whether this is an x86 CPU without bfloat16 instructions (AVX512-BF16 or AMX). There
    oneDNN emulates bfloat16, and autocast runs several times slower than float32. On other
    architectures it cannot be told, and False is returned."""
    is_x86 = torch.cpu._is_avx2_supported() or torch.cpu._is_avx512_supported()
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return is_x86 and not native


def images_to_device(images, device):
    """Images moved to `device`, then made float in [0, 1] there: the loaders send uint8 (16-bit
    images as float), a quarter of float32's bytes to copy."""
    return [
        F.to_dtype(image.to(device, non_blocking=True), torch.float32, scale=True)
        for image in images
    ]


def to_device(images, targets, device):
    images = images_to_device(images, device)
    targets = [
        {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()}
        for t in targets
    ]
    return images, targets


def train_one_epoch(
    model,
    optimizer,
    lr_scheduler,
    data_loader,
    device,
    epoch,
    args,
    scaler=None,
    start_iteration=0,
    stop_flag=None,
    after_step=None,
    log_step=None,
):
    """One pass over `data_loader`; steps the (per-iteration) scheduler after every optimizer step.

    `start_iteration` numbers the first batch (a resumed epoch). `stop_flag()` says whether this
    rank was asked to stop; it is ORed over the ranks in the loss reduction, and
    `after_step(iterations_done, stopping)` runs after every step with the result (mid-epoch
    checkpoints, stops). Returns the average of each loss over the epoch's iterations and all
    ranks. `log_step(iteration, losses, lr)` sees every step's losses (TensorBoard).
    """
    model.train()
    logger = utils.MetricLogger()
    logger.add_meter("lr", utils.SmoothedValue(window_size=1, fmt="{value:.6f}"))
    header = f"Epoch: [{epoch}]"
    batches = logger.log_every(data_loader, args.print_freq, header)
    for iteration, (images, targets) in enumerate(batches, start=start_iteration):
        images, targets = to_device(images, targets, device)
        with autocast(device, args.amp):
            loss_dict = model(images, targets)
            loss = sum(loss_dict.values())

        flag = stop_flag is not None and stop_flag()
        loss_dict_reduced, stopping = utils.reduce_losses(loss_dict, flag)
        loss_value = sum(loss_dict_reduced.values()).item()
        if not math.isfinite(loss_value):
            values = ", ".join(f"{k}={v.item():.4g}" for k, v in loss_dict_reduced.items())
            raise NonFiniteLossError(
                f"non-finite loss at epoch {epoch}, iteration {iteration}: {values}"
            )

        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        else:
            loss.backward()
        if args.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        lr = optimizer.param_groups[0]["lr"]
        logger.update(lr=lr, loss=loss_value, **loss_dict_reduced)
        if log_step is not None:
            log_step(iteration, {"loss": loss_value, **loss_dict_reduced}, lr)
        lr_scheduler.step()
        if after_step is not None:
            after_step(iteration + 1, stopping)
    return {k: v for k, v in logger.global_averages().items() if k != "lr"}


@torch.inference_mode()
def evaluate(model, data_loader, device, evaluator, amp=False, print_freq=100, image_metrics=None):
    """Runs the model over `data_loader` and returns the evaluator's stats per IoU type.

    `image_metrics` maps names to functions of one image's (target, output), computed image by
    image so that no mask outlives its batch; stats[name] is then {image_id: value} over all
    images (gathered from every rank).
    """
    model.eval()
    logger = utils.MetricLogger()
    image_metrics = image_metrics or {}
    per_image = {name: {} for name in image_metrics}
    for images, targets in logger.log_every(data_loader, print_freq, "Test:"):
        images = images_to_device(images, device)
        with autocast(device, amp):
            outputs = model(images)
        # Mixed precision returns half-precision boxes and masks; the evaluator works in float32.
        outputs = [{k: _float32(v) for k, v in o.items()} for o in outputs]
        evaluator.update(
            {target["image_id"]: output for target, output in zip(targets, outputs, strict=True)}
        )
        for name, metric in image_metrics.items():
            for target, output in zip(targets, outputs, strict=True):
                per_image[name][target["image_id"]] = metric(target, output)
    evaluator.synchronize_between_processes()
    stats = evaluator.evaluate()
    stats.update({name: gather_by_image(values) for name, values in per_image.items()})
    return stats


def _float32(value):
    """Half-precision tensors as float32; anything else (RLE lists of tiled masks) as it is."""
    return value.float() if torch.is_tensor(value) and value.is_floating_point() else value


def gather_by_image(values):
    """Merges {image_id: value} dicts over ranks; an image that two ranks saw counts once."""
    if not utils.is_dist_avail_and_initialized():
        return values
    per_rank = [None] * utils.get_world_size()
    torch.distributed.all_gather_object(per_rank, values)
    return {k: v for rank_values in per_rank for k, v in rank_values.items()}
