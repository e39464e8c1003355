import json

import conftest
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util

import ensemble
import models
import unet
from errors import CheckpointError, ConfigError

SIZE = 48


def square(y0, x0, side, size=SIZE):
    mask = np.zeros((size, size), dtype=bool)
    mask[y0 : y0 + side, x0 : x0 + side] = True
    return mask


def detection_output(masks, scores, probability=0.9):
    """A model's output for boolean masks: probability inside, 0 outside."""
    masks = np.asarray(masks, dtype=bool).reshape(-1, SIZE, SIZE)
    boxes = []
    for mask in masks:
        ys, xs = np.nonzero(mask)
        boxes.append((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1))
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.ones(len(masks), dtype=torch.int64),
        "scores": torch.tensor(scores, dtype=torch.float32),
        "masks": torch.from_numpy(masks[:, None] * np.float32(probability)),
    }


class StubMaskRCNN(torch.nn.Module):
    def __init__(self, output):
        super().__init__()
        self.output = output

    def forward(self, images):
        return [self.output for _ in images]


class StubUNet(torch.nn.Module):
    """Foreground maps whose watershed gives the instances in `masks`, a border between them."""

    watershed_kwargs = {"foreground_thresh": 0.5, "border_thresh": 0.5, "min_area": 10}

    def __init__(self, masks):
        super().__init__()
        self.foreground = torch.from_numpy(np.any(masks, axis=0) * np.float32(0.95))
        self.border = torch.full((SIZE, SIZE), 0.05)

    def predict_maps(self, images):
        return [{"foreground": self.foreground, "border": self.border} for _ in images]

    def forward(self, images):
        maps = self.predict_maps(images)
        return [unet.instances_from_maps(**m, **self.watershed_kwargs) for m in maps]


class ConstantCombiner:
    """Predicted quality from the candidate's score: the selection's input is then known."""

    def __call__(self, features):
        return features[:, ensemble.FEATURES.index("score")]


@pytest.fixture
def scene():
    """Two U-Net nuclei (apart), Mask R-CNN finding the first twice and a third one."""
    unet_masks = [square(4, 4, 10), square(30, 30, 10)]
    rcnn_masks = [square(4, 5, 10), square(5, 4, 10), square(20, 2, 8)]
    rcnn = StubMaskRCNN(detection_output(rcnn_masks, [0.6, 0.55, 0.95]))
    return rcnn, StubUNet(np.array(unet_masks)), unet_masks, rcnn_masks


def image():
    return [torch.zeros(3, SIZE, SIZE)]


def test_features_have_the_documented_columns_and_no_nan(scene):
    rcnn, stub_unet, unet_masks, _ = scene
    model = ensemble.EnsembleModel(rcnn, stub_unet, mode="baseline")
    candidates, features = model.candidates_and_features(*model.model_outputs(image())[0])
    assert features.shape == (5, len(ensemble.FEATURES)) == (5, 15)
    assert np.isfinite(features).all()
    column = dict(zip(ensemble.FEATURES, features.T, strict=True))
    assert column["source_unet"].tolist() == [0, 0, 0, 1, 1]
    # Candidates of each model come best first: Mask R-CNN's 0.95, 0.6, 0.55.
    assert column["score"][:3].tolist() == pytest.approx([0.95, 0.6, 0.55])
    assert column["area"].tolist() == [64, 100, 100, 100, 100]
    # Mask R-CNN's 0.6 square is the U-Net's shifted one pixel: IoU 90 / 110.
    assert column["best_iou_other_model"][1] == pytest.approx(90 / 110)
    assert column["other_model_score"][1] == pytest.approx(0.95)
    assert column["best_iou_same_model"][1] == pytest.approx(81 / 119)
    assert column["best_iou_other_model"][0] == 0.0
    assert column["overlapping_candidates"].tolist() == [0, 2, 2, 2, 0]
    assert column["other_contained"][3] == 2
    assert column["unet_foreground"][3] == pytest.approx(0.95)
    assert column["maskrcnn_foreground"][4] == 0.0
    assert column["solidity"][0] == pytest.approx(1.0)


