import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from instance_metrics import dsb_score, match_one_to_one
from mask_geometry import instance_stack, mask_ious


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
