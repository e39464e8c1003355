r"""Runs a checkpoint written by train.py on images, writing results people and programs can read.

    python predict.py --weights output/checkpoint.pth --input images/ --output predictions/

--input is one image or a folder (its image files, not its sub-folders). For each image
<stem>.<ext>, in --output:
    <stem>_overlay.png  the image (upscaled when small) with each kept instance's mask filled
                        translucent with its contour, and a caption (score, with the category
                        name when there are several) where it covers no other instance
                        (--overlay-text on: everywhere, off: nowhere)
    <stem>_labels.png   instance label image, uint16: 0 is background and k the image's k-th
                        detection by descending score (its k-th record in results.json); where
                        masks overlap the higher score wins, so a fully hidden detection leaves
                        no pixel. --label-format tif (or png tif) writes <stem>_labels.tif, with
                        the pixel size in it and uint32 past 65,535 objects, which a PNG cannot
                        hold (label_tiff.py). Mask models only.
    <stem>.geojson      with --geojson: the instances as QuPath detections (qupath_geojson.py)
    <stem>_measurements.csv  with --measurements: a row per object (centroid, area, perimeter,
                        shape, intensity per channel, score, model; measurements.py)
    <stem>_errors.png   with --ann: ground truth and predictions coloured by error kind
                        (true positive, missed, extra, split, merged), with a legend
and once for all images:
    results.json        COCO results: image_id, file_name, category_id, category_name, bbox
                        (x, y, width, height), score and segmentation (compressed RLE)
    errors.csv          with --ann: each image's counts per error kind and its F1 at IoU 0.5
                        and 0.7; errors.json holds the summary, printed at the end (see
                        error_analysis.py for how each kind is decided)
    summary.csv         with --measurements: each image's count, density and mean area

Image ids are 1, 2, ... in sorted file-name order; file_name is the path under --input. A
detection is kept when its score is at least --score-thresh and its label is one of the
checkpoint's categories (not a gap between category ids); its mask is the model's mask
probability above 0.5, as in evaluation. An R-CNN drops detections under --score-thresh itself
(the same ones are kept, sooner), so that with --tile the windows' low-scoring detections never
reach the merge; with --tta each flipped view keeps all of its detections. The model
(architecture, number of classes, category names, input sizes, anchor sizes, ...) is rebuilt from
the checkpoint, and images are read as in training (coco_utils.load_image): 8-bit files as they
are, 16/32-bit grey ones scaled per image between their 0.1 and 99.9 percentiles.

Microscopy files (microscopy_io.py): TIFF and OME-TIFF of any bit depth; --channels picks the
channel(s) the model sees, and each plane of a stack (Z, T, ...) is an image of its own,
<stem>_plane<N>.* (--plane N: that one only). When both the image's pixel size (--pixel-size, or
the file's OME/ImageJ/TIFF metadata) and the model's (train.py --train-pixel-size) are known,
images are rescaled to the model's scale and the results mapped back to their own pixels; the
scale used is printed once. An R-CNN also resizes each input (or --tile window) to its
--min-size: at the model's pixel size and with --tile the size of its training images, objects
reach it at the scale it learned.

Scores. A Mask R-CNN's score is its box classifier's softmax probability of the class; the
U-Net's is its instance's mean foreground probability (times its mean category probability
with several categories); the ensemble's is its combiner's predicted mask IoU with the ground
truth (its baseline mode: a fixed rule of the two scores). None is a calibrated probability of
being a true nucleus; benchmarks/calibration.py measures how far each is from one.
"""

import argparse
import functools
import json
import os

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_util
from torchvision.transforms.v2 import functional as F

import engine
import error_analysis
import instance_crops
import label_tiff
import loading
import mask_crops
import measurements
import microscopy_io
import models
import overlays
import qupath_geojson
import utils
from coco_results import prediction_records
from coco_utils import (
    image_path,
    read_annotation_file,
    segmentation_to_mask,
)
from commands import add_device_arg, one_line_errors
from errors import ConfigError, DataError
from mask_geometry import MASK_THRESHOLD, SCORE_THRESHOLD
from progress import progress
from tiling import TiledModel, check_tiling

