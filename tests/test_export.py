"""Exported files (ONNX run by onnxruntime, torch.export reloaded) against the eager model, on
images of two sizes through one file, and the errors of export.py and its runtime helpers."""

import json

import numpy as np
import pytest
import torch
import torchvision
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.models.resnet import Bottleneck

import export
import exported
import loading
import unet
from errors import CheckpointError, ConfigError

CATEGORY_NAMES = {1: "nucleus", 2: "mitotic"}
# Two sizes that the model resizes (its sides are 160 to 192 px), one of them to a side that
# float32 arithmetic on the scale would get wrong: 301 * (160 / 301) = 159.99998.
IMAGE_SHAPES = [(3, 97, 301), (3, 240, 180)]


def conditioned_maskrcnn(seed=0):
    """An untrained Mask R-CNN (3 classes, 160-192 px) whose outputs depend smoothly on its
    input, as a trained one's do, and that detects something in random images.

    Random ResNet-50 blocks amplify float32 rounding (its scores move by 3e-4 between float32
    and float64), which would hide what an exporter changes. BatchNorm statistics measured on a
    random batch and residual branches scaled down (as in a trained network, or zero-init
    residual) bring that under 1e-5. Larger class weights spread the scores over (0, 1); mask
    weights only twice as large, since masks saturated to exactly 0 and 1 paste to exactly 0.5
    where the resize falls halfway between them, which any rounding moves across the threshold.
    """
    torch.manual_seed(seed)
    model = torchvision.models.get_model(
        "maskrcnn_resnet50_fpn",
        weights=None,
        weights_backbone=None,
        num_classes=3,
        min_size=160,
        max_size=192,
        box_score_thresh=0.3,
    )
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    model.train()
    with torch.no_grad():
        model.backbone(torch.rand(2, 3, 160, 160) * 4 - 2)
        for module in model.modules():
            if isinstance(module, Bottleneck):
                module.bn3.weight.mul_(0.2)
                module.bn3.bias.mul_(0.2)
        model.roi_heads.box_predictor.cls_score.weight.mul_(8)
        model.roi_heads.mask_predictor.mask_fcn_logits.weight.mul_(2)
    return model.eval()


def images(seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(shape, generator=generator) for shape in IMAGE_SHAPES]


def mask_ious(a, b):
    """IoU of each pair of [N, 1, H, W] masks thresholded at 0.5 (1 for two empty masks)."""
    a, b = a > 0.5, b > 0.5
    union = (a | b).flatten(1).sum(1)
    return torch.where(union > 0, (a & b).flatten(1).sum(1) / union.clamp(min=1), 1.0)


def parity(expected, actual):
    """The largest box (px) and score differences and the smallest mask IoU between two sets of
    detections of one image, paired by order (both are sorted by score); fails on a different
    count or labels."""
    assert len(actual["boxes"]) == len(expected["boxes"])
    assert torch.equal(actual["labels"], expected["labels"])
    assert actual["masks"].shape == expected["masks"].shape
    return (
        (actual["boxes"] - expected["boxes"]).abs().max().item(),
        (actual["scores"] - expected["scores"]).abs().max().item(),
        mask_ious(actual["masks"], expected["masks"]).min().item(),
    )


def assert_parity(model, runner):
    """The exported file's detections equal the eager model's on both images, as the export
    issue asks: same instances, boxes within 0.01 px, scores within 1e-4, mask IoU >= 0.99."""
    with torch.no_grad():
        for image in images():
            expected = model([image])[0]
            assert 5 <= len(expected["boxes"]) < 100, "the test model should detect something"
            box_error, score_error, iou = parity(expected, runner([image])[0])
            assert box_error <= 0.01
            assert score_error <= 1e-4
            assert iou >= 0.99
            assert expected["masks"].shape[-2:] == image.shape[-2:]


@pytest.fixture(scope="module")
def maskrcnn():
    return conditioned_maskrcnn()


@pytest.fixture(scope="module")
def maskrcnn_program(maskrcnn):
    return export.exported_program(maskrcnn)


def metadata_with_names(model):
    return export.file_metadata(
        model, export.DETECTION_OUTPUTS, {"category_names": CATEGORY_NAMES, "label_offset": 0}
    )


