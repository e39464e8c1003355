"""Mask R-CNN and the U-Net ensembled: pooled candidates, a learned combiner, a fixed baseline.

After Vuola, Akram and Kannala, "Mask-RCNN and U-Net Ensembled for Nuclei Segmentation"
(ISBI 2019). This module owns the combination of one Mask R-CNN checkpoint and one U-Net
checkpoint of train.py on the same images: the candidate instances and their features, the
gradient-boosted combiner that scores them, the selection that turns scored candidates into
non-overlapping instances, the ensemble file, and the `fit` and `evaluate` commands.

    python ensemble.py fit --maskrcnn output/nuclei_maskrcnn/checkpoint.pth \\
        --unet output/nuclei_unet/checkpoint.pth \\
        --val-ann datasets/nuclei/annotations/instances_fit2017.json \\
        --val-images datasets/nuclei/fit2017 --output output/ensemble.pth
    python ensemble.py evaluate --weights output/ensemble.pth \\
        --val-ann datasets/nuclei/annotations/instances_val2017.json \\
        --val-images datasets/nuclei/val2017 --mode maskrcnn unet baseline learned

`--mode` of evaluate, one or several: `learned` (the combiner), `baseline` (no learning),
`maskrcnn` or `unet` (one model alone), so all four run through the same loader, evaluator and
nuclei measures; with several, the two models run once per image and every mode's output is
scored before the next image. It prints segm AP, AP50, AP75 (maxDets --max-detections) and the
nuclei measures of instance_metrics (DSB2018 score, F1, precision and recall at IoU 0.5, PQ,
AJI; masks scoring >= 0.5, as train.py --nuclei-metrics), overall and per image kind, of each
and, with --output-dir, writes them with error_analysis's counts (missed, split, merged) to
metrics_<mode>.json. Memory stays flat in the number of images: each output is kept only as the
evaluator's RLEs and a few counts. The split the combiner was fitted on is refused for
evaluation (same annotation file or contents), and so is fitting on a split that trained either
model.

Candidates. Each image's candidates are Mask R-CNN's detections scoring at least `min_score`
and every U-Net instance (at most `max_candidates` of each, best first: above the 375 nuclei
of the densest DSB 2018 image; Mask R-CNN's own cap is its checkpoint's
--box-detections-per-img), masks binarised at 0.5, at least `min_area` pixels.

Features (FEATURES, in order): source (1 for the U-Net), the model's score, area, solidity,
eccentricity, extent, perimeter / area; the mean inside the candidate of Mask R-CNN's foreground
(the maximum over the mask probabilities of its detections scoring >= min_score), of the
U-Net's foreground and of its border probability; the best mask IoU with the other model's
candidates and with the same model's other candidates, and the other model's score at that best
match; the number of candidates it overlaps and the number of the other model's candidates it
mostly (>= half) contains. Agreement between models says an instance is real; the U-Net maps
catch a Mask R-CNN mask that is coarse or off the nucleus, the border probability and
`other_contained` a U-Net instance that merges touching nuclei, the same-model IoU a duplicate,
the shape a fragment.

Combiner. A LightGBM regressor, fitted on a split that trained neither model, predicts each
candidate's best mask IoU with the ground truth. Its model is kept as plain text
(`model_to_string`), so the ensemble file stays a dict that `torch.load(weights_only=True)` reads
(why LightGBM: docs/nuclei.md).

Selection. Candidates are taken greedily by predicted quality (the baseline: by its fixed
score) down to `min_quality`, skipping one whose mask IoU with one already kept exceeds
`nms_iou`. Every pixel then goes to the kept instance of highest quality that covers it, and an
instance left with fewer than `min_area` pixels or under `min_kept_fraction` of its own is
dropped: output instances never share a pixel. Outputs are torchvision's (boxes, labels,
scores = predicted quality, masks [N, 1, H, W] of 0 and 1), so engine.evaluate and predict.py
run an EnsembleModel as they run either model; `sources` [N] says which model's candidate each
instance was (MASKRCNN or UNET, named in the loaded file's "sources").

Baseline. Mask R-CNN and U-Net candidates matched one to one at mask IoU > `agree_iou` are kept
with the U-Net's mask (finer than Mask R-CNN's 28 x 28 one) and score 0.75 + 0.25 x their mean
score; unmatched candidates of either model scoring at least `single_score` are kept with
0.5 + 0.25 x their score; then the same selection.

Ensemble file: a torch.save'd dict that loads with weights_only=True:
{"kind": "ensemble", "version", "combiner": LightGBM model text, "features": FEATURES,
"thresholds": {...}, "fit": {"ann", "sha256", "images", "candidates"}, "maskrcnn" and "unet":
each {"model": state dict, "args", "num_classes", "category_names", "label_offset"}}. The
weights are copied in, not referred to by path: the combiner learnt these exact models' errors,
and a checkpoint retrained or moved under the same name would silently break it.
"""