IMAGE_EXTENSIONS = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
# Overlays need each instance's full-size mask; tiled predictions of huge images skip them.
OVERLAY_BYTES = 2**30


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--weights",
        required=True,
        help="model file: checkpoint of train.py, ensemble file of ensemble.py fit, or ONNX "
        "(.onnx) or torch.export (.pt2) file of export.py",
    )
    parser.add_argument("--input", required=True, help="an image, or a folder of images")
    parser.add_argument("--output", required=True, help="folder for overlays, labels, results")
    parser.add_argument(
        "--score-thresh",
        default=SCORE_THRESHOLD,
        type=float,
        help="keep detections scoring at least this",
    )
    parser.add_argument(
        "--label-format",
        default=["png"],
        nargs="+",
        choices=["png", "tif"],
        help="label image file format(s): png, tif (with the pixel size; uint32 past 65,535 "
        "objects) or both",
    )
    parser.add_argument(
        "--geojson", action="store_true", help="write <stem>.geojson, QuPath detections"
    )
    parser.add_argument(
        "--measurements",
        action="store_true",
        help="write <stem>_measurements.csv (a row per object) and summary.csv",
    )
    parser.add_argument(
        "--overlay-text",
        default="auto",
        choices=overlays.TEXT_MODES,
        help="captions on the overlay: auto (only where they cover no other instance), on, off",
    )
    add_device_arg(parser)
    parser.add_argument(
        "--ann",
        help="COCO annotation file of the input images (matched by file name): adds an error "
        "analysis against it (<stem>_errors.png, errors.csv, errors.json)",
    )
    models.add_inference_args(parser)
    microscopy_io.add_microscopy_args(parser)
    return parser


