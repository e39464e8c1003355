"""Convert nuclei segmentation data to COCO instance annotations with a train/val split.

Two input layouts:

* BBBC038 / Data Science Bowl 2018 (``stage1_train``): ``<root>/<id>/images/<id>.png`` and
  ``<root>/<id>/masks/*.png``, one binary PNG per nucleus (nonzero = foreground)::

    python datasets/convert_nuclei.py --dsb stage1_train --output data/dsb2018

* Instance label images beside raw images: in a label image 0 is background and each positive
  value is one instance (ids need not be contiguous; a value in several pieces stays one
  instance). Image ``<stem>.<ext>`` pairs with label ``<stem><label-suffix>.<png|tif|tiff>``;
  every image needs a label and every label an image::

    python datasets/convert_nuclei.py --images raw --labels labels --output data/mine

The output holds ``annotations/instances_{train,val}.json`` (compressed RLE, one category) and
the images copied (or symlinked) into ``train/`` and ``val/``.
"""

import argparse
import json
import shlex
import shutil
import sys
from pathlib import Path

import numpy as np
import scipy.ndimage as ndi
from PIL import Image
from pycocotools import mask as mask_utils

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from commands import one_line_errors  # noqa: E402
from errors import DataError  # noqa: E402
from mask_geometry import crop_to_rle  # noqa: E402
from progress import progress  # noqa: E402

try:
    import tifffile
except ImportError:
    tifffile = None

IMAGE_EXTENSIONS = {".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp"}
LABEL_EXTENSIONS = {".png", ".tif", ".tiff"}
TIFF_EXTENSIONS = {".tif", ".tiff"}
# PIL raises SyntaxError for some corrupt PNG chunks.
PIL_ERRORS = (OSError, SyntaxError, ValueError)


class ConversionError(DataError):
    """Bad input; the message names the file and the problem."""


def read_pil(path):
    with Image.open(path) as image:
        return np.asarray(image)


def read_image_size(path):
    """Height and width of a raw image, decoding it fully so truncated files fail here."""
    try:
        array = read_pil(path)
    except PIL_ERRORS as exc:
        # train.py reads images with PIL, so an image that only tifffile can read is unusable.
        raise ConversionError(f"{path}: PIL cannot read this image ({exc})") from exc
    return array.shape[:2]


def read_label_array(path):
    """Pixel array of a mask or label image: PIL first, then tifffile for TIFFs if installed."""
    try:
        return read_pil(path)
    except PIL_ERRORS as exc:
        if path.suffix.lower() not in TIFF_EXTENSIONS:
            raise ConversionError(f"{path}: cannot read image ({exc})") from exc
        if tifffile is None:
            raise ConversionError(
                f"{path}: PIL cannot read this TIFF ({exc}); `pip install tifffile` may"
            ) from exc
    try:
        return tifffile.imread(path)
    except Exception as exc:
        raise ConversionError(f"{path}: cannot read TIFF ({exc})") from exc


def read_label_image(path):
    """A 2-D integer label image; float labels are accepted when every value is whole."""
    labels = read_label_array(path)
    if labels.ndim != 2:
        raise ConversionError(
            f"{path}: label image must have one channel, got shape {labels.shape}"
        )
    if labels.dtype.kind == "f":
        if not np.array_equal(labels, np.round(labels)):
            raise ConversionError(f"{path}: label image holds non-integer values")
        return labels.astype(np.int64)
    if labels.dtype.kind not in "biu":
        raise ConversionError(f"{path}: label image has unsupported type {labels.dtype}")
    return labels


def instance_rles(labels):
    """Compressed RLE of each positive value of a label image, in increasing value order.

    Ranking the values costs one sort of the image; each instance is then encoded from its box
    alone, not from a pass over the image.
    """
    values, ranks = np.unique(labels, return_inverse=True)
    ranks = np.maximum(ranks.reshape(labels.shape) - np.searchsorted(values, 0, "right") + 1, 0)
    return [
        crop_to_rle(ranks[box] == rank, box[0].start, box[1].start, *labels.shape)
        for rank, box in enumerate(ndi.find_objects(ranks), start=1)
    ]


def rle_annotation(rle):
    return {
        "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")},
        "area": float(mask_utils.area(rle)),
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
    }