import argparse
import hashlib
import json
import os

import cv2
import lightgbm as lgb
import numpy as np
import torch
from skimage.measure import regionprops

import checkpointing
import error_analysis
import models
import presets
import unet
import utils
from coco_eval import CocoEvaluator
from coco_utils import CocoDetection, label_to_category_id
from commands import add_device_arg, one_line_errors
from engine import images_to_device
from errors import CheckpointError, ConfigError
from instance_metrics import (
    evaluated_instances,
    format_nuclei_table,
    image_counts,
    match_one_to_one,
    nuclei_metrics,
)
from mask_geometry import (
    MASK_THRESHOLD,
    SCORE_THRESHOLD,
    intersections_from_ious,
    mask_areas,
    mask_boxes,
    mask_boxes_xyxy,
    mask_ious,
    to_numpy,
)
from progress import progress

FILE_VERSION = 1
FEATURES = (
    "source_unet",
    "score",
    "area",
    "solidity",
    "eccentricity",
    "extent",
    "perimeter_per_area",
    "maskrcnn_foreground",
    "unet_foreground",
    "unet_border",
    "best_iou_other_model",
    "best_iou_same_model",
    "other_model_score",
    "overlapping_candidates",
    "other_contained",
)
DEFAULT_THRESHOLDS = {
    "min_score": 0.05,
    "max_candidates": 500,
    "min_area": 10,
    "min_quality": 0.1,
    "nms_iou": 0.3,
    "min_kept_fraction": 0.5,
    "agree_iou": 0.5,
    "single_score": 0.9,
}
ENTRY_INFO = ("num_classes", "category_names", "label_offset")
MODES = ("learned", "baseline", "maskrcnn", "unet")
MASKRCNN, UNET = 0, 1
# Small trees and many rounds at a low rate: a few thousand candidates from 30 images.
BOOSTER_PARAMS = {
    "objective": "regression",
    "learning_rate": 0.05,
    "num_leaves": 15,
    "min_data_in_leaf": 20,
    "feature_fraction": 0.8,
    "bagging_fraction": 0.8,
    "bagging_freq": 1,
    "lambda_l2": 1.0,
    "num_threads": 1,
    "deterministic": True,
    "seed": 0,
    "verbose": -1,
}
BOOSTER_ROUNDS = 300


def image_candidates(maskrcnn_output, unet_output, thresholds):
    """One image's pooled candidates: masks [N, H, W] bool, source, scores, labels [N] and the
    [N, N] mask IoU between them."""
    parts = []
    for source, output in ((MASKRCNN, maskrcnn_output), (UNET, unet_output)):
        scores = to_numpy(output["scores"])
        masks = to_numpy(output["masks"])[:, 0] > MASK_THRESHOLD
        keep = (scores >= thresholds["min_score"]) & (mask_areas(masks) >= thresholds["min_area"])
        keep = np.flatnonzero(keep)
        keep = keep[np.argsort(-scores[keep], kind="stable")][: thresholds["max_candidates"]]
        parts.append((source, masks[keep], scores[keep], to_numpy(output["labels"])[keep]))
    height, width = to_numpy(unet_output["masks"]).shape[-2:]
    masks = np.concatenate([p[1] for p in parts]).reshape(-1, height, width)
    return {
        "masks": masks,
        "source": np.concatenate([np.full(len(p[1]), p[0]) for p in parts]).astype(np.int64),
        "scores": np.concatenate([p[2] for p in parts]).astype(np.float64),
        "labels": np.concatenate([p[3] for p in parts]).astype(np.int64),
        "iou": mask_ious(masks, masks),
    }


