"""Instance-mask metrics on numpy arrays: one-to-one matching at an IoU threshold, and the Data
Science Bowl 2018 score built on it (IoU from mask_geometry.mask_ious).

Masks come as an [K, H, W] stack (K may be 0) or an [H, W] label image (0 is background, each
other value one instance), numpy arrays or anything with a `.numpy()` (torch tensors, read
without importing torch).
"""

import csv
from dataclasses import dataclass

import numpy as np
from pycocotools import mask as mask_util

from mask_geometry import (
    MASK_THRESHOLD,
    SCORE_THRESHOLD,
    instance_stack,
    intersections_from_ious,
    mask_areas,
    mask_ious,
    to_numpy,
)

DSB_IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)


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


def evaluated_dsb_score(target, output, score_thresh=SCORE_THRESHOLD):
    """One evaluated image's DSB2018 score (dsb_image_score) of its predicted masks scoring at
    least `score_thresh` (evaluated_instances)."""
    return dsb_image_score(*evaluated_instances(target, output, score_thresh))


def evaluated_instances(
    target, output, score_thresh=SCORE_THRESHOLD, mask_threshold=MASK_THRESHOLD
):
    """One evaluated image's instances as boolean stacks: its non-empty ground-truth masks, and
    the predicted masks scoring at least `score_thresh` binarised at `mask_threshold` as the COCO
    evaluation binarises them (masks given as RLE by tiled inference are decoded)."""
    truth = instance_stack(target["masks"])
    truth = truth[truth.any(axis=(1, 2))]
    keep = np.flatnonzero(to_numpy(output["scores"]) >= score_thresh)
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


def annotation_rle(segmentation, height, width):
    """A COCO segmentation (polygons, uncompressed or compressed RLE) as one pycocotools RLE."""
    if isinstance(segmentation, list):
        return mask_util.merge(mask_util.frPyObjects(segmentation, height, width))
    if isinstance(segmentation["counts"], list):
        return mask_util.frPyObjects(segmentation, height, width)
    return segmentation


def results_image_counts(dataset, results, score_thresh):
    """{image id: ImageCounts} of every image of a COCO annotation dict, against the results
    (COCO results list with "segmentation") scoring at least `score_thresh`; crowd annotations
    are left out. Masks stay RLEs."""
    images = {image["id"]: image for image in dataset["images"]}
    gt_rles = {image_id: [] for image_id in images}
    pred_rles = {image_id: [] for image_id in images}
    for ann in dataset["annotations"]:
        if not ann.get("iscrowd", 0):
            image = images[ann["image_id"]]
            rle = annotation_rle(ann["segmentation"], image["height"], image["width"])
            gt_rles[ann["image_id"]].append(rle)
    for result in sorted(results, key=lambda r: -r["score"]):
        if result["score"] >= score_thresh:
            pred_rles[result["image_id"]].append(result["segmentation"])
    return {
        image_id: rle_image_counts(gt_rles[image_id], pred_rles[image_id]) for image_id in images
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
