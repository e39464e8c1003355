import contextlib
import copy
import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import coco_eval
from coco_eval import CocoEvaluator
from mask_geometry import uncompressed_rle

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
ROOT = Path(__file__).resolve().parents[1]


def ellipse(cx, cy, rx, ry):
    angles = np.linspace(0, 2 * np.pi, 12, endpoint=False)
    return np.stack([cx + rx * np.cos(angles), cy + ry * np.sin(angles)], 1).ravel().tolist()


def polygon_mask(polygon):
    return mask_util.decode(mask_util.frPyObjects([polygon], HEIGHT, WIDTH)[0])


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


def test_cli_checks_every_results_file_before_evaluating(files, capsys):
    args = ["--ann", str(files["gt"]), "--results", str(files["bbox"]), str(files["bbox"])]
    with pytest.raises(SystemExit) as exit_info:
        coco_eval.main([*args, "--iou-types", "bbox", "segm"])
    assert exit_info.value.code == 2
    printed = capsys.readouterr()
    assert printed.out == ""  # bbox was not evaluated before the segm file failed its check
    assert "not a COCO results list for segm" in printed.err and str(files["bbox"]) in printed.err


def test_cli_rejects_an_iou_type_named_twice(files, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(files, [files["bbox"]], "--iou-types", "bbox", "bbox")
    assert exit_info.value.code == 2
    assert "twice" in capsys.readouterr().err


def test_cli_gives_each_iou_type_its_own_copy_of_one_file(tmp_path, files, predictions):
    # pycocotools' loadRes writes each segm result's box into it, and loadRes of results with
    # boxes takes the box area as the area. A confident false positive whose mask is small and
    # whose box is not counts against APs only with the mask's area.
    diagonal = mask_util.encode(np.asfortranarray(np.eye(HEIGHT, WIDTH, dtype=np.uint8)))
    segmentation = {"size": [HEIGHT, WIDTH], "counts": diagonal["counts"].decode()}
    results = reference_results(predictions, "segm") + [
        {"image_id": image_id, "category_id": 1, "score": 2.0, "segmentation": segmentation}
        for image_id in predictions
    ]
    path = tmp_path / "segm_only.json"
    path.write_text(json.dumps(results))
    out, _ = run_cli(files, [path], "--iou-types", "bbox", "segm", "--eval-backend", "pycocotools")
    reference = pycocotools_eval(files["gt"], results, "segm")
    assert_stats_equal(out["segm"]["stats"], reference.stats)
    with_boxes = [{**r, "bbox": mask_util.toBbox(r["segmentation"]).tolist()} for r in results]
    box_areas = pycocotools_eval(files["gt"], with_boxes, "segm")
    assert box_areas.stats[3] > reference.stats[3]  # the trap is real: APs differs


def test_command_imports_neither_torch_nor_image_libraries(files, tmp_path):
    command = [sys.executable, "-X", "importtime", str(ROOT / "coco_eval.py")]
    command += ["--ann", str(files["gt"]), "--results", str(files["bbox"]), str(files["segm"])]
    command += ["--iou-types", "bbox", "segm", "--out", str(tmp_path / "stats.json")]
    finished = subprocess.run(command, capture_output=True, text=True, check=True)
    imported = {
        line.rsplit("|", 1)[1].strip().split(".")[0]
        for line in finished.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert {"coco_results", "errors", "numpy"} <= imported  # the listing is read right
    assert not imported & {"torch", "torchvision", "PIL", "matplotlib", "scipy"}
    assert set(json.loads((tmp_path / "stats.json").read_text())) == {"bbox", "segm"}


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


@pytest.mark.slow
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


def square_rle(top, left, side, size=10):
    mask = np.zeros((size, size), dtype=np.uint8, order="F")
    mask[top : top + side, left : left + side] = 1
    rle = mask_util.encode(mask)
    return {"size": rle["size"], "counts": rle["counts"].decode()}


def test_nuclei_metrics_of_a_results_file(tmp_path):
    polygon = [[1.0, 1.0, 6.0, 1.0, 6.0, 6.0, 1.0, 6.0]]
    images = [
        {"id": 1, "file_name": "a.png", "height": 10, "width": 10, "kind": "tissue"},
        {"id": 2, "file_name": "b.png", "height": 10, "width": 10, "kind": "fluorescence"},
    ]
    gt_shapes = [(1, square_rle(0, 0, 4)), (1, square_rle(6, 6, 4)), (2, polygon)]
    annotations = [
        {"id": i, "image_id": image_id, "category_id": 1, "segmentation": shape, "iscrowd": 0}
        for i, (image_id, shape) in enumerate(gt_shapes, start=1)
    ]
    for ann in annotations:
        ann["area"] = 16.0
        ann["bbox"] = [0.0, 0.0, 4.0, 4.0]
    gt = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "n"}]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    polygon_rle = mask_util.merge(mask_util.frPyObjects(polygon, 10, 10))
    polygon_rle["counts"] = polygon_rle["counts"].decode()
    # Image 1: one nucleus matched at IoU 0.6, one missed (its prediction scores below 0.5), one
    # extra 4-pixel prediction; image 2: its nucleus found exactly.
    predictions = [
        (1, square_rle(0, 1, 4), 0.9),
        (1, square_rle(0, 8, 2), 0.8),
        (1, square_rle(6, 6, 4), 0.3),
        (2, polygon_rle, 0.7),
    ]
    results = [
        {"image_id": image_id, "category_id": 1, "segmentation": rle, "score": score}
        for image_id, rle, score in predictions
    ]
    (tmp_path / "segm.json").write_text(json.dumps(results))
    out = tmp_path / "stats.json"
    argv = ["--ann", str(tmp_path / "gt.json"), "--results", str(tmp_path / "segm.json")]
    argv += ["--iou-types", "segm", "--nuclei-metrics", "--out", str(out)]
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        coco_eval.main(argv)
    nuclei = json.loads(out.read_text())["nuclei"]
    assert "Nuclei measures" in printed.getvalue()
    assert list(nuclei) == ["all", "tissue", "fluorescence"]
    assert nuclei["tissue"]["aji"] == pytest.approx(12 / 40)
    assert nuclei["tissue"]["pq"] == pytest.approx(0.6 * 0.5)
    assert nuclei["fluorescence"]["dsb"] == nuclei["fluorescence"]["aji"] == 1.0
    assert nuclei["all"]["dsb"] == pytest.approx((2 / 30 + 1) / 2)
    assert nuclei["all"]["f1_iou50"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert nuclei["all"]["recall_iou50"] == pytest.approx(2 / 3)


def test_nuclei_metrics_need_segm_results(files, capsys):
    with pytest.raises(SystemExit):
        coco_eval.main(
            ["--ann", str(files["gt"]), "--results", str(files["bbox"]), "--nuclei-metrics"]
        )
    assert "--nuclei-metrics needs segm results" in capsys.readouterr().err