def maskrcnn_foreground(maskrcnn_output, shape, min_score):
    """Mask R-CNN's foreground probability: the maximum over the mask probabilities of its
    detections scoring at least `min_score` (the candidates' floor)."""
    keep = to_numpy(maskrcnn_output["scores"]) >= min_score
    masks = to_numpy(maskrcnn_output["masks"])[keep]
    return masks[:, 0].max(0) if len(masks) else np.zeros(shape, dtype=np.float32)


def shape_features(mask):
    """Solidity, eccentricity, extent and perimeter / area of one non-empty mask."""
    top, left, bottom, right = mask_boxes(mask[None])[0]
    crop = mask[top:bottom, left:right].astype(np.uint8)
    region = regionprops(crop)[0]
    ys, xs = np.nonzero(crop)
    solidity = convex_solidity(xs, ys)
    return solidity, region.eccentricity, region.extent, region.perimeter / region.area


def convex_solidity(xs, ys):
    """Pixels over the pixels of their convex hull (at most 1). The hull's pixel count is that
    of the hull polygon of the pixel centres by Pick's theorem, area + boundary / 2 + 1, with
    the boundary's lattice points taken as its length: scikit-image's exact count rasterises
    the hull, some 40 ms a nucleus, which made the features the slowest step of the ensemble."""
    hull = cv2.convexHull(np.column_stack([xs, ys]).astype(np.int32))
    count = cv2.contourArea(hull) + cv2.arcLength(hull, True) / 2 + 1
    return min(1.0, len(xs) / count)


def pair_features(candidates):
    """Per candidate: best IoU with the other model and with its own, the other model's score
    at that best match, overlapping candidates, and the other model's candidates it contains."""
    iou, source, scores = candidates["iou"], candidates["source"], candidates["scores"]
    areas = mask_areas(candidates["masks"])
    intersection = intersections_from_ious(iou, areas, areas)
    other = source[:, None] != source[None, :]
    same = ~other & ~np.eye(len(source), dtype=bool)
    other_iou = np.where(other, iou, 0.0)
    best_other = other_iou.argmax(1) if len(source) else np.zeros(0, dtype=np.int64)
    has_other = other_iou.max(1, initial=0.0) > 0
    contained = other & (intersection >= 0.5 * areas[None, :])
    return np.stack(
        [
            other_iou.max(1, initial=0.0),
            np.where(same, iou, 0.0).max(1, initial=0.0),
            np.where(has_other, scores[best_other], 0.0),
            ((intersection > 0) & (other | same)).sum(1),
            contained.sum(1),
        ],
        axis=1,
    )


def candidate_features(candidates, maskrcnn_fg, unet_maps):
    """[N, len(FEATURES)] float32 features of one image's candidates (see the docstring)."""
    masks = candidates["masks"]
    if len(masks) == 0:
        return np.zeros((0, len(FEATURES)), dtype=np.float32)
    unet_fg, unet_border = to_numpy(unet_maps["foreground"]), to_numpy(unet_maps["border"])
    areas = mask_areas(masks).astype(np.float64)

    def mean_inside(probability):
        return np.array([probability[m].mean() for m in masks])

    columns = np.column_stack(
        [
            candidates["source"] == UNET,
            candidates["scores"],
            areas,
            np.array([shape_features(m) for m in masks]),
            mean_inside(maskrcnn_fg),
            mean_inside(unet_fg),
            mean_inside(unet_border),
            pair_features(candidates),
        ]
    )
    return columns.astype(np.float32)


def candidate_targets(candidates, gt_masks):
    """Each candidate's best mask IoU with a ground-truth instance (0 when there is none)."""
    gt_masks = to_numpy(gt_masks).astype(bool)
    if len(gt_masks) == 0 or len(candidates["masks"]) == 0:
        return np.zeros(len(candidates["masks"]))
    return mask_ious(gt_masks, candidates["masks"]).max(0)


