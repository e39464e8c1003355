"""COCO-format datasets: reading and checking annotation files, decoding images (any bit depth)
and segmentations (polygons, RLE), and `CocoDetection`, which gives images with their targets as
tensors and tv_tensors."""

import contextlib
import functools
import gc
import io
import json
import os
import pickle

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from errors import DataError
from mask_geometry import mask_boxes_xyxy

try:
    from torchcodec.decoders import decode_image
# TorchCodec before 0.16 has no image decoders, and one built for another torch fails to load its
# library: torchvision's decoder then (deprecated since torchvision 0.29).
except (ImportError, OSError, RuntimeError):
    from torchvision.io import decode_image

COCO_2017_SPLITS = {
    "train": ("train2017", os.path.join("annotations", "instances_train2017.json")),
    "val": ("val2017", os.path.join("annotations", "instances_val2017.json")),
}

# 16-bit microscopy images hold their signal in a small part of the range: scale each image
# between these percentiles to [0, 1], the same way in training, evaluation and prediction.
HIGH_BIT_DEPTH_PERCENTILES = (0.1, 99.9)
HIGH_BIT_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I", "F")
# PIL modes, by format, that torchvision.io decodes to the very pixels of PIL's convert("RGB")
# (tests/test_coco_utils.py compares them), and faster; others, CMYK included, use PIL.
FAST_DECODE_MODES = {"PNG": {"1", "L", "LA", "P", "RGB", "RGBA"}, "JPEG": {"L", "RGB"}}


def read_annotation_file(ann_file):
    """The parsed JSON of a COCO annotation file, or a DataError saying what is wrong with it."""
    if not os.path.isfile(ann_file):
        raise DataError(f"{ann_file}: no such file")
    if os.path.getsize(ann_file) == 0:
        raise DataError(f"{ann_file}: empty file")
    try:
        with open(ann_file, "rb") as f, gc_paused():
            dataset = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{ann_file}: not valid JSON ({e})") from e
    if not isinstance(dataset, dict):
        raise DataError(f"{ann_file}: not a COCO annotation file (top level is not an object)")
    for key in ("images", "annotations"):
        if not isinstance(dataset.get(key), list):
            raise DataError(f"{ann_file}: not a COCO annotation file (no '{key}' list)")
    return dataset


@contextlib.contextmanager
def gc_paused():
    """Holds off the cyclic garbage collector while a parse creates millions of objects without
    cycles, which it would traverse again and again (docs/performance.md)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def image_records(dataset, ann_file, image_dir):
    """Checks and completes a parsed annotation file in one pass; returns one (image,
    annotations) pair per image, in the file's order, sharing the file's dicts.

    Finds broken records before training starts: ids and references, segmentation shapes and
    that every image file exists; no image is decoded (unreadable or mis-sized images are found
    when they are loaded). Then fills in what some annotation tools leave out and COCOeval
    needs: images get a missing width and height from the file's header; annotations a missing
    id, iscrowd (0), and bbox and area computed from the segmentation. Existing values stay as
    they are: the training target takes its boxes from the masks anyway (see
    annotations_to_target). Annotations with neither a shape nor a box of positive size (a
    click exported as a one-point polygon) are left out: no model can find them.
    """
    records = {}
    listings = {}
    for image in dataset["images"]:
        # Messages are only formatted for a problem: this loop runs a million times for COCO.
        problem = image_problem(image, records)
        if problem:
            raise DataError(f"{ann_file}: image {image.get('id')!r}: {problem}")
        path = image_path(image_dir, image["file_name"])
        if not is_file(path, listings):
            raise DataError(f"{path}: image file missing (image {image['id']} of {ann_file})")
        records[image["id"]] = (image, [])
    category_ids = {c.get("id") for c in dataset.get("categories", [])}
    largest_id, without_id, incomplete = 0, [], []
    for annotation in dataset["annotations"]:
        record = records.get(annotation.get("image_id"))
        problem = annotation_problem(annotation, record, category_ids)
        if problem:
            raise DataError(f"{ann_file}: annotation {annotation.get('id')!r}: {problem}")
        largest_id = max(largest_id, annotation.get("id", 0))
        if not has_shape(annotation.get("segmentation")) and not has_box(annotation):
            continue
        record[1].append(annotation)
        if "id" not in annotation:
            without_id.append(annotation)
        annotation.setdefault("iscrowd", 0)
        if "bbox" not in annotation or "area" not in annotation:
            incomplete.append((annotation, record[0]))
    for image, _ in records.values():
        if "width" not in image or "height" not in image:
            with Image.open(image_path(image_dir, image["file_name"])) as opened:
                image["width"], image["height"] = opened.size
    for next_id, annotation in enumerate(without_id, start=largest_id + 1):
        annotation["id"] = next_id
    for annotation, image in incomplete:
        fill_bbox_and_area(annotation, image["height"], image["width"])
    return list(records.values())


def is_file(path, listings):
    """os.path.isfile, answered from one listing of each folder (`listings` caches them): a stat
    per image takes minutes for COCO's 118k images on a network file system."""
    folder, name = os.path.split(path)
    if folder not in listings:
        try:
            with os.scandir(folder or ".") as entries:
                listings[folder] = {entry.name for entry in entries if entry.is_file()}
        except OSError:
            listings[folder] = set()
    return name in listings[folder] or os.path.isfile(path)


