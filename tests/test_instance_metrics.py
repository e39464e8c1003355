import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util

from instance_metrics import (
    dsb_score,
    format_nuclei_table,
    image_counts,
    instance_stack,
    mask_ious,
    match_one_to_one,
    nuclei_metrics,
    rle_image_counts,
    summarize_counts,
)


def square(size, top, left, side):
    mask = np.zeros((size, size), dtype=bool)
    mask[top : top + side, left : left + side] = True
    return mask


def test_dsb_score_hand_computed():
    gt = np.stack([square(10, 0, 0, 5)])  # 25 pixels
    inside = square(10, 0, 0, 5) & ~square(10, 0, 0, 3)
    inside[0, :2] = True  # 18 of the 25 pixels: IoU 0.72, a match at 0.50 ... 0.70
    assert dsb_score([gt], [gt]) == 1.0
    assert dsb_score([gt], [inside[None]]) == pytest.approx(0.5)
    assert dsb_score([np.zeros((0, 10, 10))], [np.zeros((0, 10, 10))]) == 1.0
    assert dsb_score([gt], [np.zeros((0, 10, 10))]) == 0.0
    assert dsb_score([np.zeros((0, 10, 10))], [gt]) == 0.0
    assert dsb_score([gt, gt], [gt, inside[None]]) == pytest.approx(0.75)


def test_dsb_score_counts_tp_fp_fn_and_matches_one_to_one():
    a, b = square(12, 0, 0, 4), square(12, 6, 6, 4)
    clutter = square(12, 0, 8, 3)
    # one match, one missed object, two false positives: 1 / (1 + 2 + 1) at every threshold
    assert dsb_score([np.stack([a, b])], [np.stack([a, clutter, square(12, 8, 0, 2)])]) == 0.25
    # two predictions over one object: one true positive, one false positive
    assert dsb_score([a[None]], [np.stack([a, a])]) == 0.5


def test_dsb_score_takes_label_images_and_tensors():
    a, b = square(12, 0, 0, 4), square(12, 6, 6, 4)
    labels = torch.tensor(a * 3 + b * 7)
    assert dsb_score([labels], [np.stack([b, a])]) == 1.0
    assert dsb_score([torch.zeros(12, 12)], [np.zeros((12, 12))]) == 1.0


def test_mask_ious_equal_dense_ious():
    rng = np.random.default_rng(0)
    gt = np.stack([square(20, *rng.integers(0, 15, 2), rng.integers(1, 8)) for _ in range(6)])
    pred = np.stack([square(20, *rng.integers(0, 15, 2), rng.integers(1, 8)) for _ in range(5)])
    pred[0] = False  # an empty prediction
    flat_gt, flat_pred = gt.reshape(6, -1).astype(float), pred.reshape(5, -1).astype(float)
    intersection = flat_gt @ flat_pred.T
    union = flat_gt.sum(1)[:, None] + flat_pred.sum(1) - intersection
    assert np.count_nonzero(intersection) >= 3
    np.testing.assert_array_equal(mask_ious(gt, pred), intersection / union)


def test_mask_ious_take_label_images_and_tensors():
    a, b = square(12, 0, 0, 4), square(12, 6, 6, 4)
    labels = a * 5 + b * 2  # instance 0 is label 2 (b), instance 1 label 5 (a)
    iou = mask_ious(torch.tensor(labels), np.stack([a, b, a | b]))
    np.testing.assert_array_equal(iou, [[0, 1, 0.5], [1, 0, 0.5]])
    assert mask_ious(np.zeros((12, 12), int), np.stack([a])).shape == (0, 1)


def test_instance_stack_orders_instances_by_label():
    labels = np.array([[0, 7, 7], [3, 0, 7]])
    stack = instance_stack(labels)
    assert stack.dtype == bool and stack.shape == (2, 2, 3)
    np.testing.assert_array_equal(stack[0], labels == 3)
    np.testing.assert_array_equal(stack[1], labels == 7)


def test_match_one_to_one_takes_the_highest_iou_first():
    iou = np.array([[0.6, 0.9, 0.0], [0.0, 0.8, 0.55], [0.2, 0.0, 0.0]])
    pairs = match_one_to_one(iou, 0.5)
    # (0, 1) first; then gt 1 cannot take pred 1 and takes pred 2; gt 0 is used; gt 2 is below
    assert pairs.tolist() == [[0, 1], [1, 2]]
    assert match_one_to_one(iou, 0.85).tolist() == [[0, 1]]
    assert match_one_to_one(iou, 0.95).shape == (0, 2)
    assert match_one_to_one(np.zeros((0, 3)), 0.5).shape == (0, 2)


def test_match_one_to_one_is_strictly_above_the_threshold():
    assert match_one_to_one(np.array([[0.5]]), 0.5).shape == (0, 2)
    assert match_one_to_one(np.array([[0.5]]), 0.49).tolist() == [[0, 0]]


def test_module_imports_no_torch():
    code = "import sys, instance_metrics; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def box(top, left, height, width, size=10):
    mask = np.zeros((size, size), dtype=bool)
    mask[top : top + height, left : left + width] = True
    return mask