def test_outputs_never_share_a_pixel(scene):
    rcnn, stub_unet, _, _ = scene
    for mode, combiner in (("learned", ConstantCombiner()), ("baseline", None)):
        model = ensemble.EnsembleModel(rcnn, stub_unet, combiner, {"nms_iou": 0.9}, mode)
        (output,) = model(image())
        masks = output["masks"][:, 0] > 0.5
        assert len(masks) >= 2
        assert masks.sum(0).max() == 1, mode
        assert (output["scores"][:-1] >= output["scores"][1:]).all()


def test_pixels_go_to_the_better_instance_and_slivers_are_dropped():
    masks = np.array([square(0, 0, 10), square(0, 5, 10), square(0, 1, 10)])
    resolved = ensemble.resolve_pixels(masks, [0, 1, 2], min_area=10, min_kept_fraction=0.5)
    assert [i for i, _ in resolved] == [0, 1]
    assert resolved[0][1].sum() == 100 and resolved[1][1].sum() == 50


def test_baseline_keeps_agreed_instances(scene):
    rcnn, stub_unet, unet_masks, _ = scene
    model = ensemble.EnsembleModel(rcnn, stub_unet, mode="baseline")
    (output,) = model(image())
    masks = (output["masks"][:, 0] > 0.5).numpy()
    # The agreed nucleus keeps the U-Net's mask; the confident Mask R-CNN single survives; the
    # U-Net single (score 0.95 >= single_score) too; the second Mask R-CNN duplicate does not.
    assert any(np.array_equal(m, unet_masks[0]) for m in masks)
    assert any(np.array_equal(m, square(20, 2, 8) & ~unet_masks[0]) for m in masks)
    assert len(masks) == 3
    assert output["scores"][0] == pytest.approx(0.75 + 0.25 * (0.6 + 0.95) / 2)


def test_baseline_drops_unconfirmed_unconfident_singles(scene):
    rcnn, stub_unet, _, _ = scene
    model = ensemble.EnsembleModel(
        rcnn, stub_unet, thresholds={"single_score": 0.99}, mode="baseline"
    )
    (output,) = model(image())
    assert len(output["scores"]) == 1


def tiny_unet_checkpoint():
    args = models.model_defaults()
    args.model, args.min_size, args.max_size = "unet_resnet18", 64, 64
    torch.manual_seed(0)
    model = models.get_model(args, 2)
    return {
        "model": model.state_dict(),
        "args": vars(args),
        "num_classes": 2,
        "category_names": {1: "nucleus"},
        "label_offset": 0,
        "epoch": 0,
    }


def fitted_combiner_text():
    rng = np.random.default_rng(0)
    features = rng.random((200, len(ensemble.FEATURES))).astype(np.float32)
    targets = np.clip(features[:, 1] * 0.8 + 0.1 * rng.random(200), 0, 1)
    return ensemble.fit_combiner(features, targets), features


def test_saved_ensemble_reloads_with_identical_output(tmp_path):
    text, features = fitted_combiner_text()
    checkpoint = tiny_unet_checkpoint()
    fit_info = {"ann": "/nowhere/fit.json", "sha256": "0", "images": 1, "candidates": 200}
    path = tmp_path / "ensemble.pth"
    # Two U-Nets stand in for the pair: they speak the same interface as Mask R-CNN.
    ensemble.save_ensemble(path, text, {"min_score": 0.0}, checkpoint, checkpoint, fit_info)
    record = torch.load(path, weights_only=True)
    assert record["kind"] == "ensemble" and record["features"] == list(ensemble.FEATURES)
    model, info = ensemble.load_ensemble(str(path))
    assert info["category_names"] == {1: "nucleus"} and info["label_offset"] == 0
    assert np.array_equal(model.combiner(features), ensemble.Combiner(text)(features))
    assert model.thresholds["min_score"] == 0.0
    torch.manual_seed(1)
    images = [torch.rand(3, 64, 64)]
    again, _ = ensemble.load_ensemble(str(path))
    first, second = model(images)[0], again(images)[0]
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_combiner_learns_the_quality():
    text, features = fitted_combiner_text()
    predicted = ensemble.Combiner(text)(features)
    assert np.corrcoef(predicted, features[:, 1])[0, 1] > 0.9
    assert ((predicted >= 0) & (predicted <= 1)).all()