def image_problem(image, records):
    """What is wrong with an image record, or None."""
    if "id" not in image or "file_name" not in image:
        return "needs an 'id' and a 'file_name'"
    if image["id"] in records:
        return "id used twice"
    for key in ("height", "width"):
        if key in image and not (isinstance(image[key], int) and image[key] > 0):
            return f"{key} {image[key]!r} is not a positive integer"
    return None


def annotation_problem(annotation, record, category_ids):
    """What is wrong with an annotation whose (image, annotations) record is `record`, or None."""
    if record is None:
        return f"unknown image_id {annotation.get('image_id')!r}"
    if annotation.get("category_id") not in category_ids:
        return f"unknown category_id {annotation.get('category_id')!r}"
    return segmentation_problem(annotation.get("segmentation"), record[0])


def segmentation_problem(segmentation, image):
    if isinstance(segmentation, list):
        for polygon in segmentation:
            if not isinstance(polygon, list) or len(polygon) % 2:
                return "polygon with an odd number of coordinates"
            if len(polygon) < 6:
                return f"polygon with {len(polygon) // 2} points (needs 3)"
    elif isinstance(segmentation, dict):
        if "counts" not in segmentation or "size" not in segmentation:
            return "RLE segmentation needs 'size' and 'counts'"
        expected = [image.get("height"), image.get("width")]
        if "height" in image and list(segmentation["size"]) != expected:
            return (
                f"RLE size {list(segmentation['size'])} differs from its image's "
                f"[height, width] {expected}"
            )
        counts, (height, width) = segmentation["counts"], segmentation["size"]
        if isinstance(counts, list) and sum(counts) != height * width:
            # pycocotools would leave the rest of the mask undefined, or fail.
            return f"RLE counts cover {sum(counts)} pixels, its size {height}x{width}"
    elif segmentation is not None:
        return "segmentation is neither polygons nor RLE"
    return None


def load_image(path):
    """Reads an image as a 3-channel tv_tensors.Image: uint8 for 8-bit files, float for deeper ones.

    Any PIL mode works: grey (L), palette (P), RGBA, CMYK and 16/32-bit grey (I;16, I, F).
    """
    with open(path, "rb") as f:
        data = f.read()
    with Image.open(io.BytesIO(data)) as image:
        if image.mode in HIGH_BIT_DEPTH_MODES:
            return tv_tensors.Image(scale_high_bit_depth(np.asarray(image)).expand(3, -1, -1))
        if image.mode in FAST_DECODE_MODES.get(image.format, ()):
            decoded = decode_8_bit(data, image.format)
            if decoded is not None:
                return tv_tensors.Image(decoded)
        return tv_tensors.Image(F.pil_to_tensor(image.convert("RGB")))


def decode_8_bit(data, image_format):
    """TorchCodec's (or torchvision's) RGB decoding of a PNG or JPEG file's bytes; None for a
    16-bit PNG (PIL keeps the high bytes, the decoders round or keep 16 bits) or a file they
    cannot read (PIL then says what is wrong with it)."""
    if image_format == "PNG" and data[24] == 16:  # IHDR's bit depth; IHDR opens every PNG
        return None
    try:
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode="RGB")
    except (RuntimeError, ValueError):
        return None


def scale_high_bit_depth(array):
    """Maps a grey image's 0.1-99.9 percentile range to [0, 1] (clipped), as a [1,H,W] tensor."""
    array = array.astype(np.float32)
    low, high = np.percentile(array, HIGH_BIT_DEPTH_PERCENTILES)
    scaled = np.clip((array - low) / max(high - low, 1e-6), 0.0, 1.0).astype(np.float32)
    return torch.from_numpy(scaled)[None]


