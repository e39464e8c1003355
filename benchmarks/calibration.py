"""Is a detection's score the chance that it is right? The reliability table of a checkpoint on a
validation split: per score bin, the fraction of detections that are true positives against
their mean score, and the expected calibration error (ECE).

    python datasets/make_demo.py --output datasets/demo
    python train.py --config configs/demo.toml
    python benchmarks/calibration.py --weights output/demo/checkpoint.pth \\
        --ann datasets/demo/annotations/instances_val2017.json --images datasets/demo/val2017

What the scores are (predict.py says the same): a Mask R-CNN's is its box classifier's softmax
probability of the class, the U-Net's its instance's mean foreground probability (times its
mean category probability with several categories), the ensemble's its combiner's predicted
mask IoU with the ground truth. None is trained to be the probability that the mask matches an
object, so each may be over- or under-confident.

Each image is segmented as predict.py does (coco_utils.load_image, predict.predict_image), keeping
detections scoring at least --min-score. A detection is a true positive when it matches a
ground-truth object of its category at mask IoU >= --iou, matched as COCO does: detections in
descending score, each taking the unmatched object it overlaps most. Crowd regions are left out
of both sides: a detection whose best match is a crowd region counts neither way.

Bins split [0, 1] into --bins equal parts (a score of exactly 1 joins the last). ECE is the mean
over detections of |fraction true in its bin - mean score of its bin|: 0 for a calibrated model.
"""

import argparse
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from pycocotools import mask as mask_util

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import loading  # noqa: E402
import predict  # noqa: E402
import utils  # noqa: E402
from coco_results import masks_to_rles  # noqa: E402
from coco_utils import image_path, load_image, read_annotation_file, segmentation_to_rle  # noqa: E402
from commands import one_line_errors  # noqa: E402
from progress import progress  # noqa: E402


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", required=True, help="checkpoint or ensemble file")
    parser.add_argument("--ann", required=True, help="COCO annotation file of the split")
    parser.add_argument("--images", required=True, help="folder of the split's images")
    parser.add_argument("--bins", default=10, type=int, help="score bins over [0, 1] (10)")
    parser.add_argument("--iou", default=0.5, type=float, help="mask IoU of a match (0.5)")
    parser.add_argument(
        "--min-score", default=0.05, type=float, help="detections scoring at least this (0.05)"
    )
    parser.add_argument("--max-images", type=int, help="only the split's first images")
    parser.add_argument("--device", help="cuda when available, else cpu")
    parser.add_argument("--json", help="also write the table and ECE to this JSON file")
    return parser


class Bin(NamedTuple):
    low: float
    high: float
    count: int
    mean_score: float
    fraction_tp: float


def true_positives(scores, labels, rles, gt_labels, gt_rles, gt_crowd, iou_threshold):
    """Per detection: True (matched), False (unmatched) or None (its best match is a crowd
    region), COCO's greedy matching in descending score."""
    hits = [False] * len(scores)
    if not len(scores) or not len(gt_rles):
        return hits
    iou = mask_util.iou(list(rles), list(gt_rles), [int(c) for c in gt_crowd])
    iou = np.asarray(iou).reshape(len(scores), len(gt_rles))
    gt_labels, crowd = np.asarray(gt_labels), np.asarray(gt_crowd, dtype=bool)
    taken = np.zeros(len(gt_rles), dtype=bool)
    for d in np.argsort(-np.asarray(scores), kind="stable"):
        candidates = (gt_labels == labels[d]) & (iou[d] >= iou_threshold)
        free = candidates & ~taken & ~crowd
        if free.any():
            best = np.flatnonzero(free)[np.argmax(iou[d][free])]
            taken[best] = hits[d] = True
        elif (candidates & crowd).any():
            hits[d] = None
    return hits


def reliability_table(scores, hits, bins=10):
    """The Bins (of --bins over [0, 1]) that hold detections, in score order."""
    scores, hits = np.asarray(scores, dtype=float), np.asarray(hits, dtype=float)
    index = np.minimum((scores * bins).astype(int), bins - 1)
    rows = []
    for b in np.unique(index).tolist():
        inside = index == b
        mean_score, fraction_tp = scores[inside].mean(), hits[inside].mean()
        rows.append(Bin(b / bins, (b + 1) / bins, int(inside.sum()), mean_score, fraction_tp))
    return rows


def expected_calibration_error(rows):
    total = sum(row.count for row in rows)
    return sum(row.count * abs(row.fraction_tp - row.mean_score) for row in rows) / total


def format_table(rows, ece):
    lines = [f"{'score bin':>11} {'count':>7} {'mean score':>11} {'fraction TP':>12} {'gap':>7}"]
    for row in rows:
        gap = row.fraction_tp - row.mean_score
        lines.append(
            f"{row.low:5.2f}-{row.high:4.2f}  {row.count:7d} {row.mean_score:11.3f} "
            f"{row.fraction_tp:12.3f} {gap:+7.3f}"
        )
    total = sum(row.count for row in rows)
    lines.append(f"expected calibration error: {ece:.4f} over {total} detections")
    return "\n".join(lines)


def detections_of_split(args):
    """(scores, hits) of every detection of the split that counts (not matched to a crowd)."""
    device = torch.device(utils.device_or_default(args.device))
    loaded = loading.load(args.weights, device)
    model, offset, names = loaded.model, loaded.label_offset, loaded.category_names
    known = [category_id + offset for category_id in names] if names else None
    dataset = read_annotation_file(args.ann)
    by_image = {}
    for annotation in dataset["annotations"]:
        by_image.setdefault(annotation["image_id"], []).append(annotation)
    images = dataset["images"][: args.max_images]
    all_scores, all_hits = [], []
    for image_record in progress(images, desc="calibration", unit="image"):
        image = load_image(image_path(args.images, image_record["file_name"]))
        height, width = image.shape[-2:]
        found = predict.predict_image(model, image, device, args.min_score, known)
        masks = found["masks"]
        rles = masks if isinstance(masks, list) else masks_to_rles(masks)
        objects = [
            (a["category_id"], segmentation_to_rle(a["segmentation"], height, width), a)
            for a in by_image.get(image_record["id"], [])
        ]
        objects = [(c, rle, a) for c, rle, a in objects if rle is not None]
        hits = true_positives(
            found["scores"].tolist(),
            [label - offset for label in found["labels"].tolist()],
            rles,
            [c for c, _, _ in objects],
            [rle for _, rle, _ in objects],
            [a.get("iscrowd", 0) for _, _, a in objects],
            args.iou,
        )
        for score, hit in zip(found["scores"].tolist(), hits, strict=True):
            if hit is not None:
                all_scores.append(score)
                all_hits.append(hit)
    return all_scores, all_hits


def main(args):
    scores, hits = detections_of_split(args)
    rows = reliability_table(scores, hits, args.bins)
    ece = expected_calibration_error(rows) if rows else float("nan")
    print(format_table(rows, ece))
    common.write_json(
        args.json,
        {
            "weights": args.weights,
            "ann": args.ann,
            "iou": args.iou,
            "min_score": args.min_score,
            "bins": [row._asdict() for row in rows],
            "ece": ece,
        },
    )


if __name__ == "__main__":
    with one_line_errors("calibration.py"):
        main(get_args_parser().parse_args())
