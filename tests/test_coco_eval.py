import contextlib
import copy
import importlib.util
import io
import json

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import coco_eval
from coco_eval import CocoEvaluator, dsb_score, masks_to_rles

BACKENDS = [
    pytest.param(
        name,
        marks=pytest.mark.skipif(
            importlib.util.find_spec(module.split(".")[0]) is None, reason=f"{name} not installed"
        ),
    )
    for name, (module, _, _) in coco_eval.BACKENDS.items()
]
HEIGHT, WIDTH = 48, 64
CATEGORIES = [
    {"id": 1, "name": "cat"},
    {"id": 2, "name": "dog"},
    {"id": 3, "name": "bird"},  # ground truth only: no detections
    {"id": 4, "name": "ghost"},  # neither ground truth nor detections
]
NO_GT_IMAGE, NO_DETECTIONS_IMAGE = 5, 6


def ellipse(cx, cy, rx, ry):
    angles = np.linspace(0, 2 * np.pi, 12, endpoint=False)
    return np.stack([cx + rx * np.cos(angles), cy + ry * np.sin(angles)], 1).ravel().tolist()


def polygon_mask(polygon):
    return mask_util.decode(mask_util.frPyObjects([polygon], HEIGHT, WIDTH)[0])


def uncompressed_rle(mask):
    flat = mask.ravel(order="F")
    starts = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    counts = np.diff(starts).tolist()
    return {"size": list(mask.shape), "counts": [0, *counts] if flat[0] else counts}


def make_gt():
    """Six images: polygon, compressed and uncompressed RLE objects, crowd regions, an image
    without ground truth (5) and one that gets no detections (6)."""
    rng = np.random.default_rng(0)
    annotations = []
    for image_id in (1, 2, 3, 4, NO_DETECTIONS_IMAGE):
        for k in range(4):
            polygon = ellipse(*rng.uniform([12, 10, 3, 3], [52, 38, 12, 9]))
            mask = polygon_mask(polygon)
            crowd = k == 3 and image_id in (1, 2)
            if crowd:
                segmentation = uncompressed_rle(mask)
            elif k == 2:
                encoded = mask_util.encode(np.asfortranarray(mask))
                segmentation = {"size": [HEIGHT, WIDTH], "counts": encoded["counts"].decode()}
            else:
                segmentation = [polygon]
            rle = mask_util.encode(np.asfortranarray(mask))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": [1, 2, 3, 1][k],
                    "segmentation": segmentation,
                    "area": float(mask_util.area(rle)),
                    "bbox": mask_util.toBbox(rle).tolist(),
                    "iscrowd": int(crowd),
                }
            )
    images = [{"id": i, "height": HEIGHT, "width": WIDTH} for i in range(1, 7)]
    return {"images": images, "annotations": annotations, "categories": CATEGORIES}


def make_predictions(gt, dets_per_image=30, seed=1):
    """Model outputs for images 1-5: jittered copies of ground truth objects and clutter, labels
    1 and 2 only, float masks that threshold back to ellipses."""
    rng = np.random.default_rng(seed)
    predictions = {}
    for image_id in (1, 2, 3, 4, NO_GT_IMAGE):
        objects = [a for a in gt["annotations"] if a["image_id"] == image_id]
        boxes, masks, labels = [], [], []
        for _ in range(dets_per_image):
            if objects and rng.random() < 0.6:
                x, y, w, h = objects[int(rng.integers(len(objects)))]["bbox"]
                cx, cy, rx, ry = np.array([x + w / 2, y + h / 2, w / 2, h / 2])
                cx, cy, rx, ry = (cx, cy, rx, ry) * rng.normal(1, 0.1, 4)
            else:
                cx, cy, rx, ry = rng.uniform([5, 5, 2, 2], [59, 43, 10, 8])
            mask = polygon_mask(ellipse(cx, cy, max(rx, 1), max(ry, 1)))
            noise = rng.uniform(0, 0.45, mask.shape)
            masks.append(np.where(mask > 0, 1 - noise, noise))
            boxes.append([cx - rx, cy - ry, cx + rx, cy + ry])
            labels.append(int(rng.integers(1, 3)))
        predictions[image_id] = {
            "boxes": torch.tensor(boxes, dtype=torch.float32),
            "scores": torch.tensor(rng.random(dets_per_image), dtype=torch.float32),
            "labels": torch.tensor(labels),
            "masks": torch.tensor(np.stack(masks)[:, None], dtype=torch.float32),
        }
    return predictions


