import numpy as np
import pytest
import torch
from test_tiling import DiscFinder, disc_image, iou_matrix, random_discs

import tiling
import tta
from errors import ConfigError


class TopLeftOnly(DiscFinder):
    """DiscFinder that reports only objects whose box centre lies in the top-left quarter of its
    input: a model that is not flip-equivariant."""

    def find(self, image):
        output = super().find(image)
        height, width = image.shape[-2:]
        boxes = output["boxes"]
        keep = ((boxes[:, 0] + boxes[:, 2]) / 2 <= width / 2) & (
            (boxes[:, 1] + boxes[:, 3]) / 2 <= height / 2
        )
        return {key: value[keep] for key, value in output.items()}


def binary(output):
    return (output["masks"][:, 0] > 0.5).numpy()


def assert_same_masks(a, b):
    assert len(a) == len(b)
    iou = iou_matrix(a, b)
    assert (iou.max(axis=1) == 1).all() and (iou.max(axis=0) == 1).all()


@pytest.fixture
def image():
    return disc_image(72, 90, random_discs(np.random.default_rng(0), 72, 90, 6, radii=(4, 9)))


@pytest.mark.parametrize("flip", list(tta.FLIPS))
def test_undoing_a_view_maps_detections_back_onto_the_image(image, flip):
    model = DiscFinder()
    expected = model([image])[0]
    output = model([tta.view_image(image, flip)])[0]
    undone = tta.undo_view(output, flip, image.shape[-2:])
    assert_same_masks(binary(undone), binary(expected))
    order = [int(np.argmax(row)) for row in iou_matrix(binary(undone), binary(expected))]
    assert torch.equal(undone["boxes"], expected["boxes"][order])


def test_tta_of_a_flip_equivariant_model_gives_the_model_s_instances(image):
    model = DiscFinder()
    expected = model([image])[0]
    merged = tta.TTA(model)([image])[0]
    assert_same_masks(binary(merged), binary(expected))
    assert torch.allclose(merged["scores"], expected["scores"].sort(descending=True).values)
    assert torch.allclose(
        merged["masks"].amax(dim=(1, 2, 3)), torch.full((len(expected["scores"]),), 0.9)
    )


def test_rescaled_views_find_the_same_objects(image):
    model = DiscFinder()
    expected = binary(model([image])[0])
    merged = binary(tta.TTA(model, flips=("none", "h"), scales=(1.0, 0.5, 1.5))([image])[0])
    assert len(merged) == len(expected)
    assert (iou_matrix(merged, expected).max(axis=1) > 0.8).all()


def test_an_object_found_in_one_view_of_four_scores_a_quarter_and_keeps_its_mask():
    # In a 65 px square image a disc at (32, 32) has its box centre on both middle lines, so every
    # flipped view finds it; the one in the top-left corner is found by the unflipped view only.
    image = disc_image(65, 65, [(32, 32, 6, 0.6), (10, 12, 5, 1.0)])
    expected = DiscFinder()([image])[0]
    merged = tta.TTA(TopLeftOnly())([image])[0]
    assert merged["scores"].tolist() == pytest.approx([0.6, 0.25])
    assert_same_masks(binary(merged), binary(expected))
    assert merged["masks"].amax().item() == pytest.approx(0.9)


def square(top, left, size=10, height=40, width=40, value=0.8):
    mask = torch.zeros(1, height, width)
    mask[0, top : top + size, left : left + size] = value
    return mask


def view_output(masks, scores, label=1):
    masks = torch.stack(masks)
    binary_masks = masks[:, 0] > 0.5
    return {
        "boxes": torch.stack([torch.tensor(box) for box in map(mask_box, binary_masks)]).float(),
        "labels": torch.full((len(masks),), label, dtype=torch.int64),
        "scores": torch.tensor(scores),
        "masks": masks,
    }


def mask_box(mask):
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def test_detections_of_different_views_cluster_by_mask_iou():
    views = [
        view_output([square(0, 0)], [0.9]),
        view_output([square(0, 2, value=0.6)], [0.6]),  # IoU 80 / 120 with the first: merged
        view_output([square(0, 6), square(20, 20)], [0.3, 0.3]),  # IoU 40 / 160: apart
    ]
    merged = tta.merge_views(views)
    assert merged["scores"].tolist() == pytest.approx([0.5, 0.1, 0.1])
    first = merged["masks"][0, 0]
    # The mean over the two views that found it: 0.8 and 0.6 where both masks hold the pixel.
    assert first[0, 5].item() == pytest.approx(0.7)
    assert first[0, 0].item() == pytest.approx(0.4) and first[0, 11].item() == pytest.approx(0.3)
    assert merged["boxes"][0].tolist() == [1, 0, 11, 10]


def test_a_cluster_holds_one_detection_per_view_and_one_label():
    twice = view_output([square(0, 0), square(0, 0)], [0.9, 0.8])
    other_label = view_output([square(0, 0)], [0.7], label=2)
    merged = tta.merge_views([twice, twice, other_label])
    assert merged["scores"].tolist() == pytest.approx([0.6, 0.8 * 2 / 3, 0.7 / 3])
    assert merged["labels"].tolist() == [1, 1, 2]


def test_output_has_the_model_interface(image):
    outputs = tta.TTA(DiscFinder())([image, torch.zeros(3, 30, 20)])
    found, empty = outputs
    n = len(found["scores"])
    assert n == 6
    assert found["boxes"].shape == (n, 4) and found["boxes"].dtype == torch.float32
    assert found["labels"].shape == (n,) and found["labels"].dtype == torch.int64
    assert found["scores"].dtype == torch.float32
    assert (found["scores"][:-1] >= found["scores"][1:]).all()
    assert found["masks"].shape == (n, 1, 72, 90) and found["masks"].dtype == torch.float32
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, 1, 30, 20)
    assert empty["labels"].dtype == torch.int64


def test_tta_wraps_a_model_for_tiled_inference(image):
    plain = tiling.predict_tiled(DiscFinder(), image, tile=40, overlap=16)
    augmented = tiling.predict_tiled(tta.TTA(DiscFinder()), image, tile=40, overlap=16)
    assert sorted(r["counts"] for r in augmented["masks"]) == sorted(
        r["counts"] for r in plain["masks"]
    )


@pytest.mark.parametrize(
    "flips, scales, message",
    [
        (("none", "x"), (1.0,), "--tta-flips none x: choose from none, h, v, hv"),
        ((), (1.0,), "--tta-flips : choose from none, h, v, hv"),
        (("h",), (1.0, 0.0), "--tta-scales 1.0 0.0: scales must be positive"),
    ],
)
def test_bad_views_raise_one_line_config_errors(flips, scales, message):
    with pytest.raises(ConfigError) as error:
        tta.TTA(DiscFinder(), flips=flips, scales=scales)
    assert error.value.message == message
