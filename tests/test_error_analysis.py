import csv

import numpy as np
import pytest

from error_analysis import (
    COUNT_KEYS,
    KINDS,
    classify,
    format_summary,
    summarize,
    write_csv,
)
from mask_geometry import pairwise_intersections

SIZE = 40


def boxes(*rectangles):
    """[N, SIZE, SIZE] masks, one filled rectangle (y0, x0, y1, x1) each."""
    masks = np.zeros((len(rectangles), SIZE, SIZE), dtype=bool)
    for mask, (y0, x0, y1, x1) in zip(masks, rectangles, strict=True):
        mask[y0:y1, x0:x1] = True
    return masks


A, B, C = (2, 2, 12, 12), (2, 20, 12, 30), (20, 5, 30, 15)


def test_perfect_prediction_is_all_true_positives():
    errors = classify(boxes(A, B, C), boxes(C, A, B))
    counts = errors.counts()
    assert errors.gt_kinds == ("true_positive",) * 3
    assert sorted(errors.matches) == [(0, 1), (1, 2), (2, 0)]
    assert counts["true_positive"] == 3 and counts["missed"] == counts["extra"] == 0
    summary = summarize([counts])
    assert summary["f1_iou50"] == summary["f1_iou70"] == 1.0
    assert summary["rate_true_positive"] == 1.0 and summary["rate_extra"] == 0.0


def test_one_object_missed():
    errors = classify(boxes(A, B, C), boxes(A, C))
    assert errors.gt_kinds == ("true_positive", "missed", "true_positive")
    counts = errors.counts()
    assert (counts["true_positive"], counts["missed"], counts["extra"]) == (2, 1, 0)
    assert (counts["tp_iou50"], counts["fp_iou50"], counts["fn_iou50"]) == (2, 0, 1)
    assert summarize([counts])["f1_iou50"] == pytest.approx(4 / 5)


def test_one_extra_prediction():
    errors = classify(boxes(A, B), boxes(A, B, C))
    assert errors.pred_kinds == ("true_positive", "true_positive", "extra")
    summary = summarize([errors.counts()])
    assert summary["extra"] == 1 and summary["rate_extra"] == pytest.approx(1 / 3)
    assert summary["f1_iou50"] == pytest.approx(4 / 5)


def test_one_object_split_in_two():
    # A 10 x 20 object cut into two 10 x 10 halves; B is found as it is.
    errors = classify(boxes((20, 10, 30, 30), B), boxes((20, 10, 30, 20), (20, 20, 30, 30), B))
    assert errors.gt_kinds == ("split", "true_positive")
    assert errors.pred_kinds == ("split", "split", "true_positive")
    assert errors.splits == {0: [0, 1]}
    counts = errors.counts()
    assert (counts["split_gt"], counts["split_pred"], counts["true_positive"]) == (1, 2, 1)
    # Each half has IoU exactly 0.5, not above it: no match, so F1 = 2 / (2 + 2 + 1).
    assert summarize([counts])["f1_iou50"] == pytest.approx(2 / 5)


def test_split_wins_over_a_match_of_the_larger_piece():
    errors = classify(boxes((20, 10, 30, 30)), boxes((20, 10, 30, 23), (20, 23, 30, 30)))
    assert errors.gt_kinds == ("split",) and errors.pred_kinds == ("split", "split")
    assert errors.counts()["tp_iou50"] == 1 and errors.counts()["tp_iou70"] == 0


def test_a_piece_lies_at_least_half_inside_its_object():
    whole, left = (20, 10, 30, 30), (20, 10, 30, 20)
    # The right piece has 100 of its 160 pixels inside the object: a piece, so a split.
    assert classify(boxes(whole), boxes(left, (20, 20, 30, 36))).gt_kinds == ("split",)
    # With 100 of 300 inside it is not, and one piece alone is no split.
    errors = classify(boxes(whole), boxes(left, (15, 20, 35, 35)))
    assert errors.gt_kinds == ("missed",) and errors.pred_kinds == ("extra", "extra")


def test_small_pieces_that_cover_less_than_half_are_not_a_split():
    errors = classify(boxes((20, 10, 30, 30)), boxes((20, 10, 25, 15), (25, 25, 30, 30)))
    assert errors.gt_kinds == ("missed",) and errors.pred_kinds == ("extra", "extra")


def test_two_objects_merged_into_one():
    errors = classify(boxes((2, 2, 12, 12), (2, 12, 12, 22), C), boxes((2, 2, 12, 22), C))
    assert errors.gt_kinds == ("merged", "merged", "true_positive")
    assert errors.pred_kinds == ("merged", "true_positive")
    assert errors.merges == {0: [0, 1]}
    counts = errors.counts()
    assert (counts["merged_gt"], counts["merged_pred"], counts["true_positive"]) == (2, 1, 1)
    summary = summarize([counts])
    # Each half has IoU 0.5 with the merged prediction: only C matches, F1 = 2 / (2 + 1 + 2).
    assert summary["f1_iou50"] == pytest.approx(2 / 5)
    assert summary["rate_merged"] == pytest.approx(2 / 3)


