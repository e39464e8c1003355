"""COCO box and mask evaluation: the evaluator the training loop uses, and a command.

    python coco_eval.py --ann instances_val.json --results results_segm.json --iou-types segm
    python coco_eval.py --ann instances_val.json --results results_bbox.json results_segm.json \
        --iou-types bbox segm --max-dets 1 10 1000 --out stats.json

prints pycocotools' 12-line table per IoU type and a per-category AP table, and with `--out` writes
`{iou_type: {"stats": [12 numbers], "AP": ..., ..., "ARl": ...}}`. With `--nuclei-metrics` (segm
results) it adds the nuclei measures of instance_metrics (DSB2018 score, F1, precision and recall
at IoU 0.5, PQ, AJI) of the masks scoring at least `--score-thresh`, overall and per image kind
(the image records' "kind"), under "nuclei" in `--out`. The names AR1, AR10 and AR100
are positions: they hold the recall at the first, second and third `--max-dets` value.

The stats equal those of pycocotools' COCOeval given the same files and `params.maxDets`, with one
deliberate difference: pycocotools computes AP over 100 detections whatever maxDets says (-1 when
100 is not among them); here AP, like every other AP and area-range AR, uses the last maxDets.

Model outputs become COCO results in coco_results; this module evaluates results. The command
imports numpy and its COCOeval backend, never torch: torch.distributed is imported where
CocoEvaluator, which the training loop feeds, synchronizes ranks.
"""

import argparse
import contextlib
import importlib
import io
import json
import os
import sys
from typing import NamedTuple

import numpy as np

from coco_results import to_coco_results, to_detections
from commands import one_line_errors
from errors import ConfigError, DataError
from instance_metrics import format_nuclei_table, nuclei_metrics, results_image_counts
from mask_geometry import SCORE_THRESHOLD

IOU_TYPES = ("bbox", "segm")
# pip package: (module with COCO, module with the COCOeval class, its name). All follow
# pycocotools' API; the default is the fastest whose precision and recall arrays are bit-identical
# to pycocotools' (docs/evaluation.md, Backend).
BACKENDS = {
    "hotcoco": ("hotcoco", "hotcoco", "COCOeval"),
    "ultrafast-pycocotools": ("ultrafast_pycocotools", "ultrafast_pycocotools", "COCOeval"),
    "faster-coco-eval": ("faster_coco_eval", "faster_coco_eval", "COCOeval_faster"),
    "pycocotools": ("pycocotools.coco", "pycocotools.cocoeval", "COCOeval"),
}
DEFAULT_BACKEND = "hotcoco"

# (name, AP or AR, IoU threshold or None for the 0.50:0.95 mean, area range, maxDets index), in
# COCOeval.stats order.
_SUMMARY_ROWS = (
    ("AP", True, None, "all", 2),
    ("AP50", True, 0.5, "all", 2),
    ("AP75", True, 0.75, "all", 2),
    ("APs", True, None, "small", 2),
    ("APm", True, None, "medium", 2),
    ("APl", True, None, "large", 2),
    ("AR1", False, None, "all", 0),
    ("AR10", False, None, "all", 1),
    ("AR100", False, None, "all", 2),
    ("ARs", False, None, "small", 2),
    ("ARm", False, None, "medium", 2),
    ("ARl", False, None, "large", 2),
)
STAT_NAMES = tuple(row[0] for row in _SUMMARY_ROWS)
RESULT_KEYS = frozenset(("image_id", "category_id", "score"))
# Besides RESULT_KEYS, a result needs one of these for its IoU type.
RESULT_SHAPES = {"bbox": frozenset(("bbox", "segmentation")), "segm": frozenset(("segmentation",))}


class Backend(NamedTuple):
    name: str
    COCO: type
    COCOeval: type


