import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_util

import mask_geometry
import tiling
from errors import ConfigError

TESTS = os.path.dirname(os.path.abspath(__file__))


class DiscFinder:
    """A deterministic stand-in for a detection model: each 8-connected blob of pixels whose first
    channel is above 0.5 is an instance, with mask probability 0.9 inside and 0 outside, its
    tight box, score its mean brightness and label 2 when its second channel is dark, else 1.
    Seeing only its input, it cuts objects at a window's edge as a real model does."""

    def __call__(self, images):
        return [self.find(image) for image in images]

    def find(self, image):
        foreground = image[0] > 0.5
        height, width = foreground.shape
        rows, columns = foreground.any(dim=1), foreground.any(dim=0)
        masks = torch.zeros((0, height, width), dtype=torch.bool)
        if rows.any():
            # Components are searched in the box around the bright pixels: windows are mostly dark.
            (y0, y1), (x0, x1) = span(rows), span(columns)
            ids = components(foreground[y0:y1, x0:x1])
            values = ids.unique()
            values = values[values > 0]
            masks = torch.zeros((len(values), height, width), dtype=torch.bool)
            masks[:, y0:y1, x0:x1] = ids[None] == values[:, None, None]
        area = masks.sum(dim=(1, 2)).clamp(min=1)
        score = (masks * image[0]).sum(dim=(1, 2)) / area
        dark = (masks * image[1]).sum(dim=(1, 2)) / area < 0.5
        return {
            "boxes": mask_boxes(masks),
            "labels": torch.where(dark, 2, 1).to(torch.int64),
            "scores": score.float(),
            "masks": 0.9 * masks[:, None].float(),
        }


def span(flags):
    """[first, last + 1) of the True entries of a 1-D boolean tensor with at least one."""
    indices = torch.nonzero(flags)[:, 0]
    return int(indices[0]), int(indices[-1]) + 1


def components(foreground):
    """8-connected components of a [H, W] boolean tensor: per pixel a component id, 0 outside."""
    height, width = foreground.shape
    ids = torch.zeros((height, width), dtype=torch.float64)
    ids[foreground] = torch.arange(1, height * width + 1, dtype=torch.float64).reshape(
        height, width
    )[foreground]
    # Every pixel takes the largest id around it until nothing changes: one id per component.
    while True:
        grown = F.max_pool2d(ids[None, None], 3, stride=1, padding=1)[0, 0] * foreground
        if torch.equal(grown, ids):
            return ids
        ids = grown


def mask_boxes(masks):
    """XYXY boxes of [N, H, W] boolean masks, each with a pixel."""
    rows, columns = masks.any(dim=2), masks.any(dim=1)
    height, width = masks.shape[1:]
    x0 = columns.float().argmax(dim=1)
    x1 = width - columns.flip(1).float().argmax(dim=1)
    y0 = rows.float().argmax(dim=1)
    y1 = height - rows.flip(1).float().argmax(dim=1)
    return torch.stack([x0, y0, x1, y1], dim=1).float()


