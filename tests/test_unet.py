import math

import numpy as np
import pytest
import torch
import torchvision

import unet


def disc(size, cx, cy, radius):
    yy, xx = np.mgrid[0:size, 0:size]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2


def touching_discs(size=64):
    """Masks [3, size, size] of two discs that overlap a little (split between them along the
    perpendicular bisector) and one apart from them, in a 64 px frame scaled to `size`."""
    s = size / 64
    centres = [(20 * s, 22 * s), (39 * s, 22 * s), (34 * s, 48 * s)]
    radius = 10 * s
    discs = [disc(size, cx, cy, radius) for cx, cy in centres]
    xx = np.mgrid[0:size, 0:size][1]
    left = xx < 29.5 * s
    first = discs[0] & (left | ~discs[1])
    return np.stack([first, discs[1] & ~first, discs[2]])


def mask_iou(a, b):
    return (a & b).sum() / (a | b).sum()


def probability_maps(masks):
    """Foreground and border maps a well-trained model would give for these masks."""
    foreground = np.where(masks.any(0), 0.9, 0.05).astype(np.float32)
    others = [np.delete(masks, i, axis=0).any(0) for i in range(len(masks))]
    near_other = [
        torch.nn.functional.max_pool2d(
            torch.from_numpy(o).float()[None, None], 5, stride=1, padding=2
        )[0, 0].numpy()
        > 0
        for o in others
    ]
    border = np.any([m & n for m, n in zip(masks, near_other, strict=True)], axis=0)
    return foreground, np.where(border, 0.8, 0.1).astype(np.float32)


def test_watershed_separates_touching_discs():
    masks = touching_discs()
    foreground, border = probability_maps(masks)
    labels = unet.watershed_instances(foreground, border)
    assert labels.max() == 3
    for mask in masks:
        best = max(mask_iou(mask, labels == k) for k in range(1, 4))
        assert best >= 0.9


def test_watershed_without_foreground_gives_no_instances():
    zeros = np.zeros((32, 48), dtype=np.float32)
    assert unet.watershed_instances(zeros, zeros).max() == 0
    out = unet.instances_from_maps(
        torch.zeros(32, 48), torch.zeros(32, 48), classes=torch.full((2, 32, 48), 0.5)
    )
    assert out["boxes"].shape == (0, 4) and out["boxes"].dtype == torch.float32
    assert out["labels"].shape == (0,) and out["labels"].dtype == torch.int64
    assert out["scores"].shape == (0,) and out["scores"].dtype == torch.float32
    assert out["masks"].shape == (0, 1, 32, 48) and out["masks"].dtype == torch.float32


def test_watershed_drops_instances_under_min_area():
    foreground = np.zeros((40, 40), dtype=np.float32)
    foreground[disc(40, 12, 12, 6)] = 0.9  # about 113 px
    foreground[disc(40, 30, 30, 2)] = 0.9  # 13 px
    border = np.zeros_like(foreground)
    assert unet.watershed_instances(foreground, border, min_area=10).max() == 2
    labels = unet.watershed_instances(foreground, border, min_area=20)
    assert labels.max() == 1 and labels[12, 12] == 1


def test_seed_slivers_are_flooded_from_their_neighbours():
    foreground = np.zeros((20, 20), dtype=np.float32)
    foreground[2:18, 2:18] = 0.9
    border = np.zeros_like(foreground)
    border[2:18, 10:12] = 0.9  # where two instances meet
    border[2:5, 14] = border[4, 14:18] = 0.9  # a stray hook cutting off rows 2-3, columns 15-17
    sliver = unet.watershed_instances(foreground, border, min_area=1, min_seed_area=1)
    assert sliver.max() == 3
    labels = unet.watershed_instances(foreground, border, min_area=1, min_seed_area=8)
    assert labels.max() == 2 and labels[3, 16] == labels[10, 16] != labels[10, 5]


def test_foreground_without_seed_becomes_an_instance():
    foreground = np.zeros((20, 20), dtype=np.float32)
    foreground[5:12, 5:12] = 0.9
    border = np.where(foreground > 0, 0.9, 0.0).astype(np.float32)
    assert unet.watershed_instances(foreground, border).max() == 1


