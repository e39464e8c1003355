r"""Runs a checkpoint written by train.py on images, writing results people and programs can read.

    python predict.py --weights output/checkpoint.pth --input images/ --output predictions/

--input is one image or a folder (its image files, not its sub-folders). For each image
<stem>.<ext>, in --output:
    <stem>_overlay.png  the image with each kept instance's mask (distinct colours), box,
                        category name and score
    <stem>_labels.png   instance label image, uint16: 0 is background and k the image's k-th
                        detection by descending score (its k-th record in results.json); where
                        masks overlap the higher score wins, so a fully hidden detection leaves
                        no pixel. --label-format tif writes <stem>_labels.tif instead. Mask models
                        only.
and once for all images:
    results.json        COCO results: image_id, file_name, category_id, category_name, bbox
                        (x, y, width, height), score and segmentation (compressed RLE)

Image ids are 1, 2, ... in sorted file-name order; file_name is the path under --input. A
detection is kept when its score is at least --score-thresh and its label is one of the
checkpoint's categories (not a gap between category ids); its mask is the model's mask
probability above 0.5, as in evaluation. The model (architecture, number of classes, category
names, input sizes, anchor sizes, ...) is rebuilt from the checkpoint, and images are read as in
training (coco_utils.load_image): 8-bit files as they are, 16/32-bit grey ones scaled per image
between their 0.1 and 99.9 percentiles.
"""

import argparse
import colorsys
import json
import os
import sys

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

import engine
import train
import utils
from coco_eval import masks_to_rles
from coco_utils import load_image

IMAGE_EXTENSIONS = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
MASK_THRESHOLD = 0.5


class InputError(Exception):
    """Bad input; the message names the file and the problem."""


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", required=True, help="checkpoint written by train.py")
    parser.add_argument("--input", required=True, help="an image, or a folder of images")
    parser.add_argument("--output", required=True, help="folder for overlays, labels, results")
    parser.add_argument(
        "--score-thresh", default=0.5, type=float, help="keep detections scoring at least this"
    )
    parser.add_argument(
        "--label-format", default="png", choices=["png", "tif"], help="label image file format"
    )
    parser.add_argument("--device", help="cuda when available, else cpu")
    return parser


def list_images(path):
    """The image files to run on, sorted, as (path, file_name under --input)."""
    if os.path.isfile(path):
        return [check_header(path, os.path.basename(path))]
    if not os.path.isdir(path):
        raise InputError(f"{path}: no such file or folder")
    names = sorted(
        name
        for name in os.listdir(path)
        if name.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(path, name))
    )
    if not names:
        raise InputError(f"{path}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    stems = [os.path.splitext(name)[0] for name in names]
    for name, stem in zip(names, stems, strict=True):
        if stems.count(stem) > 1:
            raise InputError(f"{os.path.join(path, name)}: another image has the stem {stem!r}")
    return [check_header(os.path.join(path, name), name) for name in names]


def check_header(path, name):
    """Fails on a file that is no image before the model is built; damage inside an image shows
    when it is read."""
    try:
        with Image.open(path):
            pass
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"{path}: cannot read image ({e})") from None
    return path, name


def load_checkpoint(path):
    try:
        return utils.read_checkpoint(path)
    except utils.CheckpointError as e:
        raise InputError(str(e)) from e


def build_model(checkpoint, path):
    """train.get_model with the checkpoint's arguments, holding the checkpoint's weights."""
    args = train.get_args_parser().parse_args([])
    vars(args).update(checkpoint["args"])
    # Everything comes from the checkpoint: no pretrained weights to download or merge.
    args.weights = args.weights_backbone = args.trainable_backbone_layers = None
    state = checkpoint["model"]
    num_classes = checkpoint.get("num_classes") or args.num_classes
    if num_classes is None and "roi_heads.box_predictor.cls_score.weight" in state:
        num_classes = len(state["roi_heads.box_predictor.cls_score.weight"])
    try:
        model = train.get_model(args, num_classes)
    except (SystemExit, ValueError) as e:
        raise InputError(f"{path}: cannot build model {args.model!r} ({e})") from None
    if not any(k.endswith("num_batches_tracked") for k in state):
        train.freeze_batch_norm(model)  # trained from pretrained weights, with frozen BatchNorm
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise InputError(f"{path}: weights do not fit {args.model} ({' '.join(first)})") from None
    return model


