"""models.py: models by name, weights that fit, checkpoints back to models."""

import pytest
import torch

import loading
import models
import train
from errors import CheckpointError, ConfigError
from tiling import TiledModel
from tta import TTA

UNET = ["--model", "unet_resnet18", "--min-size", "64", "--max-size", "64"]


def model_args(*argv):
    return train.get_args_parser().parse_args(list(argv))


def save_checkpoint(path, args, model, num_classes):
    checkpoint = {"model": model.state_dict(), "args": vars(args), "epoch": 0}
    checkpoint.update(num_classes=num_classes, category_names={1: "nucleus"}, label_offset=0)
    torch.save(checkpoint, path)


def test_unet_flags_reach_the_unet():
    args = model_args(*UNET, "--unet-min-area", "25", "--unet-border-weight", "3")
    model = models.get_model(args, 2)
    assert model.watershed_kwargs["min_area"] == 25 and model.border_weight == 3.0
    assert models.iou_types_of(model) == ["bbox", "segm"]
    assert models.is_mask_model("unet_resnet34") and not models.is_mask_model("fcos_resnet50_fpn")


def test_an_unknown_model_is_a_one_line_error():
    with pytest.raises(ConfigError, match="--model unet_resnet7: no such torchvision model"):
        models.get_model(model_args("--model", "unet_resnet7"), 2)


@pytest.mark.parametrize("name", ["maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2"])
def test_anchor_sizes_reach_every_rcnn_builder(name):
    args = model_args("--model", name, "--anchor-sizes", "8", "16", "32", "64", "128")
    with torch.device("meta"):  # shapes alone: no weights to initialise, no pixels to compute
        model = models.get_model(args, 3)
        features = list(model.backbone(torch.zeros(1, 3, 64, 64)).values())
    generator = model.rpn.anchor_generator
    assert generator.sizes == ((8,), (16,), (32,), (64,), (128,))
    # The RPN head fits the anchors per location: as many as the generator makes, on every level.
    objectness, box_deltas = model.rpn.head(features)
    assert generator.num_anchors_per_location() == [o.shape[1] for o in objectness]
    assert [d.shape[1] for d in box_deltas] == [4 * o.shape[1] for o in objectness]


@pytest.mark.parametrize(("saved", "wanted"), [(3, 2), (2, 3)])
def test_unet_weights_fit_another_class_count(tmp_path, capsys, saved, wanted):
    args = model_args(*UNET)
    torch.manual_seed(0)
    source = models.get_model(args, saved)
    save_checkpoint(tmp_path / "saved.pth", args, source, saved)
    args.weights = str(tmp_path / "saved.pth")
    model = models.get_model(args, wanted)
    replaced = "re-initialised (class count differs): class_head" in capsys.readouterr().out
    assert replaced == (wanted > 2)  # with one category there is no class head to replace
    assert torch.equal(model.head.weight, source.head.weight)
    assert (model.class_head is None) == (wanted == 2)


def test_a_saved_unet_comes_back_as_it_was(tmp_path):
    args = model_args(*UNET, "--unet-min-area", "5")
    torch.manual_seed(0)
    model = models.get_model(args, 3).eval()
    save_checkpoint(tmp_path / "unet.pth", args, model, 3)
    result = loading.load(str(tmp_path / "unet.pth"))
    loaded = result.model
    assert result.num_classes == 3 and loaded.watershed_kwargs["min_area"] == 5
    image = torch.rand(3, 48, 40)
    with torch.no_grad():
        expected, actual = model([image])[0], loaded([image])[0]
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


def test_a_checkpoint_of_another_model_is_an_error_naming_it(tmp_path):
    checkpoint = {"model": {"x": torch.zeros(1)}, "args": {"model": "unet_resnet18"}, "epoch": 0}
    torch.save({**checkpoint, "num_classes": 2}, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'x.pth'}: weights do not fit"):
        loading.load(str(tmp_path / "x.pth"))


def test_inference_wrappers_follow_the_flags():
    model = torch.nn.Identity()
    assert models.inference_model(model_args(), model) is model
    wrapped = models.inference_model(model_args("--tta", "--tile", "128"), model)
    assert isinstance(wrapped, TiledModel) and isinstance(wrapped.model, TTA)
    with pytest.raises(ConfigError, match="--tile 64 must be larger than --tile-overlap 64"):
        models.inference_model(model_args("--tile", "64"), model)