def make_record(image_path, rles):
    height, width = read_image_size(image_path)
    for rle in rles:
        if tuple(rle["size"]) != (height, width):
            raise ConversionError(
                f"{image_path}: image is {height}x{width} but its masks are "
                f"{rle['size'][0]}x{rle['size'][1]}"
            )
    return {
        "path": image_path,
        "file_name": image_path.name,
        "height": int(height),
        "width": int(width),
        "annotations": [rle_annotation(rle) for rle in rles],
    }


def require_dir(path):
    if not path.is_dir():
        raise ConversionError(f"{path}: folder not found")


def dsb_mask_rle(path):
    mask = read_label_array(path)
    if mask.ndim != 2:
        raise ConversionError(f"{path}: mask must have one channel, got shape {mask.shape}")
    rles = instance_rles(mask != 0)
    if not rles:
        raise ConversionError(f"{path}: mask is empty")
    return rles[0]


def convert_dsb(root):
    """Records (image path, size, annotations) of a BBBC038 / DSB2018 stage1_train folder."""
    root = Path(root)
    require_dir(root)
    records = []
    samples = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    for sample in progress(samples, desc="convert", unit="image"):
        image_path = sample / "images" / f"{sample.name}.png"
        if not image_path.is_file():
            raise ConversionError(f"{image_path}: image not found")
        mask_paths = sorted((sample / "masks").glob("*.png"))
        if not mask_paths:
            raise ConversionError(f"{sample / 'masks'}: no mask PNGs for image {image_path.name}")
        records.append(make_record(image_path, [dsb_mask_rle(p) for p in mask_paths]))
    if not records:
        raise ConversionError(f"{root}: no sample folders (<id>/images/<id>.png)")
    return records


def files_by_stem(directory, extensions, suffix=""):
    """Files of ``directory`` keyed by stem with ``suffix`` removed; hidden files are skipped."""
    files = {}
    for path in sorted(directory.iterdir()):
        if path.name.startswith(".") or path.suffix.lower() not in extensions:
            continue
        if not path.stem.endswith(suffix):
            raise ConversionError(f"{path}: label name does not end with '{suffix}'")
        key = path.stem[: len(path.stem) - len(suffix)]
        if key in files:
            raise ConversionError(f"{path}: same stem as {files[key].name}, cannot pair it")
        files[key] = path
    return files