def reference_results(predictions, iou_type):
    """COCO results built as torchvision's reference builds them: box by box, mask by mask."""
    results = []
    for image_id, p in predictions.items():
        x0, y0, x1, y1 = p["boxes"].unbind(1)
        boxes = torch.stack([x0, y0, x1 - x0, y1 - y0], 1).tolist()
        labels_scores = zip(p["labels"].tolist(), p["scores"].tolist(), strict=True)
        for i, (label, score) in enumerate(labels_scores):
            result = {"image_id": image_id, "category_id": label, "score": score}
            if iou_type == "bbox":
                result["bbox"] = boxes[i]
            else:
                binary = (p["masks"][i, 0] > 0.5).numpy().astype(np.uint8)
                rle = mask_util.encode(np.asfortranarray(binary))
                result["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
            results.append(result)
    return results


def pycocotools_eval(gt_path, results, iou_type, max_dets=(1, 10, 100), img_ids=None):
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        dt = gt.loadRes(copy.deepcopy(results)) if results else COCO()
        evaluator = COCOeval(gt, dt, iou_type)
        evaluator.params.maxDets = list(max_dets)
        if img_ids is not None:
            evaluator.params.imgIds = img_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def expected_stats(evaluator):
    """pycocotools' stats, except AP at the last maxDets where pycocotools hard-codes 100."""
    stats = evaluator.stats.tolist()
    if evaluator.params.maxDets[2] != 100:
        assert stats[0] == -1  # pycocotools finds no maxDets == 100 to report
        precision = evaluator.eval["precision"][:, :, :, 0, 2]
        stats[0] = float(np.mean(precision[precision > -1]))
    return stats


def assert_stats_equal(actual, expected):
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-9)


@pytest.fixture(scope="module")
def gt():
    return make_gt()


@pytest.fixture(scope="module")
def predictions(gt):
    return make_predictions(gt)


@pytest.fixture
def files(tmp_path, gt, predictions):
    paths = {"gt": tmp_path / "gt.json", "empty": tmp_path / "empty.json"}
    paths["gt"].write_text(json.dumps(gt))
    paths["empty"].write_text("[]")
    for iou_type in coco_eval.IOU_TYPES:
        paths[iou_type] = tmp_path / f"{iou_type}.json"
        paths[iou_type].write_text(json.dumps(reference_results(predictions, iou_type)))
    return paths


def run_cli(files, results, *extra):
    out = files["gt"].parent / "stats.json"
    args = ["--ann", str(files["gt"]), "--results", *map(str, results), "--out", str(out)]
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        coco_eval.main([*args, *extra])
    return json.loads(out.read_text()), printed.getvalue()


def gt_coco(gt):
    coco = COCO()
    coco.dataset = copy.deepcopy(gt)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("max_dets", [(1, 10, 100), (1, 5, 20)])
def test_cli_equals_pycocotools(files, backend, max_dets):
    max_dets_args = ["--max-dets", *map(str, max_dets)]
    out, _ = run_cli(
        files, [files["bbox"], files["segm"]], "--iou-types", "bbox", "segm", *max_dets_args,
        "--eval-backend", backend,
    )  # fmt: skip
    for iou_type in ("bbox", "segm"):
        results = json.loads(files[iou_type].read_text())
        reference = pycocotools_eval(files["gt"], results, iou_type, max_dets)
        assert_stats_equal(out[iou_type]["stats"], expected_stats(reference))


