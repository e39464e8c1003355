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
                        no pixel. --label-format tif writes <stem>_labels.tif instead. Mask models
                        only.
    <stem>_errors.png   with --ann: ground truth and predictions coloured by error kind
                        (true positive, missed, extra, split, merged), with a legend
and once for all images:
    results.json        COCO results: image_id, file_name, category_id, category_name, bbox
                        (x, y, width, height), score and segmentation (compressed RLE)
    errors.csv          with --ann: each image's counts per error kind and its F1 at IoU 0.5
                        and 0.7; errors.json holds the summary, printed at the end (see
                        error_analysis.py for how each kind is decided)

Image ids are 1, 2, ... in sorted file-name order; file_name is the path under --input. A
detection is kept when its score is at least --score-thresh and its label is one of the
checkpoint's categories (not a gap between category ids); its mask is the model's mask
probability above 0.5, as in evaluation. An R-CNN drops detections under --score-thresh itself
(the same ones are kept, sooner), so that with --tile the windows' low-scoring detections never
reach the merge; with --tta each flipped view keeps all of its detections. The model
(architecture, number of classes, category names, input sizes, anchor sizes, ...) is rebuilt from
the checkpoint, and images are read as in training (coco_utils.load_image): 8-bit files as they
are, 16/32-bit grey ones scaled per image between their 0.1 and 99.9 percentiles.
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
import loading
import mask_crops
import models
import overlays
import utils
from coco_results import prediction_records
from coco_utils import (
    image_path,
    load_image,
    read_annotation_file,
    segmentation_to_mask,
)
from commands import add_device_arg, one_line_errors
from errors import ConfigError, DataError
from mask_geometry import MASK_THRESHOLD, SCORE_THRESHOLD, rle_to_crop
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
        "--label-format", default="png", choices=["png", "tif"], help="label image file format"
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
    try:
        with Image.open(path):
            pass
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: cannot read image ({e})") from None
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


def write_outputs(args, stem, image, detections, records, names):
    """<stem>_overlay.png and, for mask models, <stem>_labels.<format>; returns the [N, H, W]
    masks, or None when the image is too large to hold them (tiled inference)."""
    height, width = image.shape[-2:]
    masks = binary_masks(detections, height, width)
    if "masks" in detections:
        save_array(
            label_image(detections["masks"], height, width), f"{stem}_labels.{args.label_format}"
        )
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
    """uint16 labels: k + 1 on the pixels of detection k, the higher score winning overlaps;
    RLE masks (tiled inference) are painted box by box, never decoded whole."""
    if not isinstance(masks, list):
        return instance_labels(masks[:, 0] > MASK_THRESHOLD).numpy().astype(np.uint16)
    labels = np.zeros((height, width), dtype=np.uint16)
    for k in range(len(masks) - 1, -1, -1):
        x, y, w, h = (int(v) for v in mask_util.toBbox(masks[k]))
        labels[y : y + h, x : x + w][rle_to_crop(masks[k], y, x, y + h, x + w)] = k + 1
    return labels


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
    os.makedirs(args.output, exist_ok=True)
    results, per_image = [], []
    for image_id, (path, file_name) in enumerate(
        progress(inputs, desc="predict", unit="image"), start=1
    ):
        try:
            image = load_image(path)
        except (OSError, SyntaxError, ValueError) as e:
            raise DataError(f"{path}: cannot read image ({e})") from None
        detections = predict_image(model, image, device, args.score_thresh, known_labels)
        label_to_category = {label: label - offset for label in detections["labels"].tolist()}
        records = prediction_records(
            detections, image_id, label_to_category, names, {"file_name": file_name}
        )
        results.extend(records)
        stem = os.path.join(args.output, os.path.splitext(os.path.basename(path))[0])
        masks = write_outputs(args, stem, image, detections, records, names)
        if truth is not None:
            per_image.append(analyse_errors(truth, file_name, image, masks, stem))
    with open(os.path.join(args.output, "results.json"), "w") as f:
        json.dump(results, f)
    if truth is not None:
        write_error_summary(args.output, [name for _, name in inputs], per_image)
    print(
        f"wrote {len(inputs)} image(s), {len(results)} detections and results.json to {args.output}"
    )


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    with one_line_errors("predict.py"):
        run(args)


if __name__ == "__main__":
    main()
