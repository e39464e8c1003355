"""Own data: a third-party COCO export with its quirks, 16-bit images, fine-tuning to another class
count, the DSB2018 score and predict.py."""

import contextlib
import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import FAST, ROOT, SMALL_MASKRCNN, write_coco
from PIL import Image
from pycocotools import mask as mask_utils

import models
import overlays
import predict
import train
import utils
from coco_eval import CocoEvaluator
from coco_utils import CocoDetection, label_offset_of, label_to_category_id, load_image
from engine import evaluate
from errors import CheckpointError
from instance_metrics import image_dsb
from presets import DetectionPresetEval

SIZE = 64
# Label Studio style: 0-based and with a gap. Model labels are ids + 1: cell 1, debris 4.
CATEGORIES = [{"id": 0, "name": "cell", "supercategory": "none"}, {"id": 3, "name": "debris"}]
WRONG_BOX = [0, 0, 5, 5]


def square(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def rle_of_square(x0, y0, x1, y1, compressed):
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[y0:y1, x0:x1] = 1
    if compressed:
        rle = mask_utils.encode(np.asfortranarray(mask))
        return {"size": rle["size"], "counts": rle["counts"].decode()}
    flat = mask.flatten(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    return {"size": [SIZE, SIZE], "counts": np.diff([0, *changes, flat.size]).tolist()}


def write_picture(path, objects, kind):
    """Dim noise with brighter squares where the objects are, as 16-bit grey or 8-bit files."""
    rng = np.random.default_rng(len(str(path)))
    pixels = rng.normal(1000, 50, (SIZE, SIZE))
    for x0, y0, x1, y1 in objects:
        pixels[y0:y1, x0:x1] += 3000
    path.parent.mkdir(parents=True, exist_ok=True)
    grey16 = Image.fromarray(pixels.clip(0, 65535).astype(np.uint16))
    grey8 = Image.fromarray((pixels / 20).clip(0, 255).astype(np.uint8))
    {"16": grey16, "palette": grey8.convert("P"), "rgba": grey8.convert("RGBA")}[kind].save(path)


def write_export(root):
    """A COCO export with the quirks annotation tools produce; returns (image folder, file).

    Sub-folders (one written Windows-style), 16-bit PNG and TIFF, palette and RGBA, category ids
    0 and 3, no info or licenses but extra keys, an image without annotations and one without
    width/height, annotations without id, iscrowd, bbox or area, a bbox that disagrees with its
    polygon, and all three segmentation forms. (A polygon of fewer than 3 points is an error,
    tested in test_reliability.py.)
    """
    images_dir = root / "images"
    specs = [  # file_name, kind, [(category, square, form, dropped keys, bbox)]
        ("day1/a.png", "16", [(0, (4, 4, 20, 20), "poly", (), None), (3, (30, 30, 50, 44), "rle", ("bbox", "area"), None)]),  # noqa: E501
        ("day1\\b.png", "16", [(0, (10, 8, 30, 30), "poly", ("area",), WRONG_BOX), (3, (40, 6, 58, 20), "counts", ("iscrowd", "id"), None)]),  # noqa: E501
        ("day2/c.tif", "16", [(0, (20, 20, 44, 40), "poly", ("bbox", "area"), None)]),
        ("d.png", "palette", [(0, (6, 30, 26, 58), "poly", (), None), (3, (36, 36, 60, 60), "poly", (), None)]),  # noqa: E501
        ("e.png", "rgba", []),
    ]  # fmt: skip
    images, annotations = [], []
    for image_id, (file_name, kind, objects) in enumerate(specs, start=1):
        path = images_dir.joinpath(*file_name.replace("\\", "/").split("/"))
        write_picture(path, [square_corners for _, square_corners, *_ in objects], kind)
        image = {"id": image_id, "file_name": file_name, "height": SIZE, "width": SIZE}
        if kind == "palette":
            del image["height"], image["width"]
        images.append(image)
        for category, (x0, y0, x1, y1), form, dropped, bbox in objects:
            segmentation = {
                "poly": square(x0, y0, x1, y1),
                "rle": rle_of_square(x0, y0, x1, y1, compressed=True),
                "counts": rle_of_square(x0, y0, x1, y1, compressed=False),
            }[form]
            annotation = {
                "id": len(annotations) + 10,
                "image_id": image_id,
                "category_id": category,
                "segmentation": segmentation,
                "bbox": bbox or [x0, y0, x1 - x0, y1 - y0],
                "area": (x1 - x0) * (y1 - y0),
                "iscrowd": 0,
            }
            annotations.append({k: v for k, v in annotation.items() if k not in dropped})
    dataset = {
        "images": images,
        "annotations": annotations,
        "categories": CATEGORIES,
        "type": "instances",
        "tool": {"name": "some-labeller", "version": "3.1"},
    }
    ann_file = root / "export.json"
    ann_file.write_text(json.dumps(dataset))
    return images_dir, ann_file


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return write_export(tmp_path_factory.mktemp("export"))


def test_label_offset_rule():
    assert label_offset_of([1, 2]) == 0
    assert label_offset_of([1, 5, 90]) == 0  # COCO's gaps stay: 91 classes
    assert label_offset_of([0, 3]) == 1
    assert label_to_category_id(0, 91) is None
    assert label_to_category_id(1, 5) == {1: 0, 2: 1, 3: 2, 4: 3}


def test_export_loads_with_labels_shifted_past_background(export):
    dataset = CocoDetection(*export)
    assert dataset.label_offset == 1
    assert dataset.category_names() == {0: "cell", 3: "debris"}
    assert train.default_num_classes(dataset) == 5
    assert dataset.ids == [1, 2, 3, 4, 5]
    assert CocoDetection(*export, drop_images_without_objects=True).ids == [1, 2, 3, 4]
    labels = [dataset[i][1]["labels"].tolist() for i in range(5)]
    assert labels == [[1, 4], [1, 4], [1], [1, 4], []]
    # Another file's offset can be imposed (a validation set follows the training set).
    assert CocoDetection(*export, label_offset=0)[0][1]["labels"].tolist() == [0, 3]


def test_export_images_load_from_sub_folders_in_every_format(export):
    dataset = CocoDetection(*export)
    dtypes = [dataset[i][0].dtype for i in range(5)]
    assert dtypes == [torch.float32] * 3 + [torch.uint8] * 2  # 16-bit scaled, 8-bit as is
    assert all(dataset[i][0].shape == (3, SIZE, SIZE) for i in range(5))
    assert dataset.coco.imgs[4]["width"] == dataset.coco.imgs[4]["height"] == SIZE


def test_training_boxes_come_from_the_segmentation(export):
    dataset = CocoDetection(*export)
    _, target = dataset[1]  # its cell's bbox in the file is WRONG_BOX
    assert target["boxes"].tolist() == [[10, 8, 30, 30], [40, 6, 58, 20]]
    _, target = dataset[2]  # no bbox in the file
    assert target["boxes"].tolist() == [[20, 20, 44, 40]]


def test_missing_fields_are_filled_for_the_evaluator(export):
    coco = CocoDetection(*export).coco
    annotations = coco.dataset["annotations"]
    assert all({"id", "iscrowd", "bbox", "area"} <= a.keys() for a in annotations)
    assert len({a["id"] for a in annotations}) == len(annotations) == 7
    by_box = {tuple(a["bbox"]): a for a in annotations}
    assert by_box[(30.0, 30.0, 20.0, 14.0)]["area"] == 20 * 14  # from the RLE
    assert by_box[(20.0, 20.0, 24.0, 20.0)]["area"] == 24 * 20  # from the polygon
    assert tuple(WRONG_BOX) in by_box  # a given bbox stays what the file says
    assert {"type", "tool"} <= coco.dataset.keys()


def test_16_bit_tiff_and_float_tiff_follow_the_percentile_rule(tmp_path):
    pixels = np.random.default_rng(0).integers(100, 5000, (20, 30)).astype(np.uint16)
    for name, array in (("a.tif", pixels), ("b.tif", pixels.astype(np.float32))):
        Image.fromarray(array).save(tmp_path / name)
        image = load_image(tmp_path / name)
        assert image.dtype == torch.float32 and image.shape == (3, 20, 30)
        assert image.min() == 0 and image.max() == 1
        low, high = np.percentile(pixels, (0.1, 99.9))
        expected = np.clip((pixels - low) / (high - low), 0, 1)
        assert np.allclose(image[0].numpy(), expected, atol=1e-5)


class GroundTruthModel(torch.nn.Module):
    """Predicts each image's ground truth in the data loader's order, as model labels; drops the
    last object of the images in `drop_last_of`."""

    def __init__(self, dataset, drop_last_of=()):
        super().__init__()
        self.targets = iter([dataset[i][1] for i in range(len(dataset))])
        self.drop_last_of = drop_last_of

    def forward(self, images):
        outputs = []
        for _ in images:
            target = next(self.targets)
            n = len(target["labels"]) - (target["image_id"] in self.drop_last_of)
            outputs.append(
                {
                    "boxes": target["boxes"][:n].float(),
                    "labels": target["labels"][:n],
                    "scores": torch.linspace(1.0, 0.9, n),
                    "masks": target["masks"][:n, None].float(),
                }
            )
        return outputs


def evaluate_ground_truth(export, evaluator_for, drop_last_of=()):
    dataset = CocoDetection(*export, transforms=DetectionPresetEval())
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, collate_fn=utils.collate_fn)
    model = GroundTruthModel(dataset, drop_last_of)
    metrics = train.image_metrics(train.get_args_parser().parse_args(["--dsb-score"]))
    with contextlib.redirect_stdout(io.StringIO()):
        stats = evaluate(model, loader, "cpu", evaluator_for(dataset), image_metrics=metrics)
    return {**stats, "dsb": np.mean([image_dsb(c) for c in stats["nuclei"].values()])}


def test_evaluation_maps_labels_back_to_category_ids(export):
    args = train.get_args_parser().parse_args(["--model", "maskrcnn_resnet50_fpn"])
    with torch.device("meta"):  # the evaluator reads what the model outputs, not its weights
        mask_model = models.get_model(args, 5)
    stats = evaluate_ground_truth(
        export, lambda dataset: train.make_evaluator(args, mask_model, dataset, 5)
    )
    assert stats["segm"][0] == pytest.approx(1.0)
    assert stats["dsb"] == pytest.approx(1.0)


def test_pycocotools_evaluates_the_completed_export(export):
    def evaluator_for(dataset):
        return CocoEvaluator(
            dataset.coco,
            ["bbox", "segm"],
            backend="pycocotools",
            label_to_category_id=label_to_category_id(dataset.label_offset, 5),
        )

    stats = evaluate_ground_truth(export, evaluator_for)
    assert stats["segm"][0] == pytest.approx(1.0)
    # The file's wrong bbox is the ground truth for box AP: one box in seven misses.
    assert 0.5 < stats["bbox"][0] < 1.0


def test_dsb_score_of_missed_objects(export):
    # Images 1 and 2 lose one of their two objects: 1/2 each at every IoU threshold; images 3-4
    # are perfect and image 5 has nothing to find and finds nothing.
    stats = evaluate_ground_truth(
        export,
        lambda dataset: CocoEvaluator(dataset.coco, ["segm"], label_to_category_id={1: 0, 4: 3}),
        drop_last_of=(1, 2),
    )
    assert stats["dsb"] == pytest.approx((0.5 + 0.5 + 1 + 1 + 1) / 5)


def save_checkpoint(path, model_argv, num_classes, **extra):
    args = train.get_args_parser().parse_args(model_argv)
    model = models.get_model(args, num_classes)
    torch.save({"model": model.state_dict(), "args": vars(args), **extra}, path)
    return model.state_dict()


@pytest.mark.slow
def test_fitting_weights_loads_all_but_the_class_layers(tmp_path, capsys):
    saved = save_checkpoint(tmp_path / "three.pth", SMALL_MASKRCNN, 3)
    args = train.get_args_parser().parse_args(
        [*SMALL_MASKRCNN, "--weights", str(tmp_path / "three.pth")]
    )
    state = models.get_model(args, 5).state_dict()
    reinitialised = (
        "roi_heads.box_predictor.cls_score, roi_heads.box_predictor.bbox_pred, "
        "roi_heads.mask_predictor.mask_fcn_logits"
    )
    assert (
        capsys.readouterr().out.strip() == f"re-initialised (class count differs): {reinitialised}"
    )
    assert state["roi_heads.box_predictor.cls_score.weight"].shape[0] == 5
    assert state["roi_heads.mask_predictor.mask_fcn_logits.weight"].shape[0] == 5
    for key, value in state.items():
        if not key.startswith(models.RCNN_CLASS_DEPENDENT_PREFIXES):
            assert torch.equal(value, saved[key]), key


def test_replacing_predictors_keeps_the_mask_upsampling(capsys):
    args = train.get_args_parser().parse_args([])
    with torch.device("meta"):  # the layout alone: no weights to initialise
        model = models.get_model(args, 91)
    upsampling = model.roi_heads.mask_predictor.conv5_mask
    models.replace_class_layers(model, 4)
    assert model.roi_heads.mask_predictor.conv5_mask is upsampling
    assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 4
    assert model.roi_heads.box_predictor.bbox_pred.out_features == 16
    assert "roi_heads.mask_predictor.mask_fcn_logits" in capsys.readouterr().out


@pytest.mark.slow
def test_weights_that_do_not_fit_are_an_error_naming_the_tensor(tmp_path):
    state = save_checkpoint(tmp_path / "ok.pth", SMALL_MASKRCNN, 3)
    state["backbone.fpn.layer_blocks.0.0.weight"] = torch.zeros(16, 8, 3, 3)
    torch.save({"model": state}, tmp_path / "changed.pth")
    faster = ["--model", "fasterrcnn_resnet18_fpn", "--fpn-channels", "16"]
    save_checkpoint(tmp_path / "faster.pth", faster, 3)
    args = train.get_args_parser().parse_args(SMALL_MASKRCNN)
    args.weights = str(tmp_path / "changed.pth")
    with pytest.raises(CheckpointError) as changed:
        models.get_model(args, 3)
    assert str(changed.value) == (
        f"--weights {args.weights}: tensor backbone.fpn.layer_blocks.0.0.weight has shape "
        "(16, 8, 3, 3), the model expects (16, 16, 3, 3)"
    )
    args.weights = str(tmp_path / "faster.pth")
    with pytest.raises(CheckpointError) as other_model:
        models.get_model(args, 3)
    assert "tensors missing (e.g. ['roi_heads.mask_head" in str(other_model.value)


@pytest.fixture(scope="module")
def fine_tuned(export, maskrcnn_checkpoint, tmp_path_factory):
    """Two iterations on the export (16-bit images), from the demo's 3-class checkpoint, with
    --dsb-score."""
    root = tmp_path_factory.mktemp("fine_tuned")
    images, ann_file = export
    split = ["--train-ann", ann_file, "--train-images", images, "--val-ann", ann_file]
    argv = [*split, "--val-images", images, "--output-dir", root / "out", *SMALL_MASKRCNN, *FAST]
    argv += ["--epochs", "1", "--weights", maskrcnn_checkpoint, "--dsb-score"]
    argv += ["--anchor-sizes", "8", "16", "32", "64", "128"]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        train.main(train.get_args_parser().parse_args([str(a) for a in argv]))
    return root / "out", stdout.getvalue()


@pytest.mark.slow
def test_fine_tuning_on_the_export_logs_categories_and_dsb_score(fine_tuned):
    output_dir, stdout = fine_tuned
    assert "re-initialised (class count differs): roi_heads.box_predictor.cls_score" in stdout
    assert "categories: 0 cell, 3 debris; model label = category id + 1" in stdout
    assert "DSB2018 score (masks with score >= 0.5, 5 images)" in stdout
    (record,) = [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines()]
    assert 0.0 <= record["dsb"] <= 1.0 and len(record["segm"]) == 12
    assert all(np.isfinite(v) for v in record["train"].values())
    checkpoint = torch.load(output_dir / "checkpoint.pth", weights_only=True)
    assert checkpoint["num_classes"] == 5 and checkpoint["label_offset"] == 1
    assert checkpoint["category_names"] == {0: "cell", 3: "debris"}
    assert checkpoint["args"]["anchor_sizes"] == [8, 16, 32, 64, 128]


@pytest.mark.slow
def test_test_only_writes_the_dsb_score_to_eval_json(export, fine_tuned, tmp_path):
    output_dir, _ = fine_tuned
    images, ann_file = export
    argv = ["--val-ann", ann_file, "--val-images", images, "--output-dir", tmp_path]
    argv += [*SMALL_MASKRCNN, *FAST, "--test-only", "--resume", output_dir / "checkpoint.pth"]
    argv += ["--dsb-score"]
    with contextlib.redirect_stdout(io.StringIO()):
        train.main(train.get_args_parser().parse_args([str(a) for a in argv]))
    result = json.loads((tmp_path / "eval.json").read_text())
    (record,) = [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines()]
    # The labels follow the checkpoint's categories: the same numbers as after training.
    assert result["dsb"] == record["dsb"] and result["segm"] == record["segm"]


@pytest.fixture(scope="module")
def predictions(fine_tuned, tmp_path_factory):
    folder = tmp_path_factory.mktemp("to_predict")
    pictures = {"b16.png": (4, 4, 30, 30), "a.tif": (10, 10, 40, 40), "c.png": (20, 20, 50, 60)}
    for (name, box), kind in zip(pictures.items(), ("16", "16", "palette"), strict=True):
        write_picture(folder / name, [box], kind)
    (folder / "notes.txt").write_text("not an image")
    images = [
        {"id": i, "file_name": name, "height": SIZE, "width": SIZE}
        for i, name in enumerate(pictures, start=1)
    ]
    annotations = [
        {"id": i, "image_id": i, "category_id": 0, "segmentation": square(*box)}
        for i, box in enumerate(pictures.values(), start=1)
    ]
    ann_file = write_coco(folder.parent / "truth.json", images, annotations, CATEGORIES)
    output = tmp_path_factory.mktemp("predictions")
    with contextlib.redirect_stdout(io.StringIO()):
        predict.main(
            ["--weights", str(fine_tuned[0] / "checkpoint.pth"), "--input", str(folder)]
            + ["--output", str(output), "--score-thresh", "0.1", "--device", "cpu"]
            + ["--ann", str(ann_file)]
        )
    return output, folder


@pytest.mark.slow
def test_predict_writes_overlays_label_images_and_results(predictions):
    predictions, _ = predictions
    results = json.loads((predictions / "results.json").read_text())
    ids = {r["file_name"]: r["image_id"] for r in results}
    assert ids == {"a.tif": 1, "b16.png": 2, "c.png": 3}  # sorted file order, from 1
    assert {r["category_name"] for r in results} <= {"cell", "debris"}
    assert {(r["category_id"], r["category_name"]) for r in results} <= {(0, "cell"), (3, "debris")}
    assert all(r["score"] >= 0.1 for r in results)
    scale = overlays.drawing_scale(SIZE, SIZE)  # small images are drawn larger
    for stem in ("a", "b16", "c"):
        overlay = Image.open(predictions / f"{stem}_overlay.png")
        assert overlay.mode == "RGB" and overlay.size == (SIZE * scale, SIZE * scale) != (SIZE,) * 2
        labels = Image.open(predictions / f"{stem}_labels.png")
        assert labels.mode == "I;16" and labels.size == (SIZE, SIZE)


@pytest.mark.slow
def test_predict_with_ann_counts_every_object_once(predictions):
    predictions, _ = predictions
    summary = json.loads((predictions / "errors.json").read_text())
    results = json.loads((predictions / "results.json").read_text())
    assert summary["images"] == 3 and summary["gt"] == 3 and summary["pred"] == len(results)
    found = ("true_positive", "missed", "split_gt", "merged_gt")
    assert sum(summary[kind] for kind in found) == 3
    assert sum(summary[k] for k in ("true_positive", "extra", "split_pred", "merged_pred")) == len(
        results
    )
    rows = (predictions / "errors.csv").read_text().splitlines()
    assert rows[0].startswith("image,") and sorted(r.split(",")[0] for r in rows[1:]) == [
        "a.tif", "b16.png", "c.png",
    ]  # fmt: skip
    assert all((predictions / f"{stem}_errors.png").exists() for stem in ("a", "b16", "c"))


@pytest.mark.slow
def test_label_image_numbers_detections_by_descending_score(predictions):
    predictions, _ = predictions
    results = json.loads((predictions / "results.json").read_text())
    for image_id, stem in enumerate(("a", "b16", "c"), start=1):
        records = [r for r in results if r["image_id"] == image_id]
        scores = [r["score"] for r in records]
        assert scores == sorted(scores, reverse=True)
        labels = np.asarray(Image.open(predictions / f"{stem}_labels.png")).astype(np.int64)
        masks = np.stack(
            [mask_utils.decode(r["segmentation"]) for r in records] or [np.zeros_like(labels)]
        ).astype(bool)
        # Each pixel belongs to the first (highest-scoring) detection whose mask covers it.
        expected = np.where(masks.any(0), masks.argmax(0) + 1, 0)
        assert (labels == expected).all()
    assert any(r["segmentation"]["counts"] != "" for r in results)
    assert len(results) > 0


def test_label_image_overlaps_go_to_the_higher_score(tmp_path):
    masks = torch.zeros(3, 4, 6, dtype=torch.bool)  # by descending score
    masks[0, :2, :3] = True
    masks[1, 1:3, 2:5] = True
    masks[2, 1, 1:3] = True  # hidden entirely by the first two
    expected = [
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 2, 2, 0],
        [0, 0, 2, 2, 2, 0],
        [0, 0, 0, 0, 0, 0],
    ]
    labels = predict.instance_labels(masks)
    assert labels.tolist() == expected
    predict.save_array(labels.numpy().astype(np.uint16), tmp_path / "x_labels.tif")
    read = np.asarray(Image.open(tmp_path / "x_labels.tif"))
    assert read.dtype == np.uint16 and read.tolist() == expected


@pytest.mark.slow
def test_predict_bad_input_is_one_line_naming_the_file(fine_tuned, tmp_path, capsys):
    broken = tmp_path / "in" / "broken.png"
    broken.parent.mkdir()
    broken.write_bytes(b"\x89PNG not really")
    argv = ["--input", str(broken.parent), "--output", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        predict.main(["--weights", str(fine_tuned[0] / "checkpoint.pth"), *argv])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"predict.py: error: {broken}: cannot read image " + (
        f"(cannot identify image file '{broken}')\n"
    )
    write_picture(tmp_path / "good" / "a.png", [], "16")
    argv[1] = str(tmp_path / "good")
    result = subprocess.run(
        [sys.executable, "predict.py", "--weights", str(tmp_path / "missing.pth"), *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr == f"predict.py: error: {tmp_path / 'missing.pth'}: no such file\n"
