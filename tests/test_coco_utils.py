import io
import json
import struct
import zlib

import numpy as np
import pytest
import torch
from conftest import write_coco, write_image
from PIL import Image
from pycocotools import mask as mask_utils
from torchvision.transforms.v2 import functional as F

from coco_utils import (
    CocoDetection,
    DataError,
    PackedRecords,
    annotations_to_target,
    is_file,
    load_image,
    mask_boxes,
    segmentation_to_mask,
)

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


def test_packed_records_give_back_each_record_exactly():
    records = [
        ({"id": 1, "file_name": "a.png", "height": 2}, [{"bbox": [0.1, 2, 3.5e-9, 4]}]),
        ({"id": 2, "file_name": "b/\u00e9.jpg", "extra": None}, []),
        ({"id": 3}, [{"segmentation": {"size": [2, 2], "counts": "04"}, "area": 1}] * 3),
    ]
    packed = PackedRecords(records)
    assert len(packed) == 3
    assert [packed[i] for i in range(3)] == list(packed) == records
    assert isinstance(packed[0][1][0]["bbox"][1], int)  # ints stay ints, floats floats
    assert packed.buffer.dtype == np.uint8 and packed.offsets.dtype == np.int64


def pil_rgb(path):
    with Image.open(path) as image:
        return F.pil_to_tensor(image.convert("RGB"))


@pytest.mark.parametrize(
    ("mode", "fmt", "options"),
    [
        ("RGB", "PNG", {}),
        ("L", "PNG", {}),
        ("RGBA", "PNG", {}),
        ("P", "PNG", {}),
        ("P", "PNG", {"transparency": 3}),
        ("LA", "PNG", {}),
        ("1", "PNG", {}),
        ("RGB", "JPEG", {"subsampling": 2, "quality": 80}),
        ("RGB", "JPEG", {"subsampling": 0, "quality": 95}),
        ("RGB", "JPEG", {"progressive": True}),
        ("L", "JPEG", {}),
        ("CMYK", "JPEG", {}),
    ],
)
def test_8_bit_files_decode_to_the_same_pixels_as_pil(tmp_path, mode, fmt, options):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:37, 0:53]
    pixels = np.stack([xx * 4, yy * 6, (xx + yy) * 3], axis=-1) + rng.integers(0, 40, (37, 53, 3))
    path = tmp_path / f"x.{fmt.lower()}"
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).convert(mode).save(path, fmt, **options)
    image = load_image(path)
    assert image.dtype == torch.uint8 and torch.equal(image, pil_rgb(path))


def write_png_16_bit_rgb(path, pixels):
    """A 48-bit RGB PNG, which PIL cannot write: signature, IHDR, one IDAT, IEND."""

    def chunk(kind, data):
        checksum = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + checksum

    height, width, _ = pixels.shape
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def test_16_bit_rgb_png_reads_as_pil_does(tmp_path):
    # PIL keeps the high byte of each channel; torchvision.io would return uint16.
    path = tmp_path / "x.png"
    write_png_16_bit_rgb(path, np.random.default_rng(0).integers(0, 65535, (9, 7, 3)))
    image = load_image(path)
    assert image.dtype == torch.uint8 and torch.equal(image, pil_rgb(path))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file_is_a_pil_error(tmp_path, fmt):
    path = tmp_path / f"x.{fmt.lower()}"
    buffer = io.BytesIO()
    Image.fromarray(np.full((40, 40, 3), 128, dtype=np.uint8)).save(buffer, fmt)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(OSError):
        load_image(path)


def expected_target(annotations, height, width):
    """The target as the previous implementation built it: one mask at a time, boxes scanned."""
    kept = [a for a in annotations if not a.get("iscrowd", 0)]
    masks = np.stack(
        [segmentation_to_mask(a.get("segmentation"), height, width) for a in kept]
        or [np.zeros((height, width), np.uint8)]
    )[: len(kept)]
    return masks, mask_boxes(masks, kept), [a["category_id"] for a in kept]


