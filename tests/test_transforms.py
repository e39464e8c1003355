import torch
from conftest import assert_boxes_enclose_masks, make_sample
from torchvision.transforms import v2 as T

from transforms import SanitizeBoundingBoxes, copy_paste_collate_fn, paste_objects


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
