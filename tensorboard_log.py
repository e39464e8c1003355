"""What a run shows in TensorBoard, written with torch.utils.tensorboard's SummaryWriter.

    tensorboard --logdir output        # each run's <output-dir>/tensorboard is one run

Tags, with what their x axis counts:
- `train/<loss name>`, `train/lr`: every iteration (the global step).
- `bbox/AP`, `bbox/AP50`, ..., `segm/ARl` (coco_eval.STAT_NAMES) and `dsb/score`: every epoch's
  evaluation. A stat of -1 (no ground truth of that size) is left out rather than drawn as a
  score.
- `predictions/<k>`: fixed validation image k with its ground truth (left) beside the
  predictions with score >= 0.5 (right), every epoch.
- `pr_<iou_type>_iou0.50/<category>`, `pr_<iou_type>_iou0.50:0.95/<category>`: precision-recall
  curves per category, every epoch, in TensorBoard's PR curves tab.

The PR curves go to that tab (add_pr_curve_raw) rather than into matplotlib figures: it draws
any number of categories, filters them by tag, has a slider over epochs and stores numbers, not
images. COCOeval keeps precision at 101 recall points, not per score threshold, so each curve is
those points: the tab's "threshold" column shows the recall point and its TP/FP/TN/FN columns are
zero. The curves are COCO's interpolated precision at area "all" and the last maxDets, as in
`python plot.py RUN_DIR --pr`.

Every function writes; calling them on the main process only is the caller's job. TrainingBoard
is what train.py calls: it writes on the main process only, and nothing without --tensorboard.
"""

import os

import numpy as np
import torch
from torchvision.transforms.v2 import functional as F

import utils
from coco_eval import STAT_NAMES, precision_curves
from engine import images_to_device
from mask_geometry import MASK_THRESHOLD, SCORE_THRESHOLD
from overlays import boxes_to_masks, draw_instances

GAP = 8  # white pixels between ground truth and prediction


def make_writer(output_dir):
    """A writer whose event files go to <output_dir>/tensorboard, flushed every 30 s for live
    plots."""
    # TensorBoard loads only for the runs that use it.
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=os.path.join(output_dir, "tensorboard"), flush_secs=30)


def log_step(writer, global_step, losses, lr):
    """Each loss (floats or 0-d tensors, by name) and the learning rate of one iteration."""
    for name, value in losses.items():
        writer.add_scalar(f"train/{name}", float(value), global_step)
    writer.add_scalar("train/lr", lr, global_step)


def log_evaluation(writer, epoch, stats):
    """The 12 COCO stats of each IoU type in `stats` ({"bbox": [...], "segm": [...]}) under
    their names, and the DSB score under dsb/score when `stats` has "dsb"."""
    for iou_type in ("bbox", "segm"):
        if iou_type not in stats:
            continue
        for name, value in zip(STAT_NAMES, stats[iou_type], strict=True):
            if value != -1:
                writer.add_scalar(f"{iou_type}/{name}", value, epoch)
    if stats.get("dsb") is not None:
        writer.add_scalar("dsb/score", stats["dsb"], epoch)


@torch.inference_mode()
def predict_samples(model, dataset, indices, device):
    """(images, targets, outputs on the CPU) of `dataset[i]` for i in `indices`.

    `model` must be the bare model, not its DDP wrapper: DDP's forward would wait for the other
    ranks, which do not run this. Its training mode is restored afterwards.
    """
    samples = [dataset[i] for i in indices]
    images, targets = [image for image, _ in samples], [target for _, target in samples]
    was_training = model.training
    model.eval()
    try:
        outputs = model(images_to_device(images, device))
    finally:
        model.train(was_training)
    return images, targets, [{k: v.cpu() for k, v in output.items()} for output in outputs]


def log_predictions(writer, epoch, images, targets, outputs):
    """Image k ([3, H, W], uint8 or float in [0, 1]) with its target's masks beside its
    output's masks (probabilities [N, 1, H, W], or boxes for models without masks) under
    predictions/<k>."""
    for k, (image, target, output) in enumerate(zip(images, targets, outputs, strict=True)):
        writer.add_image(
            f"predictions/{k}", side_by_side(image, target, output), epoch, dataformats="HWC"
        )


def side_by_side(image, target, output):
    """[H', 2 W' + GAP, 3] uint8: ground truth left, predictions with score >= SCORE_THRESHOLD
    right, drawn as predict.py's overlays without captions."""
    image = F.to_dtype(image.cpu(), torch.uint8, scale=True)
    height, width = image.shape[-2:]
    kept = output["scores"].cpu() >= SCORE_THRESHOLD
    if "masks" in output:
        predicted = output["masks"].cpu()[kept, 0] > MASK_THRESHOLD
    else:
        predicted = boxes_to_masks(output["boxes"].cpu()[kept].numpy(), height, width)
    truth = draw_instances(image, target["masks"].cpu().bool(), text="off")
    prediction = draw_instances(image, predicted, text="off")
    gap = np.full((truth.shape[0], GAP, 3), 255, dtype=np.uint8)
    return np.concatenate([truth, gap, prediction], axis=1)


def log_pr_curves(writer, epoch, coco_evals, category_names):
    """PR curves of every category with ground truth, from accumulated COCOeval objects by IoU
    type ({"segm": ..., "bbox": ...}); `category_names` maps category ids to names."""
    for iou_type, accumulated in coco_evals.items():
        recall = np.asarray(accumulated.params.recThrs, dtype=np.float64)
        zeros = np.zeros_like(recall)
        for category_id, curves in precision_curves(accumulated).items():
            name = category_names.get(category_id, str(category_id))
            for iou, precision in zip(("0.50", "0.50:0.95"), curves, strict=True):
                writer.add_pr_curve_raw(
                    f"pr_{iou_type}_iou{iou}/{name}",
                    zeros, zeros, zeros, zeros, precision, recall, epoch,
                    num_thresholds=len(recall),
                )  # fmt: skip


class TrainingBoard:
    """What a run writes to TensorBoard with --tensorboard, on the main process (a no-op
    otherwise): per-iteration losses and learning rate, and per evaluation the COCO stats, the
    DSB score, precision-recall curves and a few validation images beside their ground truth."""

    SAMPLE_IMAGES = 4

    def __init__(self, args, iters_per_epoch):
        self.iters_per_epoch = iters_per_epoch
        self.device = args.device
        self.writer = self.epoch = None
        if args.tensorboard and utils.is_main_process():
            self.writer = make_writer(args.output_dir)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        if self.writer is not None:
            self.writer.close()

    def step_logger(self, epoch):
        """engine.train_one_epoch's log_step for `epoch`, or None."""
        if self.writer is None:
            return None

        def log_iteration(iteration, losses, lr):
            step = epoch * self.iters_per_epoch + iteration
            log_step(self.writer, step, losses, lr)

        return log_iteration

    def at_epoch(self, epoch):
        self.epoch = epoch
        return self

    def log_evaluation(self, stats, evaluator, model, dataset_val):
        if self.writer is None:
            return
        log_evaluation(self.writer, self.epoch, stats)
        names = {i: c["name"] for i, c in dataset_val.coco.cats.items()}
        log_pr_curves(self.writer, self.epoch, evaluator.coco_evals, names)
        indices = range(min(self.SAMPLE_IMAGES, len(dataset_val)))
        samples = predict_samples(model, dataset_val, indices, self.device)
        log_predictions(self.writer, self.epoch, *samples)
