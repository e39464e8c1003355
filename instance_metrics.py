"""Instance-mask metrics on numpy arrays: IoU between two sets of masks, one-to-one matching at
an IoU threshold, and the Data Science Bowl 2018 score built on them.

Masks come as an [K, H, W] stack (K may be 0) or an [H, W] label image (0 is background, each
other value one instance), numpy arrays or anything with a `.numpy()` (torch tensors, read
without importing torch).
"""

import csv
from dataclasses import dataclass

import numpy as np
from pycocotools import mask as mask_util

DSB_IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)


def instance_stack(masks):
    """[K, H, W] boolean masks from a stack or from an [H, W] label image, whose instance k is
    its k-th smallest nonzero label."""
    masks = masks.detach().cpu().numpy() if hasattr(masks, "numpy") else np.asarray(masks)
    if masks.ndim == 2:
        labels = np.unique(masks)
        return masks[None] == labels[labels != 0][:, None, None]
    return masks.astype(bool, copy=False)


def mask_ious(gt, pred):
    """[K, P] IoU of every ground-truth instance (rows) with every predicted one (columns).

    `gt` and `pred` are stacks or label images (see instance_stack) of the same height and width.
    An empty mask has IoU 0 with everything.
    """
    gt, pred = instance_stack(gt), instance_stack(pred)
    # Comparing only masks whose boxes overlap, on the overlap, keeps a few hundred nuclei in a
    # megapixel image cheap; a dense [K, H*W] @ [H*W, P] product would need gigabytes.
    iou = np.zeros((len(gt), len(pred)))
    gt_boxes, pred_boxes = _mask_boxes(gt), _mask_boxes(pred)
    gt_areas, pred_areas = gt.sum((1, 2)), pred.sum((1, 2))
    top_left = np.maximum(gt_boxes[:, None, :2], pred_boxes[None, :, :2])
    bottom_right = np.minimum(gt_boxes[:, None, 2:], pred_boxes[None, :, 2:])
    for g, p in np.argwhere((top_left < bottom_right).all(-1)):
        (y0, x0), (y1, x1) = top_left[g, p], bottom_right[g, p]
        intersection = np.count_nonzero(gt[g, y0:y1, x0:x1] & pred[p, y0:y1, x0:x1])
        iou[g, p] = intersection / (gt_areas[g] + pred_areas[p] - intersection)
    return iou


def _mask_boxes(masks):
    # [N, 4] (y0, x0, y1, x1) with exclusive ends; an empty mask gets an empty box.
    rows, columns = masks.any(2), masks.any(1)
    first_row, first_column = rows.argmax(1), columns.argmax(1)
    end_row = rows.shape[1] - rows[:, ::-1].argmax(1)
    end_column = columns.shape[1] - columns[:, ::-1].argmax(1)
    boxes = np.stack([first_row, first_column, end_row, end_column], 1)
    return np.where(rows.any(1)[:, None], boxes, 0)


def match_one_to_one(iou, threshold):
    """[M, 2] (gt, pred) index pairs with IoU above `threshold`, each index in at most one pair,
    taken greedily from the highest IoU down (ties in row-major order). Above 0.5 a pair is the
    only candidate of both its masks when the masks of each side do not overlap."""
    candidates = np.argwhere(iou > threshold)
    order = np.argsort(-iou[candidates[:, 0], candidates[:, 1]], kind="stable")
    used_gt, used_pred, pairs = set(), set(), []
    for g, p in candidates[order].tolist():
        if g not in used_gt and p not in used_pred:
            used_gt.add(g)
            used_pred.add(p)
            pairs.append((g, p))
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


def dsb_score(gt_masks_per_image, pred_masks_per_image):
    """The Data Science Bowl 2018 score: mean over images of the mean over IoU thresholds
    0.50, 0.55, ..., 0.95 of TP / (TP + FP + FN).

    Each image's masks are a stack or a label image (see instance_stack). A prediction matches a
    ground truth when their IoU exceeds the threshold, one to one (match_one_to_one). An image
    with neither ground truth nor predictions scores 1.0: nothing was there and nothing was found.
    """
    scores = [
        dsb_image_score(gt, pred)
        for gt, pred in zip(gt_masks_per_image, pred_masks_per_image, strict=True)
    ]
    return float(np.mean(scores))


def dsb_image_score(gt, pred):
    """One image's DSB2018 score (see dsb_score)."""
    return image_dsb(image_counts(gt, pred))


