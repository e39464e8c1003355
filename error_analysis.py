"""Error analysis of predicted instance masks against ground truth: which objects were found,
missed, invented, split or merged, per image and over a set of images.

Every ground-truth object and every prediction of an image gets exactly one kind:

- **merged**: a prediction that holds two or more ground-truth objects, and those objects. A
  ground-truth object is held by the prediction that covers the largest part of it, when that
  part is at least half of the object's area.
- **split**: a ground-truth object (not merged) that holds two or more predictions (not merged)
  which together cover at least half of its area, and those predictions. A prediction is held by
  the ground-truth object that covers the largest part of it, when that part is at least half of
  the prediction's area.
- **true positive**: a ground-truth object and a prediction matched at IoU above 0.5 (one to
  one, highest IoU first, as in the DSB2018 score), neither of them merged or split.
- **missed**: any other ground-truth object (unmatched, and in no split or merge).
- **extra**: any other prediction (unmatched, and in no split or merge).

The kinds are decided in this order, so merged wins over split and both win over a match: a
nucleus cut into a large and a small piece is split even when the large piece alone matches it,
because the image now counts two nuclei where there is one. Ties (two objects covering equal
parts) go to the lower index.

Rates: true positive, missed, split and merged are fractions of the ground-truth objects (the
four add up to 1); extra is a fraction of the predictions. F1 at IoU t is 2TP / (2TP + FP + FN)
with TP the one-to-one matches at IoU above t, FP = predictions - TP and FN = ground truth - TP,
each summed over the images before dividing; with no objects at all it is 1 (nothing to find,
nothing found). It ignores the kinds: a matched piece of a split object counts as a TP there.

Masks come as an [N, H, W] stack or an [H, W] label image (see mask_geometry.instance_stack);
object k of a label image is its k-th smallest nonzero label.
"""

import csv
from dataclasses import dataclass

import numpy as np

from instance_metrics import MATCH_IOU, f1_score, match_one_to_one
from mask_geometry import (
    instance_stack,
    intersections_from_ious,
    mask_areas,
    mask_ious,
)

KINDS = ("true_positive", "missed", "extra", "split", "merged")
F1_IOUS = (0.5, 0.7)
# "Mostly inside" and "covered" both mean at least this fraction of an object's own area.
MOSTLY = 0.5
COUNT_KEYS = (
    "gt",
    "pred",
    "true_positive",
    "missed",
    "extra",
    "split_gt",
    "split_pred",
    "merged_gt",
    "merged_pred",
    *(f"{name}_iou{round(100 * iou)}" for iou in F1_IOUS for name in ("tp", "fp", "fn")),
)


@dataclass(frozen=True)
class ImageErrors:
    """One image's classification: `gt_kinds[k]` and `pred_kinds[p]` are names from KINDS;
    `matches` the true-positive (gt, pred) pairs; `splits` maps a split ground-truth object to
    its predictions, `merges` a merged prediction to its ground-truth objects; `f1_matches` the
    number of one-to-one matches at each IoU of F1_IOUS."""

    gt_kinds: tuple
    pred_kinds: tuple
    matches: tuple
    splits: dict
    merges: dict
    f1_matches: dict

    def counts(self):
        """{key: int} for COUNT_KEYS: objects of each kind on each side, and TP, FP, FN at the
        IoUs of F1_IOUS."""
        gt, pred = len(self.gt_kinds), len(self.pred_kinds)
        counts = {
            "gt": gt,
            "pred": pred,
            "true_positive": len(self.matches),
            "missed": self.gt_kinds.count("missed"),
            "extra": self.pred_kinds.count("extra"),
            "split_gt": self.gt_kinds.count("split"),
            "split_pred": self.pred_kinds.count("split"),
            "merged_gt": self.gt_kinds.count("merged"),
            "merged_pred": self.pred_kinds.count("merged"),
        }
        for iou, tp in self.f1_matches.items():
            suffix = f"iou{round(100 * iou)}"
            counts.update({f"tp_{suffix}": tp, f"fp_{suffix}": pred - tp, f"fn_{suffix}": gt - tp})
        return counts


def classify(gt, pred):
    """ImageErrors of one image's predicted masks against its ground truth (module docstring)."""
    gt, pred = instance_stack(gt), instance_stack(pred)
    if gt.shape[1:] != pred.shape[1:]:
        raise ValueError(f"ground truth is {gt.shape[1:]} pixels, predictions {pred.shape[1:]}")
    iou = mask_ious(gt, pred)
    gt_areas, pred_areas = mask_areas(gt), mask_areas(pred)
    inter = intersections_from_ious(iou, gt_areas, pred_areas)
    gt_kinds, pred_kinds = ["missed"] * len(gt), ["extra"] * len(pred)

    merges = _groups(_holder(inter, gt_areas, axis=1))
    merges = {p: members for p, members in merges.items() if len(members) >= 2}
    for p, members in merges.items():
        pred_kinds[p] = "merged"
        for g in members:
            gt_kinds[g] = "merged"

    pieces = _holder(inter.T, pred_areas, axis=1)
    pieces[np.array([kind == "merged" for kind in pred_kinds], dtype=bool)] = -1
    splits = {}
    for g, members in _groups(pieces).items():
        if gt_kinds[g] != "merged" and len(members) >= 2 and _covers(gt[g], pred, members):
            splits[g] = members
            gt_kinds[g] = "split"
            for p in members:
                pred_kinds[p] = "split"

    matches = tuple(
        (g, p)
        for g, p in match_one_to_one(iou, MATCH_IOU).tolist()
        if gt_kinds[g] == "missed" and pred_kinds[p] == "extra"
    )
    for g, p in matches:
        gt_kinds[g], pred_kinds[p] = "true_positive", "true_positive"
    return ImageErrors(
        gt_kinds=tuple(gt_kinds),
        pred_kinds=tuple(pred_kinds),
        matches=matches,
        splits=splits,
        merges=merges,
        f1_matches={t: len(match_one_to_one(iou, t)) for t in F1_IOUS},
    )