def test_a_resnet50_rcnn_built_here_is_laid_out_as_torchvisions():
    with torch.device("meta"):  # the layout alone: no weights to initialise
        ours = models.get_model(model_args("--fpn-channels", "256"), 3).state_dict()
        theirs = models.get_model(model_args(), 3).state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)


def test_a_narrow_resnet18_mask_rcnn_trains_and_comes_back_from_its_checkpoint(tmp_path):
    args = model_args("--model", "maskrcnn_resnet18_fpn", "--fpn-channels", "64",
                      "--min-size", "64", "--max-size", "64")  # fmt: skip
    torch.manual_seed(0)
    model = models.get_model(args, 3)
    assert model.backbone.out_channels == 64
    assert model.roi_heads.mask_predictor.conv5_mask.in_channels == 64
    assert all(p.requires_grad for p in model.parameters())  # from scratch: every stage trains
    box = torch.tensor([[8.0, 8.0, 40.0, 30.0]])
    mask = torch.zeros(1, 64, 64, dtype=torch.uint8)
    mask[0, 8:30, 8:40] = 1
    target = {"boxes": box, "labels": torch.tensor([2]), "masks": mask}
    losses = model([torch.rand(3, 64, 64)], [target])
    assert {"loss_mask", "loss_classifier"} <= set(losses)
    save_checkpoint(tmp_path / "r18.pth", args, model.eval(), 3)
    loaded = loading.load(str(tmp_path / "r18.pth")).model
    image = torch.rand(3, 64, 64)
    with torch.no_grad():
        expected, actual = model([image])[0], loaded([image])[0]
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


def test_pretrained_backbones_freeze_stages_as_torchvision_does():
    assert models.frozen_stages(pretrained=False, trainable_layers=2) == []
    assert models.frozen_stages(pretrained=True, trainable_layers=None) == ["conv1", "layer1"]
    assert models.frozen_stages(pretrained=True, trainable_layers=5) == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "retinanet_resnet50_fpn", "--fpn-channels", "128"], "only for maskrcnn_"),
        (["--fpn-channels", "0"], "--fpn-channels 0: must be at least 1"),
        (
            ["--fpn-channels", "128", "--weights", "MaskRCNN_ResNet50_FPN_Weights.COCO_V1"],
            "torchvision's detection weights fit its own builders only",
        ),
    ],
)
def test_fpn_channels_that_cannot_apply_are_a_one_line_error(argv, message):
    with pytest.raises(ConfigError, match=message):
        models.get_model(model_args(*argv), 3)


def test_a_fixed_image_scale_resizes_every_image_by_that_factor():
    images = [torch.rand(3, 40, 70), torch.rand(3, 100, 30)]
    for name in ("unet_resnet18", "maskrcnn_resnet18_fpn"):
        native = models.get_model(model_args("--model", name, "--image-scale", "1"), 2).eval()
        assert native.transform(images)[0].image_sizes == [(40, 70), (100, 30)]
        double = models.get_model(model_args("--model", name, "--image-scale", "2"), 2).eval()
        assert double.transform(images)[0].image_sizes == [(80, 140), (200, 60)]


def test_a_fixed_image_scale_resizes_boxes_and_masks_with_the_image():
    model = models.get_model(model_args("--model", "unet_resnet18", "--image-scale", "2"), 2)
    masks = torch.zeros(1, 20, 30, dtype=torch.uint8)
    masks[0, 5:10, 3:12] = 1
    target = {"boxes": torch.tensor([[3.0, 5.0, 12.0, 10.0]]), "masks": masks}
    image, resized = model.transform.resize(torch.rand(3, 20, 30), target)
    assert image.shape[-2:] == (40, 60) and resized["masks"].shape[-2:] == (40, 60)
    assert resized["boxes"].tolist() == [[6.0, 10.0, 24.0, 20.0]]
    assert resized["masks"].sum() == 4 * masks.sum()


def test_the_image_scale_comes_back_from_the_checkpoint(tmp_path):
    args = model_args("--model", "unet_resnet18", "--image-scale", "1.5")
    save_checkpoint(tmp_path / "scaled.pth", args, models.get_model(args, 2), 2)
    model = loading.load(str(tmp_path / "scaled.pth")).model
    assert model.transform.scale == 1.5
    assert model.transform([torch.rand(3, 40, 60)])[0].image_sizes == [(60, 90)]


def test_a_non_positive_image_scale_is_a_one_line_error():
    with pytest.raises(ConfigError, match="--image-scale 0: must be positive"):
        models.get_model(model_args("--model", "unet_resnet18", "--image-scale", "0"), 2)