def write_coco(path, num_annotations=1):
    data = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "nucleus"}]}
    data["info"] = {"n": num_annotations}
    path.write_text(json.dumps(data))
    return path


def test_evaluating_on_the_fit_split_is_refused(tmp_path):
    fit_ann = write_coco(tmp_path / "fit.json")
    fit_info = {"ann": str(fit_ann.resolve()), "sha256": ensemble.file_sha256(fit_ann)}
    with pytest.raises(ConfigError, match="fitted on this split"):
        ensemble.check_not_fit_split(fit_info, str(fit_ann))
    copy = tmp_path / "copy.json"
    copy.write_bytes(fit_ann.read_bytes())
    with pytest.raises(ConfigError, match="fitted on this split"):
        ensemble.check_not_fit_split(fit_info, str(copy))
    ensemble.check_not_fit_split(fit_info, str(write_coco(tmp_path / "val.json", 2)))


def test_fitting_on_a_training_split_is_refused(tmp_path):
    checkpoint = {"args": {"model": "unet_resnet18", "data_path": str(tmp_path), "train_ann": None}}
    train_ann = tmp_path / "annotations" / "instances_train2017.json"
    with pytest.raises(ConfigError, match="trained on this split"):
        ensemble.check_held_out(str(train_ann), checkpoint)
    ensemble.check_held_out(str(tmp_path / "annotations" / "instances_fit2017.json"), checkpoint)


@pytest.mark.parametrize("content", ["checkpoint", "text"])
def test_not_an_ensemble_file_is_a_one_line_error(tmp_path, capsys, content):
    weights = tmp_path / "model.pth"
    if content == "checkpoint":
        torch.save({"model": {}, "epoch": 0, "args": {"model": "unet_resnet18"}}, weights)
    else:
        weights.write_text("not a checkpoint")
    val = write_coco(tmp_path / "val.json")
    argv = ["evaluate", "--weights", str(weights), "--val-ann", str(val)]
    argv += ["--val-images", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        ensemble.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"ensemble.py: error: {weights}: not")


def test_load_ensemble_rejects_a_train_checkpoint(tmp_path):
    path = tmp_path / "model.pth"
    torch.save({"model": {}, "epoch": 0, "args": {}}, path)
    with pytest.raises(CheckpointError, match="not an ensemble file"):
        ensemble.load_ensemble(str(path))


def test_members_must_be_the_right_models():
    rcnn = {"args": {"model": "maskrcnn_resnet50_fpn"}, "category_names": {1: "a"}}
    net = {"args": {"model": "unet_resnet34"}, "category_names": {1: "a"}}
    ensemble.check_members(rcnn, net, "a.pth", "b.pth")
    with pytest.raises(ConfigError, match="not a U-Net"):
        ensemble.check_members(rcnn, rcnn, "a.pth", "b.pth")
    with pytest.raises(ConfigError, match="different categories"):
        ensemble.check_members(rcnn, {**net, "category_names": {1: "b"}}, "a.pth", "b.pth")


def write_onnx_with_metadata(path):
    """An ONNX file that loads as export.py's do (an identity graph with their metadata)."""
    onnx = pytest.importorskip("onnx")
    image = onnx.helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, [3, None, None])
    boxes = onnx.helper.make_tensor_value_info("boxes", onnx.TensorProto.FLOAT, [3, None, None])
    node = onnx.helper.make_node("Identity", ["image"], ["boxes"])
    model = onnx.helper.make_model(onnx.helper.make_graph([node], "identity", [image], [boxes]))
    metadata = {"model": "unet_resnet18", "outputs": ["boxes"], "category_names": {},
                "label_offset": 0}  # fmt: skip
    onnx.helper.set_model_props(model, {"instance_segmentation": json.dumps(metadata)})
    onnx.save(model, path)