def get_backend(name="auto"):
    """The backend called `name`; "auto" is DEFAULT_BACKEND, or pycocotools when it is missing."""
    if name == "auto":
        try:
            return get_backend(DEFAULT_BACKEND)
        except ImportError:
            print(
                f"coco_eval: {DEFAULT_BACKEND} is not installed, evaluating with pycocotools",
                file=sys.stderr,
            )
            return get_backend("pycocotools")
    coco_module, eval_module, eval_name = BACKENDS[name]
    coco_class = importlib.import_module(coco_module).COCO
    return Backend(name, coco_class, getattr(importlib.import_module(eval_module), eval_name))


def load_gt(backend, dataset):
    """The backend's COCO object for a ground-truth dataset dict, which it leaves untouched."""
    dataset = {**dataset, "annotations": [_plain_annotation(a) for a in dataset["annotations"]]}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools and its heirs narrate
        if backend.name != "pycocotools":
            return backend.COCO(dataset)
        coco = backend.COCO()
        coco.dataset = dataset
        coco.createIndex()
    return coco


def _plain_annotation(annotation):
    # A copy, because pycocotools' COCOeval replaces polygons with RLE in place; and counts as str,
    # because that replacement leaves bytes, which the C++ and Rust backends do not read.
    segmentation = annotation.get("segmentation")
    if isinstance(segmentation, dict) and isinstance(segmentation["counts"], bytes):
        segmentation = {**segmentation, "counts": segmentation["counts"].decode("ascii")}
        return {**annotation, "segmentation": segmentation}
    return dict(annotation)


def load_results(backend, coco_gt, results):
    """The backend's COCO object for a list of results in COCO results format. Like
    pycocotools' loadRes, it may write area, id and iscrowd into the results."""
    if not results:
        # pycocotools' loadRes fails on an empty list; an empty COCO means "no detections".
        return backend.COCO()
    return coco_gt.loadRes(results)


