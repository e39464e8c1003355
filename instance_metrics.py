"""Instance-mask metrics on numpy arrays: IoU between two sets of masks, one-to-one matching at
an IoU threshold, and the Data Science Bowl 2018 score built on them.

Masks come as an [K, H, W] stack (K may be 0) or an [H, W] label image (0 is background, each
other value one instance), numpy arrays or anything with a `.numpy()` (torch tensors, read
without importing torch).
"""

import numpy as np

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
    gt, pred = instance_stack(gt), instance_stack(pred)
    if len(gt) == 0 and len(pred) == 0:
        return 1.0
    iou = mask_ious(gt, pred)
    ratios = []
    for threshold in DSB_IOU_THRESHOLDS:
        tp = len(match_one_to_one(iou, threshold))
        ratios.append(tp / (len(gt) + len(pred) - tp))
    return float(np.mean(ratios))


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
        from pycocotools import mask as mask_util  # only tiled outputs need it

        decoded = [mask_util.decode(masks[i]).astype(bool) for i in keep]
        return truth, np.array(decoded, dtype=bool).reshape(len(keep), *truth.shape[1:])
    return truth, instance_stack(masks[:, 0] > mask_threshold)[keep]