def segmentation_to_rle(segmentation, height, width):
    """A polygon list, compressed RLE or uncompressed RLE as one compressed RLE; None if empty.

    Polygons with fewer than three points are left out: annotation tools export them, and
    pycocotools would read a 4-number one as a box.
    """
    if isinstance(segmentation, list):
        polygons = [p for p in segmentation if len(p) >= 6]
        if not polygons:
            return None
        return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    if not segmentation:
        return None
    if isinstance(segmentation["counts"], list):
        segmentation = full_length_counts(segmentation, height, width)
        return mask_utils.frPyObjects(segmentation, height, width)
    return segmentation


def full_length_counts(segmentation, height, width):
    """An uncompressed RLE whose runs cover fewer pixels than its size, ended by background:
    pycocotools would leave the pixels after its last run as whatever memory held."""
    counts = list(segmentation["counts"])
    missing = height * width - sum(counts)
    if missing <= 0:
        return segmentation
    if len(counts) % 2:  # the last run is background: lengthen it
        counts[-1] += missing
    else:
        counts.append(missing)
    return {**segmentation, "counts": counts}


def segmentation_to_mask(segmentation, height, width):
    """Decodes a polygon list, compressed RLE or uncompressed RLE into an [H,W] uint8 array."""
    rle = segmentation_to_rle(segmentation, height, width)
    if rle is None:
        return np.zeros((height, width), dtype=np.uint8)
    return mask_utils.decode(rle)


def label_offset_of(category_ids):
    """What model labels add to category ids: 0, unless an id is below 1.

    The model reserves label 0 for background, so a category with id 0 (an export's
    `_background_` or a 0-based tool) shifts every category up by one. Otherwise labels are the
    category ids, gaps included (COCO's 80 categories keep ids up to 90: 91 classes).
    """
    return max(0, 1 - min(category_ids, default=1))


def num_classes_of(category_ids, label_offset):
    """The classes a model needs for these categories: the largest model label, plus one for
    the background (label 0)."""
    return max(category_ids, default=0) + label_offset + 1


def has_shape(segmentation):
    if isinstance(segmentation, list):
        return any(len(polygon) >= 6 for polygon in segmentation)
    return bool(segmentation) and bool(segmentation.get("counts"))


def has_box(annotation):
    return "bbox" in annotation and annotation["bbox"][2] > 0 and annotation["bbox"][3] > 0


def fill_bbox_and_area(annotation, height, width):
    rle = segmentation_to_rle(annotation.get("segmentation"), height, width)
    if "bbox" not in annotation:
        annotation["bbox"] = [0.0] * 4 if rle is None else mask_utils.toBbox(rle).tolist()
    if "area" not in annotation:
        w, h = annotation["bbox"][2:]
        annotation["area"] = float(w * h if rle is None else mask_utils.area(rle))


def mask_boxes(masks, annotations):
    """XYXY float32 boxes around each [H,W] mask (to the pixel after the last); an empty mask keeps
    its annotation's bbox, so box-only annotations still train a detector."""
    boxes = mask_boxes_xyxy(masks)
    for box, annotation in zip(boxes, annotations, strict=True):
        if not box[2] and "bbox" in annotation:
            x, y, w, h = annotation["bbox"]
            box[:] = x, y, x + w, y + h
    return boxes


def rles_to_masks(rles, from_file, height, width):
    """Decodes RLEs into [N, H, W] uint8 masks; returns them with pycocotools' boxes (XYXY),
    each of which holds every pixel of its mask.

    One pycocotools call decodes the RLEs it made itself, back to back, as [H, W, N] in
    column-major order (N masks stored transposed). An RLE from the file (`from_file`) is
    decoded alone: one shorter than its size says would shift every mask after it. Only the
    pixels inside each box are copied into place: the transposition is the slow part, and a
    COCO object covers a small part of its image.
    """
    masks = np.zeros((len(rles), height, width), dtype=np.uint8)
    if not rles:
        return masks, np.zeros((0, 4), dtype=np.float32)
    boxes = mask_utils.toBbox(rles).astype(np.float32)
    boxes[:, 2:] += boxes[:, :2]
    batched = [i for i in range(len(rles)) if not from_file[i]]
    decoded = mask_utils.decode([rles[i] for i in batched]) if batched else None
    column = {i: k for k, i in enumerate(batched)}
    for i, (x0, y0, x1, y1) in enumerate(boxes.astype(np.int64).tolist()):
        mask = decoded[:, :, column[i]] if i in column else mask_utils.decode(rles[i])
        masks[i, y0:y1, x0:x1] = mask[y0:y1, x0:x1]
    return masks, boxes


