import numpy as np
import pytest
import torch
from conftest import write_coco, write_image
from pycocotools import mask as mask_utils

from coco_utils import CocoDetection, load_image, segmentation_to_mask

H, W = 20, 30


def square_polygon(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def square_mask(x0, y0, x1, y1):
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


def test_polygon_and_both_rle_forms_decode_to_the_same_mask():
    expected = square_mask(3, 4, 13, 10)
    compressed = mask_utils.encode(np.asfortranarray(expected))
    compressed["counts"] = compressed["counts"].decode()
    flat = expected.flatten(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    counts = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    uncompressed = {"size": [H, W], "counts": counts}
    for segmentation in (square_polygon(3, 4, 13, 10), compressed, uncompressed):
        decoded = segmentation_to_mask(segmentation, H, W)
        assert decoded.shape == (H, W)
        # pycocotools rasterises polygon edges; compare the interior exactly.
        assert (decoded[5:9, 4:12] == 1).all() and decoded.sum() >= expected.sum() - 16
    assert (segmentation_to_mask(compressed, H, W) == expected).all()
    assert (segmentation_to_mask(uncompressed, H, W) == expected).all()


def annotation(ann_id, image_id, bbox, crowd=0, category=1):
    x, y, w, h = bbox
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category,
        "bbox": bbox,
        "area": w * h,
        "iscrowd": crowd,
        "segmentation": square_polygon(x, y, x + w, y + h),
    }


@pytest.fixture
def small_dataset(tmp_path):
    images = [
        {"id": 1, "file_name": "a.png", "height": H, "width": W},
        {"id": 2, "file_name": "sub/b.png", "height": H, "width": W},  # only crowd
        {"id": 3, "file_name": "c.png", "height": H, "width": W},  # no annotation
        {"id": 4, "file_name": "d.png", "height": H, "width": W},  # only degenerate
    ]
    annotations = [
        annotation(1, 1, [2, 3, 10, 6]),
        annotation(2, 1, [15, 5, 8, 8], category=2),
        annotation(3, 1, [0, 0, 30, 20], crowd=1),
        annotation(4, 2, [1, 1, 5, 5], crowd=1),
        annotation(5, 4, [4, 4, 0, 5]),
    ]
    for info in images:
        write_image(tmp_path / "images" / info["file_name"], H, W)
    ann_file = write_coco(tmp_path / "ann.json", images, annotations)
    return tmp_path / "images", ann_file


def test_training_set_drops_images_without_usable_objects(small_dataset):
    image_dir, ann_file = small_dataset
    assert CocoDetection(image_dir, ann_file, drop_images_without_objects=True).ids == [1]
    assert CocoDetection(image_dir, ann_file).ids == [1, 2, 3, 4]


def test_target_leaves_out_crowd_and_matches_annotations(small_dataset):
    image, target = CocoDetection(*small_dataset)[0]
    assert image.shape == (3, H, W) and image.dtype == torch.uint8
    assert target["image_id"] == 1
    assert target["labels"].tolist() == [1, 2]
    assert target["boxes"].tolist() == [[2, 3, 12, 9], [15, 5, 23, 13]]
    assert target["masks"].shape == (2, H, W)
    # Each mask lies inside its box.
    for box, mask in zip(target["boxes"], target["masks"], strict=True):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert xs.min() >= box[0] and xs.max() <= box[2] and ys.min() >= box[1]


def test_image_without_objects_gives_empty_target(small_dataset):
    _, target = CocoDetection(*small_dataset)[2]
    assert target["boxes"].shape == (0, 4)
    assert target["masks"].shape == (0, H, W)
    assert target["labels"].shape == (0,)


def test_degenerate_box_is_dropped_by_the_training_transforms(small_dataset):
    from presets import DetectionPresetTrain

    dataset = CocoDetection(*small_dataset, transforms=DetectionPresetTrain(hflip_prob=0.0))
    _, target = dataset[3]
    assert target["boxes"].shape == (0, 4) and target["masks"].shape[0] == 0


def test_aspect_ratios_come_from_the_annotation_file(small_dataset):
    assert CocoDetection(*small_dataset).aspect_ratios() == [W / H] * 4


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "RGB"])
def test_every_8_bit_mode_becomes_rgb_uint8(tmp_path, mode):
    suffix = "jpg" if mode == "CMYK" else "png"
    image = load_image(write_image(tmp_path / f"x.{suffix}", 9, 7, mode=mode))
    assert image.shape == (3, 9, 7) and image.dtype == torch.uint8


def test_16_bit_grey_is_scaled_between_percentiles(tmp_path):
    image = load_image(write_image(tmp_path / "x.png", 40, 50, mode="I;16"))
    assert image.shape == (3, 40, 50) and image.dtype == torch.float32
    assert image.min() == 0.0 and image.max() == 1.0
    # Only the 0.1% tails on each side are clipped.
    assert 0.995 < ((image[0] > 0) & (image[0] < 1)).float().mean() < 1.0
