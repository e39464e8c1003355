"""COCO box and mask evaluation: the evaluator the training loop uses, and a command.

    python coco_eval.py --ann instances_val.json --results results_segm.json --iou-types segm
    python coco_eval.py --ann instances_val.json --results results_bbox.json results_segm.json \
        --iou-types bbox segm --max-dets 1 10 1000 --out stats.json

prints pycocotools' 12-line table per IoU type and a per-category AP table, and with `--out` writes
`{iou_type: {"stats": [12 numbers], "AP": ..., ..., "ARl": ...}}`. The names AR1, AR10 and AR100
are positions: they hold the recall at the first, second and third `--max-dets` value.

The stats equal those of pycocotools' COCOeval given the same files and `params.maxDets`, with one
deliberate difference: pycocotools computes AP over 100 detections whatever maxDets says (-1 when
100 is not among them); here AP, like every other AP and area-range AR, uses the last maxDets.
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
import torch
import torch.distributed as dist
from pycocotools import mask as mask_util

IOU_TYPES = ("bbox", "segm")
# pip package: (module with COCO, module with the COCOeval class, its name). All follow
# pycocotools' API; the default is the fastest whose precision and recall arrays are bit-identical
# to pycocotools' (README, Evaluation).
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


class InputError(Exception):
    """A ground-truth or results file that cannot be evaluated."""


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


def masks_to_rles(masks, threshold=0.5):
    """Compressed RLEs (pycocotools format, counts as bytes) of [N, 1, H, W] mask probabilities
    above `threshold`; the same as pycocotools.mask.encode of each thresholded mask."""
    n, _, height, width = masks.shape
    if n == 0:
        return []
    masks = masks[:, 0].detach()
    first, stop = _rows_to_compare(masks, threshold)
    if masks.device.type != "cpu":
        # Compared where they are, one byte per pixel crosses to the host instead of four.
        masks = (masks > threshold).cpu()
    masks = masks.numpy() if masks.dtype == torch.bool else masks.float().numpy()
    counts = _rle_counts(masks, first, stop, threshold)
    uncompressed = [{"size": [height, width], "counts": c} for c in counts]
    return mask_util.frPyObjects(uncompressed, height, width)


def _rows_to_compare(masks, threshold):
    """Per [H, W] mask, the rows [first, stop) that can start a run: from the first row with a
    pixel above `threshold` to the row after the last one (0, 0 for an empty mask)."""
    # A max per row reads the masks at memory speed and writes almost nothing; comparing every
    # pixel would write a byte for each. A NaN propagates into the max and keeps its row.
    foreground = ~(torch.amax(masks, dim=2) <= threshold)
    height = foreground.shape[1]
    first = foreground.byte().argmax(dim=1)  # 0 for an empty mask: argmax takes the first max
    last = height - 1 - foreground.flip(1).byte().argmax(dim=1)
    stop = torch.where(foreground.any(dim=1), torch.clamp(last + 2, max=height), first)
    return first.cpu().numpy(), stop.cpu().numpy()


def _rle_counts(masks, first, stop, threshold):
    """Uncompressed RLE counts (uint32 arrays) of [N, H, W] float masks above `threshold`, or of
    boolean masks, whose rows outside [first, stop) hold nothing (see _rows_to_compare)."""
    n, height, width = masks.shape
    rows, packed = _compare_and_pack(masks, first, stop, threshold)
    edges = masks[:, [0, -1]]  # first and last rows, where columns meet
    if edges.dtype != bool:
        edges = edges > threshold
    size = height * width
    # RLE counts are the gaps between run starts, beginning with a run of zeros: each mask's first
    # pixel starts a run, and again (an empty run of zeros) when it is set.
    dtype = np.int32 if (n + 1) * size < 2**31 else np.int64  # int32 sorts twice as fast
    starts = np.concatenate(
        [
            _starts_below(packed, rows, height, width).astype(dtype),
            _starts_across(edges, height).astype(dtype),
            np.flatnonzero(edges[:, 0, 0]).astype(dtype) * size,
            np.arange(n + 1, dtype=dtype) * size,
        ]
    )
    starts.sort()
    counts = np.diff(starts).astype(np.uint32)
    return np.split(counts, np.searchsorted(starts, np.arange(1, n) * size))


def _compare_and_pack(masks, first, stop, threshold):
    """Rows [first, stop) of each [H, W] mask compared with `threshold` (or taken as they are if
    boolean) and packed eight pixels to a byte, and their flat indices mask * H + row."""
    n, height, width = masks.shape
    spans = stop - first
    row_bytes = (width + 7) // 8
    # Rows padded to whole bytes let packbits pack the array flat, twice as fast as row by row.
    padded = np.empty((spans.sum(), 8 * row_bytes), dtype=bool)
    padded[:, width:] = False
    offset = 0
    for mask, begin, end in zip(masks, first, stop, strict=True):
        compared = padded[offset : offset + end - begin, :width]
        if mask.dtype == bool:
            np.copyto(compared, mask[begin:end])
        else:
            np.greater(mask[begin:end], threshold, out=compared)
        offset += end - begin
    packed = np.packbits(padded.reshape(-1)).reshape(-1, row_bytes)
    span_offsets = np.cumsum(spans) - spans
    rows = np.arange(spans.sum()) + np.repeat(np.arange(n) * height + first - span_offsets, spans)
    return rows, packed


def _starts_below(packed, rows, height, width):
    """Run starts at pixels unlike the pixel above them, as positions mask * H * W + column * H +
    row, from the packed `rows` (flat indices); a row not among them holds nothing and has nothing
    above it."""
    # Reading columns top to bottom, as RLE does, a run starts where a pixel differs from the one
    # above it. Finding these in packed rows and sorting the few positions costs a fraction of
    # transposing every pixel for mask.encode.
    row_bytes = packed.shape[1]
    above = np.zeros_like(packed)
    below_a_row = np.flatnonzero(rows[1:] == rows[:-1] + 1) + 1
    above[below_a_row] = packed[below_a_row - 1]
    changed = packed ^ above
    changed[rows % height == 0] = 0  # a column's first pixel follows the previous column's last
    changed = changed.reshape(-1)
    changed_bytes = np.flatnonzero(changed != 0)
    changed_bits = np.flatnonzero(np.unpackbits(changed[changed_bytes]))
    packed_row, byte = np.divmod(changed_bytes[changed_bits // 8], row_bytes)
    mask, row = np.divmod(rows[packed_row], height)
    column = 8 * byte + changed_bits % 8
    return mask * (height * width) + column * height + row


def _starts_across(edges, height):
    """Run starts at a column's first pixel when unlike the previous column's last, as positions;
    `edges` [N, 2, W] holds each mask's first and last row."""
    n, _, width = edges.shape
    across = np.flatnonzero(edges[:, 1, :-1] != edges[:, 0, 1:])
    mask, column = np.divmod(across, max(width - 1, 1))
    return mask * (height * width) + (column + 1) * height