def fit_combiner(features, targets):
    """A LightGBM regressor of candidate quality, as the text of the model."""
    data = lgb.Dataset(features, targets, feature_name=list(FEATURES), free_raw_data=False)
    booster = lgb.train(BOOSTER_PARAMS, data, num_boost_round=BOOSTER_ROUNDS)
    return booster.model_to_string()


class Combiner:
    """A fitted combiner, from its LightGBM text: predicted quality in [0, 1] of candidates."""

    def __init__(self, model_text):
        self.text = model_text
        self.booster = lgb.Booster(model_str=model_text)
        names = tuple(self.booster.feature_name())
        if names != FEATURES:
            raise ValueError(f"combiner features {names} are not this version's {FEATURES}")

    def __call__(self, features):
        if len(features) == 0:
            return np.zeros(0)
        return np.clip(self.booster.predict(features, num_threads=1), 0.0, 1.0)


def baseline_quality(candidates, thresholds):
    """The baseline's fixed score of each candidate (0: not kept); see the module docstring."""
    source, scores = candidates["source"], candidates["scores"]
    rcnn, unets = np.flatnonzero(source == MASKRCNN), np.flatnonzero(source == UNET)
    quality = np.where(scores >= thresholds["single_score"], 0.5 + 0.25 * scores, 0.0)
    pairs = match_one_to_one(candidates["iou"][np.ix_(rcnn, unets)], thresholds["agree_iou"])
    for r, u in pairs:
        i, j = rcnn[r], unets[u]
        quality[i] = 0.0
        quality[j] = 0.75 + 0.25 * (scores[i] + scores[j]) / 2
    return quality


def keep_greedily(iou, quality, min_quality, nms_iou):
    """Indices kept, best first: by quality down to min_quality, skipping any overlapping a
    kept one at IoU above nms_iou."""
    kept = []
    for i in np.argsort(-quality, kind="stable"):
        if quality[i] < min_quality:
            break
        if all(iou[i, j] <= nms_iou for j in kept):
            kept.append(int(i))
    return kept


def resolve_pixels(masks, kept, min_area, min_kept_fraction):
    """(index, mask) of the kept instances, every pixel given to the first (best) kept instance
    that covers it; instances left too small are dropped."""
    owner = np.full(masks.shape[1:], -1, dtype=np.int64)
    for rank in reversed(range(len(kept))):
        owner[masks[kept[rank]]] = rank
    resolved = []
    for rank, index in enumerate(kept):
        mask = owner == rank
        area = int(mask.sum())
        if area >= max(min_area, min_kept_fraction * masks[index].sum()):
            resolved.append((index, mask))
    return resolved


def detections(candidates, resolved, quality, device):
    """torchvision's detection dict for the resolved instances, best first."""
    height, width = candidates["masks"].shape[1:]
    indices = [i for i, _ in resolved]
    masks = np.array([m for _, m in resolved], dtype=np.float32).reshape(-1, height, width)
    return {
        "boxes": torch.from_numpy(mask_boxes_xyxy(masks)).to(device),
        "labels": torch.as_tensor(candidates["labels"][indices], device=device).long(),
        "scores": torch.as_tensor(quality[indices], dtype=torch.float32, device=device),
        "masks": torch.from_numpy(masks[:, None]).to(device),
        "sources": torch.as_tensor(candidates["source"][indices], device=device).long(),
    }


