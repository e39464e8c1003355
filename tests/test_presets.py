"""The augmentation recipes keep images, boxes and masks together and leave images uint8."""

import pytest
import torch
from conftest import assert_boxes_enclose_masks, make_sample
from torchvision.transforms import v2 as T

from presets import DATA_AUGMENTATIONS, DetectionPresetEval, DetectionPresetTrain


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


def test_unknown_recipe_is_an_error_naming_it():
    with pytest.raises(ValueError, match="unknown data augmentation 'mosaic'"):
        DetectionPresetTrain("mosaic")


def test_lsj_crops_to_1_28_times_the_min_size():
    torch.manual_seed(0)
    image, target = DetectionPresetTrain("lsj", min_size=50, max_size=80)(*make_sample())
    assert image.shape[-2:] == (64, 64) and target["masks"].shape[-2:] == (64, 64)


def test_nuclei_recipe_pads_a_small_image_to_the_crop_without_resizing_it():
    image, target = make_sample()  # 48 x 64 px, smaller than the crop
    for seed in range(4):
        torch.manual_seed(seed)
        out_image, out = DetectionPresetTrain("nuclei", crop_size=80)(image, target)
        assert out_image.shape[-2:] == (80, 80) and out["masks"].shape[-2:] == (80, 80)
        # Flips and quarter turns move pixels without resampling: every nucleus keeps its area.
        assert sorted(out["masks"].sum((1, 2)).tolist()) == sorted(
            target["masks"].sum((1, 2)).tolist()
        )
        assert_boxes_enclose_masks(out, tolerance=0.0)


def test_nuclei_recipe_crops_a_large_image_at_its_own_scale():
    image, target = make_sample(height=96, width=128)
    torch.manual_seed(0)
    out_image, out = DetectionPresetTrain("nuclei", crop_size=32)(image, target)
    assert out_image.shape[-2:] == (32, 32) and out_image.dtype == torch.uint8
    # A crop never holds more of a nucleus than the nucleus has.
    original_areas = dict(enumerate(target["masks"].sum((1, 2)).tolist()))
    assert all(0 < area <= max(original_areas.values()) for area in out["masks"].sum((1, 2)))
    assert_boxes_enclose_masks(out, tolerance=0.0)