class Detections(NamedTuple):
    """One image's predictions as kept until evaluation: boxes and RLE, never full masks."""

    boxes: np.ndarray  # [N, 4] XYWH, in the model's float dtype
    scores: np.ndarray  # [N]
    category_ids: list
    mask_size: tuple | None  # (H, W) of the masks
    mask_counts: list | None  # compressed RLE counts, as str


def to_detections(prediction, label_to_category_id=None, with_masks=True):
    """One image's model output as Detections."""
    boxes = prediction["boxes"].detach().clone()
    boxes[:, 2:] -= boxes[:, :2]
    labels = prediction["labels"].tolist()
    if label_to_category_id is not None:
        labels = [label_to_category_id[label] for label in labels]
    mask_size = mask_counts = None
    if with_masks:
        masks = prediction["masks"].detach()
        mask_size = tuple(masks.shape[-2:])
        mask_counts = [rle["counts"].decode("ascii") for rle in masks_to_rles(masks)]
    scores = prediction["scores"].detach().cpu().numpy()
    return Detections(boxes.cpu().numpy(), scores, labels, mask_size, mask_counts)


def to_coco_results(image_id, detections, iou_type):
    """One image's Detections as COCO results dicts for `iou_type`."""
    common = zip(detections.category_ids, detections.scores.tolist(), strict=True)
    if iou_type == "bbox":
        boxes = detections.boxes.tolist()
        return [
            {"image_id": image_id, "category_id": c, "bbox": box, "score": s}
            for (c, s), box in zip(common, boxes, strict=True)
        ]
    size = list(detections.mask_size)
    return [
        {
            "image_id": image_id,
            "category_id": c,
            "segmentation": {"size": size, "counts": counts},
            "score": s,
        }
        for (c, s), counts in zip(common, detections.mask_counts, strict=True)
    ]


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
        if not (dist.is_available() and dist.is_initialized()):
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
        all_stats = {}
        for iou_type in self.iou_types:
            coco_eval = run_cocoeval(
                self.backend, coco_gt, self.results(iou_type), iou_type, self.max_dets, img_ids
            )
            self.coco_evals[iou_type] = coco_eval
            all_stats[iou_type], lines = summarize(coco_eval)
            # Every rank holds the merged detections after synchronizing; one table is enough.
            if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
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


