"""Times COCO evaluation from Mask R-CNN outputs to final stats: torchvision's reference way
against coco_eval.CocoEvaluator, on the same generated outputs in the same run.

    python benchmarks/eval_bench.py --repeats 3 --json eval_bench.json

The workload is fixed by --seed: images of 320-480 px with polygon ground truth in 80 categories
(some crowd regions), and per image --dets detections with boxes, scores, labels and [N, 1, H, W]
float masks that are zero outside their box, as Mask R-CNN pastes them. Generating the outputs is
not timed; each evaluator has its own pass over them (generated again, identical), so that
neither pays for the other's garbage collection or cache contents. The baseline does what
references/detection/coco_eval.py does per batch (threshold, encode mask by mask, loadRes and
COCOeval.evaluate for the batch's images) and accumulates at the end.

Also printed: the memory CocoEvaluator keeps, three ways of turning masks into RLE timed alone,
and with --compare-backends each installed COCOeval backend evaluating the results files.
"""

import argparse
import contextlib
import copy
import gc
import importlib.metadata
import importlib.util
import io
import itertools
import json
import sys
import tempfile
import time
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
from synthetic import make_ground_truth, random_detection  # noqa: E402

import coco_eval  # noqa: E402
import coco_results  # noqa: E402

IOU_TYPES = ("bbox", "segm")
# The reference's np.array(tensor, dtype=..., order="F") warns on every mask with numpy 2.
warnings.filterwarnings("ignore", message="__array__ implementation", category=DeprecationWarning)


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=300, help="number of images")
    parser.add_argument("--dets", type=int, default=100, help="detections per image")
    parser.add_argument("--categories", type=int, default=80, help="number of categories")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each method")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated workload")
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="device the model outputs live on",
    )
    parser.add_argument(
        "--eval-backend",
        choices=("auto", *coco_eval.BACKENDS),
        default="auto",
        help="CocoEvaluator's COCOeval backend",
    )
    parser.add_argument(
        "--compare-backends",
        action="store_true",
        help="also time every installed backend on the results files of one run",
    )
    parser.add_argument("--json", help="write the figures to this JSON file")
    return parser


def make_outputs(image, objects, num_dets, num_categories, device, rng):
    """One image's model output: half jittered ground-truth objects, half clutter."""
    height, width = image["height"], image["width"]
    boxes, labels, ellipses = [], [], []
    for _ in range(num_dets):
        cx, cy, rx, ry, label = random_detection(objects, height, width, num_categories, rng)
        x0, y0 = min(max(cx - rx, 0), width - 2), min(max(cy - ry, 0), height - 2)
        x1, y1 = min(max(cx + rx, x0 + 1), width - 1), min(max(cy + ry, y0 + 1), height - 1)
        boxes.append([x0, y0, x1, y1])
        labels.append(label)
        ellipses.append((cx, cy, rx, ry))
    masks = torch.zeros((num_dets, 1, height, width), device=device)
    for i, ((cx, cy, rx, ry), box) in enumerate(zip(ellipses, boxes, strict=True)):
        x0, y0, x1, y1 = (int(v) for v in box)
        ys = torch.arange(y0, y1 + 1, device=device, dtype=torch.float32)[:, None]
        xs = torch.arange(x0, x1 + 1, device=device, dtype=torch.float32)[None, :]
        r2 = ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2
        masks[i, 0, y0 : y1 + 1, x0 : x1 + 1] = torch.sigmoid(6 * (1 - r2))
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32, device=device),
        "scores": torch.tensor(np.sort(rng.random(num_dets))[::-1].copy(), device=device).float(),
        "labels": torch.tensor(labels, dtype=torch.int64, device=device),
        "masks": masks,
    }


class ReferenceEvaluator:
    """torchvision references/detection's evaluation, rewritten: COCOeval.evaluate per batch."""

    def __init__(self, coco_gt, iou_types):
        self.coco_gt = copy.deepcopy(coco_gt)
        self.coco_evals = {t: COCOeval(self.coco_gt, iouType=t) for t in iou_types}
        self.img_ids = []
        self.eval_imgs = {t: [] for t in iou_types}

    def update(self, predictions):
        # The reference's engine moves every output to the CPU before the evaluator sees it.
        predictions = {i: {k: v.cpu() for k, v in p.items()} for i, p in predictions.items()}
        img_ids = list(predictions)
        self.img_ids.extend(img_ids)
        for iou_type, cocoeval in self.coco_evals.items():
            results = [r for i, p in predictions.items() for r in reference_results(i, p, iou_type)]
            with contextlib.redirect_stdout(io.StringIO()):
                cocoeval.cocoDt = self.coco_gt.loadRes(results) if results else COCO()
                cocoeval.params.imgIds = img_ids
                cocoeval.evaluate()
            areas = len(cocoeval.params.areaRng)
            per_image = np.asarray(cocoeval.evalImgs).reshape(-1, areas, len(img_ids))
            self.eval_imgs[iou_type].append(per_image)

    def evaluate(self):
        img_ids, first = np.unique(self.img_ids, return_index=True)
        stats = {}
        for iou_type, cocoeval in self.coco_evals.items():
            eval_imgs = np.concatenate(self.eval_imgs[iou_type], axis=2)[..., first]
            cocoeval.evalImgs = list(eval_imgs.flatten())
            cocoeval.params.imgIds = list(img_ids)
            cocoeval._paramsEval = copy.deepcopy(cocoeval.params)
            with contextlib.redirect_stdout(io.StringIO()):
                cocoeval.accumulate()
                cocoeval.summarize()
            stats[iou_type] = cocoeval.stats.tolist()
        return stats


