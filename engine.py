"""The training and evaluation loops."""

import contextlib
import math

import torch
from torchvision.transforms.v2 import functional as F

import utils
from coco_eval import dsb_score


class NonFiniteLossError(RuntimeError):
    pass


def autocast(device, enabled):
    """Mixed precision: float16 on CUDA (with a GradScaler), bfloat16 on CPU (needs none)."""
    if not enabled:
        return contextlib.nullcontext()
    device_type = torch.device(device).type
    dtype = torch.float16 if device_type == "cuda" else torch.bfloat16
    return torch.amp.autocast(device_type, dtype=dtype)


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
    end_of_step=None,
):
    """One pass over `data_loader`; steps the (per-iteration) scheduler after every optimizer step.

    `start_iteration` numbers the first batch (a resumed epoch); `end_of_step(iterations_done)`
    runs after every step (mid-epoch checkpoints, stop signals). Returns the average of each
    loss over the epoch's iterations and all ranks.
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

        loss_dict_reduced = utils.reduce_dict(loss_dict)
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
        logger.update(lr=optimizer.param_groups[0]["lr"], loss=loss_value, **loss_dict_reduced)
        lr_scheduler.step()
        if end_of_step is not None:
            end_of_step(iteration + 1)
    return {k: v for k, v in logger.global_averages().items() if k != "lr"}


@torch.inference_mode()
def evaluate(
    model, data_loader, device, evaluator, amp=False, print_freq=100, dsb_score_thresh=None
):
    """Runs the model over `data_loader` and returns the evaluator's stats per IoU type.

    With `dsb_score_thresh`, stats["dsb"] is also the DSB2018 score of the predicted masks with
    at least that score, computed image by image so that no mask outlives its batch.
    """
    model.eval()
    logger = utils.MetricLogger()
    dsb_scores = {}
    for images, targets in logger.log_every(data_loader, print_freq, "Test:"):
        images = images_to_device(images, device)
        with autocast(device, amp):
            outputs = model(images)
        # Mixed precision returns half-precision boxes and masks; the evaluator works in float32.
        outputs = [
            {k: v.float() if v.is_floating_point() else v for k, v in o.items()} for o in outputs
        ]
        evaluator.update(
            {target["image_id"]: output for target, output in zip(targets, outputs, strict=True)}
        )
        if dsb_score_thresh is not None:
            for target, output in zip(targets, outputs, strict=True):
                dsb_scores[target["image_id"]] = image_dsb_score(target, output, dsb_score_thresh)
    evaluator.synchronize_between_processes()
    stats = evaluator.evaluate()
    if dsb_score_thresh is not None:
        scores = gather_by_image(dsb_scores)
        stats["dsb"] = sum(scores.values()) / max(len(scores), 1)
        utils.print_main(
            f"DSB2018 score (masks with score >= {dsb_score_thresh}, {len(scores)} images): "
            f"{stats['dsb']:.4f}"
        )
    return stats


def image_dsb_score(target, output, score_thresh):
    """One image's DSB2018 score: its non-empty ground-truth masks against the predicted masks
    scoring at least `score_thresh`, binarised at 0.5 like the COCO evaluation's."""
    truth = target["masks"][(target["masks"].flatten(1) != 0).any(1)]
    predicted = output["masks"][output["scores"] >= score_thresh, 0] > 0.5
    return dsb_score([truth], [predicted])


def gather_by_image(values):
    """Merges {image_id: value} dicts over ranks; an image that two ranks saw counts once."""
    if not utils.is_dist_avail_and_initialized():
        return values
    per_rank = [None] * utils.get_world_size()
    torch.distributed.all_gather_object(per_rank, values)
    return {k: v for rank_values in per_rank for k, v in rank_values.items()}
