"""benchmarks/calibration.py: the reliability table, its ECE and the matching, on known cases."""

import sys
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_util

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import calibration  # noqa: E402


def test_the_table_holds_each_bins_count_mean_score_and_fraction_of_true_positives():
    scores = [0.95, 0.95, 0.95, 0.95, 0.15, 0.15, 1.0]
    hits = [True, True, True, False, False, False, True]
    rows = calibration.reliability_table(scores, hits, bins=10)
    assert [(row.low, row.high, row.count) for row in rows] == [(0.1, 0.2, 2), (0.9, 1.0, 5)]
    assert rows[0].mean_score == pytest.approx(0.15) and rows[0].fraction_tp == 0
    assert rows[1].mean_score == pytest.approx((4 * 0.95 + 1) / 5) and rows[1].fraction_tp == 0.8
    # |0 - 0.15| for 2 detections, |0.8 - 0.96| for 5: (0.3 + 0.8) / 7
    assert calibration.expected_calibration_error(rows) == pytest.approx((0.3 + 0.8) / 7)


def test_a_calibrated_case_has_no_error():
    scores = [0.25] * 4 + [0.75] * 4
    hits = [True, False, False, False, True, True, True, False]
    rows = calibration.reliability_table(scores, hits, bins=4)
    assert calibration.expected_calibration_error(rows) == pytest.approx(0)


def rle(top, left, bottom, right, size=20):
    mask = np.zeros((size, size), dtype=np.uint8, order="F")
    mask[top:bottom, left:right] = 1
    return mask_util.encode(mask)


def test_detections_match_objects_greedily_by_score_one_each_and_crowds_count_neither_way():
    gt = [rle(0, 0, 10, 10), rle(10, 10, 20, 20), rle(0, 10, 10, 20)]
    crowd = [0, 0, 1]
    detections = [
        rle(0, 0, 10, 10),  # object 0
        rle(0, 0, 10, 9),  # object 0 again, lower score: taken
        rle(10, 10, 20, 20),  # object 1, but of another category
        rle(0, 11, 10, 20),  # inside the crowd region
        rle(15, 0, 20, 5),  # nothing
    ]
    hits = calibration.true_positives(
        [0.9, 0.8, 0.7, 0.6, 0.5], [1, 1, 2, 1, 1], detections, [1, 1, 1], gt, crowd, 0.5
    )
    assert hits == [True, False, False, None, False]