@pytest.mark.parametrize("backend", BACKENDS)
def test_cli_empty_results_and_one_file_for_both_types(files, backend):
    out, _ = run_cli(
        files, [files["empty"]], "--iou-types", "bbox", "segm", "--eval-backend", backend
    )
    for iou_type in ("bbox", "segm"):
        assert_stats_equal(
            out[iou_type]["stats"], pycocotools_eval(files["gt"], [], iou_type).stats
        )
        assert out[iou_type]["AP"] == 0.0


def crowded_results(gt):
    """Per image and category 120 confident specks (maxDets counts per image and category),
    then every object exactly, less confident."""
    coco = gt_coco(gt)
    speck = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    speck[:2, :2] = 1
    results = []
    for image_id in (1, 2, 3, 4):
        objects = [a for a in coco.imgToAnns[image_id] if not a["iscrowd"]]
        masks = [(c, speck) for c in (1, 2, 3)] * 120
        masks += [(a["category_id"], coco.annToMask(a)) for a in objects]
        for rank, (category_id, mask) in enumerate(masks):
            rle = mask_util.encode(np.asfortranarray(mask))
            segmentation = {"size": [HEIGHT, WIDTH], "counts": rle["counts"].decode()}
            result = {"image_id": image_id, "category_id": category_id, "score": 1 - rank / 1e4}
            results.append({**result, "segmentation": segmentation})
    return results


@pytest.mark.parametrize("backend", BACKENDS)
def test_cli_honours_max_dets_above_100(tmp_path, files, gt, backend):
    results = crowded_results(gt)
    path = tmp_path / "crowded.json"
    path.write_text(json.dumps(results))
    out, printed = run_cli(
        files, [path], "--iou-types", "segm", "--max-dets", "1", "10", "1000",
        "--eval-backend", backend,
    )  # fmt: skip
    reference = pycocotools_eval(files["gt"], results, "segm", (1, 10, 1000))
    assert_stats_equal(out["segm"]["stats"], expected_stats(reference))
    ap_line = printed.splitlines()[1]
    assert "maxDets=1000" in ap_line and not ap_line.endswith("-1.000")
    assert "maxDets=100 " not in printed
    # the objects, ranked beyond 100, are found only because 1000 detections count
    assert out["segm"]["AR100"] > 0.5 and out["segm"]["AP"] > 0
    assert pycocotools_eval(files["gt"], results, "segm").stats[8] == 0


def test_cli_out_names_the_stats(files):
    out, printed = run_cli(files, [files["segm"]], "--iou-types", "segm")
    assert list(out) == ["segm"]
    assert list(out["segm"]) == ["stats", *coco_eval.STAT_NAMES]
    assert [out["segm"][name] for name in coco_eval.STAT_NAMES] == out["segm"]["stats"]
    assert printed.startswith("IoU metric: segm\n Average Precision  (AP) @[ IoU=0.50:0.95 |")


@pytest.mark.parametrize(
    ("content", "message"), [(None, "No such file"), ("{broken", "not valid JSON")]
)
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, files, capsys, content, message):
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content)
    for args in (["--ann", str(path), "--results", str(files["bbox"])],
                 ["--ann", str(files["gt"]), "--results", str(path)]):  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            coco_eval.main(args)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(path) in err and message in err
        assert "Traceback" not in err


def test_cli_rejects_detections_on_unknown_images(tmp_path, files, capsys):
    path = tmp_path / "stray.json"
    path.write_text(json.dumps([{"image_id": 99, "category_id": 1, "score": 1, "bbox": [0] * 4}]))
    with pytest.raises(SystemExit):
        coco_eval.main(["--ann", str(files["gt"]), "--results", str(path)])
    assert "image ids not in the ground truth" in capsys.readouterr().err


@pytest.mark.parametrize("backend", BACKENDS)
def test_evaluator_equals_pycocotools_on_updated_images(files, gt, predictions, backend):
    evaluator = CocoEvaluator(gt_coco(gt), ["bbox", "segm"], backend=backend)
    for image_id, prediction in predictions.items():
        evaluator.update({image_id: prediction})
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0)}
    evaluator.update({NO_DETECTIONS_IMAGE: {**empty, "masks": torch.zeros(0, 1, HEIGHT, WIDTH)}})
    with contextlib.redirect_stdout(io.StringIO()):
        stats = evaluator.evaluate()
    img_ids = [*predictions, NO_DETECTIONS_IMAGE]
    for iou_type in ("bbox", "segm"):
        results = reference_results(predictions, iou_type)
        reference = pycocotools_eval(files["gt"], results, iou_type, img_ids=img_ids)
        assert_stats_equal(stats[iou_type], reference.stats)
        # the image without detections was evaluated: its objects lower the recall
        without = pycocotools_eval(files["gt"], results, iou_type, img_ids=list(predictions))
        assert stats[iou_type][8] < without.stats[8]