def pair_images_and_labels(images_dir, labels_dir, label_suffix=""):
    images = files_by_stem(images_dir, IMAGE_EXTENSIONS)
    labels = files_by_stem(labels_dir, LABEL_EXTENSIONS, label_suffix)
    if not images:
        raise ConversionError(f"{images_dir}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    for stem, path in images.items():
        if stem not in labels:
            raise ConversionError(f"{path}: no label image {stem}{label_suffix}.* in {labels_dir}")
    for stem, path in labels.items():
        if stem not in images:
            raise ConversionError(f"{path}: no image {stem}.* in {images_dir}")
    return [(images[stem], labels[stem]) for stem in sorted(images)]


def convert_label_images(images_dir, labels_dir, label_suffix=""):
    """Records of raw images paired with instance label images (see the module docstring)."""
    images_dir, labels_dir = Path(images_dir), Path(labels_dir)
    require_dir(images_dir)
    require_dir(labels_dir)
    pairs = pair_images_and_labels(images_dir, labels_dir, label_suffix)
    return [
        make_record(image_path, instance_rles(read_label_image(label_path)))
        for image_path, label_path in progress(pairs, desc="convert", unit="image")
    ]


def split_records(records, val_fraction=0.2, seed=0):
    """Reproducible (train, val) split by image; both non-empty when possible, unless
    `val_fraction` is 1: then every image is in val."""
    records = sorted(records, key=lambda r: r["file_name"])
    num_val = round(len(records) * val_fraction)
    if 0 < val_fraction < 1 and len(records) > 1:
        num_val = min(max(num_val, 1), len(records) - 1)
    is_val = np.zeros(len(records), dtype=bool)
    is_val[np.random.default_rng(seed).permutation(len(records))[:num_val]] = True
    train = [r for r, v in zip(records, is_val, strict=True) if not v]
    val = [r for r, v in zip(records, is_val, strict=True) if v]
    return train, val


def place_image(source, destination, symlink):
    destination.unlink(missing_ok=True)
    if symlink:
        destination.symlink_to(source.resolve())
    else:
        shutil.copyfile(source, destination)


def write_coco(records, output, split, category_name="nucleus", symlink=False):
    """Write ``<output>/<split>/`` images and ``annotations/instances_<split>.json``."""
    output = Path(output)
    image_dir = output / split
    image_dir.mkdir(parents=True, exist_ok=True)
    (output / "annotations").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id, record in enumerate(records, start=1):
        place_image(record["path"], image_dir / record["file_name"], symlink)
        images.append(
            {
                "id": image_id,
                "file_name": record["file_name"],
                "height": record["height"],
                "width": record["width"],
            }
        )
        for ann in record["annotations"]:
            annotations.append(
                {"id": len(annotations) + 1, "image_id": image_id, "category_id": 1}
                | ann
                | {"iscrowd": 0}
            )
    coco = {
        "info": {"description": "Nuclei converted by datasets/convert_nuclei.py"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": category_name, "supercategory": "cell"}],
    }
    ann_path = output / "annotations" / f"instances_{split}.json"
    with open(ann_path, "w") as f:
        json.dump(coco, f)
    return ann_path


def get_args_parser():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Pass either --dsb or both --images and --labels.",
    )
    source = parser.add_argument_group("input (one layout)")
    source.add_argument(
        "--dsb", type=Path, metavar="DIR", help="BBBC038 / DSB2018 stage1_train folder"
    )
    source.add_argument("--images", type=Path, metavar="DIR", help="folder of raw images")
    source.add_argument(
        "--labels", type=Path, metavar="DIR", help="folder of instance label images (PNG/TIFF)"
    )
    source.add_argument(
        "--label-suffix",
        metavar="SUFFIX",
        default="",
        help="label stem = image stem + this, e.g. '_masks' (default: none)",
    )
    output = parser.add_argument_group("output")
    output.add_argument("--output", type=Path, metavar="DIR", required=True, help="folder to write")
    output.add_argument(
        "--val-fraction",
        type=float,
        default=0.2,
        help="fraction of images for validation, in [0, 1]; 1 writes the whole folder as one "
        "evaluation split, val (default: %(default)s)",
    )
    output.add_argument("--seed", type=int, default=0, help="split seed (default: %(default)s)")
    output.add_argument(
        "--category-name", default="nucleus", help="name of the one category (default: %(default)s)"
    )
    output.add_argument(
        "--symlink", action="store_true", help="symlink images instead of copying them"
    )
    return parser


def check_args(args):
    label_layout = args.images is not None or args.labels is not None
    if (args.dsb is None) == (not label_layout):
        raise ConversionError("pass either --dsb or both --images and --labels")
    if label_layout and (args.images is None or args.labels is None):
        raise ConversionError("--images and --labels go together")
    if not 0 <= args.val_fraction <= 1:
        raise ConversionError(f"--val-fraction must be in [0, 1], got {args.val_fraction}")


def summary(split, records):
    return (
        f"{split}: {len(records)} images, {sum(len(r['annotations']) for r in records)} instances"
    )


def convert(args):
    check_args(args)
    if args.dsb is not None:
        records = convert_dsb(args.dsb)
    else:
        records = convert_label_images(args.images, args.labels, args.label_suffix)
    train, val = split_records(records, args.val_fraction, args.seed)
    evaluation_only = args.val_fraction == 1
    flags = []
    for split, subset in (("val", val),) if evaluation_only else (("train", train), ("val", val)):
        ann_path = write_coco(subset, args.output, split, args.category_name, args.symlink)
        flags += [f"--{split}-ann", str(ann_path), f"--{split}-images", str(args.output / split)]
    print(f"{summary('train', train)}; {summary('val', val)} -> {args.output}")
    if evaluation_only:
        print(f"evaluate with: python train.py --test-only --resume CHECKPOINT {shlex.join(flags)}")
    else:
        print(f"train with: python train.py {shlex.join(flags)}")


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    with one_line_errors("convert_nuclei.py"):
        convert(args)


if __name__ == "__main__":
    main()