def _holder(inter, areas, axis):
    """For each object (row of `inter`), the column covering its largest part when that part is
    at least MOSTLY of its area, else -1."""
    if inter.shape[axis] == 0:
        return np.full(len(inter), -1)
    best = inter.argmax(axis)
    part = np.take_along_axis(inter, best[:, None], axis)[:, 0]
    return np.where((areas > 0) & (part >= MOSTLY * areas), best, -1)


def _groups(holder):
    """{holder: [objects it holds]} in ascending order, leaving out -1."""
    groups = {}
    for index, held_by in enumerate(holder.tolist()):
        if held_by >= 0:
            groups.setdefault(held_by, []).append(index)
    return groups


def _covers(mask, masks, members):
    """Whether the union of masks[members] covers at least MOSTLY of `mask`; only `mask`'s box is
    read."""
    rows, columns = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    box = np.s_[rows[0] : rows[-1] + 1, columns[0] : columns[-1] + 1]
    union = np.any([masks[index][box] for index in members], axis=0)
    return np.count_nonzero(mask[box] & union) >= MOSTLY * np.count_nonzero(mask)


def summarize(per_image_counts):
    """Totals over images (the keys of ImageErrors.counts, plus "images"), the rate of each kind
    ("rate_<kind>", None when its denominator is 0) and "f1_iou50", "f1_iou70"."""
    totals = {key: sum(counts[key] for counts in per_image_counts) for key in COUNT_KEYS}
    summary = {"images": len(per_image_counts), **totals}
    gt_side = {
        "true_positive": "true_positive",
        "missed": "missed",
        "split": "split_gt",
        "merged": "merged_gt",
    }
    for kind, key in gt_side.items():
        summary[f"rate_{kind}"] = _ratio(totals[key], totals["gt"])
    summary["rate_extra"] = _ratio(totals["extra"], totals["pred"])
    return {**summary, **_f1s(totals)}


def _f1s(counts):
    """{"f1_iou50": ..., "f1_iou70": ...} from the TP, FP and FN keys of `counts`."""
    f1s = {}
    for iou in F1_IOUS:
        suffix = f"iou{round(100 * iou)}"
        f1s[f"f1_{suffix}"] = f1_score(*(counts[f"{n}_{suffix}"] for n in ("tp", "fp", "fn")))
    return f1s


def _ratio(numerator, denominator):
    return numerator / denominator if denominator else None


def write_csv(path, names, per_image_counts):
    """One row per image: `image` (its name), the COUNT_KEYS, then f1_iou50 and f1_iou70 of that
    image alone."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", *COUNT_KEYS, *(f"f1_iou{round(100 * t)}" for t in F1_IOUS)])
        for name, counts in zip(names, per_image_counts, strict=True):
            f1s = [f"{f1:.4f}" for f1 in _f1s(counts).values()]
            writer.writerow([name, *(counts[key] for key in COUNT_KEYS), *f1s])


def format_summary(summary):
    """The summary of summarize() as a text table: objects and rate per kind, then F1 lines."""
    rows = [
        ("true positive", summary["true_positive"], summary["true_positive"], "true_positive"),
        ("missed", summary["missed"], "-", "missed"),
        ("split", summary["split_gt"], summary["split_pred"], "split"),
        ("merged", summary["merged_gt"], summary["merged_pred"], "merged"),
        ("extra", "-", summary["extra"], "extra"),
    ]
    lines = [
        f"Errors over {summary['images']} image(s)",
        f"{'kind':<14}{'ground truth':>13}{'predictions':>13}  rate",
    ]
    for label, gt, pred, kind in rows:
        rate = summary[f"rate_{kind}"]
        of = "of predictions" if kind == "extra" else "of ground truth"
        rate_text = "-" if rate is None else f"{rate:.3f} {of}"
        lines.append(f"{label:<14}{gt:>13}{pred:>13}  {rate_text}")
    lines.append(f"{'all':<14}{summary['gt']:>13}{summary['pred']:>13}")
    for iou in F1_IOUS:
        suffix = f"iou{round(100 * iou)}"
        tp, fp, fn = (summary[f"{n}_{suffix}"] for n in ("tp", "fp", "fn"))
        lines.append(f"F1 at IoU {iou}: {summary[f'f1_{suffix}']:.4f} (TP {tp}, FP {fp}, FN {fn})")
    return "\n".join(lines)