def test_evaluator_leaves_the_ground_truth_untouched(gt, predictions):
    coco = gt_coco(gt)
    before = copy.deepcopy(coco.dataset)
    evaluator = CocoEvaluator(coco, ["segm"], backend="pycocotools")
    evaluator.update(predictions)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
    assert coco.dataset == before


@pytest.mark.parametrize("backend", BACKENDS)
def test_evaluator_reads_ground_truth_that_pycocotools_rewrote(files, gt, predictions, backend):
    coco = gt_coco(gt)
    results = reference_results(predictions, "segm")
    with contextlib.redirect_stdout(io.StringIO()):
        COCOeval(coco, coco.loadRes(copy.deepcopy(results)), "segm").evaluate()
    segmentations = [a["segmentation"] for a in coco.dataset["annotations"]]
    assert any(isinstance(s, dict) and isinstance(s["counts"], bytes) for s in segmentations)
    evaluator = CocoEvaluator(coco, ["segm"], backend=backend)
    evaluator.update(predictions)
    with contextlib.redirect_stdout(io.StringIO()):
        stats = evaluator.evaluate()
    reference = pycocotools_eval(files["gt"], results, "segm", img_ids=list(predictions))
    assert_stats_equal(stats["segm"], reference.stats)


def test_written_results_reproduce_the_stats(tmp_path, files, gt, predictions):
    evaluator = CocoEvaluator(gt_coco(gt), ["bbox", "segm"])
    evaluator.update(predictions)
    with contextlib.redirect_stdout(io.StringIO()):
        stats = evaluator.evaluate()
    evaluator.write_results(tmp_path / "out")
    for iou_type in ("bbox", "segm"):
        results = json.loads((tmp_path / "out" / f"results_{iou_type}.json").read_text())
        assert results == reference_results(predictions, iou_type)
        reference = pycocotools_eval(files["gt"], results, iou_type, img_ids=list(predictions))
        assert_stats_equal(stats[iou_type], reference.stats)


def test_label_to_category_id(gt, predictions):
    evaluator = CocoEvaluator(gt_coco(gt), ["bbox"], label_to_category_id={1: 2, 2: 1})
    evaluator.update({1: predictions[1]})
    swapped = [3 - label for label in predictions[1]["labels"].tolist()]
    assert [r["category_id"] for r in evaluator.results("bbox")] == swapped


def per_mask_encode(masks):
    return [
        mask_util.encode(np.asfortranarray((m[0] > 0.5).numpy().astype(np.uint8))) for m in masks
    ]