def evaluated_instances(target, output, score_thresh, mask_threshold=0.5):
    """One evaluated image's instances as boolean stacks: its non-empty ground-truth masks, and
    the predicted masks scoring at least `score_thresh` binarised at `mask_threshold` as the COCO
    evaluation binarises them (masks given as RLE by tiled inference are decoded)."""
    truth = instance_stack(target["masks"])
    truth = truth[truth.any(axis=(1, 2))]
    scores = output["scores"]
    scores = scores.detach().cpu().numpy() if hasattr(scores, "numpy") else np.asarray(scores)
    keep = np.flatnonzero(scores >= score_thresh)
    masks = output["masks"]
    if isinstance(masks, list):
        decoded = [mask_util.decode(masks[i]).astype(bool) for i in keep]
        return truth, np.array(decoded, dtype=bool).reshape(len(keep), *truth.shape[1:])
    return truth, instance_stack(masks[:, 0] > mask_threshold)[keep]


# The measures nuclei segmentation reports, from one image's counts.
#
# Every image is first reduced to ImageCounts (a few numbers), so evaluating thousands of images
# keeps no mask. The measures, with MATCH_IOU = 0.5 and matches one to one (match_one_to_one):
#
# - dsb: the DSB 2018 score, per image the mean over DSB_IOU_THRESHOLDS of TP / (TP + FP + FN),
#   then the mean over images (dsb_score).
# - precision TP / (TP + FP), recall TP / (TP + FN) and f1 2TP / (2TP + FP + FN) at IoU 0.5,
#   with TP, FP and FN summed over the images before dividing (so dense images weigh more).
# - panoptic quality pq = sq * rq (Kirillov et al. 2019) at IoU 0.5: sq is the mean IoU of the
#   matches, rq = TP / (TP + FP / 2 + FN / 2), which equals f1; summed over images as F1.
# - aji, the aggregated Jaccard index (Kumar et al. 2017): each ground-truth nucleus takes the
#   prediction of highest IoU with it, which may already be taken by another nucleus (a merge
#   then counts once per nucleus); C sums their intersections and U their unions, plus the area
#   of a nucleus no prediction touches and of each prediction no nucleus took; aji = C / U per
#   image, then the mean over images.
#
# A ratio whose denominator is 0 is 1.0: nothing to find and nothing found (an image with no
# nuclei and no predictions scores 1 everywhere, as in dsb_score).

MATCH_IOU = 0.5
NUCLEI_MEASURES = ("dsb", "f1_iou50", "precision_iou50", "recall_iou50", "pq", "sq", "rq", "aji")


@dataclass(frozen=True)
class ImageCounts:
    """What the nuclei measures need of one image: objects on each side, matches at each DSB
    IoU threshold (`tp[0]` at MATCH_IOU), the summed IoU of the MATCH_IOU matches, and the AJI's
    intersection and union in pixels."""

    gt: int
    pred: int
    tp: tuple
    matched_iou: float
    aji_intersection: int
    aji_union: int


def image_counts(gt, pred):
    """ImageCounts of one image's masks: stacks or label images (see instance_stack)."""
    gt, pred = instance_stack(gt), instance_stack(pred)
    if gt.shape[1:] != pred.shape[1:]:
        raise ValueError(f"ground truth is {gt.shape[1:]} pixels, predictions {pred.shape[1:]}")
    return counts_from_ious(mask_ious(gt, pred), mask_areas(gt), mask_areas(pred))


def rle_image_counts(gt_rles, pred_rles):
    """ImageCounts of one image's masks as COCO RLEs (pycocotools format), never decoded."""
    if gt_rles and pred_rles:
        iou = np.asarray(mask_util.iou(gt_rles, pred_rles, [0] * len(pred_rles)), dtype=float)
    else:
        iou = np.zeros((len(gt_rles), len(pred_rles)))
    gt_areas = np.asarray(mask_util.area(gt_rles) if gt_rles else [], dtype=np.int64)
    pred_areas = np.asarray(mask_util.area(pred_rles) if pred_rles else [], dtype=np.int64)
    return counts_from_ious(iou, gt_areas, pred_areas)


def counts_from_ious(iou, gt_areas, pred_areas):
    """ImageCounts from the [K, P] IoU of ground truth (rows) and predictions, and their areas."""
    matches = match_one_to_one(iou, MATCH_IOU)
    intersection, union = aji_sums(iou, gt_areas, pred_areas)
    return ImageCounts(
        gt=len(gt_areas),
        pred=len(pred_areas),
        tp=tuple(len(match_one_to_one(iou, t)) for t in DSB_IOU_THRESHOLDS),
        matched_iou=float(iou[matches[:, 0], matches[:, 1]].sum()),
        aji_intersection=intersection,
        aji_union=union,
    )