def annotations_to_target(annotations, image_id, height, width, label_offset=0):
    """Builds the training target of one image from its non-crowd annotations.

    Crowd regions are left out: the model should neither learn them as objects nor as
    background, and the evaluator reads them from the annotation file itself. Boxes come from
    the masks, because exported boxes may be missing or disagree with the segmentation.
    """
    kept = [a for a in annotations if not a.get("iscrowd", 0)]
    no_shape = {"size": [height, width], "counts": [height * width]}
    rles = [segmentation_to_rle(a.get("segmentation"), height, width) for a in kept]
    rles = [mask_utils.frPyObjects(no_shape, height, width) if r is None else r for r in rles]
    from_file = [isinstance(a.get("segmentation"), dict) for a in kept]
    masks, boxes = rles_to_masks(rles, from_file, height, width)
    for i, annotation in enumerate(kept):
        # pycocotools' box is exact for an RLE without empty runs, which is how it makes them
        # from polygons; one from the file may hold some (other tools write them), and then
        # takes a pixel more. An empty mask takes its annotation's bbox.
        if from_file[i] or not boxes[i, 2:].any():
            boxes[i] = mask_boxes(masks[i : i + 1], [annotation])[0]
    labels = [a["category_id"] + label_offset for a in kept]
    return {
        "boxes": tv_tensors.BoundingBoxes(
            torch.from_numpy(boxes), format="XYXY", canvas_size=(height, width)
        ),
        "masks": tv_tensors.Mask(torch.from_numpy(masks)),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "image_id": image_id,
    }


def has_usable_annotation(annotations):
    """True when the image holds at least one non-crowd object with a box of positive size."""
    return any(
        not a.get("iscrowd", 0) and a["bbox"][2] > 1 and a["bbox"][3] > 1 for a in annotations
    )


class PackedRecords:
    """A read-only sequence of Python objects, each pickled into one shared byte buffer.

    DataLoader workers are forked with the dataset. A list of dicts would be copied into each of
    them page by page, as reading an item changes the reference counts stored beside it (several
    GB for COCO train2017); these two numpy arrays are only read, so the pages stay shared.
    """

    def __init__(self, items):
        # One growing buffer rather than a bytes object per item: freed, those would leave
        # holes in the heap, and each worker would copy the pages it then allocates into.
        stream, ends = io.BytesIO(), [0]
        for item in items:
            pickle.dump(item, stream, protocol=pickle.HIGHEST_PROTOCOL)
            ends.append(stream.tell())
        self.offsets = np.array(ends, dtype=np.int64)
        self.buffer = np.frombuffer(stream.getvalue(), dtype=np.uint8)

    def __len__(self):
        return len(self.offsets) - 1

    def __getitem__(self, index):
        return pickle.loads(self.buffer[self.offsets[index] : self.offsets[index + 1]])

    def __iter__(self):
        return (self[i] for i in range(len(self)))