def test_instances_from_maps_scores_categories_and_masks():
    masks = touching_discs()
    foreground, border = probability_maps(masks)
    foreground[masks[2]] = 0.6
    classes = np.zeros((2, 64, 64), dtype=np.float32)
    classes[0], classes[1] = 0.8, 0.2
    classes[:, masks[1]] = np.array([0.3, 0.7], dtype=np.float32)[:, None]
    out = unet.instances_from_maps(
        torch.from_numpy(foreground), torch.from_numpy(border), torch.from_numpy(classes)
    )
    assert out["scores"].tolist() == pytest.approx([0.72, 0.63, 0.48], abs=1e-4)
    assert out["labels"].tolist() == [1, 2, 1]
    instances = out["masks"][:, 0] > 0.5
    assert mask_iou(instances[2].numpy(), masks[2]) == 1
    # The mask holds the foreground probability inside and 0 outside.
    assert out["masks"][2].unique().tolist() == pytest.approx([0.0, 0.6])
    ys, xs = np.nonzero(masks[2])
    assert out["boxes"][2].tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_border_targets_mark_where_instances_meet():
    masks = torch.zeros(3, 12, 30, dtype=torch.uint8)
    masks[0, :, 0:10] = 1
    masks[1, :, 10:20] = 1
    masks[2, 0:2, 25:30] = 1  # apart from the others
    labels = torch.tensor([1, 2, 2])
    foreground, border, category = unet.target_maps(masks, labels, border_width=2)
    assert torch.equal(foreground, masks.any(0))
    columns = border.any(0).nonzero().flatten().tolist()
    assert columns == [8, 9, 10, 11] and border[:, 8:12].all()
    assert category[0, 0] == 0 and category[0, 15] == 1 and category[5, 25] == -100
    _, narrow, _ = unet.target_maps(masks, labels, border_width=1)
    assert narrow.any(0).nonzero().flatten().tolist() == [9, 10]
    overlapping = torch.stack([masks[0], masks[0]])
    assert unet.target_maps(overlapping, labels[:2], 1)[1].sum() == masks[0].sum()


def make_target(masks, labels):
    masks = torch.as_tensor(np.asarray(masks), dtype=torch.uint8).reshape(-1, *masks.shape[-2:])
    boxes = [
        [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        for ys, xs in (np.nonzero(m.numpy()) for m in masks)
    ]
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.as_tensor(labels, dtype=torch.int64),
        "masks": masks,
        "image_id": 1,
    }


def paint(masks):
    """A nuclei-like image: bright discs, darker where they meet, on a dark background."""
    image = np.full((3, *masks.shape[1:]), 0.1, dtype=np.float32)
    for mask in masks:
        image[:, mask] = 0.8
    meet = unet.target_maps(torch.from_numpy(masks).byte(), torch.ones(len(masks)).long(), 1)[1]
    image[:, meet.numpy()] = 0.5
    return torch.from_numpy(image)


@pytest.fixture
def batch():
    """Two images of different sizes (one resized by the model), the second without objects."""
    masks = touching_discs(48)
    images = [paint(masks), torch.rand(3, 80, 64)]
    targets = [make_target(masks, [1, 2, 1]), make_target(np.zeros((0, 80, 64)), [])]
    return images, targets


def small_unet(num_classes=3, **kwargs):
    torch.manual_seed(0)
    return unet.unet_resnet18(num_classes, min_size=64, max_size=96, **kwargs)


@pytest.mark.parametrize("num_classes", [2, 3])
def test_training_losses_and_gradients(batch, num_classes):
    images, targets = batch
    model = small_unet(num_classes).train()
    losses = model(images, targets)
    expected = {"loss_foreground", "loss_border"} | (
        {"loss_classifier"} if num_classes > 2 else set()
    )
    assert set(losses) == expected
    assert all(v.dim() == 0 and math.isfinite(v.item()) for v in losses.values())
    sum(losses.values()).backward()
    # DDP needs every parameter to receive a gradient every step.
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    assert (model.class_head is None) == (num_classes == 2)