@pytest.fixture(scope="module")
def torch_file(maskrcnn, maskrcnn_program, tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "model.pt2"
    export.save_torch(maskrcnn_program, path, metadata_with_names(maskrcnn))
    return str(path)


@pytest.fixture(scope="module")
def onnx_file(maskrcnn, maskrcnn_program, tmp_path_factory):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    path = tmp_path_factory.mktemp("export") / "model.onnx"
    export.save_onnx(maskrcnn_program, path, metadata_with_names(maskrcnn))
    return str(path)


def plain_maskrcnn():
    with torch.device("meta"):  # the model's kind alone: no weights to initialise
        return torchvision.models.get_model(
            "maskrcnn_resnet50_fpn", weights=None, weights_backbone=None, num_classes=3
        )


def test_paste_masks_matches_torchvision():
    generator = torch.Generator().manual_seed(0)
    masks = torch.rand(6, 1, 28, 28, generator=generator)
    # Inside, across each border, a sliver, and boxes larger than the image.
    boxes = torch.tensor(
        [
            [10.3, 12.7, 40.2, 30.9],
            [-5.5, -3.2, 20.0, 15.0],
            [50.0, 30.0, 70.4, 47.9],
            [5.0, 5.0, 5.4, 30.0],
            [-20.0, -20.0, 90.0, 70.0],
            [0.0, 0.0, 63.0, 47.0],
        ]
    )
    expected = paste_masks_in_image(masks, boxes, (48, 64))
    pasted = export.paste_masks(masks, boxes, 48, 64)
    assert pasted.shape == expected.shape == (6, 1, 48, 64)
    torch.testing.assert_close(pasted, expected, atol=1e-5, rtol=0)
    assert (expected > 0).flatten(1).any(1).all()


@pytest.mark.slow
def test_rcnn_detections_is_the_eager_model(maskrcnn):
    """The export's rearranged forward pass, run eagerly, gives the model's detections."""
    wrapper = export.RCNNDetections(maskrcnn).eval()
    with torch.no_grad():
        for image in images():
            expected = maskrcnn([image])[0]
            boxes, labels, scores, masks = wrapper(image)
            actual = {"boxes": boxes, "labels": labels, "scores": scores, "masks": masks}
            box_error, score_error, iou = parity(expected, actual)
            assert box_error == score_error == 0
            assert iou >= 0.99
            torch.testing.assert_close(masks, expected["masks"], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_torch_export_file_matches_eager(maskrcnn, torch_file):
    runner = exported.ExportedModel(torch_file)
    assert_parity(maskrcnn, runner)
    assert runner.category_names == CATEGORY_NAMES and runner.label_offset == 0


@pytest.mark.slow
def test_onnx_file_matches_eager(maskrcnn, onnx_file):
    runner = exported.OnnxModel(onnx_file)
    assert_parity(maskrcnn, runner)
    assert runner.category_names == CATEGORY_NAMES and runner.label_offset == 0


@pytest.mark.slow
def test_onnx_file_runs_without_this_repository(onnx_file):
    """onnxruntime alone: one input, four named outputs, masks at the input size."""
    import onnxruntime

    session = onnxruntime.InferenceSession(onnx_file)
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert [o.name for o in session.get_outputs()] == list(export.DETECTION_OUTPUTS)
    for image in images():
        boxes, labels, scores, masks = session.run(None, {"image": image.numpy()})
        assert masks.shape == (len(boxes), 1, *image.shape[-2:])
        assert labels.dtype == np.int64 and set(labels) <= {1, 2}
        assert np.all(np.diff(scores) <= 0)


@pytest.fixture(scope="module")
def unet_checkpoint(tmp_path_factory):
    """A checkpoint of train.py's form for a U-Net with two categories (num_classes 3)."""
    torch.manual_seed(0)
    model = unet.unet_resnet18(num_classes=3, min_size=128, max_size=160)
    path = tmp_path_factory.mktemp("unet") / "checkpoint.pth"
    torch.save(
        {
            "model": model.state_dict(),
            "epoch": 0,
            "args": {"model": "unet_resnet18", "min_size": 128, "max_size": 160},
            "num_classes": 3,
            "category_names": CATEGORY_NAMES,
            "label_offset": 0,
        },
        path,
    )
    return path


def unet_maps(model, image):
    with torch.no_grad():
        return model.predict_maps([image])[0]


@pytest.mark.slow
@pytest.mark.parametrize("file_format", ["onnx", "torch-export"])
def test_unet_command_writes_maps_and_runner_makes_instances(
    unet_checkpoint, tmp_path, capsys, file_format
):
    if file_format == "onnx":
        pytest.importorskip("onnxscript")
        pytest.importorskip("onnxruntime")
    output = tmp_path / f"unet.{'onnx' if file_format == 'onnx' else 'pt2'}"
    export.main(
        ["--weights", str(unet_checkpoint), "--format", file_format, "--output", str(output)]
    )
    assert "foreground, border, classes" in capsys.readouterr().out
    model = loading.load(str(unet_checkpoint)).model
    runner = (
        exported.OnnxModel(str(output))
        if file_format == "onnx"
        else exported.ExportedModel(str(output))
    )
    assert runner.category_names == CATEGORY_NAMES
    for image in images():
        expected = unet_maps(model, image)
        actual = runner.run(image)
        assert actual.keys() == expected.keys()
        for name in expected:
            torch.testing.assert_close(actual[name], expected[name], atol=1e-4, rtol=0)
        with torch.no_grad():
            instances = model([image])[0]
        detections = runner([image])[0]
        assert len(detections["boxes"]) == len(instances["boxes"]) > 0
        assert mask_ious(detections["masks"], instances["masks"]).min() >= 0.99


def test_unet_detections_is_an_error(unet_checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        export.main(
            [
                "--weights", str(unet_checkpoint), "--format", "onnx",
                "--output", str(tmp_path / "unet.onnx"), "--outputs", "detections",
            ]
        )  # fmt: skip
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("export.py: error: --outputs detections:") and "watershed" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "unet.onnx").exists()


def test_maskrcnn_maps_is_an_error():
    with pytest.raises(ConfigError, match="--outputs maps"):
        export.output_names(plain_maskrcnn(), "maps")


def test_other_models_are_an_error():
    with torch.device("meta"):
        model = torchvision.models.get_model(
            "fasterrcnn_resnet50_fpn", weights=None, weights_backbone=None, num_classes=2
        )
    with pytest.raises(ConfigError, match="FasterRCNN"):
        export.output_names(model)


def test_command_names_a_file_that_is_no_checkpoint(tmp_path, capsys):
    weights = tmp_path / "notes.txt"
    weights.write_text("not a model")
    with pytest.raises(SystemExit) as exit_info:
        export.main(
            ["--weights", str(weights), "--format", "onnx", "--output", str(tmp_path / "m.onnx")]
        )
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith(f"export.py: error: {weights}: not a loadable")


@pytest.mark.parametrize("runner", [exported.OnnxModel, exported.ExportedModel])
def test_runners_name_a_file_that_is_no_model(tmp_path, runner):
    if runner is exported.OnnxModel:
        pytest.importorskip("onnxruntime")
    path = tmp_path / "notes.onnx"
    path.write_text("not a model")
    with pytest.raises(CheckpointError) as error_info:
        runner(str(path))
    assert error_info.value.message.startswith(str(path))
    assert "\n" not in error_info.value.message
    with pytest.raises(CheckpointError, match="no such file"):
        runner(str(tmp_path / "missing.onnx"))


def test_onnx_file_without_metadata_is_an_error(tmp_path):
    """An ONNX file that export.py did not write: the runner says what is missing."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["image"], ["boxes"])],
        "identity",
        [onnx.helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, [3, None, None])],
        [onnx.helper.make_tensor_value_info("boxes", onnx.TensorProto.FLOAT, [3, None, None])],
    )
    path = tmp_path / "identity.onnx"
    onnx.save(onnx.helper.make_model(graph), path)
    with pytest.raises(CheckpointError, match="instance_segmentation"):
        exported.OnnxModel(str(path))


def test_metadata_is_json_with_string_keys():
    metadata = export.file_metadata(
        plain_maskrcnn(),
        export.DETECTION_OUTPUTS,
        {"category_names": CATEGORY_NAMES, "label_offset": 1},
    )
    assert json.loads(json.dumps(metadata))["category_names"] == {"1": "nucleus", "2": "mitotic"}
    assert metadata["label_offset"] == 1