def check_max_dets(max_dets):
    if len(max_dets) != 3 or not 0 < max_dets[0] < max_dets[1] < max_dets[2]:
        raise ValueError(f"max-dets must be three increasing positive numbers, got {max_dets}")


def dsb_score(gt_masks_per_image, pred_masks_per_image):
    """The Data Science Bowl 2018 score: mean over images of the mean over IoU thresholds
    0.50, 0.55, ..., 0.95 of TP / (TP + FP + FN).

    Each image's masks are a [K, H, W] array (K may be 0) or an [H, W] label image (0 is
    background, each other value one instance); numpy arrays or tensors. A prediction matches a
    ground truth when their IoU exceeds the threshold, one to one, highest IoU first (above 0.5
    the match is unique when masks do not overlap). An image with neither ground truth nor
    predictions scores 1.0: nothing was there and nothing was found.
    """
    scores = [
        _dsb_image_score(_instance_stack(gt), _instance_stack(pred))
        for gt, pred in zip(gt_masks_per_image, pred_masks_per_image, strict=True)
    ]
    return float(np.mean(scores))


def _instance_stack(masks):
    masks = masks.cpu().numpy() if isinstance(masks, torch.Tensor) else np.asarray(masks)
    if masks.ndim == 2:
        labels = np.unique(masks)
        return masks[None] == labels[labels != 0][:, None, None]
    return masks.astype(bool)


def _dsb_image_score(gt, pred):
    if len(gt) == 0 and len(pred) == 0:
        return 1.0
    iou = mask_ious(gt, pred)
    ratios = []
    for threshold in np.linspace(0.5, 0.95, 10):
        tp = _count_one_to_one_matches(iou, threshold)
        ratios.append(tp / (len(gt) + len(pred) - tp))
    return float(np.mean(ratios))


def mask_ious(gt, pred):
    """[K, P] IoU between two stacks of [H, W] boolean masks."""
    # Comparing only masks whose boxes overlap, on the overlap, keeps a few hundred nuclei in a
    # megapixel image cheap; a dense [K, H*W] @ [H*W, P] product would need gigabytes.
    iou = np.zeros((len(gt), len(pred)))
    gt_boxes, pred_boxes = _mask_boxes(gt), _mask_boxes(pred)
    gt_areas, pred_areas = gt.sum((1, 2)), pred.sum((1, 2))
    top_left = np.maximum(gt_boxes[:, None, :2], pred_boxes[None, :, :2])
    bottom_right = np.minimum(gt_boxes[:, None, 2:], pred_boxes[None, :, 2:])
    for g, p in np.argwhere((top_left < bottom_right).all(-1)):
        (y0, x0), (y1, x1) = top_left[g, p], bottom_right[g, p]
        intersection = np.count_nonzero(gt[g, y0:y1, x0:x1] & pred[p, y0:y1, x0:x1])
        iou[g, p] = intersection / (gt_areas[g] + pred_areas[p] - intersection)
    return iou