def test_merge_of_a_large_and_a_small_object_wins_over_their_match():
    # The large object alone has IoU 100 / 120 with the prediction, which also swallows a small one.
    errors = classify(boxes((0, 0, 10, 10), (0, 10, 10, 12)), boxes((0, 0, 10, 12)))
    assert errors.gt_kinds == ("merged", "merged") and errors.pred_kinds == ("merged",)
    assert errors.counts()["tp_iou50"] == 1


def test_f1_at_iou_07_is_stricter():
    # IoU 60 / 100 = 0.6: a match at 0.5, not at 0.7.
    summary = summarize([classify(boxes((0, 0, 10, 10)), boxes((0, 0, 10, 6))).counts()])
    assert summary["f1_iou50"] == 1.0 and summary["f1_iou70"] == 0.0
    assert summary["true_positive"] == 1


def test_image_without_objects():
    errors = classify(np.zeros((0, SIZE, SIZE), bool), np.zeros((0, SIZE, SIZE), bool))
    counts = errors.counts()
    assert set(counts) == set(COUNT_KEYS) and not any(counts.values())
    summary = summarize([counts])
    assert summary["f1_iou50"] == summary["f1_iou70"] == 1.0
    assert summary["rate_missed"] is None and summary["rate_extra"] is None
    assert "F1 at IoU 0.5: 1.0000" in format_summary(summary)


def test_only_ground_truth_or_only_predictions():
    assert classify(boxes(A, B), np.zeros((0, SIZE, SIZE), bool)).gt_kinds == ("missed",) * 2
    assert classify(np.zeros((0, SIZE, SIZE), bool), boxes(A)).pred_kinds == ("extra",)


def test_label_images_give_the_same_classification_as_stacks():
    gt, pred = boxes(A, B, C), boxes((2, 2, 12, 7), (2, 7, 12, 12), (2, 20, 12, 30))
    gt_labels = (gt * np.array([3, 5, 9])[:, None, None]).sum(0)
    pred_labels = (pred * np.array([1, 2, 4])[:, None, None]).sum(0)
    assert classify(gt_labels, pred_labels) == classify(gt, pred)


def random_instances(rng, count, size=64):
    masks = np.zeros((count, size, size), dtype=bool)
    for mask in masks:
        y, x = rng.integers(0, size - 4, 2)
        h, w = rng.integers(3, 16, 2)
        mask[y : y + h, x : x + w] = rng.random((min(h, size - y), min(w, size - x))) < 0.8
    return masks


def test_intersections_equal_the_dense_product():
    rng = np.random.default_rng(0)
    gt, pred = random_instances(rng, 30), random_instances(rng, 25)
    dense = gt.reshape(30, -1).astype(np.int64) @ pred.reshape(25, -1).T.astype(np.int64)
    np.testing.assert_array_equal(pairwise_intersections(gt, pred), dense)


def test_every_object_gets_exactly_one_kind_and_the_counts_add_up():
    rng = np.random.default_rng(1)
    per_image = [
        classify(random_instances(rng, 40), random_instances(rng, 35)).counts() for _ in range(5)
    ]
    for counts in per_image:
        gt_side = ("true_positive", "missed", "split_gt", "merged_gt")
        pred_side = ("true_positive", "extra", "split_pred", "merged_pred")
        assert sum(counts[key] for key in gt_side) == counts["gt"] == 40
        assert sum(counts[key] for key in pred_side) == counts["pred"] == 35
    summary = summarize(per_image)
    rates = [summary[f"rate_{kind}"] for kind in KINDS if kind != "extra"]
    assert sum(rates) == pytest.approx(1.0)


def test_summary_sums_over_images_before_dividing():
    perfect = classify(boxes(A), boxes(A)).counts()
    empty = classify(boxes(A, B, C), np.zeros((0, SIZE, SIZE), bool)).counts()
    summary = summarize([perfect, empty])
    assert summary["images"] == 2 and summary["gt"] == 4 and summary["missed"] == 3
    assert summary["f1_iou50"] == pytest.approx(2 / (2 + 3))
    text = format_summary(summary)
    assert "missed" in text and "0.750 of ground truth" in text


def test_csv_has_one_row_per_image(tmp_path):
    per_image = [classify(boxes(A, B), boxes(A)).counts(), classify(boxes(A), boxes(A)).counts()]
    path = tmp_path / "errors.csv"
    write_csv(path, ["a.png", "b.png"], per_image)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["image"] for row in rows] == ["a.png", "b.png"]
    assert rows[0]["missed"] == "1" and rows[0]["f1_iou50"] == "0.6667"
    assert rows[1]["f1_iou70"] == "1.0000"


def test_different_image_sizes_are_an_error():
    with pytest.raises(ValueError, match="pixels"):
        classify(boxes(A), np.zeros((1, SIZE, SIZE + 1), bool))