class EnsembleModel(torch.nn.Module):
    """Mask R-CNN and a U-Net combined by `mode` (MODES); called as either model in eval mode:
    a list of images in, a detection dict per image out."""

    predicts_masks = True

    def __init__(self, maskrcnn, unet_model, combiner=None, thresholds=None, mode="learned"):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: choose from {MODES}")
        if mode == "learned" and combiner is None:
            raise ValueError("the learned mode needs a fitted combiner")
        self.maskrcnn = maskrcnn
        self.unet = unet_model
        self.combiner = combiner
        self.thresholds = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
        self.mode = mode
        # It only predicts (its models train with train.py), so it starts in eval mode.
        self.eval()

    @torch.no_grad()
    def model_outputs(self, images):
        """Per image (Mask R-CNN's output, the U-Net's output, the U-Net's maps)."""
        maskrcnn_outputs = self.maskrcnn(images)
        maps = self.unet.predict_maps(images)
        unet_outputs = [unet.instances_from_maps(**m, **self.unet.watershed_kwargs) for m in maps]
        return list(zip(maskrcnn_outputs, unet_outputs, maps, strict=True))

    def candidates_and_features(self, maskrcnn_output, unet_output, maps):
        candidates = image_candidates(maskrcnn_output, unet_output, self.thresholds)
        shape = candidates["masks"].shape[1:]
        fg = maskrcnn_foreground(maskrcnn_output, shape, self.thresholds["min_score"])
        return candidates, candidate_features(candidates, fg, maps)

    def combine(self, maskrcnn_output, unet_output, maps):
        """One image's ensembled detections."""
        t = self.thresholds
        candidates, features = self.candidates_and_features(maskrcnn_output, unet_output, maps)
        if self.mode == "baseline":
            quality, min_quality = baseline_quality(candidates, t), 0.5
        else:
            quality, min_quality = self.combiner(features), t["min_quality"]
        kept = keep_greedily(candidates["iou"], quality, min_quality, t["nms_iou"])
        resolved = resolve_pixels(candidates["masks"], kept, t["min_area"], t["min_kept_fraction"])
        return detections(candidates, resolved, quality, maps["foreground"].device)

    def forward(self, images, targets=None):
        if self.training:
            raise RuntimeError("EnsembleModel only predicts: train its two models with train.py")
        return [self.output(*outputs) for outputs in self.model_outputs(images)]

    def output(self, maskrcnn_output, unet_output, maps):
        """One image's detections in this mode."""
        if self.mode == "maskrcnn":
            return maskrcnn_output
        if self.mode == "unet":
            return unet_output
        return self.combine(maskrcnn_output, unet_output, maps)


def model_entry(checkpoint):
    """What the ensemble file keeps of one train.py checkpoint."""
    return {
        "model": checkpoint["model"],
        "args": checkpoint["args"],
        "num_classes": checkpoint.get("num_classes"),
        "category_names": checkpoint.get("category_names"),
        "label_offset": checkpoint.get("label_offset", 0),
    }


def load_members(maskrcnn_path, unet_path, device):
    """(Mask R-CNN, U-Net) in eval mode and their two checkpoints, checked to be what they
    should be and to share categories."""
    maskrcnn_ckpt = read_member("--maskrcnn", maskrcnn_path)
    unet_ckpt = read_member("--unet", unet_path)
    check_members(maskrcnn_ckpt, unet_ckpt, maskrcnn_path, unet_path)
    maskrcnn = models.model_from_checkpoint(maskrcnn_ckpt, maskrcnn_path)
    unet_model = models.model_from_checkpoint(unet_ckpt, unet_path)
    return maskrcnn.to(device).eval(), unet_model.to(device).eval(), maskrcnn_ckpt, unet_ckpt


def read_member(flag, path):
    """The train.py checkpoint `flag` names; any other file (an export, an ensemble file) is a
    one-line error: the ensemble file keeps its members' weights and flags."""
    try:
        return checkpointing.read_checkpoint(path)
    except CheckpointError as e:
        raise CheckpointError(f"{flag} {e.message}; give a checkpoint of train.py") from None