def disc_image(height, width, discs):
    """A float [3, H, W] image, black but for discs (cy, cx, radius, brightness)."""
    image = torch.zeros(3, height, width)
    yy, xx = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    for cy, cx, radius, brightness in discs:
        image[:, (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = brightness
    return image


def random_discs(rng, height, width, count, radii=(4, 10), margin=1):
    """Up to `count` discs whose masks stay `margin` pixels apart and from the image border."""
    discs = []
    for _ in range(50 * count):
        if len(discs) == count:
            break
        radius = int(rng.integers(*radii))
        cy = int(rng.integers(radius + margin, height - radius - margin))
        cx = int(rng.integers(radius + margin, width - radius - margin))
        if all(
            (cy - y) ** 2 + (cx - x) ** 2 > (radius + r + margin + 2) ** 2 for y, x, r, _ in discs
        ):
            discs.append((cy, cx, radius, float(rng.uniform(0.6, 1.0))))
    return discs


def untiled_masks(image):
    return (DiscFinder()([image])[0]["masks"][:, 0] > 0.5).numpy()


def tiled_masks(result):
    return np.stack([mask_util.decode(rle).astype(bool) for rle in result["masks"]])


def iou_matrix(a, b):
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    inter = a @ b.T
    return inter / (a.sum(1)[:, None] + b.sum(1)[None, :] - inter)


def assert_same_instances(tiled, untiled):
    """One tiled instance per untiled one and the other way round, each pair at IoU >= 0.99."""
    assert len(tiled) == len(untiled)
    iou = iou_matrix(tiled, untiled)
    assert (iou.max(axis=1) >= 0.99).all()
    assert (iou.max(axis=0) >= 0.99).all()
    assert ((iou >= 0.5).sum(axis=1) == 1).all()


@pytest.mark.parametrize(
    "length, tile, overlap",
    [(100, 100, 10), (80, 100, 10), (101, 32, 8), (300, 96, 64), (64, 8, 3)],
)
def test_windows_cover_the_axis_with_the_overlap_and_owned_parts_partition_it(
    length, tile, overlap
):
    spans = tiling.axis_spans(length, tile, overlap)
    assert spans[0][0] == 0 and spans[-1][1] == length
    assert all(stop - start == min(tile, length) for start, stop, _, _ in spans)
    for (_, stop, _, own_stop), (next_start, _, next_own_start, _) in zip(
        spans, spans[1:], strict=False
    ):
        assert stop - next_start >= overlap
        assert own_stop == next_own_start
        assert next_start < own_stop < stop
    assert spans[0][2] == 0 and spans[-1][3] == length


@pytest.mark.parametrize(
    "tile, overlap, batch_size, message",
    [
        (64, 96, 1, "--tile 64 must be larger than --tile-overlap 96"),
        (64, 64, 1, "--tile 64 must be larger than --tile-overlap 64"),
        (0, 0, 1, "--tile 0 must be positive"),
        (64, -1, 1, "--tile-overlap -1 must not be negative"),
        (64, 8, 0, "--tile-batch-size 0 must be positive"),
    ],
)
def test_bad_tiling_arguments_raise_one_line_config_errors(tile, overlap, batch_size, message):
    image = disc_image(32, 32, [])
    with pytest.raises(ConfigError) as error:
        tiling.predict_tiled(DiscFinder(), image, tile, overlap, batch_size)
    assert error.value.message == message


def test_crop_rle_equals_pycocotools_encode_of_the_full_mask():
    rng = np.random.default_rng(0)
    for case in range(300):
        height, width = (int(v) for v in rng.integers(1, 40, 2))
        rows, columns = int(rng.integers(1, height + 1)), int(rng.integers(1, width + 1))
        # A third of the crops span whole columns, where runs continue into the next column.
        top = 0 if case % 3 == 0 else int(rng.integers(0, height - rows + 1))
        rows = height if case % 3 == 0 else rows
        left = int(rng.integers(0, width - columns + 1))
        crop = rng.random((rows, columns)) < rng.choice([0.2, 0.7, 1.0])
        full = np.zeros((height, width), dtype=np.uint8)
        full[top : top + rows, left : left + columns] = crop
        expected = mask_util.encode(np.asfortranarray(full))
        rle = mask_geometry.crop_to_rle(crop, top, left, height, width)
        assert rle["counts"] == expected["counts"] and list(rle["size"]) == [height, width]
        box = sorted(rng.integers(0, height + 1, 2)), sorted(rng.integers(0, width + 1, 2))
        (y0, y1), (x0, x1) = box
        if y0 < y1 and x0 < x1:
            assert np.array_equal(
                mask_geometry.rle_to_crop(expected, y0, x0, y1, x1), full[y0:y1, x0:x1]
            )


@pytest.mark.parametrize("cx", [60, 66, 72, 80, 88, 94, 100])
def test_an_object_crossing_window_edges_is_one_instance_equal_to_the_untiled_one(cx):
    # Windows [0, 96) and [64, 160) along x, split at 80: every disc here is cut by one window.
    image = disc_image(48, 160, [(24, cx, 8, 0.8)])
    result = tiling.predict_tiled(DiscFinder(), image, tile=96, overlap=32)
    assert_same_instances(tiled_masks(result), untiled_masks(image))
    assert result["scores"].tolist() == pytest.approx([0.8])


class PullToCentre(DiscFinder):
    """DiscFinder whose masks move a pixel towards the centre of its input along x: a model that
    segments an object a little differently from either side of a split line."""

    def find(self, image):
        output = super().find(image)
        width = image.shape[-1]
        for n, box in enumerate(output["boxes"].tolist()):
            step = 1 if box[0] + box[2] < width else -1
            output["masks"][n] = output["masks"][n].roll(step, dims=-1)
            output["boxes"][n, [0, 2]] += step
        return output


def test_an_object_on_a_split_line_seen_whole_from_both_sides_is_kept_once():
    # The split between windows [0, 96) and [64, 160) is at x = 80: the two views of this disc
    # lie 2 px apart, their box centres on either side of the split.
    image = disc_image(48, 160, [(24, 80, 8, 0.8)])
    result = tiling.predict_tiled(PullToCentre(), image, tile=96, overlap=32)
    assert len(result["masks"]) == 1
    assert iou_matrix(tiled_masks(result), untiled_masks(image)).item() > 0.8


@pytest.mark.parametrize("batch_size", [1, 3])
def test_an_object_larger_than_the_overlap_and_the_tile_is_joined_from_its_pieces(batch_size):
    image = disc_image(200, 200, [(100, 90, 45, 0.7), (20, 180, 6, 0.9)])
    result = tiling.predict_tiled(DiscFinder(), image, tile=64, overlap=16, batch_size=batch_size)
    assert_same_instances(tiled_masks(result), untiled_masks(image))
    assert result["boxes"][result["scores"].argmin()].tolist() == [45, 55, 136, 146]


def test_a_mosaic_of_four_images_gives_the_instances_of_the_four():
    rng = np.random.default_rng(1)
    images = [disc_image(80, 80, random_discs(rng, 80, 80, 5, margin=2)) for _ in range(4)]
    mosaic = torch.cat([torch.cat(images[:2], dim=2), torch.cat(images[2:], dim=2)], dim=1)
    expected = []
    for k, image in enumerate(images):
        for mask in untiled_masks(image):
            placed = np.zeros((160, 160), dtype=bool)
            placed[80 * (k // 2) : 80 * (k // 2) + 80, 80 * (k % 2) : 80 * (k % 2) + 80] = mask
            expected.append(placed)
    result = tiling.predict_tiled(DiscFinder(), mosaic, tile=48, overlap=24, batch_size=4)
    assert_same_instances(tiled_masks(result), np.stack(expected))


@pytest.mark.slow
def test_no_duplicates_where_windows_overlap():
    rng = np.random.default_rng(2)
    image = disc_image(240, 240, random_discs(rng, 240, 240, 40, radii=(3, 10)))
    result = tiling.predict_tiled(DiscFinder(), image, tile=56, overlap=24, batch_size=8)
    masks = tiled_masks(result)
    assert_same_instances(masks, untiled_masks(image))
    assert masks.sum(axis=0).max() == 1  # no pixel claimed twice
    assert len(result["masks"]) > 30


def test_output_follows_the_model_interface_with_rle_masks():
    rng = np.random.default_rng(3)
    image = disc_image(100, 130, random_discs(rng, 100, 130, 8))
    result = tiling.predict_tiled(DiscFinder(), image, tile=48, overlap=20)
    n = len(result["masks"])
    assert n >= 6
    assert result["boxes"].shape == (n, 4) and result["boxes"].dtype == torch.float32
    assert result["labels"].dtype == torch.int64 and result["labels"].shape == (n,)
    assert result["scores"].dtype == torch.float32
    assert (result["scores"][:-1] >= result["scores"][1:]).all()
    assert all(
        rle["size"] == [100, 130] and isinstance(rle["counts"], bytes) for rle in result["masks"]
    )
    boxes = torch.from_numpy(mask_util.toBbox(result["masks"])).float()
    boxes[:, 2:] += boxes[:, :2]
    assert torch.equal(boxes, result["boxes"])  # the fake model's boxes are its masks' boxes


def test_uint8_and_array_images_give_what_float_ones_give():
    image = disc_image(90, 90, [(40, 45, 12, 0.8), (70, 20, 5, 1.0)])
    as_uint8 = (image * 255).round().to(torch.uint8)
    from_float = tiling.predict_tiled(DiscFinder(), image, tile=40, overlap=16)
    from_uint8 = tiling.predict_tiled(DiscFinder(), as_uint8, tile=40, overlap=16)
    from_array = tiling.predict_tiled(DiscFinder(), as_uint8.numpy(), tile=40, overlap=16)
    assert from_uint8["masks"] == from_float["masks"] == from_array["masks"]
    assert torch.allclose(from_uint8["scores"], from_float["scores"], atol=1e-2)


def test_an_empty_image_gives_empty_outputs():
    result = tiling.predict_tiled(DiscFinder(), torch.zeros(3, 70, 50), tile=32, overlap=8)
    assert result["boxes"].shape == (0, 4) and result["labels"].shape == (0,)
    assert result["masks"] == []


MEMORY_SCRIPT = """
import resource, sys
import numpy as np, torch
sys.path[:0] = [{root!r}, {tests!r}]
import tiling
from test_tiling import DiscFinder

size = 4000
image = torch.zeros(3, size, size, dtype=torch.uint8)
discs = [(300, 300), (1000, 3990), (2040, 2040), (3500, 700), (3999, 3999), (1790, 1790)]
for cy, cx in discs:
    image[:, max(cy - 30, 0) : cy + 30, max(cx - 30, 0) : cx + 30] = 200
tiling.predict_tiled(DiscFinder(), image[:, :600, :600], tile=512, overlap=64)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
result = tiling.predict_tiled(DiscFinder(), image, tile=512, overlap=64, batch_size=4)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(len(result["masks"]), (after - before) * 1024)
"""


@pytest.mark.slow
def test_a_large_image_is_segmented_in_memory_bounded_by_the_window():
    root = os.path.dirname(TESTS)
    script = MEMORY_SCRIPT.format(root=root, tests=TESTS)
    output = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout
    count, grown = (int(v) for v in output.split())
    assert count == 6
    # A single [4000, 4000] float mask takes 64 MB; one for each instance would take 384 MB.
    assert grown < 4000 * 4000 * 4 / 2


@pytest.mark.parametrize(
    ("height", "width", "tile", "overlap"),
    [(500, 700, 128, 32), (300, 300, 100, 70), (100, 900, 128, 0), (64, 64, 128, 16)],
)
def test_windows_that_meet_are_found_from_the_grid(height, width, tile, overlap):
    windows = tiling.make_windows(height, width, tile, overlap)
    expected = {
        (a, b)
        for a, wa in enumerate(windows)
        for b, wb in enumerate(windows)
        if a < b
        and max(wa.top, wb.top) < min(wa.bottom, wb.bottom)
        and max(wa.left, wb.left) < min(wa.right, wb.right)
    }
    found = list(tiling._overlapping_windows(windows))
    assert len(found) == len(set(found)) and set(found) == expected