def distinct_colours(n):
    """n bright colours, hues spread by the golden ratio so neighbours in the list differ."""
    return [
        tuple(round(255 * c) for c in colorsys.hsv_to_rgb((0.13 + 0.618034 * i) % 1, 0.85, 1))
        for i in range(n)
    ]


def instance_labels(masks):
    """[H, W] int32 labels from [N, H, W] masks ordered by descending score: mask k is label
    k + 1, and where masks overlap the earlier (higher-scoring) one wins."""
    labels = torch.zeros(masks.shape[-2:], dtype=torch.int32)
    for k in range(len(masks) - 1, -1, -1):
        labels[masks[k]] = k + 1
    return labels


def overlay(image, boxes, masks, captions):
    """The uint8 image with masks, boxes and captions drawn in one colour per instance."""
    pixels = F.to_dtype(image, torch.uint8, scale=True)
    if len(boxes) == 0:
        return pixels
    colours = distinct_colours(len(boxes))
    if masks is not None:
        pixels = draw_segmentation_masks(pixels, masks, alpha=0.45, colors=colours)
    width = max(1, round(min(pixels.shape[-2:]) / 300))
    return draw_bounding_boxes(
        pixels,
        boxes,
        labels=captions,
        colors=colours,
        width=width,
        label_colors="black",
        label_background_colors=colours,
        fill_labels=True,
    )


def save_array(array, path):
    Image.fromarray(array).save(path)


@torch.inference_mode()
def predict_image(model, image, device, score_thresh, labels=None):
    """The kept detections of one image, on the CPU and ordered by descending score.

    With `labels`, detections of other labels (gaps between category ids) are left out.
    """
    output = model(engine.images_to_device([image], device))[0]
    keep = output["scores"] >= score_thresh
    if labels is not None:
        keep &= torch.isin(output["labels"], torch.tensor(labels, device=keep.device))
    order = torch.argsort(output["scores"], descending=True)
    order = order[keep[order]]
    return {k: v[order].cpu() for k, v in output.items()}


def to_records(detections, image_id, file_name, label_offset, names):
    """One image's detections as COCO results, with its file name and category names added."""
    boxes = detections["boxes"].clone()
    boxes[:, 2:] -= boxes[:, :2]
    category_ids = [label - label_offset for label in detections["labels"].tolist()]
    records = [
        {
            "image_id": image_id,
            "file_name": file_name,
            "category_id": category_id,
            "category_name": names.get(category_id, str(category_id)),
            "bbox": [round(v, 2) for v in box],
            "score": round(score, 5),
        }
        for category_id, box, score in zip(
            category_ids, boxes.tolist(), detections["scores"].tolist(), strict=True
        )
    ]
    if "masks" in detections:
        rles = masks_to_rles(detections["masks"], MASK_THRESHOLD)
        for record, rle in zip(records, rles, strict=True):
            record["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    return records


def run(args):
    inputs = list_images(args.input)
    checkpoint = load_checkpoint(args.weights)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = build_model(checkpoint, args.weights).to(device).eval()
    names = checkpoint.get("category_names") or {}
    offset = checkpoint.get("label_offset", 0)
    known_labels = [category_id + offset for category_id in names] if names else None
    os.makedirs(args.output, exist_ok=True)
    results = []
    for image_id, (path, file_name) in enumerate(inputs, start=1):
        try:
            image = load_image(path)
        except (OSError, SyntaxError, ValueError) as e:
            raise InputError(f"{path}: cannot read image ({e})") from None
        detections = predict_image(model, image, device, args.score_thresh, known_labels)
        records = to_records(detections, image_id, file_name, offset, names)
        results.extend(records)
        stem = os.path.join(args.output, os.path.splitext(os.path.basename(path))[0])
        masks = detections["masks"][:, 0] > MASK_THRESHOLD if "masks" in detections else None
        captions = [f"{r['category_name']} {r['score']:.2f}" for r in records]
        drawn = overlay(image, detections["boxes"], masks, captions)
        save_array(drawn.permute(1, 2, 0).numpy(), f"{stem}_overlay.png")
        if masks is not None:
            label_image = instance_labels(masks).numpy().astype(np.uint16)
            save_array(label_image, f"{stem}_labels.{args.label_format}")
        print(f"{file_name}: image_id {image_id}, {len(records)} detections")
    with open(os.path.join(args.output, "results.json"), "w") as f:
        json.dump(results, f)
    print(f"wrote {len(inputs)} image(s) and results.json to {args.output}")


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    try:
        run(args)
    except InputError as e:
        print(f"predict.py: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