def test_training_on_images_without_objects(batch):
    images, targets = batch
    model = small_unet(3).train()
    losses = model(images[1:], targets[1:])
    assert all(math.isfinite(v.item()) for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("num_classes", [2, 3])
def test_inference_outputs_at_image_size(batch, num_classes):
    images, _ = batch
    model = small_unet(num_classes).eval()
    with torch.inference_mode():
        outputs = model(images)
        maps = model.predict_maps(images)
    assert len(outputs) == len(maps) == 2
    for image, out, image_maps in zip(images, outputs, maps, strict=True):
        h, w = image.shape[-2:]
        n = len(out["scores"])
        assert out["boxes"].shape == (n, 4) and out["boxes"].dtype == torch.float32
        assert out["labels"].shape == (n,) and out["labels"].dtype == torch.int64
        assert out["scores"].dtype == torch.float32
        assert out["masks"].shape == (n, 1, h, w) and out["masks"].dtype == torch.float32
        assert 0 <= out["masks"].min() and out["masks"].max() <= 1
        assert set(out["labels"].tolist()) <= set(range(1, num_classes))
        assert (out["scores"].diff() <= 0).all()
        assert image_maps["foreground"].shape == image_maps["border"].shape == (h, w)
        if num_classes > 2:
            assert image_maps["classes"].shape == (num_classes - 1, h, w)
            assert torch.allclose(image_maps["classes"].sum(0), torch.ones(h, w))
        else:
            assert "classes" not in image_maps


def test_inference_without_objects_returns_empty_tensors():
    model = small_unet(3).eval()
    with torch.no_grad():
        model.head.bias.copy_(torch.tensor([-20.0, 0.0]))  # foreground nowhere
    (out,) = model([torch.rand(3, 40, 72)])
    assert out["boxes"].shape == (0, 4) and out["labels"].dtype == torch.int64
    assert out["scores"].shape == (0,) and out["masks"].shape == (0, 1, 40, 72)


def test_bfloat16_autocast(batch):
    images, targets = batch
    model = small_unet(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model.train()(images, targets)
        outputs = model.eval()(images)
    assert all(v.dtype == torch.float32 and math.isfinite(v.item()) for v in losses.values())
    sum(losses.values()).backward()
    assert outputs[0]["masks"].shape[-2:] == images[0].shape[-2:]


def test_replace_class_head():
    model = small_unet(3)
    before = model.state_dict()
    assert model.replace_class_head(5) == ["class_head"]
    after = model.state_dict()
    changed = [k for k in after if k not in before or after[k].shape != before[k].shape]
    assert changed and all(k.startswith(unet.UNet.CLASS_DEPENDENT_PREFIXES) for k in changed)
    assert model.class_head.out_channels == 4 and model.num_classes == 5
    assert model.replace_class_head(2) == ["class_head"] and model.class_head is None
    assert not any(k.startswith("class_head") for k in model.state_dict())
    assert model.replace_class_head(2) == []


def test_state_dict_round_trip(batch):
    images, targets = batch
    model = small_unet(3, border_width=1)
    sum(model.train()(images, targets).values()).backward()  # moves BatchNorm statistics
    state = model.state_dict()
    rebuilt = unet.unet_resnet18(3, min_size=64, max_size=96, border_width=1)
    rebuilt.load_state_dict(state)
    with torch.no_grad():
        expected = model.eval().predict_maps(images)[0]["foreground"]
        assert torch.equal(rebuilt.eval().predict_maps(images)[0]["foreground"], expected)


def test_backbone_weights_by_name_load_into_encoder(monkeypatch):
    """A weights name resolves to torchvision's enum, whose state dict (here a stand-in instead
    of the download) loads into the encoder with frozen BatchNorm, as for Mask R-CNN."""
    reference = torchvision.models.resnet18().state_dict()
    reference["conv1.weight"] = torch.full_like(reference["conv1.weight"], 0.25)
    urls = []

    def fake_download(url, *args, **kwargs):
        urls.append(url)
        return reference

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", fake_download)
    model = unet.unet_resnet18(2, weights_backbone="ResNet18_Weights.IMAGENET1K_V1")
    assert urls == [torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url]
    assert (model.encoder.conv1.weight == 0.25).all()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert not any(k.endswith("num_batches_tracked") for k in model.state_dict())
    trainable = {n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad}
    assert {"layer2", "layer3", "layer4"} <= trainable and not {"conv1", "layer1"} & trainable
    frozen = unet.unet_resnet18(
        2, weights_backbone=torchvision.models.ResNet18_Weights.DEFAULT, trainable_backbone_layers=0
    )
    assert not any(p.requires_grad for p in frozen.encoder.parameters())
    with pytest.raises(ValueError, match="not a torchvision weights name"):
        unet.unet_resnet18(2, weights_backbone="ResNet18_Weights.NO_SUCH_WEIGHTS")
    with pytest.raises(ValueError, match="use weights_backbone"):
        unet.unet_resnet18(2, weights="ResNet18_Weights.IMAGENET1K_V1")


def matched_discs(model, image, masks):
    """How many discs the model finds, if it finds as many instances as there are discs: those
    matched by an instance with mask IoU >= 0.8."""
    with torch.no_grad():
        (out,) = model.eval()([image])
    found = (out["masks"][:, 0] > 0.5).numpy()
    if len(found) != len(masks):
        return 0
    return sum(max(mask_iou(m, f) for f in found) >= 0.8 for m in masks)


@pytest.mark.slow
def test_overfits_one_image_of_touching_discs():
    masks = touching_discs(64)
    image, target = paint(masks), make_target(masks, [1, 2, 1])
    model = small_unet(3)
    assert matched_discs(model, image, masks) == 0
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(50):
        loss = sum(model.train()([image], [target]).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert matched_discs(model, image, masks) == 3