def aji_sums(iou, gt_areas, pred_areas):
    """(C, U) of the aggregated Jaccard index, in pixels (see the notes above ImageCounts)."""
    gt_areas, pred_areas = np.asarray(gt_areas), np.asarray(pred_areas)
    if iou.shape[1] == 0:
        return 0, int(gt_areas.sum())
    best = iou.argmax(1)
    rows = np.flatnonzero(iou[np.arange(len(best)), best] > 0)
    best = best[rows]
    inter = intersections_from_ious(iou, gt_areas, pred_areas)[rows, best]
    taken = np.zeros(len(pred_areas), dtype=bool)
    taken[best] = True
    untouched = np.ones(len(gt_areas), dtype=bool)
    untouched[rows] = False
    union = gt_areas[rows] + pred_areas[best] - inter
    extra = gt_areas[untouched].sum() + pred_areas[~taken].sum()
    return int(inter.sum()), int(union.sum() + extra)


def mask_areas(masks):
    return np.count_nonzero(masks, axis=(1, 2))


def intersections_from_ious(iou, gt_areas, pred_areas):
    """[K, P] int64 intersections of masks from their IoU and areas."""
    # IoU = I / (A + B - I) gives I = IoU (A + B) / (1 + IoU); rounding makes it exact again.
    areas = gt_areas[:, None] + pred_areas[None, :]
    return np.rint(iou * areas / (1 + iou)).astype(np.int64)


def f1_score(tp, fp, fn):
    """2TP / (2TP + FP + FN); 1.0 when there is nothing to find and nothing was found."""
    total = 2 * tp + fp + fn
    return 2 * tp / total if total else 1.0


def _ratio(numerator, denominator):
    return numerator / denominator if denominator else 1.0


def image_dsb(counts):
    """One image's DSB 2018 score from its ImageCounts (see dsb_score)."""
    if counts.gt == counts.pred == 0:
        return 1.0
    return float(np.mean([tp / (counts.gt + counts.pred - tp) for tp in counts.tp]))


def summarize_counts(per_image):
    """NUCLEI_MEASURES over a list of ImageCounts (see the notes above ImageCounts), with the
    number of images and the totals of ground truth, predictions and matches at IoU 0.5."""
    tp = sum(c.tp[0] for c in per_image)
    gt, pred = sum(c.gt for c in per_image), sum(c.pred for c in per_image)
    fp, fn = pred - tp, gt - tp
    if tp:
        sq = sum(c.matched_iou for c in per_image) / tp
    else:
        sq = 1.0 if gt == pred == 0 else 0.0
    rq = f1_score(tp, fp, fn)
    dsb = [image_dsb(c) for c in per_image]
    aji = [_ratio(c.aji_intersection, c.aji_union) for c in per_image]
    return {
        "images": len(per_image),
        "gt": gt,
        "pred": pred,
        "tp_iou50": tp,
        "dsb": float(np.mean(dsb)) if per_image else 1.0,
        "f1_iou50": rq,
        "precision_iou50": _ratio(tp, pred),
        "recall_iou50": _ratio(tp, gt),
        "pq": sq * rq,
        "sq": sq,
        "rq": rq,
        "aji": float(np.mean(aji)) if per_image else 1.0,
    }


def nuclei_metrics(per_image, kinds=None):
    """{"all": summarize_counts of every image, <kind>: of that kind's images} for
    `per_image` {image id: ImageCounts} and `kinds` {image id: kind}; an image without a kind
    counts in "all" only."""
    kinds = kinds or {}
    groups = {"all": list(per_image.values())}
    for image_id, counts in per_image.items():
        if kinds.get(image_id) is not None:
            groups.setdefault(kinds[image_id], []).append(counts)
    return {name: summarize_counts(counts) for name, counts in groups.items()}


def format_nuclei_table(metrics):
    """nuclei_metrics as a text table, one row per group of images."""
    header = f"{'images':<14}{'n':>5}{'nuclei':>8}{'pred':>8}"
    header += "".join(f"{name.removesuffix('_iou50'):>10}" for name in NUCLEI_MEASURES)
    lines = ["Nuclei measures (IoU 0.5 for F1, precision, recall and PQ)", header]
    for group, summary in metrics.items():
        row = f"{group:<14}{summary['images']:>5}{summary['gt']:>8}{summary['pred']:>8}"
        lines.append(row + "".join(f"{summary[name]:>10.4f}" for name in NUCLEI_MEASURES))
    return "\n".join(lines)


def write_nuclei_csv(path, names, kinds, per_image):
    """One row per image of `per_image` {image id: ImageCounts}: its name and kind (from the
    {image id: ...} dicts `names` and `kinds`), objects on each side, matches at IoU 0.5 and
    the NUCLEI_MEASURES of that image alone."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "kind", "gt", "pred", "tp_iou50", *NUCLEI_MEASURES])
        for image_id, counts in per_image.items():
            measures = summarize_counts([counts])
            row = [names[image_id], kinds.get(image_id) or "", counts.gt, counts.pred]
            writer.writerow([*row, counts.tp[0], *(f"{measures[m]:.4f}" for m in NUCLEI_MEASURES)])