def check_members(maskrcnn_ckpt, unet_ckpt, maskrcnn_path, unet_path):
    maskrcnn_name = maskrcnn_ckpt["args"].get("model")
    unet_name = unet_ckpt["args"].get("model")
    if "maskrcnn" not in str(maskrcnn_name):
        raise ConfigError(
            f"--maskrcnn {maskrcnn_path}: a {maskrcnn_name} checkpoint, not Mask R-CNN"
        )
    if not models.is_unet(unet_name):
        raise ConfigError(f"--unet {unet_path}: a {unet_name} checkpoint, not a U-Net")
    for key in ("category_names", "label_offset"):
        if maskrcnn_ckpt.get(key) != unet_ckpt.get(key):
            raise ConfigError(
                f"--maskrcnn {maskrcnn_path} and --unet {unet_path}: trained on different "
                f"categories ({key} differ)"
            )


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_ensemble(path, combiner_text, thresholds, maskrcnn_ckpt, unet_ckpt, fit_info):
    """Writes the ensemble file (see the module docstring) atomically."""
    record = {
        "kind": "ensemble",
        "version": FILE_VERSION,
        "combiner": combiner_text,
        "features": list(FEATURES),
        "thresholds": dict(thresholds),
        "fit": fit_info,
        "maskrcnn": model_entry(maskrcnn_ckpt),
        "unet": model_entry(unet_ckpt),
    }
    checkpointing.save_atomically(record, path)


def read_ensemble_file(path):
    """The ensemble file's dict, or CheckpointError naming the file."""
    record = checkpointing.load_file(path)
    check_record(record, path)
    return record


def check_record(record, path):
    if not isinstance(record, dict) or record.get("kind") != "ensemble":
        raise CheckpointError(f"{path}: not an ensemble file of ensemble.py fit")
    if record.get("version") != FILE_VERSION or tuple(record.get("features", ())) != FEATURES:
        raise CheckpointError(f"{path}: ensemble file of another version of ensemble.py")