def run_cocoeval(backend, coco_gt, results, iou_type, max_dets=(1, 10, 100), img_ids=None):
    """COCOeval evaluated and accumulated; img_ids=None evaluates every ground-truth image.
    The results may come back with keys added (see load_results)."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval = backend.COCOeval(coco_gt, load_results(backend, coco_gt, results), iou_type)
        coco_eval.params.maxDets = list(max_dets)
        if img_ids is not None:
            coco_eval.params.imgIds = list(img_ids)
        coco_eval.evaluate()
        coco_eval.accumulate()
    return coco_eval


def summarize(coco_eval):
    """The 12 stats of an accumulated COCOeval, and the table lines pycocotools would print."""
    params = coco_eval.params
    iou_thrs = np.asarray(params.iouThrs)
    area_labels = list(params.areaRngLbl)
    max_dets = list(params.maxDets)
    # precision is [IoU, recall, category, area, maxDets]; recall lacks the recall axis.
    precision = np.asarray(coco_eval.eval["precision"])
    recall = np.asarray(coco_eval.eval["recall"])
    stats, lines = [], []
    for _, is_ap, iou_thr, area, max_det_index in _SUMMARY_ROWS:
        values = (precision if is_ap else recall)[..., area_labels.index(area), max_det_index]
        if iou_thr is not None:
            values = values[np.flatnonzero(iou_thrs == iou_thr)]
        stats.append(_mean_of_valid(values))
        iou = f"{iou_thrs[0]:0.2f}:{iou_thrs[-1]:0.2f}" if iou_thr is None else f"{iou_thr:0.2f}"
        title = "Average Precision  (AP)" if is_ap else "Average Recall     (AR)"
        where = f"IoU={iou:<9} | area={area:>6s} | maxDets={max_dets[max_det_index]:>3d}"
        lines.append(f" {title} @[ {where} ] = {stats[-1]:0.3f}")
    return stats, lines


def _mean_of_valid(values):
    # -1 marks "no ground truth here"; np.mean over the same elements in the same order as
    # pycocotools keeps the result bit-identical.
    valid = values[values > -1]
    return float(np.mean(valid)) if valid.size else -1.0


def stats_to_dict(stats):
    """{"stats": [...], "AP": ..., ...}: the 12 numbers in order and by name."""
    return {"stats": list(stats), **dict(zip(STAT_NAMES, stats, strict=True))}


def precision_curves(accumulated):
    """{category id: (precision at IoU 0.50, mean precision over the IoU thresholds)} of an
    accumulated COCOeval, each at its params.recThrs, area "all" and the last maxDets.

    Categories without ground truth (precision -1) are left out. The mean of a category's second
    curve is its AP as coco_eval.per_category_ap gives it.
    """
    params = accumulated.params
    precision = np.asarray(accumulated.eval["precision"])
    precision = precision[:, :, :, list(params.areaRngLbl).index("all"), -1]
    at_50 = int(np.flatnonzero(np.isclose(params.iouThrs, 0.5))[0])
    return {
        category_id: (precision[at_50, :, k], precision[:, :, k].mean(axis=0))
        for k, category_id in enumerate(params.catIds)
        if (precision[:, :, k] >= 0).all()
    }


def per_category_ap(coco_evals, categories):
    """Rows {"category": name, iou_type: AP, ...} over the evaluated categories, by category id.

    AP is averaged over IoU 0.50:0.95 at the last maxDets and all areas; None where the category
    has no ground truth in the evaluated images.
    """
    category_ids = next(iter(coco_evals.values())).params.catIds
    rows = [{"category": categories[category_id]["name"]} for category_id in category_ids]
    for iou_type, coco_eval in coco_evals.items():
        precision = np.asarray(coco_eval.eval["precision"])
        for k, row in enumerate(rows):
            ap = _mean_of_valid(precision[:, :, k, 0, -1])
            row[iou_type] = None if ap == -1.0 else ap
    return rows


def format_per_category_table(rows, iou_types):
    """The per-category rows as an aligned text table."""
    width = max([len("category"), *(len(row["category"]) for row in rows)])
    header = f"{'category':<{width}}" + "".join(f"  {t + ' AP':>7}" for t in iou_types)
    lines = [header]
    for row in rows:
        cells = ("-" if row[t] is None else f"{row[t]:.3f}" for t in iou_types)
        lines.append(f"{row['category']:<{width}}" + "".join(f"  {c:>7}" for c in cells))
    return "\n".join(lines)


def merge_detections(per_rank):
    """One {image_id: Detections} from several; an image seen twice counts once."""
    merged = {}
    for detections in per_rank:
        for image_id, image_detections in detections.items():
            merged.setdefault(image_id, image_detections)
    return merged


class CocoEvaluator:
    """Collects model outputs during evaluation and scores them with COCOeval.

    Predictions are kept as boxes and RLE strings, so memory grows with the number of detections,
    not with image size. Every image passed to update() is evaluated, detections or not.
    """

    def __init__(
        self, coco_gt, iou_types, max_dets=(1, 10, 100), backend="auto", label_to_category_id=None
    ):
        unknown = set(iou_types) - set(IOU_TYPES)
        if unknown:
            raise ValueError(f"unsupported IoU types {sorted(unknown)}; choose from {IOU_TYPES}")
        check_max_dets(max_dets)
        self.coco_gt = coco_gt
        self.iou_types = list(iou_types)
        self.max_dets = list(max_dets)
        self.backend = get_backend(backend)
        self.label_to_category_id = label_to_category_id
        self.detections = {}
        self.coco_evals = {}

    def update(self, predictions):
        with_masks = "segm" in self.iou_types
        for image_id, prediction in predictions.items():
            self.detections[int(image_id)] = to_detections(
                prediction, self.label_to_category_id, with_masks
            )

    def synchronize_between_processes(self):
        """Gives every rank the predictions of all ranks (all_gather_object, so gloo works too);
        an image that DistributedSampler's padding sent to two ranks counts once."""
        dist = _process_group()
        if dist is None:
            return
        per_rank = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, self.detections)
        self.detections = merge_detections(per_rank)

    def results(self, iou_type):
        """All collected predictions as COCO results for `iou_type`."""
        return [
            result
            for image_id, detections in self.detections.items()
            for result in to_coco_results(image_id, detections, iou_type)
        ]

    def evaluate(self):
        """Runs COCOeval per IoU type, prints the standard tables, returns {iou_type: 12 stats}."""
        coco_gt = load_gt(self.backend, self.coco_gt.dataset)
        img_ids = sorted(self.detections)
        dist = _process_group()
        all_stats = {}
        for iou_type in self.iou_types:
            coco_eval = run_cocoeval(
                self.backend, coco_gt, self.results(iou_type), iou_type, self.max_dets, img_ids
            )
            self.coco_evals[iou_type] = coco_eval
            all_stats[iou_type], lines = summarize(coco_eval)
            # Every rank holds the merged detections after synchronizing; one table is enough.
            if dist is None or dist.get_rank() == 0:
                print(f"IoU metric: {iou_type}", *lines, sep="\n")
        return all_stats

    def per_category_table(self):
        """After evaluate(): AP per category and IoU type, as text."""
        rows = per_category_ap(self.coco_evals, self.coco_gt.cats)
        return format_per_category_table(rows, list(self.coco_evals))

    def write_results(self, output_dir):
        """Writes results_<iou_type>.json in COCO results format for each IoU type."""
        os.makedirs(output_dir, exist_ok=True)
        for iou_type in self.iou_types:
            with open(os.path.join(output_dir, f"results_{iou_type}.json"), "w") as f:
                json.dump(self.results(iou_type), f)


