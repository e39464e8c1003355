"""mask_crops.py: masks pasted box by box equal torchvision's full-size paste above 0.5, and
predict.py's Mask R-CNN path gives what the plain model gives."""

import contextlib
import copy
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_util
from torchvision.models.detection.roi_heads import paste_masks_in_image

import coco_results
import engine
import mask_crops
import models
import predict

HEIGHT, WIDTH = 37, 53


def random_boxes(generator, count):
    """Boxes (x0, y0, x1, y1) inside a HEIGHT x WIDTH image as the model clips them: many
    touching an edge or the whole image, some under a pixel across, at fractional positions."""
    x = torch.rand(count, 2, generator=generator) * (WIDTH + 20) - 10
    y = torch.rand(count, 2, generator=generator) * (HEIGHT + 20) - 10
    boxes = torch.stack([x.min(1)[0], y.min(1)[0], x.max(1)[0], y.max(1)[0]], dim=1)
    tiny = torch.rand(count, generator=generator) < 0.2
    boxes[tiny, 2:] = boxes[tiny, :2] + torch.rand(int(tiny.sum()), 2, generator=generator)
    whole = torch.rand(count, generator=generator) < 0.05
    boxes[whole] = torch.tensor([0.0, 0.0, WIDTH, HEIGHT])
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, WIDTH)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, HEIGHT)
    return boxes


def assemble(crops):
    """The full-size [N, H, W] masks that paste_crops' crops stand for."""
    full = np.zeros((len(crops), HEIGHT, WIDTH), dtype=bool)
    for k, (top, left, crop) in enumerate(crops):
        full[k, top : top + crop.shape[0], left : left + crop.shape[1]] = crop
    return full


@pytest.mark.parametrize("seed", range(3))
def test_crops_equal_torchvisions_pasted_masks_above_the_threshold(seed):
    generator = torch.Generator().manual_seed(seed)
    masks = torch.rand(300, 1, 28, 28, generator=generator)
    # Probabilities of 0, 0.5 and 1 make pixels of exactly 0.5, which the threshold leaves out.
    masks[::3] = torch.randint(0, 3, (100, 1, 28, 28), generator=generator) / 2
    boxes = random_boxes(generator, 300)
    expected = (paste_masks_in_image(masks, boxes, (HEIGHT, WIDTH))[:, 0] > 0.5).numpy()
    crops = mask_crops.paste_crops(masks, boxes, HEIGHT, WIDTH)
    assert np.array_equal(assemble(crops), expected)
    touching = (boxes[:, 2] >= WIDTH) | (boxes[:, 3] >= HEIGHT) | (boxes[:, :2] <= 0).any(1)
    assert touching.sum() > 50 and ((boxes[:, 2:] - boxes[:, :2]) < 1).any(1).sum() > 20
    assert expected.any(axis=(1, 2)).sum() > 200  # most masks keep pixels


def test_crops_stay_inside_the_image_and_their_expanded_box():
    generator = torch.Generator().manual_seed(3)
    boxes = random_boxes(generator, 100)
    crops = mask_crops.paste_crops(torch.ones(100, 1, 28, 28), boxes, HEIGHT, WIDTH)
    for (top, left, crop), box in zip(crops, boxes.tolist(), strict=True):
        assert 0 <= top and top + crop.shape[0] <= HEIGHT
        assert 0 <= left and left + crop.shape[1] <= WIDTH
        assert left <= max(box[0], 0) + 1 and left + crop.shape[1] >= min(box[2], WIDTH) - 1


def test_rles_equal_pycocotools_encoding_of_the_pasted_masks():
    generator = torch.Generator().manual_seed(4)
    masks = torch.rand(60, 1, 28, 28, generator=generator) ** 2
    boxes = random_boxes(generator, 60)
    pasted = paste_masks_in_image(masks, boxes, (HEIGHT, WIDTH))
    rles = mask_crops.paste_rles(masks, boxes, HEIGHT, WIDTH)
    assert rles == coco_results.masks_to_rles(pasted)
    dense = (pasted[:, 0] > 0.5).numpy().astype(np.uint8)
    assert rles == mask_util.encode(np.asfortranarray(dense.transpose(1, 2, 0)))


