"""mask_geometry.py: boxes, areas, shared pixels, IoU and RLE against answers worked out by hand
and against pycocotools."""

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util

from mask_geometry import (
    box_overlap,
    compressed_rle,
    crop_rle_counts,
    crop_to_rle,
    instance_stack,
    mask_areas,
    mask_boxes,
    mask_boxes_xyxy,
    mask_ious,
    masks_to_rles,
    pairwise_intersections,
    rle_to_crop,
    shared_pixels,
    to_numpy,
    uncompressed_rle,
)


def rectangle(top, left, bottom, right, size=(8, 10)):
    mask = np.zeros(size, dtype=bool)
    mask[top:bottom, left:right] = True
    return mask


def test_boxes_of_a_hand_drawn_mask_and_an_empty_one():
    drawn = np.zeros((6, 7), dtype=bool)
    drawn[1, 2] = drawn[4, 5] = drawn[3, 3] = True  # rows 1..4, columns 2..5
    masks = np.stack([drawn, np.zeros_like(drawn), np.ones_like(drawn)])
    expected = [[1, 2, 5, 6], [0, 0, 0, 0], [0, 0, 6, 7]]
    assert mask_boxes(masks).tolist() == expected
    assert mask_boxes(torch.from_numpy(masks)).tolist() == expected
    assert mask_boxes_xyxy(masks).tolist() == [[2, 1, 6, 5], [0, 0, 0, 0], [0, 0, 7, 6]]
    assert mask_areas(masks).tolist() == [3, 0, 42]


def test_iou_of_two_rectangles():
    # 4 x 4 and 3 x 5 rectangles sharing rows 2..3 and columns 3..4: 2 x 2 = 4 pixels in common.
    a, b = rectangle(0, 1, 4, 5), rectangle(2, 3, 5, 8)
    assert pairwise_intersections(a[None], b[None]).tolist() == [[4]]
    assert mask_ious(a[None], b[None])[0, 0] == pytest.approx(4 / (16 + 15 - 4))
    assert mask_ious(a[None], a[None])[0, 0] == 1.0


def test_empty_and_apart_masks_have_iou_zero():
    empty, a, far = np.zeros((8, 10), dtype=bool), rectangle(0, 0, 2, 2), rectangle(5, 6, 8, 10)
    assert mask_ious(np.stack([empty, a]), np.stack([empty, far])).tolist() == [[0, 0], [0, 0]]
    assert mask_ious(np.zeros((0, 8, 10), bool), a[None]).shape == (0, 1)


def test_label_image_is_a_stack_in_label_order():
    labels = np.zeros((4, 4), dtype=np.int32)
    labels[0, 0], labels[3, 3] = 7, 2
    stack = instance_stack(labels)
    assert stack.shape == (2, 4, 4) and stack[0, 3, 3] and stack[1, 0, 0]
    assert stack.sum() == 2


def test_shared_pixels_of_crops_at_their_origins():
    # Crop a: rows 2..5, columns 1..4 of the image; crop b: rows 4..7, columns 3..6. They share
    # rows 4..5 and columns 3..4: 4 pixels, all set.
    a, b = np.ones((4, 4), dtype=bool), np.ones((4, 4), dtype=bool)
    box = box_overlap((2, 1, 6, 5), (4, 3, 8, 7))
    assert box == (4, 3, 6, 5)
    assert shared_pixels(a, b, box, (2, 1), (4, 3)) == 4
    assert box_overlap((0, 0, 2, 2), (2, 2, 4, 4)) is None
    assert shared_pixels(a, b, None) == 0


def random_masks(seed, count=6, size=(9, 13)):
    generator = np.random.default_rng(seed)
    masks = generator.random((count, *size)) < 0.4
    masks[0] = False
    masks[1] = True
    masks[2, :, 0] = True  # columns that meet: a run across a column's end
    return masks


@pytest.mark.parametrize("seed", range(3))
def test_rle_round_trip_against_pycocotools(seed):
    masks = random_masks(seed)
    for mask in masks:
        expected = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        rle = crop_to_rle(mask, 0, 0, *mask.shape)
        assert rle == expected
        assert compressed_rle(mask)["counts"] == expected["counts"].decode("ascii")
        assert np.array_equal(mask_util.decode(rle).astype(bool), mask)
        assert np.array_equal(rle_to_crop(rle, 0, 0, *mask.shape), mask)
        assert np.array_equal(rle_to_crop(rle, 2, 3, 7, 11), mask[2:7, 3:11])
    probabilities = torch.from_numpy(masks[:, None].astype(np.float32))
    assert masks_to_rles(probabilities) == [
        mask_util.encode(np.asfortranarray(m.astype(np.uint8))) for m in masks
    ]


def test_a_crop_encodes_as_the_whole_mask_that_holds_it():
    crop = np.array([[1, 0], [1, 1]], dtype=bool)
    full = np.zeros((5, 6), dtype=bool)
    full[3:5, 4:6] = crop
    assert crop_to_rle(crop, 3, 4, 5, 6) == mask_util.encode(np.asfortranarray(full.astype("u1")))


def test_uncompressed_counts_by_hand():
    # Column-major: column 0 is (0, 1, 1), column 1 is (1, 0, 0): runs 0 | 1 1 1 | 0 0.
    mask = np.array([[0, 1], [1, 0], [1, 0]], dtype=bool)
    assert uncompressed_rle(mask) == {"size": [3, 2], "counts": [1, 3, 2]}
    assert uncompressed_rle(~mask)["counts"] == [0, 1, 3, 2]  # starts with an empty run of zeros
    assert uncompressed_rle(np.zeros((2, 2), bool))["counts"] == [4]
    assert crop_rle_counts(np.zeros((0, 0), bool), 0, 0, 2, 2).tolist() == [4]


def test_to_numpy_keeps_dtypes_and_widens_half_floats():
    assert to_numpy(torch.tensor([1, 2])).dtype == np.int64
    assert to_numpy(torch.tensor([True])).dtype == bool
    assert to_numpy(torch.tensor([0.5], dtype=torch.float64)).dtype == np.float64
    half = to_numpy(torch.tensor([0.5], dtype=torch.bfloat16))
    assert half.dtype == np.float32 and half[0] == 0.5
    assert to_numpy([1.0, 2.0]).tolist() == [1.0, 2.0]
