"""Instance-mask metrics on numpy arrays: one-to-one matching at an IoU threshold, and the Data
Science Bowl 2018 score built on it (IoU from mask_geometry.mask_ious).

Masks come as an [K, H, W] stack (K may be 0) or an [H, W] label image (0 is background, each
other value one instance), numpy arrays or anything with a `.numpy()` (torch tensors, read
without importing torch).
"""

import numpy as np
from pycocotools import mask as mask_util

from mask_geometry import MASK_THRESHOLD, SCORE_THRESHOLD, instance_stack, mask_ious, to_numpy

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
    gt, pred = instance_stack(gt), instance_stack(pred)
    if len(gt) == 0 and len(pred) == 0:
        return 1.0
    iou = mask_ious(gt, pred)
    ratios = []
    for threshold in DSB_IOU_THRESHOLDS:
        tp = len(match_one_to_one(iou, threshold))
        ratios.append(tp / (len(gt) + len(pred) - tp))
    return float(np.mean(ratios))


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