@pytest.fixture(scope="module")
def mask_rcnn():
    """A small untrained Mask R-CNN whose BatchNorm statistics come from an image (as training
    sets them; the default ones blow the activations up) and whose classes 1 and 2 are favoured,
    so that it finds boxes of many sizes with non-trivial masks; that image, the model's own
    output on it (masks pasted at full size by torchvision), and the model flags."""
    torch.manual_seed(0)
    args = models.model_defaults()
    vars(args).update(
        model="maskrcnn_resnet18_fpn",
        fpn_channels=32,
        min_size=128,
        max_size=192,
        rpn_post_nms_top_n_test=100,
        box_detections_per_img=20,
    )
    model = models.get_model(args, 4)
    generator = torch.Generator().manual_seed(0)
    small = torch.rand(1, 3, 12, 16, generator=generator)
    image = torch.nn.functional.interpolate(small, size=(120, 160), mode="bilinear")[0]
    image = (image * 255).to(torch.uint8)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None
    with torch.no_grad():
        model.train()
        model.backbone(model.transform([image.float() / 255])[0].tensors)
        model.roi_heads.box_predictor.cls_score.bias[1:3] += torch.tensor([3.0, 2.5])
    model.eval()
    with torch.inference_mode():
        output = model(engine.images_to_device([image], "cpu"))[0]
    return model, image, output, args


@pytest.mark.parametrize(("score_thresh", "labels"), [(0.0, None), ("median", [2, 3])])
def test_predict_image_gives_the_plain_models_detections_and_masks(mask_rcnn, score_thresh, labels):
    model, image, output, _ = mask_rcnn
    if score_thresh == "median":
        score_thresh = output["scores"].median().item()
    order = predict.kept_in_order(output["scores"], output["labels"], score_thresh, labels)
    expected = {k: v[order] for k, v in output.items()}
    got = predict.predict_image(model, image, "cpu", score_thresh, labels)
    assert 5 < len(order) <= len(output["scores"]) == 20
    for key in ("boxes", "labels", "scores"):
        assert torch.equal(got[key], expected[key]), key
    dense = expected["masks"][:, 0] > 0.5
    assert 0 < dense.sum() < dense.numel() // 2
    assert torch.equal(predict.binary_masks(got, *image.shape[-2:]), dense)
    records = coco_results.prediction_records(got, 1, None, {1: "a"}, {"file_name": "x.png"})
    assert records == coco_results.prediction_records(
        expected, 1, None, {1: "a"}, {"file_name": "x.png"}
    )
    height, width = image.shape[-2:]
    labels_image = predict.label_image(got["masks"], height, width)
    assert np.array_equal(labels_image, predict.label_image(expected["masks"], height, width))


def test_a_raised_score_threshold_keeps_the_detections_at_or_above_it(mask_rcnn):
    model, image, output, _ = mask_rcnn
    score_thresh = output["scores"].median().item()
    raised = copy.deepcopy(model)
    models.raise_score_threshold(raised, score_thresh)
    with torch.inference_mode():
        got = raised(engine.images_to_device([image], "cpu"))[0]
    kept = output["scores"] >= score_thresh
    assert 5 < kept.sum() < len(kept)
    for key in ("boxes", "labels", "scores", "masks"):
        assert torch.equal(got[key], output[key][kept]), key


def test_predict_py_writes_the_files_it_writes_with_the_plain_model(
    mask_rcnn, tmp_path, monkeypatch
):
    model, image, output, args = mask_rcnn
    names = {1: "a", 2: "b", 3: "c"}
    checkpoint = {"model": model.state_dict(), "args": vars(args), "epoch": 0}
    checkpoint.update(num_classes=4, category_names=names, label_offset=0)
    torch.save(checkpoint, tmp_path / "checkpoint.pth")
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp_path / "x.png")
    argv = ["--weights", str(tmp_path / "checkpoint.pth"), "--input", str(tmp_path / "x.png")]
    argv += ["--score-thresh", str(output["scores"].median().item())]
    with contextlib.redirect_stdout(io.StringIO()):
        predict.main([*argv, "--output", str(tmp_path / "crops")])
        monkeypatch.setattr(mask_crops, "is_mask_rcnn", lambda model: False)
        predict.main([*argv, "--output", str(tmp_path / "plain")])
    assert len(json.loads((tmp_path / "crops" / "results.json").read_text())) >= 10
    for name in ("results.json", "x_labels.png", "x_overlay.png"):
        assert (tmp_path / "crops" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes()


def test_a_model_in_training_mode_or_another_model_takes_the_plain_path(mask_rcnn):
    model, *_ = mask_rcnn
    assert mask_crops.is_mask_rcnn(model)
    assert not mask_crops.is_mask_rcnn(model.backbone)
    model.train()
    try:
        assert not mask_crops.is_mask_rcnn(model)
    finally:
        model.eval()


def test_no_kept_detection_gives_no_masks(mask_rcnn):
    model, image, *_ = mask_rcnn
    got = predict.predict_image(model, image, "cpu", 1.1)
    assert got["masks"] == [] and got["boxes"].shape == (0, 4) and got["scores"].numel() == 0