@pytest.mark.parametrize("counts", [[2, 3], [2, 3, 1]])
def test_an_uncompressed_rle_shorter_than_its_size_ends_in_background(counts):
    for _ in range(20):  # pycocotools alone leaves the pixels after the last run undefined
        mask = segmentation_to_mask({"size": [8, 8], "counts": counts}, 8, 8)
        assert mask.sum() == 3 and mask.T.reshape(-1)[2:5].all()


def test_targets_equal_one_mask_at_a_time_decoding(demo_root):
    dataset = json.loads((demo_root / "annotations" / "instances_train2017.json").read_text())
    by_image = {}
    for a in dataset["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    size = dataset["images"][0]["height"]
    odd = [
        # An uncompressed RLE with an empty run: pycocotools' box would take a pixel more.
        {"category_id": 1, "segmentation": {"size": [size, size], "counts": [70, 3, 0, 4, 2, 5]}},
        {"category_id": 2, "bbox": [3, 4, 10, 6]},  # box only: an empty mask, the given box
        {"category_id": 1, "segmentation": [[-9, -9, -5, -9, -5, -5]], "bbox": [0, 0, 1, 1]},
        {"category_id": 2, "segmentation": square_polygon(40, 50, 64, 64), "iscrowd": 1},
    ]
    checked = 0
    for annotations in [*by_image.values(), odd, []]:
        target = annotations_to_target(annotations, 7, size, size, label_offset=1)
        masks, boxes, labels = expected_target(annotations, size, size)
        assert torch.equal(target["masks"], torch.from_numpy(masks))
        assert torch.equal(target["boxes"].as_subclass(torch.Tensor), torch.from_numpy(boxes))
        assert target["labels"].tolist() == [label + 1 for label in labels]
        checked += len(labels)
    assert checked > 40


def test_an_rle_shorter_than_its_size_spoils_no_other_mask():
    # The file check stops at such an uncompressed RLE; a compressed one can still be short.
    short = mask_utils.frPyObjects({"size": [H, W], "counts": [H * W]}, H, W)
    short["counts"] = b"52"  # 5 zeros, then 2 ones: 7 of 600 pixels
    annotations = [
        {"category_id": 1, "segmentation": short},
        {"category_id": 1, "segmentation": square_polygon(3, 4, 13, 10)},
    ]
    target = annotations_to_target(annotations, 1, H, W)
    expected = segmentation_to_mask(square_polygon(3, 4, 13, 10), H, W)
    assert torch.equal(target["masks"][1], torch.from_numpy(expected))


def test_rle_counts_must_cover_the_image(tmp_path):
    images = [{"id": 1, "file_name": "a.png", "height": H, "width": W}]
    rle = {"size": [H, W], "counts": [5, 20]}
    annotations = [{"id": 9, "image_id": 1, "category_id": 1, "segmentation": rle}]
    write_image(tmp_path / "a.png", H, W)
    ann_file = write_coco(tmp_path / "ann.json", images, annotations)
    with pytest.raises(DataError, match="annotation 9: RLE counts cover 25 pixels, its size 20x30"):
        CocoDetection(tmp_path, ann_file)


def test_coco_index_is_built_on_first_use_from_the_completed_file(small_dataset):
    dataset = CocoDetection(*small_dataset, drop_images_without_objects=True)
    for i in range(len(dataset)):
        dataset[i]
    assert "coco" not in vars(dataset)  # training never builds pycocotools' index
    images = dataset.coco.dataset["images"]
    assert [image["id"] for image in images] == [1, 2, 3, 4]  # all of them, in the file's order
    assert sorted(dataset.coco.getAnnIds()) == [1, 2, 3, 4, 5]
    assert dataset.coco.dataset["categories"][1]["name"] == "other"


def test_image_file_check_agrees_with_isfile(tmp_path):
    write_image(tmp_path / "a.png", 2, 2)
    write_image(tmp_path / "sub" / "b.png", 2, 2)
    (tmp_path / "folder.png").mkdir()
    listings = {}
    for name, exists in [
        ("a.png", True),
        ("sub/b.png", True),
        ("missing.png", False),
        ("folder.png", False),
        ("nowhere/a.png", False),
    ]:
        assert is_file(str(tmp_path / name), listings) is exists
