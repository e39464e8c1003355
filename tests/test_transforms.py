import pytest
import torch
from torchvision import tv_tensors
from torchvision.ops import masks_to_boxes
from torchvision.transforms import v2 as T

from engine import images_to_device
from presets import DATA_AUGMENTATIONS, DetectionPresetEval, DetectionPresetTrain
from transforms import SanitizeBoundingBoxes, copy_paste_collate_fn, paste_objects


def make_sample(height=48, width=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    masks = torch.zeros(3, height, width, dtype=torch.uint8)
    masks[0, 5:20, 4:30] = 1
    masks[1, 25:40, 35:60] = 1
    masks[2, 10:30, 40:50] = 1
    image = torch.randint(0, 255, (3, height, width), dtype=torch.uint8, generator=generator)
    boxes = masks_to_boxes(masks)
    boxes[:, 2:] += 1
    target = {
        "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
        "masks": tv_tensors.Mask(masks),
        "labels": torch.tensor([1, 2, 1]),
        "image_id": 7,
    }
    return tv_tensors.Image(image), target


def assert_boxes_enclose_masks(target, tolerance=1.0):
    for box, mask in zip(target["boxes"], target["masks"], strict=True):
        if not mask.any():
            continue
        tight = masks_to_boxes(mask[None])[0]
        tight[2:] += 1
        assert torch.allclose(box, tight, atol=tolerance), (box, tight)


@pytest.mark.parametrize("name", DATA_AUGMENTATIONS)
def test_recipes_keep_image_boxes_and_masks_together(name):
    torch.manual_seed(0)
    preset = DetectionPresetTrain(name, min_size=48, max_size=80)
    for _ in range(5):
        image, target = preset(*make_sample())
        assert image.dtype == torch.uint8 and type(image) is torch.Tensor
        assert target["masks"].shape[-2:] == image.shape[-2:]
        assert len(target["boxes"]) == len(target["masks"]) == len(target["labels"])
        assert target["image_id"] == 7
        # Resizing moves box corners by at most a pixel against the resampled masks.
        assert_boxes_enclose_masks(target, tolerance=2.0 if name != "hflip" else 0.0)


def test_horizontal_flip_mirrors_boxes_and_masks():
    image, target = make_sample()
    flipped_image, flipped = DetectionPresetTrain("hflip", hflip_prob=1.0)(image, target)
    assert torch.equal(flipped["masks"], target["masks"].flip(-1))
    assert torch.equal(flipped_image, image.flip(-1).as_subclass(torch.Tensor))
    assert flipped["boxes"][0].tolist() == [64 - 30, 5, 64 - 4, 20]


def test_eval_preset_returns_plain_tensors_unchanged():
    image, target = make_sample()
    out_image, out_target = DetectionPresetEval()(image, target)
    assert type(out_image) is torch.Tensor
    assert torch.equal(out_image, image.as_subclass(torch.Tensor))
    assert torch.equal(out_target["boxes"], target["boxes"].as_subclass(torch.Tensor))


def test_images_become_float_on_the_device():
    image, _ = make_sample()
    as_float = torch.rand(3, 8, 8)  # a 16-bit image, already scaled
    moved = images_to_device([image, as_float], "cpu")
    assert moved[0].dtype == torch.float32 and torch.allclose(moved[0] * 255, image.float())
    assert moved[1] is as_float


def test_paste_objects_occludes_and_recomputes_boxes():
    torch.manual_seed(0)
    image, target = make_sample(seed=0)
    source_image, source_target = make_sample(seed=1)
    source_target["masks"] = source_target["masks"].roll(shifts=8, dims=-1)
    source_target["labels"] = torch.tensor([5, 6, 7])
    new_image, new_target = paste_objects(image, target, source_image, source_target)

    pasted = new_target["labels"] >= 5
    assert pasted.any()
    region = new_target["masks"][pasted].bool().any(0)
    assert torch.equal(new_image[:, region], source_image[:, region])
    assert torch.equal(new_image[:, ~region], image[:, ~region])
    kept = new_target["masks"][~pasted].bool()
    assert not (kept & region).any()
    assert_boxes_enclose_masks(new_target, tolerance=0.0)


def test_paste_objects_between_an_8_bit_and_a_16_bit_image_gives_float():
    torch.manual_seed(0)
    image, target = make_sample(seed=0)
    source_image, source_target = make_sample(seed=1)
    source_image = source_image.float() / 255  # as a 16-bit image arrives
    source_target["labels"] = torch.tensor([5, 6, 7])
    new_image, new_target = paste_objects(image, target, source_image, source_target)
    region = new_target["masks"][new_target["labels"] >= 5].bool().any(0)
    assert new_image.dtype == torch.float32
    assert torch.equal(new_image[:, region], source_image[:, region])
    assert torch.allclose(new_image[:, ~region] * 255, image[:, ~region].float())


def test_copy_paste_collate_returns_batch_of_same_length():
    batch = [make_sample(seed=i) for i in range(3)]
    images, targets = copy_paste_collate_fn(batch)
    assert len(images) == len(targets) == 3
    assert all(t["masks"].shape[0] == len(t["labels"]) for t in targets)


def test_sanitize_keeps_valid_objects_as_they_are_and_drops_others_as_torchvision_does():
    image, target = make_sample()
    _, kept = SanitizeBoundingBoxes()(image, target)
    assert all(kept[key] is target[key] for key in ("boxes", "masks", "labels"))
    target["boxes"][1, 2] = target["boxes"][1, 0]  # no width
    _, ours = SanitizeBoundingBoxes()(image, target)
    _, theirs = T.SanitizeBoundingBoxes()(image, target)
    assert ours["labels"].tolist() == theirs["labels"].tolist() == [1, 1]
    for key in ("boxes", "masks"):
        assert torch.equal(ours[key], theirs[key]) and type(ours[key]) is type(theirs[key])


def test_recipes_on_uint8_and_float_input_agree():
    # 8-bit images go through the recipes as uint8 and 16-bit ones as float; a flip commutes with
    # the conversion exactly, a resize up to rounding.
    image, target = make_sample()
    for name in ("hflip", "multiscale"):
        torch.manual_seed(0)
        from_uint8, _ = DetectionPresetTrain(name, min_size=48, max_size=80)(image, target)
        from_uint8 = T.ToDtype(torch.float32, scale=True)(from_uint8)
        torch.manual_seed(0)
        as_float = T.ToDtype(torch.float32, scale=True)(image)
        from_float, _ = DetectionPresetTrain(name, min_size=48, max_size=80)(as_float, target)
        assert from_float.dtype == torch.float32 and from_uint8.shape == from_float.shape
        assert (from_uint8 - from_float).abs().max() <= (0 if name == "hflip" else 1 / 255)