class CocoDetection(torch.utils.data.Dataset):
    """Images of a COCO annotation file with their targets, for detection and instance masks.

    Model labels are category ids plus `label_offset` (by default the file's own, see
    label_offset_of()); pass the training set's to a validation set whose categories differ.
    Each image and its annotations are kept as one pickled record (see PackedRecords); `coco`,
    pycocotools' index of the completed file that evaluation needs, is built on first use.
    """

    def __init__(
        self,
        image_dir,
        ann_file,
        transforms=None,
        drop_images_without_objects=False,
        label_offset=None,
        skip_bad_images=False,
        sample_seed=None,
    ):
        self.image_dir = image_dir
        self.ann_file = ann_file
        self.skip_bad_images = skip_bad_images
        self.skipped = 0
        self.sample_seed = sample_seed
        self.epoch = 0
        dataset = read_annotation_file(ann_file)
        with gc_paused():
            records = image_records(dataset, ann_file, image_dir)
            ids = [image["id"] for image, _ in records]
            rows = sorted(range(len(records)), key=ids.__getitem__)
            if drop_images_without_objects:
                rows = [row for row in rows if has_usable_annotation(records[row][1])]
            self.rows = np.array(rows, dtype=np.int64)
            self.sizes = np.array(
                [(records[row][0]["height"], records[row][0]["width"]) for row in rows],
                dtype=np.int64,
            ).reshape(-1, 2)
            self.records = PackedRecords(records)
            # What stays a Python object, ids and what the file holds besides images and
            # annotations (categories, info, ...), is copied once the parsed file is gone, so
            # that no page of the freed heap is pinned by it (and copied by the workers).
            kept = (
                [ids[row] for row in rows],
                {k: v for k, v in dataset.items() if k not in ("images", "annotations")},
            )
            kept = pickle.dumps(kept)
            del dataset, records, ids, rows
            self.ids, self.header = pickle.loads(kept)
        if label_offset is None:
            label_offset = label_offset_of(self.category_names())
        self.label_offset = label_offset
        self.transforms = transforms

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        if not self.skip_bad_images:
            return self.load(index)
        for offset in range(len(self)):
            try:
                return self.load((index + offset) % len(self))
            except DataError as e:
                self.skipped += 1
                print(f"warning: skipped {e} ({self.skipped} skipped in this process)", flush=True)
        raise DataError(f"{self.image_dir}: no readable image left")

    def load(self, index):
        """Image and target of one index, augmented with a seed of its own when one is set.

        The per-sample seed (`sample_seed`, `epoch`, index) makes augmentations independent of
        the number of workers and of where a resumed epoch starts.
        """
        info, annotations = self.records[self.rows[index]]
        path = image_path(self.image_dir, info["file_name"])
        try:
            image = load_image(path)
        except (OSError, ValueError) as e:  # PIL: missing, truncated or not an image
            raise DataError(f"{path}: cannot read image ({e})") from e
        height, width = image.shape[-2:]
        if (height, width) != (info["height"], info["width"]):
            raise DataError(
                f"{path}: image is {width}x{height} px but {self.ann_file} says "
                f"{info['width']}x{info['height']}"
            )
        target = annotations_to_target(annotations, info["id"], height, width, self.label_offset)
        if self.transforms is None:
            return image, target
        if self.sample_seed is None:
            return self.transforms(image, target)
        with torch.random.fork_rng(devices=[]):
            # The CPU generator only: torch.manual_seed also queues a seed for every lazily
            # initialised accelerator, with a stack trace, which takes longer than a flip.
            torch.default_generator.manual_seed(sample_seed(self.sample_seed, self.epoch, index))
            return self.transforms(image, target)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def aspect_ratios(self):
        """Width / height of each image, read from the annotation file (no image is opened)."""
        return [width / height for height, width in self.sizes.tolist()]

    def file_name(self, image_id):
        """The file name of the image with id `image_id`."""
        return self.records[self.rows[self.index_of_id[image_id]]][0]["file_name"]

    @functools.cached_property
    def index_of_id(self):
        return {image_id: index for index, image_id in enumerate(self.ids)}

    def category_names(self):
        """{category id: name} from the annotation file."""
        return {c["id"]: c.get("name", str(c["id"])) for c in self.header.get("categories", [])}

    @functools.cached_property
    def coco(self):
        """pycocotools' index of the completed annotation file (images in the file's order,
        annotations grouped by image), for the evaluator."""
        images, annotations = [], []
        for image, image_annotations in self.records:
            images.append(image)
            annotations += image_annotations
        coco = COCO()
        coco.dataset = {**self.header, "images": images, "annotations": annotations}
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its timings
            coco.createIndex()
        return coco


def sample_seed(run_seed, epoch, index):
    """The seed of one sample's augmentation, drawn from the run seed, epoch and index by
    numpy's SeedSequence, so that nearby triples give unrelated streams."""
    state = np.random.SeedSequence((run_seed, epoch, index)).generate_state(1, dtype=np.uint64)
    return int(state[0]) % 2**63


def image_path(image_dir, file_name):
    """A file_name under image_dir; sub-folders may be written with / or (Windows exports) \\."""
    return os.path.join(image_dir, *file_name.replace("\\", "/").split("/"))


def split_paths(args, split):
    """Image folder and annotation file of a split: the --{split}-* flags, else COCO 2017's."""
    image_folder, ann_file = COCO_2017_SPLITS[split]
    image_dir = getattr(args, f"{split}_images") or os.path.join(args.data_path, image_folder)
    ann_path = getattr(args, f"{split}_ann") or os.path.join(args.data_path, ann_file)
    return image_dir, ann_path


def get_coco(args, split, transforms, label_offset=None, sample_seed=None):
    image_dir, ann_file = split_paths(args, split)
    return CocoDetection(
        image_dir,
        ann_file,
        transforms,
        drop_images_without_objects=(split == "train"),
        label_offset=label_offset,
        skip_bad_images=args.skip_bad_images,
        sample_seed=sample_seed,
    )


def label_to_category_id(label_offset, num_classes):
    """{model label: category id} for the evaluator and predictions; None when they are equal."""
    if label_offset == 0:
        return None
    return {label: label - label_offset for label in range(1, num_classes)}
