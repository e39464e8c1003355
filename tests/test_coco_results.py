import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util

from coco_results import (
    prediction_records,
    to_coco_results,
    to_detections,
    xyxy_to_xywh,
)
from mask_geometry import compressed_rle, masks_to_rles, uncompressed_rle


def per_mask_encode(masks):
    """The reference: pycocotools' mask.encode of each thresholded mask, one at a time."""
    return [
        mask_util.encode(np.asfortranarray((m[0] > 0.5).numpy().astype(np.uint8))) for m in masks
    ]


@pytest.mark.parametrize(
    "shape", [(7, 1, 48, 61), (6, 1, 16, 64), (5, 1, 1, 9), (5, 1, 9, 1), (1, 1, 1, 1)]
)
def test_masks_to_rles_equals_per_mask_encoding(shape):
    torch.manual_seed(0)
    masks = torch.rand(shape) ** 3  # mostly below the threshold, in runs and specks
    masks[0] = 0  # empty
    if shape[0] > 1:
        masks[1] = 1  # full: RLE starts with an empty run of zeros
    if shape[0] > 2:
        masks[2, 0, -1, -1] = 1  # only the last pixel
    assert masks_to_rles(masks) == per_mask_encode(masks)


def random_masks(case, generator):
    """Foreground confined to some rows (the rows masks_to_rles skips), touching the first or
    last row and column, full masks and NaN, in many small shapes."""
    n, height, width = (int(v) for v in torch.randint(1, 20, (3,), generator=generator))
    masks = torch.rand(n, 1, height, width, generator=generator) ** (1 + case % 6)
    if case % 3 == 0:
        masks[:, :, : height // 2] = 0
    if case % 4 == 0:
        masks[:, :, :, width // 2 :] = 0
    if case % 5 == 0:
        masks[0] = 1
    if case % 7 == 0:
        masks[-1, 0, 0, 0] = float("nan")
    if case % 11 == 0:
        masks[-1, 0, -1] = 1
    return masks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_masks_to_rles_equals_per_mask_encoding_on_random_masks(dtype):
    generator = torch.Generator().manual_seed(0)
    for case in range(150):
        masks = random_masks(case, generator).to(dtype)
        assert masks_to_rles(masks) == per_mask_encode(masks.float()), (case, masks.shape)


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8])
def test_masks_to_rles_takes_binary_masks(dtype):
    generator = torch.Generator().manual_seed(1)
    for case in range(60):
        masks = (random_masks(case, generator) > 0.5).to(dtype)
        assert masks_to_rles(masks) == per_mask_encode(masks.float()), (case, masks.shape)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_masks_to_rles_on_the_gpu_equals_per_mask_encoding():
    generator = torch.Generator().manual_seed(2)
    for case in range(60):
        masks = random_masks(case, generator)
        assert masks_to_rles(masks.cuda()) == per_mask_encode(masks), (case, masks.shape)


def test_masks_to_rles_of_no_masks():
    assert masks_to_rles(torch.zeros(0, 1, 4, 5)) == []


def binary_masks():
    rng = np.random.default_rng(0)
    masks = [rng.random((h, w)) < p for h, w, p in [(7, 5, 0.5), (1, 9, 0.3), (12, 1, 0.7)]]
    full, empty = np.ones((4, 6), bool), np.zeros((4, 6), bool)
    first_only = empty.copy()
    first_only[0, 0] = True
    return [*masks, full, empty, first_only]


@pytest.mark.parametrize("mask", binary_masks())
def test_uncompressed_rle_decodes_to_the_mask(mask):
    rle = uncompressed_rle(mask)
    height, width = mask.shape
    assert rle["size"] == [height, width]
    assert sum(rle["counts"]) == mask.size
    assert (rle["counts"][0] == 0) == bool(mask[0, 0])  # a set first pixel: an empty zero run
    assert all(count > 0 for count in rle["counts"][1:])
    decoded = mask_util.decode(mask_util.frPyObjects(json.loads(json.dumps(rle)), height, width))
    np.testing.assert_array_equal(decoded, mask)


@pytest.mark.parametrize("mask", binary_masks())
def test_compressed_rle_is_mask_encode_with_str_counts(mask):
    rle = compressed_rle(mask)
    expected = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    assert rle == {"size": list(expected["size"]), "counts": expected["counts"].decode()}
    json.dumps(rle)  # what a COCO file holds