@pytest.mark.parametrize("given", ["onnx", "unet"])
def test_a_maskrcnn_that_is_no_mask_rcnn_checkpoint_is_a_one_line_error(tmp_path, capsys, given):
    unet_path = tmp_path / "unet.pth"
    torch.save(tiny_unet_checkpoint(), unet_path)
    maskrcnn = unet_path
    if given == "onnx":
        maskrcnn = tmp_path / "maskrcnn.onnx"
        write_onnx_with_metadata(maskrcnn)
    fit_ann = write_coco(tmp_path / "fit.json")
    argv = ["fit", "--maskrcnn", str(maskrcnn), "--unet", str(unet_path), "--val-ann", str(fit_ann),
            "--val-images", str(tmp_path), "--output", str(tmp_path / "ensemble.pth")]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        ensemble.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"ensemble.py: error: --maskrcnn {maskrcnn}: ")
    assert ("not a loadable checkpoint" if given == "onnx" else "not Mask R-CNN") in err
    assert not (tmp_path / "ensemble.pth").exists()


def rle_annotation(annotation_id, mask):
    rle = mask_util.encode(np.asfortranarray(mask, dtype=np.uint8))
    ys, xs = np.nonzero(mask)
    return {
        "id": annotation_id,
        "image_id": annotation_id // 10,
        "category_id": 1,
        "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode()},
        "area": float(mask.sum()),
        "bbox": [float(xs.min()), float(ys.min()), float(np.ptp(xs) + 1), float(np.ptp(ys) + 1)],
        "iscrowd": 0,
    }


@pytest.fixture
def val_split(scene, tmp_path):
    """Two images of different kinds whose nuclei are the U-Net's two instances."""
    unet_masks = scene[2]
    images, annotations = [], []
    for image_id, kind in ((1, "tissue"), (2, "fluorescence")):
        conftest.write_image(tmp_path / "val" / f"{image_id}.png", SIZE, SIZE, seed=image_id)
        images.append({"id": image_id, "file_name": f"{image_id}.png", "kind": kind})
        images[-1] |= {"height": SIZE, "width": SIZE}
        annotations += [rle_annotation(10 * image_id + i, m) for i, m in enumerate(unet_masks)]
    categories = [{"id": 1, "name": "nucleus"}]
    ann = conftest.write_coco(tmp_path / "val.json", images, annotations, categories)
    return ann, tmp_path / "val"


def test_modes_evaluated_in_one_pass_equal_each_alone(scene, val_split):
    rcnn, unet_model, _, _ = scene
    model = ensemble.EnsembleModel(rcnn, unet_model, mode="baseline")
    info = {"label_offset": 0, "num_classes": 2}
    loader = ensemble.eval_loader(str(val_split[0]), str(val_split[1]), 0)
    together = ensemble.evaluate_modes(model, ["unet", "maskrcnn"], loader, "cpu", info, 500)
    alone = ensemble.evaluate_modes(model, ["maskrcnn"], loader, "cpu", info, 500)
    assert together[1] == alone[0]
    unet_metrics = together[0]
    assert list(unet_metrics["nuclei"]) == ["all", "tissue", "fluorescence"]
    assert unet_metrics["nuclei"]["tissue"]["images"] == 1
    # The U-Net finds both nuclei of each image exactly; Mask R-CNN one of two, and two extras.
    assert unet_metrics["nuclei"]["all"]["f1_iou50"] == 1.0
    assert unet_metrics["dsb"] == unet_metrics["nuclei"]["all"]["dsb"] == 1.0
    assert together[1]["nuclei"]["all"]["recall_iou50"] == 0.5
    # The errors of the U-Net's exact instances: every nucleus a true positive, per kind too.
    errors = unet_metrics["errors"]
    assert errors["all"]["true_positive"] == errors["all"]["gt"] == 4
    assert errors["tissue"]["true_positive"] == 2 and errors["all"]["missed"] == 0


def test_convex_solidity_is_one_for_convex_pixel_sets_and_drops_with_a_notch():
    ys, xs = np.nonzero(np.ones((5, 7), dtype=bool))
    assert ensemble.convex_solidity(xs, ys) == 1.0
    assert ensemble.convex_solidity(np.array([3]), np.array([3])) == 1.0
    notched = np.ones((9, 9), dtype=bool)
    notched[3:6, 4:] = False  # a slot cut in from the right: 3 x 5 of 81 pixels
    ys, xs = np.nonzero(notched)
    # The hull is still the 9 x 9 square (8 x 8 between pixel centres, 32 around): 81 pixels.
    assert ensemble.convex_solidity(xs, ys) == pytest.approx(66 / (64 + 16 + 1))