def _process_group():
    """torch.distributed when a process group is initialized, else None."""
    # Imported here, where the training loop's evaluator needs it: the command never does.
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def check_max_dets(max_dets):
    if len(max_dets) != 3 or not 0 < max_dets[0] < max_dets[1] < max_dets[2]:
        raise ValueError(f"max-dets must be three increasing positive numbers, got {max_dets}")


def get_args_parser():
    parser = argparse.ArgumentParser(
        description="COCO bbox / segm evaluation of a results file against a ground-truth file."
    )
    parser.add_argument("--ann", required=True, help="ground-truth annotation file (COCO format)")
    parser.add_argument(
        "--results",
        required=True,
        nargs="+",
        help="results file(s) in COCO results format: one for every IoU type, or one per IoU type "
        "in --iou-types order",
    )
    parser.add_argument(
        "--iou-types",
        nargs="+",
        choices=IOU_TYPES,
        default=["bbox"],
        help="what to evaluate (default: bbox)",
    )
    parser.add_argument(
        "--max-dets",
        nargs=3,
        type=int,
        default=[1, 10, 100],
        help="detections per image for AR1, AR10 and AR100 (named by position); the last also "
        "caps AP",
    )
    parser.add_argument(
        "--nuclei-metrics",
        action="store_true",
        help="also the DSB2018 score, F1/precision/recall at IoU 0.5, PQ and AJI, overall and per "
        "image kind (needs segm results)",
    )
    parser.add_argument(
        "--score-thresh",
        type=float,
        default=SCORE_THRESHOLD,
        help="--nuclei-metrics counts masks scoring at least this (default: %(default)s)",
    )
    parser.add_argument("--out", help="write the stats of each IoU type to this JSON file")
    parser.add_argument(
        "--eval-backend",
        choices=("auto", *BACKENDS),
        default="auto",
        help=f"COCOeval implementation; auto is {DEFAULT_BACKEND}, or pycocotools without it",
    )
    return parser


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as e:
        raise DataError(f"{path}: {e.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None


def read_gt(path):
    dataset = read_json(path)
    keys = ("images", "annotations", "categories")
    if not isinstance(dataset, dict) or not all(isinstance(dataset.get(k), list) for k in keys):
        raise DataError(f"{path}: not a COCO annotation file (needs {', '.join(keys)} lists)")
    return dataset


def read_results(paths, image_ids):
    """{iou_type: results list} for {iou_type: path}, every file read once and checked against
    the ground truth's image ids before anything is evaluated. A file named for two IoU types
    gives each its own dicts, since loadRes may write into them."""
    parsed, results = {}, {}
    for iou_type, path in paths.items():
        if path in parsed:
            results[iou_type] = [dict(result) for result in parsed[path]]
        else:
            results[iou_type] = parsed[path] = read_json(path)
        check_results(results[iou_type], path, iou_type, image_ids)
    return results


def check_results(results, path, iou_type, image_ids):
    shapes = RESULT_SHAPES[iou_type]
    # Set operations on the keys views keep this to a small part of parsing the file.
    if not isinstance(results, list) or not all(
        type(r) is dict and RESULT_KEYS <= r.keys() and not shapes.isdisjoint(r.keys())
        for r in results
    ):
        raise DataError(
            f"{path}: not a COCO results list for {iou_type} (every item needs image_id, "
            f"category_id, score and {' or '.join(sorted(shapes))})"
        )
    unknown = {r["image_id"] for r in results} - image_ids
    if unknown:
        raise DataError(f"{path}: image ids not in the ground truth, e.g. {min(unknown)}")


def evaluate_files(args):
    """Evaluates the files named by the command-line arguments; returns {iou_type: 12 stats},
    and with --nuclei-metrics {"nuclei": nuclei_metrics} too."""
    if len(args.results) not in (1, len(args.iou_types)):
        raise ConfigError("--results takes one file, or one per --iou-types entry")
    if len(set(args.iou_types)) < len(args.iou_types):
        raise ConfigError(f"--iou-types names an IoU type twice: {' '.join(args.iou_types)}")
    check_max_dets(args.max_dets)
    if args.nuclei_metrics and "segm" not in args.iou_types:
        raise ConfigError("--nuclei-metrics needs segm results: add --iou-types segm")
    dataset = read_gt(args.ann)
    image_ids = {image["id"] for image in dataset["images"]}
    paths = args.results * len(args.iou_types) if len(args.results) == 1 else args.results
    results = read_results(dict(zip(args.iou_types, paths, strict=True)), image_ids)
    backend = get_backend(args.eval_backend)
    coco_gt = load_gt(backend, dataset)
    coco_evals, all_stats = {}, {}
    for iou_type, type_results in results.items():
        coco_evals[iou_type] = run_cocoeval(backend, coco_gt, type_results, iou_type, args.max_dets)
        all_stats[iou_type], lines = summarize(coco_evals[iou_type])
        print(f"IoU metric: {iou_type}", *lines, sep="\n")
    categories = {category["id"]: category for category in dataset["categories"]}
    rows = per_category_ap(coco_evals, categories)
    print(format_per_category_table(rows, list(coco_evals)))
    if args.nuclei_metrics:
        all_stats["nuclei"] = evaluate_nuclei(dataset, results["segm"], args.score_thresh)
    return all_stats


def evaluate_nuclei(dataset, results, score_thresh):
    """The nuclei measures of segm results, printed and returned by group of images."""
    per_image = results_image_counts(dataset, results, score_thresh)
    kinds = {image["id"]: image.get("kind") for image in dataset["images"]}
    metrics = nuclei_metrics(per_image, kinds)
    print(f"masks with score >= {score_thresh}; {format_nuclei_table(metrics)}")
    return metrics


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    with one_line_errors("coco_eval.py"):
        try:
            all_stats = evaluate_files(args)
        except (ImportError, ValueError) as e:
            # An --eval-backend that is not installed, or numbers COCOeval refuses.
            raise ConfigError(str(e)) from None
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {t: stats_to_dict(s) if t in IOU_TYPES else s for t, s in all_stats.items()},
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
