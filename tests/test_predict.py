"""predict.py's parts: finding the inputs, keeping detections, numbering label images."""

import numpy as np
import pytest
import torch
from conftest import write_image

import coco_results
import predict
from errors import DataError


def test_inputs_are_image_files_sorted_with_their_names(tmp_path):
    for name in ("b.png", "a.tif", "c.jpg"):
        write_image(tmp_path / name, 8, 8)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "sub").mkdir()
    write_image(tmp_path / "sub" / "d.png", 8, 8)
    names = [name for _, name in predict.list_images(str(tmp_path))]
    assert names == ["a.tif", "b.png", "c.jpg"]
    single = predict.list_images(str(tmp_path / "b.png"))
    assert single == [(str(tmp_path / "b.png"), "b.png")]


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({}, "no image files"),
        ({"a.png": "image", "a.tif": "image"}, "another image has the stem 'a'"),
        ({"x.png": b"\x89PNG not really"}, "x.png: cannot read image"),
    ],
)
def test_bad_inputs_are_errors_naming_the_file(tmp_path, files, expected):
    for name, content in files.items():
        if content == "image":
            write_image(tmp_path / name, 8, 8)
        else:
            (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=expected):
        predict.list_images(str(tmp_path))
    with pytest.raises(DataError, match="no such file or folder"):
        predict.list_images(str(tmp_path / "missing"))


class FixedModel(torch.nn.Module):
    def forward(self, images):
        return [
            {
                "boxes": torch.tensor([[0.0, 0, 2, 2], [1, 1, 3, 3], [2, 2, 4, 4]]),
                "labels": torch.tensor([1, 2, 4]),
                "scores": torch.tensor([0.3, 0.9, 0.6]),
                "masks": torch.ones(3, 1, 4, 4),
            }
        ]


def test_kept_detections_are_sorted_by_score_above_the_threshold_and_of_known_labels():
    image = torch.zeros(3, 4, 4, dtype=torch.uint8)
    kept = predict.predict_image(FixedModel(), image, "cpu", 0.5)
    assert kept["scores"].tolist() == pytest.approx([0.9, 0.6])
    assert kept["labels"].tolist() == [2, 4]
    known = predict.predict_image(FixedModel(), image, "cpu", 0.0, labels=[1, 2])
    assert known["labels"].tolist() == [2, 1]


def test_label_image_numbers_masks_in_order_and_earlier_masks_win_overlaps():
    masks = torch.zeros(3, 4, 5, dtype=torch.bool)
    masks[0, :2, :2] = True
    masks[1, 1:3, 1:3] = True  # overlaps mask 0 at (1, 1)
    masks[2, 3, 4] = True
    labels = predict.instance_labels(masks)
    assert labels[1, 1] == 1 and labels[2, 2] == 2 and labels[3, 4] == 3
    assert labels.unique().tolist() == [0, 1, 2, 3]


def test_label_images_of_tiled_rle_masks_equal_those_of_dense_masks():
    generator = torch.Generator().manual_seed(0)
    probabilities = torch.rand(4, 1, 20, 30, generator=generator) ** 3  # sparse, overlapping
    rles = coco_results.masks_to_rles(probabilities)
    dense = predict.label_image(probabilities, 20, 30)
    assert dense.max() == 4 and np.array_equal(predict.label_image(rles, 20, 30), dense)
    decoded = predict.binary_masks({"masks": rles}, 20, 30)
    assert torch.equal(decoded, probabilities[:, 0] > 0.5)