def test_xyxy_to_xywh_keeps_the_dtype_and_the_input():
    boxes = torch.tensor([[1.5, 2.0, 4.0, 7.25], [0.5, 0.25, 1.0, 3.0]])
    xywh = xyxy_to_xywh(boxes)
    assert isinstance(xywh, np.ndarray) and xywh.dtype == np.float32
    assert xywh.tolist() == [[1.5, 2.0, 2.5, 5.25], [0.5, 0.25, 0.5, 2.75]]
    assert boxes[0].tolist() == [1.5, 2.0, 4.0, 7.25]
    array = np.array([[10, 20, 15, 30]], dtype=np.float64)
    assert xyxy_to_xywh(array).tolist() == [[10, 20, 5, 10]] and array[0, 2] == 15
    assert xyxy_to_xywh(torch.zeros(0, 4)).shape == (0, 4)


@pytest.fixture
def prediction():
    """Two detections on a 6 x 8 image, the first mask a 2 x 3 block, the second one pixel."""
    masks = torch.zeros(2, 1, 6, 8)
    masks[0, 0, 1:3, 2:5] = 0.9
    masks[1, 0, 4, 7] = 0.6
    masks[1, 0, 0, 0] = 0.5  # not above the threshold
    return {
        "boxes": torch.tensor([[2.0, 1.0, 5.0, 3.0], [7.0, 4.0, 8.0, 5.0]]),
        "scores": torch.tensor([0.87654321, 0.5]),
        "labels": torch.tensor([1, 2]),
        "masks": masks,
    }


def decoded(segmentation):
    return mask_util.decode({**segmentation, "counts": segmentation["counts"].encode()})


def test_to_detections_and_coco_results(prediction):
    detections = to_detections(prediction, {1: 7, 2: 9})
    bbox = to_coco_results(3, detections, "bbox")
    assert [r["category_id"] for r in bbox] == [7, 9]
    assert [r["bbox"] for r in bbox] == [[2, 1, 3, 2], [7, 4, 1, 1]]
    assert [r["image_id"] for r in bbox] == [3, 3]
    assert bbox[0]["score"] == pytest.approx(0.87654321)
    segm = to_coco_results(3, detections, "segm")
    assert [r["category_id"] for r in segm] == [7, 9] and "bbox" not in segm[0]
    for result, mask in zip(segm, prediction["masks"], strict=True):
        assert result["segmentation"]["size"] == [6, 8]
        np.testing.assert_array_equal(decoded(result["segmentation"]), (mask[0] > 0.5).numpy())
    assert decoded(segm[1]["segmentation"]).sum() == 1
    unmapped = to_detections(prediction, with_masks=False)
    assert unmapped.category_ids == [1, 2] and unmapped.mask_counts is None


def test_prediction_records(prediction):
    records = prediction_records(
        prediction, 4, {1: 0, 2: 3}, {0: "cell"}, extra={"file_name": "a/b.png"}
    )
    assert list(records[0]) == [
        "image_id", "file_name", "category_id", "category_name", "bbox", "score", "segmentation",
    ]  # fmt: skip
    assert [r["category_name"] for r in records] == ["cell", "3"]  # no name: the id
    assert [r["file_name"] for r in records] == ["a/b.png"] * 2
    assert records[0]["bbox"] == [2.0, 1.0, 3.0, 2.0] and records[0]["score"] == 0.87654
    np.testing.assert_array_equal(
        decoded(records[1]["segmentation"]), (prediction["masks"][1, 0] > 0.5).numpy()
    )
    json.dumps(records)
    boxes_only = {k: v for k, v in prediction.items() if k != "masks"}
    records = prediction_records(boxes_only, 4)
    assert [r["category_id"] for r in records] == [1, 2] and "segmentation" not in records[0]
    assert list(records[0])[:2] == ["image_id", "category_id"]


def test_prediction_records_round_boxes_and_scores():
    prediction = {
        "boxes": torch.tensor([[0.123456, 1.0, 10.987654, 3.333333]]),
        "scores": torch.tensor([0.123456789]),
        "labels": torch.tensor([1]),
    }
    (record,) = prediction_records(prediction, 1)
    x0, y0, x1, y1 = prediction["boxes"][0].tolist()
    width, height = (prediction["boxes"][0, 2:] - prediction["boxes"][0, :2]).tolist()
    assert record["bbox"] == [round(x0, 2), round(y0, 2), round(width, 2), round(height, 2)]
    assert record["bbox"] == [0.12, 1.0, 10.86, 2.33]
    assert record["score"] == 0.12346


def test_module_imports_no_torch():
    code = "import sys, coco_results; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