@pytest.mark.parametrize(
    "shape", [(7, 1, 48, 61), (6, 1, 16, 64), (5, 1, 1, 9), (5, 1, 9, 1), (1, 1, 1, 1)]
)
def test_masks_to_rles_equals_per_mask_encoding(shape):
    torch.manual_seed(0)
    masks = torch.rand(shape) ** 3  # mostly below the threshold, in runs and specks
    masks[0] = 0  # empty
    if shape[0] > 1:
        masks[1] = 1  # full: RLE starts with an empty run of zeros
    if shape[0] > 2:
        masks[2, 0, -1, -1] = 1  # only the last pixel
    assert masks_to_rles(masks) == per_mask_encode(masks)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masks_to_rles_equals_per_mask_encoding_on_random_masks(dtype):
    # Foreground confined to some rows (the rows masks_to_rles skips), touching the first or last
    # row and column, full masks and NaN, in many small shapes.
    generator = torch.Generator().manual_seed(0)
    for case in range(150):
        n, height, width = (int(v) for v in torch.randint(1, 20, (3,), generator=generator))
        masks = torch.rand(n, 1, height, width, generator=generator) ** (1 + case % 6)
        if case % 3 == 0:
            masks[:, :, : height // 2] = 0
        if case % 4 == 0:
            masks[:, :, :, width // 2 :] = 0
        if case % 5 == 0:
            masks[0] = 1
        if case % 7 == 0:
            masks[-1, 0, 0, 0] = float("nan")
        if case % 11 == 0:
            masks[-1, 0, -1] = 1
        masks = masks.to(dtype)
        assert masks_to_rles(masks) == per_mask_encode(masks.float()), (case, masks.shape)


def test_masks_to_rles_of_no_masks():
    assert masks_to_rles(torch.zeros(0, 1, 4, 5)) == []


def test_update_counts_a_repeated_image_once(gt, predictions):
    once = CocoEvaluator(gt_coco(gt), ["bbox"])
    once.update(predictions)
    twice = CocoEvaluator(gt_coco(gt), ["bbox"])
    twice.update(predictions)
    twice.update({torch.tensor(1): predictions[1]})  # engine passes target["image_id"]
    assert twice.results("bbox") == once.results("bbox")


def test_merge_detections_dedupes_by_image_id(gt, predictions):
    evaluator = CocoEvaluator(gt_coco(gt), ["bbox"])
    evaluator.update(predictions)
    per_rank = [
        {i: d for i, d in evaluator.detections.items() if i % 2},
        {i: d for i, d in evaluator.detections.items() if i % 2 == 0 or i == 1},  # padded shard
    ]
    merged = coco_eval.merge_detections(per_rank)
    assert sorted(merged) == sorted(predictions)
    assert all(merged[i] is evaluator.detections[i] for i in merged)


def sync_worker(rank, world_size, init_file, gt, predictions, out_dir):
    dist.init_process_group("gloo", f"file://{init_file}", rank=rank, world_size=world_size)
    evaluator = CocoEvaluator(gt_coco(gt), ["bbox", "segm"], backend="pycocotools")
    image_ids = sorted(predictions)
    # DistributedSampler pads the last shard by repeating images.
    shard = image_ids[rank::world_size] + ([image_ids[0]] if rank == world_size - 1 else [])
    evaluator.update({i: predictions[i] for i in shard})
    evaluator.synchronize_between_processes()
    if rank == 0:
        with contextlib.redirect_stdout(io.StringIO()):
            stats = evaluator.evaluate()
        (out_dir / "stats.json").write_text(json.dumps(stats))
    dist.destroy_process_group()


def test_synchronize_gathers_every_rank_on_gloo(tmp_path, gt, predictions):
    mp.spawn(sync_worker, args=(2, tmp_path / "init", gt, predictions, tmp_path), nprocs=2)
    single = CocoEvaluator(gt_coco(gt), ["bbox", "segm"], backend="pycocotools")
    single.update(predictions)
    with contextlib.redirect_stdout(io.StringIO()):
        expected = single.evaluate()
    assert json.loads((tmp_path / "stats.json").read_text()) == expected


def test_synchronize_without_process_group_keeps_everything(gt, predictions):
    evaluator = CocoEvaluator(gt_coco(gt), ["bbox"])
    evaluator.update(predictions)
    evaluator.synchronize_between_processes()
    assert sorted(evaluator.detections) == sorted(predictions)


def test_per_category_table(files, gt, predictions):
    evaluator = CocoEvaluator(gt_coco(gt), ["bbox", "segm"])
    evaluator.update(predictions)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
    rows = coco_eval.per_category_ap(evaluator.coco_evals, evaluator.coco_gt.cats)
    assert [row["category"] for row in rows] == ["cat", "dog", "bird", "ghost"]
    for iou_type in ("bbox", "segm"):
        results = reference_results(predictions, iou_type)
        reference = pycocotools_eval(files["gt"], results, iou_type, img_ids=list(predictions))
        for k, row in enumerate(rows[:2]):
            precision = reference.eval["precision"][:, :, k, 0, -1]
            assert row[iou_type] == pytest.approx(np.mean(precision[precision > -1]), abs=1e-12)
        assert rows[2][iou_type] == 0.0  # ground truth, no detections
        assert rows[3][iou_type] is None  # no ground truth
    table = evaluator.per_category_table().splitlines()
    assert table[0].split() == ["category", "bbox", "AP", "segm", "AP"]
    assert table[3].split() == ["bird", "0.000", "0.000"]
    assert table[4].split() == ["ghost", "-", "-"]


def test_auto_backend_falls_back_to_pycocotools(monkeypatch, capsys):
    missing = ("no_such_module_anywhere", "no_such_module_anywhere", "COCOeval")
    monkeypatch.setitem(coco_eval.BACKENDS, "missing", missing)
    monkeypatch.setattr(coco_eval, "DEFAULT_BACKEND", "missing")
    assert coco_eval.get_backend("auto").name == "pycocotools"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing" in err and "pycocotools" in err


def test_evaluator_rejects_bad_arguments(gt):
    with pytest.raises(ValueError, match="keypoints"):
        CocoEvaluator(gt_coco(gt), ["keypoints"])
    with pytest.raises(ValueError, match="max-dets"):
        CocoEvaluator(gt_coco(gt), ["bbox"], max_dets=(1, 100))


def square(size, top, left, side):
    mask = np.zeros((size, size), dtype=bool)
    mask[top : top + side, left : left + side] = True
    return mask


def test_dsb_score_hand_computed():
    gt = np.stack([square(10, 0, 0, 5)])  # 25 pixels
    inside = square(10, 0, 0, 5) & ~square(10, 0, 0, 3)
    inside[0, :2] = True  # 18 of the 25 pixels: IoU 0.72, a match at 0.50 ... 0.70
    assert dsb_score([gt], [gt]) == 1.0
    assert dsb_score([gt], [inside[None]]) == pytest.approx(0.5)
    assert dsb_score([np.zeros((0, 10, 10))], [np.zeros((0, 10, 10))]) == 1.0
    assert dsb_score([gt], [np.zeros((0, 10, 10))]) == 0.0
    assert dsb_score([np.zeros((0, 10, 10))], [gt]) == 0.0
    assert dsb_score([gt, gt], [gt, inside[None]]) == pytest.approx(0.75)


def test_dsb_score_counts_tp_fp_fn_and_matches_one_to_one():
    a, b = square(12, 0, 0, 4), square(12, 6, 6, 4)
    clutter = square(12, 0, 8, 3)
    # one match, one missed object, two false positives: 1 / (1 + 2 + 1) at every threshold
    assert dsb_score([np.stack([a, b])], [np.stack([a, clutter, square(12, 8, 0, 2)])]) == 0.25
    # two predictions over one object: one true positive, one false positive
    assert dsb_score([a[None]], [np.stack([a, a])]) == 0.5


def test_dsb_score_takes_label_images_and_tensors():
    a, b = square(12, 0, 0, 4), square(12, 6, 6, 4)
    labels = torch.tensor(a * 3 + b * 7)
    assert dsb_score([labels], [np.stack([b, a])]) == 1.0
    assert dsb_score([torch.zeros(12, 12)], [np.zeros((12, 12))]) == 1.0


def test_mask_ious_equal_dense_ious():
    rng = np.random.default_rng(0)
    gt = np.stack([square(20, *rng.integers(0, 15, 2), rng.integers(1, 8)) for _ in range(6)])
    pred = np.stack([square(20, *rng.integers(0, 15, 2), rng.integers(1, 8)) for _ in range(5)])
    pred[0] = False  # an empty prediction
    flat_gt, flat_pred = gt.reshape(6, -1).astype(float), pred.reshape(5, -1).astype(float)
    intersection = flat_gt @ flat_pred.T
    union = flat_gt.sum(1)[:, None] + flat_pred.sum(1) - intersection
    assert np.count_nonzero(intersection) >= 3
    np.testing.assert_array_equal(coco_eval.mask_ious(gt, pred), intersection / union)