def _mask_boxes(masks):
    # [N, 4] (y0, x0, y1, x1) with exclusive ends; an empty mask gets an empty box.
    rows, columns = masks.any(2), masks.any(1)
    first_row, first_column = rows.argmax(1), columns.argmax(1)
    end_row = rows.shape[1] - rows[:, ::-1].argmax(1)
    end_column = columns.shape[1] - columns[:, ::-1].argmax(1)
    boxes = np.stack([first_row, first_column, end_row, end_column], 1)
    return np.where(rows.any(1)[:, None], boxes, 0)


def _count_one_to_one_matches(iou, threshold):
    candidates = np.argwhere(iou > threshold)
    order = np.argsort(-iou[candidates[:, 0], candidates[:, 1]], kind="stable")
    used_gt, used_pred = set(), set()
    for g, p in candidates[order]:
        if g not in used_gt and p not in used_pred:
            used_gt.add(g)
            used_pred.add(p)
    return len(used_gt)


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
        raise InputError(f"{path}: {e.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None


def read_gt(path):
    dataset = read_json(path)
    keys = ("images", "annotations", "categories")
    if not isinstance(dataset, dict) or not all(isinstance(dataset.get(k), list) for k in keys):
        raise InputError(f"{path}: not a COCO annotation file (needs {', '.join(keys)} lists)")
    return dataset


def read_results(path, iou_type, image_ids):
    results = read_json(path)
    needed = ("segmentation",) if iou_type == "segm" else ("bbox", "segmentation")
    if not isinstance(results, list) or not all(_is_result(r, needed) for r in results):
        raise InputError(
            f"{path}: not a COCO results list for {iou_type} (every item needs image_id, "
            f"category_id, score and {' or '.join(needed)})"
        )
    unknown = {r["image_id"] for r in results} - image_ids
    if unknown:
        raise InputError(f"{path}: image ids not in the ground truth, e.g. {min(unknown)}")
    return results


def _is_result(result, needed):
    return (
        isinstance(result, dict)
        and all(k in result for k in ("image_id", "category_id", "score"))
        and any(k in result for k in needed)
    )


def evaluate_files(args):
    """Evaluates the files named by the command-line arguments; returns {iou_type: 12 stats}."""
    if len(args.results) not in (1, len(args.iou_types)):
        raise InputError("--results takes one file, or one per --iou-types entry")
    check_max_dets(args.max_dets)
    dataset = read_gt(args.ann)
    image_ids = {image["id"] for image in dataset["images"]}
    results_paths = args.results * len(args.iou_types) if len(args.results) == 1 else args.results
    backend = get_backend(args.eval_backend)
    coco_gt = load_gt(backend, dataset)
    coco_evals, all_stats = {}, {}
    for iou_type, path in zip(args.iou_types, results_paths, strict=True):
        results = read_results(path, iou_type, image_ids)
        coco_evals[iou_type] = run_cocoeval(backend, coco_gt, results, iou_type, args.max_dets)
        all_stats[iou_type], lines = summarize(coco_evals[iou_type])
        print(f"IoU metric: {iou_type}", *lines, sep="\n")
    categories = {category["id"]: category for category in dataset["categories"]}
    rows = per_category_ap(coco_evals, categories)
    print(format_per_category_table(rows, args.iou_types))
    return all_stats


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    try:
        all_stats = evaluate_files(args)
    except (InputError, ImportError, ValueError) as e:
        print(f"coco_eval.py: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.out:
        with open(args.out, "w") as f:
            json.dump({t: stats_to_dict(s) for t, s in all_stats.items()}, f, indent=2)


if __name__ == "__main__":
    main()