def ensemble_from_checkpoint(record, path, device="cpu", mode="learned"):
    """(EnsembleModel in eval mode on `device`, checkpoint-like dict) from an ensemble file's
    dict: the dict holds category_names, label_offset and num_classes as a train.py one does."""
    check_record(record, path)
    members = []
    for name in ("maskrcnn", "unet"):
        model = models.model_from_checkpoint(record[name], f"{path} ({name})")
        members.append(model.to(device).eval())
    try:
        combiner = Combiner(record["combiner"])
    except (lgb.basic.LightGBMError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable combiner ({e})") from None
    model = EnsembleModel(*members, combiner, record["thresholds"], mode).eval()
    info = {
        key: record["maskrcnn"][key] for key in ("num_classes", "category_names", "label_offset")
    }
    sources = {MASKRCNN: record["maskrcnn"]["args"]["model"], UNET: record["unet"]["args"]["model"]}
    return model, {"kind": "ensemble", "fit": record["fit"], "sources": sources, **info}


def load_ensemble(path, device="cpu", mode="learned"):
    """(EnsembleModel in eval mode, checkpoint-like dict) of an ensemble file."""
    return ensemble_from_checkpoint(read_ensemble_file(path), path, device, mode)


def eval_loader(ann, images, label_offset):
    """Single-image batches of a COCO split, in file order, as evaluation reads them."""
    dataset = CocoDetection(images, ann, presets.DetectionPresetEval(), label_offset=label_offset)
    return torch.utils.data.DataLoader(
        dataset, batch_size=1, shuffle=False, num_workers=0, collate_fn=utils.collate_fn
    )


def extract_training_rows(model, loader, device):
    """Features and targets (best IoU with the ground truth) of every candidate of the split."""
    features, targets = [], []
    for images, image_targets in progress(loader, desc="features", unit="image"):
        images = images_to_device(images, device)
        for outputs, target in zip(model.model_outputs(images), image_targets, strict=True):
            candidates, image_features = model.candidates_and_features(*outputs)
            features.append(image_features)
            targets.append(candidate_targets(candidates, target["masks"]))
    return np.concatenate(features), np.concatenate(targets)


def training_ann(checkpoint):
    """The annotation file a train.py checkpoint was trained on."""
    args = checkpoint["args"]
    default = os.path.join(args.get("data_path") or "", "annotations", "instances_train2017.json")
    return os.path.abspath(args.get("train_ann") or default)


def check_held_out(ann, *checkpoints):
    """Refuses to fit the combiner on a split that trained one of the models: their errors on
    it are not their errors on new images."""
    for checkpoint in checkpoints:
        if os.path.abspath(ann) == training_ann(checkpoint):
            raise ConfigError(
                f"--val-ann {ann}: {checkpoint['args']['model']} was trained on this split; "
                "fit on a held-out one (make_demo.py --style nuclei writes fit2017)"
            )


def fit(args):
    device = torch.device(utils.device_or_default(args.device))
    thresholds = {**DEFAULT_THRESHOLDS, **threshold_overrides(args)}
    if not os.path.isfile(args.val_ann):
        raise ConfigError(f"--val-ann {args.val_ann}: no such file")
    maskrcnn, unet_model, maskrcnn_ckpt, unet_ckpt = load_members(args.maskrcnn, args.unet, device)
    check_held_out(args.val_ann, maskrcnn_ckpt, unet_ckpt)
    loader = eval_loader(args.val_ann, args.val_images, maskrcnn_ckpt.get("label_offset"))
    model = EnsembleModel(maskrcnn, unet_model, thresholds=thresholds, mode="baseline").eval()
    features, targets = extract_training_rows(model, loader, device)
    if len(features) == 0:
        raise ConfigError(f"--val-ann {args.val_ann}: the models found no candidates to fit on")
    combiner_text = fit_combiner(features, targets)
    fit_info = {
        "ann": os.path.abspath(args.val_ann),
        "sha256": file_sha256(args.val_ann),
        "images": len(loader.dataset),
        "candidates": len(features),
    }
    save_ensemble(args.output, combiner_text, thresholds, maskrcnn_ckpt, unet_ckpt, fit_info)
    print(
        f"fitted the combiner on {len(features)} candidates of {len(loader.dataset)} images "
        f"(mean best IoU {targets.mean():.3f}); wrote {args.output}"
    )


def check_not_fit_split(fit_info, ann):
    """Refuses to report on the split the combiner was fitted on."""
    if os.path.abspath(ann) == fit_info["ann"] or file_sha256(ann) == fit_info["sha256"]:
        raise ConfigError(
            f"--val-ann {ann}: the combiner was fitted on this split ({fit_info['ann']}); "
            "evaluate on one that fitted nothing"
        )


def run_evaluation(args):
    """segm AP, AP50, AP75 and the nuclei measures of each mode of args.mode on a split."""
    device = torch.device(utils.device_or_default(args.device))
    if not os.path.isfile(args.val_ann):
        raise ConfigError(f"--val-ann {args.val_ann}: no such file")
    if args.max_detections <= 10:
        raise ConfigError(f"--max-detections must be above 10, got {args.max_detections}")
    record = read_ensemble_file(args.weights)
    check_not_fit_split(record["fit"], args.val_ann)
    model, info = ensemble_from_checkpoint(record, args.weights, device, args.mode[0])
    model.thresholds["max_candidates"] = args.max_detections
    loader = eval_loader(args.val_ann, args.val_images, info["label_offset"])
    results = evaluate_modes(model, args.mode, loader, device, info, args.max_detections)
    for metrics in results:
        print(metrics_line(metrics))
        print(format_nuclei_table(metrics["nuclei"]))
        if args.output_dir:
            os.makedirs(args.output_dir, exist_ok=True)
            with open(os.path.join(args.output_dir, f"metrics_{metrics['mode']}.json"), "w") as f:
                json.dump(metrics, f, indent=1)
    return results


def evaluate_modes(model, modes, loader, device, info, max_detections):
    """Each mode's metrics from one pass over the images: the two models run once per image,
    and each mode's output is reduced to the evaluator's RLEs and the nuclei measures' counts
    before the next image, so that no mask outlives its image."""
    category_ids = label_to_category_id(info["label_offset"], info["num_classes"])
    max_dets = (1, 10, max_detections)
    evaluators = {
        mode: CocoEvaluator(
            loader.dataset.coco, ["segm"], max_dets, label_to_category_id=category_ids
        )
        for mode in modes
    }
    counts = {mode: {} for mode in modes}
    errors = {mode: {} for mode in modes}
    for images, targets in progress(loader, desc="evaluate", unit="image"):
        images = images_to_device(images, device)
        for outputs, target in zip(model.model_outputs(images), targets, strict=True):
            image_id = target["image_id"]
            for mode in modes:
                model.mode = mode
                output = model.output(*outputs)
                evaluators[mode].update({image_id: output})
                instances = evaluated_instances(target, output, SCORE_THRESHOLD)
                counts[mode][image_id] = image_counts(*instances)
                errors[mode][image_id] = error_analysis.classify(*instances).counts()
    images = loader.dataset.coco.imgs
    kinds = {image_id: images[image_id].get("kind") for image_id in images}
    return [
        mode_metrics(mode, evaluators[mode], counts[mode], errors[mode], kinds) for mode in modes
    ]


def error_summaries(per_image, kinds):
    """error_analysis.summarize over every image ("all") and over each kind's images."""
    groups = {"all": list(per_image.values())}
    for image_id, counts in per_image.items():
        if kinds.get(image_id) is not None:
            groups.setdefault(kinds[image_id], []).append(counts)
    return {name: error_analysis.summarize(counts) for name, counts in groups.items()}


def mode_metrics(mode, evaluator, per_image, errors, kinds):
    segm = evaluator.evaluate()["segm"]
    nuclei = nuclei_metrics(per_image, kinds)
    return {
        "errors": error_summaries(errors, kinds),
        "mode": mode,
        "segm_AP": segm[0],
        "segm_AP50": segm[1],
        "segm_AP75": segm[2],
        "dsb": nuclei["all"]["dsb"],
        "images": len(per_image),
        "nuclei": nuclei,
    }


def metrics_line(metrics):
    return (
        f"{metrics['mode']}: segm AP {metrics['segm_AP']:.3f}  AP50 {metrics['segm_AP50']:.3f}  "
        f"AP75 {metrics['segm_AP75']:.3f}  DSB2018 {metrics['dsb']:.3f} "
        f"({metrics['images']} images)"
    )


def threshold_overrides(args):
    return {
        key: getattr(args, key)
        for key in ("min_score", "nms_iou", "min_quality")
        if getattr(args, key) is not None
    }


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    fit_parser = commands.add_parser("fit", help="fit the combiner and write the ensemble file")
    fit_parser.add_argument("--maskrcnn", required=True, help="Mask R-CNN checkpoint of train.py")
    fit_parser.add_argument("--unet", required=True, help="U-Net checkpoint of train.py")
    fit_parser.add_argument(
        "--val-ann", required=True, help="annotation file of a split that trained neither model"
    )
    fit_parser.add_argument("--val-images", required=True, help="folder of that split's images")
    fit_parser.add_argument("--output", required=True, help="ensemble file to write")
    for name, help_text in (
        ("--min-score", "lowest Mask R-CNN score of a candidate"),
        ("--nms-iou", "mask IoU above which a kept instance suppresses a candidate"),
        ("--min-quality", "lowest predicted quality of a kept instance"),
    ):
        default = DEFAULT_THRESHOLDS[name[2:].replace("-", "_")]
        fit_parser.add_argument(name, type=float, help=f"{help_text} ({default})")
    eval_parser = commands.add_parser("evaluate", help="segm AP and DSB score on a split")
    eval_parser.add_argument("--weights", required=True, help="ensemble file of ensemble.py fit")
    eval_parser.add_argument("--val-ann", required=True, help="annotation file to report on")
    eval_parser.add_argument("--val-images", required=True, help="folder of that split's images")
    eval_parser.add_argument("--output-dir", help="write metrics_<mode>.json here")
    eval_parser.add_argument(
        "--max-detections",
        type=int,
        default=DEFAULT_THRESHOLDS["max_candidates"],
        help="candidates per model and COCO maxDets per image, above the densest image's "
        "nuclei (%(default)s)",
    )
    what = "what to evaluate, one or several (the models then run once): learned"
    eval_parser.add_argument("--mode", nargs="+", choices=MODES, default=["learned"], help=what)
    for sub in (fit_parser, eval_parser):
        add_device_arg(sub)
    return parser


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    command = fit if args.command == "fit" else run_evaluation
    with one_line_errors("ensemble.py"):
        command(args)


if __name__ == "__main__":
    main()