def reference_results(image_id, prediction, iou_type):
    scores = prediction["scores"].tolist()
    labels = prediction["labels"].tolist()
    if iou_type == "bbox":
        x0, y0, x1, y1 = prediction["boxes"].unbind(1)
        boxes = torch.stack((x0, y0, x1 - x0, y1 - y0), dim=1).tolist()
        return [
            {"image_id": image_id, "category_id": c, "bbox": b, "score": s}
            for c, b, s in zip(labels, boxes, scores, strict=True)
        ]
    rles = reference_rles(prediction["masks"])
    for rle in rles:
        rle["counts"] = rle["counts"].decode("utf-8")
    return [
        {"image_id": image_id, "category_id": c, "segmentation": r, "score": s}
        for c, r, s in zip(labels, rles, scores, strict=True)
    ]


def reference_rles(masks):
    """Mask by mask, as the reference encodes."""
    return [
        mask_util.encode(np.array(mask[0, :, :, np.newaxis], dtype=np.uint8, order="F"))[0]
        for mask in masks.cpu() > 0.5
    ]


def fortran_layout_rles(masks):
    """Thresholded straight into the Fortran-ordered [H, W, N] array mask.encode reads (a
    C-ordered [N, W, H] one), then one mask.encode call for all masks."""
    n, _, height, width = masks.shape
    binary = torch.empty((n, width, height), dtype=torch.bool, device=masks.device)
    torch.gt(masks[:, 0].transpose(1, 2), 0.5, out=binary)
    return mask_util.encode(binary.cpu().numpy().view(np.uint8).transpose(2, 1, 0))


ENCODERS = {
    "per mask (reference)": reference_rles,
    "Fortran layout, one mask.encode": fortran_layout_rles,
    "coco_results.masks_to_rles": coco_results.masks_to_rles,
}


def time_encoders(dataset, objects, args):
    """Milliseconds per image each way of turning masks into RLE takes (the best of --repeats
    on each of the first 20 images), and whether all give the same RLE."""
    images = min(args.images, 20)
    seconds = dict.fromkeys(ENCODERS, 0.0)
    same = True
    for _, outputs in itertools.islice(outputs_stream(dataset, objects, args), images):
        rles = {}
        for name, encode in ENCODERS.items():
            runs = [timed(encode, outputs["masks"]) for _ in range(args.repeats)]
            seconds[name] += min(elapsed for elapsed, _ in runs)
            rles[name] = runs[0][1]
        same &= all(r == rles["per mask (reference)"] for r in rles.values())
    return {"ms_per_image": {k: 1000 * v / images for k, v in seconds.items()}, "identical": same}


def outputs_stream(dataset, objects, args):
    """(image_id, outputs) for each image; the same sequence on every call."""
    rng = np.random.default_rng(args.seed + 1)
    for image in dataset["images"]:
        image_objects = objects[image["id"]]
        outputs = make_outputs(image, image_objects, args.dets, args.categories, args.device, rng)
        yield image["id"], outputs


def timed_run(coco_gt, objects, args):
    """Each evaluator in its own pass over the workload, so that neither pays for the other's
    objects (garbage collection) or cache contents: seconds spent in each, their stats, and
    CocoEvaluator."""
    evaluators = {
        "baseline": ReferenceEvaluator(coco_gt, IOU_TYPES),
        "ours": coco_eval.CocoEvaluator(coco_gt, IOU_TYPES, backend=args.eval_backend),
    }
    seconds, stats = {}, {}
    for name, evaluator in evaluators.items():
        seconds[name], stats[name] = timed_pass(evaluator, coco_gt, objects, args)
    return seconds, stats, evaluators["ours"]


def timed_pass(evaluator, coco_gt, objects, args):
    """Seconds from model outputs to stats (update per image, then evaluate), and the stats."""
    gc.collect()
    seconds = 0.0
    for image_id, outputs in outputs_stream(coco_gt.dataset, objects, args):
        seconds += timed(evaluator.update, {image_id: outputs})[0]
    with contextlib.redirect_stdout(io.StringIO()):
        elapsed, stats = timed(evaluator.evaluate)
    return seconds + elapsed, stats


