import numpy as np
import pytest
import torch

import error_analysis
from overlays import (
    ERROR_COLOURS,
    boxes_to_masks,
    caption_boxes,
    draw_errors,
    draw_instances,
    drawing_scale,
    neighbour_colours,
)


def discs(centres, radius, size):
    """[N, size, size] masks of discs around (y, x) centres, each computed on its own box."""
    masks = np.zeros((len(centres), size, size), dtype=bool)
    for mask, (cy, cx) in zip(masks, centres, strict=True):
        y0, x0 = max(0, int(cy - radius)), max(0, int(cx - radius))
        y1, x1 = min(size, int(cy + radius) + 1), min(size, int(cx + radius) + 1)
        yy, xx = np.mgrid[y0:y1, x0:x1] + 0.5
        mask[y0:y1, x0:x1] = np.hypot(yy - cy, xx - cx) < radius
    return masks


@pytest.fixture(scope="module")
def crowded():
    """300 touching discs of radius 4.5 on a 256 px image, scores descending."""
    rng = np.random.default_rng(0)
    centres = np.empty((0, 2))
    while len(centres) < 300:
        centre = rng.uniform(4, 252, 2)
        if (np.hypot(*(centres - centre).T) >= 8.5).all():
            centres = np.vstack([centres, centre])
    image = rng.integers(0, 60, (256, 256, 3), dtype=np.uint8)
    captions = [f"{score:.2f}" for score in np.sort(rng.uniform(0.5, 1, 300))[::-1]]
    return image, discs(centres, 4.5, 256), captions


def overlaps(a, b):
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_crowded_image_renders_enlarged(crowded):
    image, masks, captions = crowded
    drawn = draw_instances(image, masks, captions)
    assert drawn.shape == (512, 512, 3) and drawn.dtype == np.uint8
    assert not np.array_equal(drawn, image.repeat(2, 0).repeat(2, 1))


def test_auto_captions_overlap_neither_each_other_nor_other_instances(crowded):
    _, masks, captions = crowded
    places = caption_boxes(masks, captions, "auto")
    placed = [(k, p) for k, p in enumerate(places) if p is not None]
    assert 10 < len(placed) < len(captions)
    enlarged = masks.repeat(2, 1).repeat(2, 2)
    for i, (k, (x0, y0, x1, y1)) in enumerate(placed):
        assert 0 <= x0 < x1 <= 512 and 0 <= y0 < y1 <= 512
        others = np.delete(enlarged[:, y0:y1, x0:x1], k, axis=0)
        assert not others.any(), f"caption {k} covers another instance"
        assert not any(overlaps(placed[i][1], other) for _, other in placed[i + 1 :])


def test_text_on_places_every_caption_and_off_none(crowded):
    image, masks, captions = crowded
    assert all(place is not None for place in caption_boxes(masks, captions, "on"))
    assert caption_boxes(masks, captions, "off") == [None] * len(captions)
    without = draw_instances(image, masks, None)
    np.testing.assert_array_equal(draw_instances(image, masks, captions, text="off"), without)
    assert not np.array_equal(draw_instances(image, masks, captions, text="auto"), without)


def test_a_caption_that_fits_is_drawn_in_auto():
    image = np.zeros((100, 100, 3), dtype=np.uint8)
    masks = discs([(50, 50)], 20, 100)
    (place,) = caption_boxes(masks, ["nucleus 0.99"], "auto")
    assert place is not None
    x0, y0, x1, y1 = place
    colour = neighbour_colours([[30, 30, 70, 70]])[0]
    drawn = draw_instances(image, masks, ["nucleus 0.99"], colours=[colour])
    caption = drawn[y0:y1, x0:x1].reshape(-1, 3)
    assert (caption == colour).all(1).mean() > 0.5
    assert (caption == 0).all(1).any(), "no dark text on the light caption background"


def test_small_images_are_enlarged_by_a_whole_factor_nearest_neighbour():
    image = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    drawn = draw_instances(image, None)
    assert drawing_scale(48, 64) == 11 and drawn.shape == (528, 704, 3)
    np.testing.assert_array_equal(drawn, image.repeat(11, 0).repeat(11, 1))
    assert drawing_scale(1024, 2048) == 1 and drawing_scale(10, 5000) == 1
    assert drawing_scale(256, 3000) == 1 and drawing_scale(256, 1000) == 2


def test_tensor_and_array_images_draw_the_same():
    image = np.random.default_rng(1).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    masks = discs([(20, 20), (20, 30)], 6, 50)[:, :40]
    from_tensor = draw_instances(torch.from_numpy(image).permute(2, 0, 1), torch.from_numpy(masks))
    np.testing.assert_array_equal(draw_instances(image, masks), from_tensor)


def test_touching_instances_get_different_colours_and_each_its_own_contour():
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    masks = np.zeros((2, 32, 32), dtype=bool)
    masks[0, 8:24, 4:16], masks[1, 8:24, 16:28] = True, True
    colours = neighbour_colours([[8, 4, 24, 16], [8, 16, 24, 28]])
    assert colours[0] != colours[1]
    drawn = draw_instances(image, masks)
    scale = drawing_scale(32, 32)
    row = 16 * scale
    # The last drawn column of the left instance and the first of the right one.
    assert tuple(drawn[row, 16 * scale - 1]) == colours[0]
    assert tuple(drawn[row, 16 * scale]) == colours[1]


def test_bad_arguments_are_errors():
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="auto, on, off"):
        draw_instances(image, None, text="sometimes")
    with pytest.raises(ValueError, match="uint8"):
        draw_instances(image.astype(np.float32), None)
    with pytest.raises(ValueError, match=r"\[N, 8, 8\]"):
        draw_instances(image, np.zeros((1, 8, 9), dtype=bool))
    with pytest.raises(ValueError, match="captions: 2 given for 1 masks"):
        draw_instances(image, np.ones((1, 8, 8), dtype=bool), ["a", "b"])


def test_boxes_become_masks_with_the_box_as_contour():
    (mask,) = boxes_to_masks([[2, 3, 6, 8]], 10, 10)
    assert mask[3:8, 2:6].all() and mask.sum() == 20


def test_error_overlay_has_a_legend_in_the_kind_colours():
    assert set(ERROR_COLOURS) == set(error_analysis.KINDS)
    size = 64
    gt = discs([(16, 16), (16, 48), (48, 16), (48, 30), (58, 56)], 5, size)
    pred = discs([(16, 16), (40, 56)], 5, size)
    left = np.arange(size) < 48
    pred = np.concatenate([pred, [gt[1] & left, gt[1] & ~left], [gt[2] | gt[3]]])
    errors = error_analysis.classify(gt, pred)
    assert errors.gt_kinds == ("true_positive", "split", "merged", "merged", "missed")
    image = np.full((size, size, 3), 40, dtype=np.uint8)
    drawn = draw_errors(image, gt, pred, errors.gt_kinds, errors.pred_kinds)
    scale = drawing_scale(size, size)
    assert drawn.shape[1] == size * scale and drawn.shape[0] > size * scale
    legend = drawn[size * scale :].reshape(-1, 3)
    for kind, colour in ERROR_COLOURS.items():
        assert (legend == colour).all(1).sum() > 50, f"no {kind} swatch in the legend"
    missed_fill = np.round(0.4 * 40 + 0.6 * np.array(ERROR_COLOURS["missed"]))
    np.testing.assert_array_equal(drawn[58 * scale, 56 * scale], missed_fill)