def list_images(path):
    """The image files to run on, sorted, as (path, file_name under --input)."""
    if os.path.isfile(path):
        return [check_header(path, os.path.basename(path))]
    if not os.path.isdir(path):
        raise DataError(f"{path}: no such file or folder")
    names = sorted(
        name
        for name in os.listdir(path)
        if name.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(path, name))
    )
    if not names:
        raise DataError(f"{path}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    stems = [os.path.splitext(name)[0] for name in names]
    for name, stem in zip(names, stems, strict=True):
        if stems.count(stem) > 1:
            raise DataError(f"{os.path.join(path, name)}: another image has the stem {stem!r}")
    return [check_header(os.path.join(path, name), name) for name in names]


def check_header(path, name):
    """Fails on a file that is no image before the model is built; damage inside an image shows
    when it is read."""
    microscopy_io.check_readable(path)
    return path, name


def instance_labels(masks):
    """[H, W] int32 labels from [N, H, W] masks ordered by descending score: mask k is label
    k + 1, and where masks overlap the earlier (higher-scoring) one wins."""
    labels = torch.zeros(masks.shape[-2:], dtype=torch.int32)
    for k in range(len(masks) - 1, -1, -1):
        labels[masks[k]] = k + 1
    return labels


def save_array(array, path):
    Image.fromarray(array).save(path)


@torch.inference_mode()
def predict_image(model, image, device, score_thresh, labels=None):
    """The kept detections of one image, on the CPU and ordered by descending score.

    With `labels`, detections of other labels (gaps between category ids) are left out. A
    torchvision Mask R-CNN returns its masks as RLE, pasted box by box (mask_crops.py).
    """
    choose = functools.partial(kept_in_order, score_thresh=score_thresh, labels=labels)
    if isinstance(model, TiledModel):
        mask_crops.map_large_blocks()
    else:
        mask_crops.keep_freed_memory()
    if mask_crops.is_mask_rcnn(model):
        return mask_crops.predict(model, engine.images_to_device([image], device)[0], choose)
    # A tiled model converts its windows to float one by one, never the whole (large) image.
    inputs = [image] if isinstance(model, TiledModel) else engine.images_to_device([image], device)
    output = model(inputs)[0]
    order = choose(output["scores"], output["labels"])
    return {k: select(v, order) for k, v in output.items()}


def kept_in_order(scores, predicted_labels, score_thresh, labels=None):
    """Indices (on the CPU) of the detections scoring at least `score_thresh` whose label is
    among `labels` (any label when None), by descending score."""
    keep = scores >= score_thresh
    if labels is not None:
        keep &= torch.isin(predicted_labels, torch.tensor(labels, device=keep.device))
    order = torch.argsort(scores, descending=True)
    return order[keep[order]].cpu()


def select(values, order):
    """values[order] on the CPU, for tensors and for lists (the RLE masks of tiled inference)."""
    if isinstance(values, list):
        return [values[i] for i in order.tolist()]
    return values[order.to(values.device)].cpu()


class GroundTruth:
    """The instance masks of the images of a COCO annotation file, found by file name (the path
    under --input, or failing that the base name)."""

    def __init__(self, ann_file):
        dataset = read_annotation_file(ann_file)
        self.ann_file = ann_file
        self.images = {}
        for image in dataset["images"]:
            self.images[image_path("", image["file_name"])] = image
            self.images.setdefault(os.path.basename(image_path("", image["file_name"])), image)
        self.annotations = {}
        for annotation in dataset["annotations"]:
            self.annotations.setdefault(annotation.get("image_id"), []).append(annotation)

    def masks(self, file_name, height, width):
        """[K, H, W] bool masks of the image's non-crowd objects."""
        image = self.images.get(image_path("", file_name)) or self.images.get(
            os.path.basename(file_name)
        )
        if image is None:
            raise DataError(f"{file_name}: no image of that file name in --ann {self.ann_file}")
        objects = [a for a in self.annotations.get(image["id"], []) if not a.get("iscrowd", 0)]
        masks = [segmentation_to_mask(a.get("segmentation"), height, width) for a in objects]
        return np.array(masks, dtype=bool).reshape(len(masks), height, width)


def display(image):
    """The image as uint8 for drawing (16-bit images are read as float in [0, 1])."""
    return F.to_dtype(image, torch.uint8, scale=True)


def captions_of(records, names):
    """Score only when there is one category (a name on every nucleus hides the nuclei)."""
    if len(names) <= 1:
        return [f"{r['score']:.2f}" for r in records]
    return [f"{r['category_name']} {r['score']:.2f}" for r in records]


def write_outputs(args, stem, image, detections, records, names, pixel_size=None):
    """<stem>_overlay.png and, for mask models, <stem>_labels.<format>; returns the [N, H, W]
    masks, or None when the image is too large to hold them (tiled inference)."""
    height, width = image.shape[-2:]
    masks = binary_masks(detections, height, width)
    if "masks" in detections:
        write_label_images(args, stem, label_image(detections["masks"], height, width), pixel_size)
    if masks is None:
        print(f"{stem}_overlay.png left out: {len(records)} masks of {width}x{height} px exceed "
              f"{OVERLAY_BYTES >> 20} MiB")  # fmt: skip
        return None
    drawn = overlays.draw_instances(
        display(image), masks, captions_of(records, names), text=args.overlay_text
    )
    save_array(drawn, f"{stem}_overlay.png")
    return masks


def binary_masks(detections, height, width):
    """[N, H, W] boolean masks of the detections (their boxes for a box model), or None when
    that would take more than OVERLAY_BYTES."""
    masks = detections.get("masks")
    if masks is None:
        return torch.from_numpy(overlays.boxes_to_masks(detections["boxes"], height, width))
    if not isinstance(masks, list):
        return masks[:, 0] > MASK_THRESHOLD
    if len(masks) * height * width > OVERLAY_BYTES:
        return None
    decoded = [mask_util.decode(rle).astype(bool) for rle in masks]
    return torch.from_numpy(np.array(decoded, dtype=bool).reshape(-1, height, width))


def label_image(masks, height, width):
    """uint16 labels (uint32 past 65,535 detections): k + 1 on the pixels of detection k, the
    higher score winning overlaps; painted crop by crop, never a full-size mask."""
    return instance_crops.label_image(masks, height, width, label_tiff.label_dtype(len(masks)))


def write_label_images(args, stem, labels, pixel_size):
    for label_format in args.label_format:
        path = f"{stem}_labels.{label_format}"
        if label_format == "tif":
            label_tiff.write_label_tiff(path, labels, pixel_size)
        elif labels.dtype == np.uint16:
            save_array(labels, path)
        else:
            print(f"{path} left out: {labels.max()} objects exceed a 16-bit PNG; see the .tif")


def write_object_tables(args, stem, plane, detections, records, loaded, file_name):
    """<stem>.geojson and <stem>_measurements.csv as asked; returns the image's summary row (None
    without --measurements)."""
    if not (args.geojson or args.measurements) or "masks" not in detections:
        return None
    height, width = plane.raw.shape[-2:]
    crops = list(instance_crops.crops(detections["masks"], height, width))
    scores = [r["score"] for r in records]
    categories = [r["category_name"] for r in records]
    object_ids = range(1, len(records) + 1)
    if args.geojson:
        found = qupath_geojson.features(crops, scores, categories, object_ids)
        qupath_geojson.write_geojson(f"{stem}.geojson", found)
    if not args.measurements:
        return None
    rows = measurements.object_rows(
        crops,
        scores,
        categories,
        object_models(detections, loaded, args.weights),
        plane.raw,
        plane.pixel_size,
        file_name,
        plane.index,
    )
    columns = measurements.OBJECT_COLUMNS
    measurements.write_csv(f"{stem}_measurements.csv", rows, columns)
    return measurements.summary_row(rows, height, width, plane.pixel_size, file_name, plane.index)


def analyse_errors(truth, file_name, image, masks, stem):
    """The image's error counts against the ground truth; writes <stem>_errors.png."""
    if masks is None:
        raise ConfigError(f"{file_name}: too large for --ann; evaluate it with coco_eval.py")
    gt = truth.masks(file_name, *image.shape[-2:])
    predicted = masks.numpy()
    errors = error_analysis.classify(gt, predicted)
    drawn = overlays.draw_errors(display(image), gt, predicted, errors.gt_kinds, errors.pred_kinds)
    save_array(drawn, f"{stem}_errors.png")
    return errors.counts()


def write_error_summary(output, file_names, per_image):
    summary = error_analysis.summarize(per_image)
    error_analysis.write_csv(os.path.join(output, "errors.csv"), file_names, per_image)
    with open(os.path.join(output, "errors.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(error_analysis.format_summary(summary))


def run(args):
    inputs = list_images(args.input)
    truth = GroundTruth(args.ann) if args.ann else None
    device = torch.device(utils.device_or_default(args.device))
    if args.tile is not None:
        check_tiling(args.tile, args.tile_overlap)
    loaded = loading.load(args.weights, device)
    model = loaded.model
    if not args.tta:  # flipped views are merged by mask, each view with all its detections
        models.raise_score_threshold(model, args.score_thresh)
    model = models.inference_model(args, model)
    if truth is not None and not models.predicts_masks(model):
        raise ConfigError(f"--ann: the error analysis needs a mask model, not {args.weights}")
    names, offset = loaded.category_names, loaded.label_offset
    known_labels = [category_id + offset for category_id in names] if names else None
    train_pixel_size = loaded.args.get("train_pixel_size")
    os.makedirs(args.output, exist_ok=True)
    results, per_image, summaries, said = [], [], [], set()
    image_id = 0
    for path, file_name in progress(inputs, desc="predict", unit="image"):
        for plane in microscopy_io.read_planes(path, args.channels, args.plane, args.pixel_size):
            image_id += 1
            image = plane.image
            detections = predict_at_model_scale(
                model, plane, train_pixel_size, device, args.score_thresh, known_labels, said
            )
            label_to_category = {label: label - offset for label in detections["labels"].tolist()}
            extra = {"file_name": file_name}
            if plane.index is not None:
                extra["plane"] = plane.index
            records = prediction_records(detections, image_id, label_to_category, names, extra)
            results.extend(records)
            stem = os.path.join(args.output, microscopy_io.file_stem(path))
            if plane.index is not None:
                stem += f"_plane{plane.index}"
            masks = write_outputs(args, stem, image, detections, records, names, plane.pixel_size)
            summary = write_object_tables(args, stem, plane, detections, records, loaded, file_name)
            if summary is not None:
                summaries.append(summary)
            if truth is not None:
                per_image.append(analyse_errors(truth, file_name, image, masks, stem))
    with open(os.path.join(args.output, "results.json"), "w") as f:
        json.dump(results, f)
    if args.measurements:
        summary_path = os.path.join(args.output, "summary.csv")
        measurements.write_csv(summary_path, summaries, measurements.SUMMARY_COLUMNS)
    if truth is not None:
        write_error_summary(args.output, [name for _, name in inputs], per_image)
    print(f"wrote {image_id} image(s), {len(results)} detections and results.json to {args.output}")


def predict_at_model_scale(model, plane, train_pixel_size, device, score_thresh, labels, said):
    """predict_image on a plane rescaled to the model's pixel size, the detections mapped back
    to the plane's own pixels; says once which scale was used."""
    factor, notice = microscopy_io.scale_factor(plane.pixel_size, train_pixel_size)
    say_once(said, notice)
    if plane.pixel_size is not None:
        say_once(said, f"pixel size: {plane.pixel_size:g} um/px from {plane.pixel_size_source}")
    height, width = plane.image.shape[-2:]
    scaled = microscopy_io.rescale(plane.image, factor)
    detections = predict_image(model, scaled, device, score_thresh, labels)
    return microscopy_io.to_original_grid(detections, scaled.shape[-2:], height, width)


def say_once(said, line):
    if line not in said:
        said.add(line)
        print(line)


def object_models(detections, loaded, weights):
    """The model each detection came from: the checkpoint's architecture, or for an ensemble
    "ensemble:" and the architecture of the member whose candidate it was."""
    if "sources" in detections:
        sources = loaded.sources
        return [f"ensemble:{sources[source]}" for source in detections["sources"].tolist()]
    if loaded.kind == "ensemble":  # tiled or flipped views keep no sources
        return ["ensemble"] * len(detections["scores"])
    name = loaded.args.get("model") or os.path.basename(weights)
    return [name] * len(detections["scores"])


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    with one_line_errors("predict.py"):
        run(args)


if __name__ == "__main__":
    main()