def timed(function, *args):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = function(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def compare_backends(dataset, evaluator, repeats):
    """Per installed backend: seconds to evaluate bbox and segm from results files, as
    `python coco_eval.py` does, and how far its stats are from pycocotools'."""
    with tempfile.TemporaryDirectory() as folder:
        evaluator.write_results(folder)
        gt_path = Path(folder, "gt.json")
        gt_path.write_text(json.dumps(dataset))
        results = [str(Path(folder, f"results_{t}.json")) for t in IOU_TYPES]
        argv = ["--ann", str(gt_path), "--results", *results, "--iou-types", *IOU_TYPES]
        figures = {}
        for name, (module, _, _) in coco_eval.BACKENDS.items():
            if importlib.util.find_spec(module.split(".")[0]) is None:
                continue
            args = coco_eval.get_args_parser().parse_args([*argv, "--eval-backend", name])
            with contextlib.redirect_stdout(io.StringIO()):
                runs = [timed(coco_eval.evaluate_files, args) for _ in range(repeats)]
            stats = np.array([runs[0][1][t] for t in IOU_TYPES])
            figures[name] = {"version": importlib.metadata.version(name), "stats": stats}
            figures[name].update(common.summary([seconds for seconds, _ in runs]))
    reference = figures["pycocotools"]["stats"]
    for backend in figures.values():
        stats = backend.pop("stats")
        backend["identical"] = bool(np.array_equal(stats, reference))
        backend["max_abs_diff"] = float(np.abs(stats - reference).max())
    return figures


def memory_growth(coco_gt, objects, args):
    """Bytes a CocoEvaluator holds after every image's update(), and its peak while updating.

    Traced with tracemalloc (Python objects and numpy arrays; the transient torch masks are the
    model's, not the evaluator's)."""
    evaluator = coco_eval.CocoEvaluator(coco_gt, IOU_TYPES, backend=args.eval_backend)
    tracemalloc.start()
    for image_id, outputs in outputs_stream(coco_gt.dataset, objects, args):
        evaluator.update({image_id: outputs})
        del outputs
    retained, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return retained, peak


def main(args):
    rng = np.random.default_rng(args.seed)
    dataset, objects = make_ground_truth(args.images, args.categories, rng)
    coco_gt = COCO()
    coco_gt.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt.createIndex()
    backend = coco_eval.get_backend(args.eval_backend).name
    runs = [timed_run(coco_gt, objects, args) for _ in range(args.repeats)]
    identical = all(stats["ours"] == stats["baseline"] for _, stats, _ in runs)
    baseline = common.summary([seconds["baseline"] for seconds, _, _ in runs])
    ours = common.summary([seconds["ours"] for seconds, _, _ in runs])
    retained, peak = memory_growth(coco_gt, objects, args)
    detections = args.images * args.dets
    pixels = sum(image["height"] * image["width"] for image in dataset["images"]) * args.dets
    figures = {
        "workload": {
            "images": args.images,
            "detections_per_image": args.dets,
            "categories": args.categories,
            "device": str(args.device),
            "backend": backend,
            "repeats": args.repeats,
            "torch_threads": torch.get_num_threads(),
        },
        "baseline_s": baseline,
        "ours_s": ours,
        "speedup": baseline["median"] / ours["median"],
        "stats_identical": identical,
        "stats": runs[0][1]["ours"],
        "retained_bytes": retained,
        "retained_bytes_per_detection": retained / detections,
        "peak_bytes": peak,
        "binary_masks_bytes": pixels,
    }
    figures["encoders"] = time_encoders(dataset, objects, args)
    if args.compare_backends:
        figures["backends"] = compare_backends(dataset, runs[0][2], args.repeats)
    print_figures(figures)
    common.write_json(args.json, figures)


def print_figures(figures):
    workload = figures["workload"]
    print(
        f"{workload['images']} images x {workload['detections_per_image']} detections, "
        f"{workload['categories']} categories, device {workload['device']}, "
        f"{workload['torch_threads']} torch threads, {workload['repeats']} repeats"
    )
    for label, key in (("baseline (reference)", "baseline_s"), ("CocoEvaluator", "ours_s")):
        s = figures[key]
        print(f"{label:<21} median {s['median']:7.2f} s  (min {s['min']:.2f}, max {s['max']:.2f})")
    print(f"speed-up {figures['speedup']:.1f}x with {workload['backend']}")
    print(f"stats identical: {figures['stats_identical']}")
    print(
        f"kept for predictions: {figures['retained_bytes'] / 2**20:.1f} MiB "
        f"({figures['retained_bytes_per_detection']:.0f} B per detection), "
        f"peak {figures['peak_bytes'] / 2**20:.1f} MiB; "
        f"the binary masks alone would be {figures['binary_masks_bytes'] / 2**30:.1f} GiB"
    )
    encoders = figures["encoders"]
    print(f"masks to RLE, identical: {encoders['identical']}")
    for name, milliseconds in encoders["ms_per_image"].items():
        print(f"  {name:<32} {milliseconds:6.1f} ms per image")
    for name, backend in figures.get("backends", {}).items():
        print(
            f"from results files, {name} {backend['version']}: median {backend['median']:.2f} s "
            f"(min {backend['min']:.2f}, max {backend['max']:.2f}), stats identical to "
            f"pycocotools: {backend['identical']} (max diff {backend['max_abs_diff']:.1e})"
        )


if __name__ == "__main__":
    main(get_args_parser().parse_args())