# Two nuclei of 16 pixels; a prediction shifted by one column (12 shared pixels: IoU 12 / 20 =
# 0.6, a match at IoU 0.50 and 0.55 only), a 4-pixel prediction touching nothing, one nucleus
# missed.
SHIFTED = (
    np.stack([box(0, 0, 4, 4), box(6, 6, 4, 4)]),
    np.stack([box(0, 1, 4, 4), box(0, 8, 2, 2)]),
)
# Two touching 9-pixel nuclei, one 18-pixel prediction over both (IoU 0.5 with each: no match).
MERGED = (np.stack([box(0, 0, 3, 3), box(0, 3, 3, 3)]), box(0, 0, 3, 6)[None])
EMPTY = np.zeros((0, 10, 10), dtype=bool)


def test_nuclei_measures_of_one_image_by_hand():
    measures = summarize_counts([image_counts(*SHIFTED)])
    # TP 1, FP 1, FN 1 at IoU 0.50 and 0.55; TP 0, FP 2, FN 2 above.
    assert measures["dsb"] == pytest.approx((1 / 3 + 1 / 3) / 10)
    assert measures["f1_iou50"] == measures["precision_iou50"] == measures["recall_iou50"] == 0.5
    assert measures["sq"] == pytest.approx(0.6)
    assert measures["rq"] == 0.5
    assert measures["pq"] == pytest.approx(0.3)
    # C = 12; U = 20 (the match) + 16 (the missed nucleus) + 4 (the prediction nobody took).
    assert measures["aji"] == pytest.approx(12 / 40)


def test_aji_counts_a_prediction_over_two_nuclei_once_per_nucleus():
    counts = image_counts(*MERGED)
    assert (counts.aji_intersection, counts.aji_union) == (9 + 9, 18 + 18)
    measures = summarize_counts([counts])
    assert measures["aji"] == 0.5
    assert measures["dsb"] == measures["f1_iou50"] == measures["pq"] == measures["sq"] == 0.0
    assert measures["precision_iou50"] == measures["recall_iou50"] == 0.0


@pytest.mark.parametrize(
    ("gt", "pred", "expected"),
    [
        (
            EMPTY,
            EMPTY,
            dict.fromkeys(
                ["dsb", "f1_iou50", "precision_iou50", "recall_iou50", "pq", "sq", "aji"], 1.0
            ),
        ),
        (
            EMPTY,
            SHIFTED[1],
            {"dsb": 0, "f1_iou50": 0, "precision_iou50": 0, "recall_iou50": 1, "pq": 0, "aji": 0},
        ),
        (
            SHIFTED[0],
            EMPTY,
            {"dsb": 0, "f1_iou50": 0, "precision_iou50": 1, "recall_iou50": 0, "pq": 0, "aji": 0},
        ),
    ],
)
def test_nuclei_measures_of_empty_images(gt, pred, expected):
    measures = summarize_counts([image_counts(gt, pred)])
    assert {name: measures[name] for name in expected} == expected


def test_dsb_averages_images_and_f1_pq_pool_their_counts():
    measures = summarize_counts([image_counts(*SHIFTED), image_counts(*MERGED)])
    # DSB and AJI: the mean of the two images' values.
    assert measures["dsb"] == pytest.approx((1 / 15 + 0) / 2)
    assert measures["aji"] == pytest.approx((0.3 + 0.5) / 2)
    # F1, precision, recall, PQ: TP 1, FP 1 + 1, FN 1 + 2 summed first.
    assert measures["f1_iou50"] == pytest.approx(2 / (2 + 2 + 3))
    assert measures["precision_iou50"] == pytest.approx(1 / 3)
    assert measures["recall_iou50"] == pytest.approx(1 / 4)
    assert measures["pq"] == pytest.approx(0.6 * 2 / 7)
    assert (measures["images"], measures["gt"], measures["pred"]) == (2, 4, 3)
    assert dsb_score([SHIFTED[0], MERGED[0]], [SHIFTED[1], MERGED[1]]) == measures["dsb"]


def rles(masks):
    return [mask_util.encode(np.asfortranarray(m, dtype=np.uint8)) for m in masks]


@pytest.mark.parametrize("case", [SHIFTED, MERGED, (EMPTY, SHIFTED[1]), (SHIFTED[0], EMPTY)])
def test_counts_from_rles_equal_counts_from_masks(case):
    gt, pred = case
    from_rles, from_masks = rle_image_counts(rles(gt), rles(pred)), image_counts(gt, pred)
    assert from_rles.matched_iou == pytest.approx(from_masks.matched_iou)
    assert from_rles.__dict__ | {"matched_iou": 0} == from_masks.__dict__ | {"matched_iou": 0}


def test_nuclei_metrics_per_kind():
    per_image = {1: image_counts(*SHIFTED), 2: image_counts(*MERGED), 3: image_counts(EMPTY, EMPTY)}
    metrics = nuclei_metrics(per_image, {1: "fluorescence", 2: "tissue", 3: None})
    assert list(metrics) == ["all", "fluorescence", "tissue"]
    assert metrics["all"]["images"] == 3
    assert metrics["fluorescence"] == summarize_counts([per_image[1]])
    assert metrics["tissue"]["aji"] == 0.5
    table = format_nuclei_table(metrics)
    assert len(table.splitlines()) == 2 + 3 and "0.5000" in table.splitlines()[-1]
