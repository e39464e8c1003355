"""COCO-format datasets: images and annotations as tensors and tv_tensors."""

import contextlib
import io
import json
import os

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

COCO_2017_SPLITS = {
    "train": ("train2017", os.path.join("annotations", "instances_train2017.json")),
    "val": ("val2017", os.path.join("annotations", "instances_val2017.json")),
}

# 16-bit microscopy images hold their signal in a small part of the range: scale each image
# between these percentiles to [0, 1], the same way in training, evaluation and prediction.
HIGH_BIT_DEPTH_PERCENTILES = (0.1, 99.9)


class DataError(Exception):
    """A problem in the data, described in one line that names the file and the item."""


def read_annotation_file(ann_file):
    """The parsed JSON of a COCO annotation file, or a DataError saying what is wrong with it."""
    if not os.path.isfile(ann_file):
        raise DataError(f"{ann_file}: no such file")
    if os.path.getsize(ann_file) == 0:
        raise DataError(f"{ann_file}: empty file")
    try:
        with open(ann_file, "rb") as f:
            dataset = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{ann_file}: not valid JSON ({e})") from e
    if not isinstance(dataset, dict):
        raise DataError(f"{ann_file}: not a COCO annotation file (top level is not an object)")
    for key in ("images", "annotations"):
        if not isinstance(dataset.get(key), list):
            raise DataError(f"{ann_file}: not a COCO annotation file (no '{key}' list)")
    return dataset


def check_dataset(dataset, ann_file, image_dir):
    """One pass over the annotation file that finds broken records before training starts.

    Checks ids and references, segmentation shapes and that every image file exists; no image
    is decoded (unreadable or mis-sized images are found when they are loaded).
    """
    images = {}
    for image in dataset["images"]:
        where = f"{ann_file}: image {image.get('id')!r}"
        if "id" not in image or "file_name" not in image:
            raise DataError(f"{where}: needs an 'id' and a 'file_name'")
        if image["id"] in images:
            raise DataError(f"{where}: id used twice")
        for key in ("height", "width"):
            if key in image and not (isinstance(image[key], int) and image[key] > 0):
                raise DataError(f"{where}: {key} {image[key]!r} is not a positive integer")
        path = image_path(image_dir, image["file_name"])
        if not os.path.isfile(path):
            raise DataError(f"{path}: image file missing (image {image['id']} of {ann_file})")
        images[image["id"]] = image
    category_ids = {c.get("id") for c in dataset.get("categories", [])}
    for annotation in dataset["annotations"]:
        where = f"{ann_file}: annotation {annotation.get('id')!r}"
        image = images.get(annotation.get("image_id"))
        if image is None:
            raise DataError(f"{where}: unknown image_id {annotation.get('image_id')!r}")
        if annotation.get("category_id") not in category_ids:
            raise DataError(f"{where}: unknown category_id {annotation.get('category_id')!r}")
        check_segmentation(annotation.get("segmentation"), image, where)


def check_segmentation(segmentation, image, where):
    if isinstance(segmentation, list):
        for polygon in segmentation:
            if not isinstance(polygon, list) or len(polygon) % 2:
                raise DataError(f"{where}: polygon with an odd number of coordinates")
            if len(polygon) < 6:
                raise DataError(f"{where}: polygon with {len(polygon) // 2} points (needs 3)")
    elif isinstance(segmentation, dict):
        if "counts" not in segmentation or "size" not in segmentation:
            raise DataError(f"{where}: RLE segmentation needs 'size' and 'counts'")
        expected = [image.get("height"), image.get("width")]
        if "height" in image and list(segmentation["size"]) != expected:
            raise DataError(
                f"{where}: RLE size {list(segmentation['size'])} differs from its image's "
                f"[height, width] {expected}"
            )
    elif segmentation is not None:
        raise DataError(f"{where}: segmentation is neither polygons nor RLE")


def load_image(path):
    """Reads an image as a 3-channel tv_tensors.Image: uint8 for 8-bit files, float for deeper ones.

    Any PIL mode works: grey (L), palette (P), RGBA, CMYK and 16/32-bit grey (I;16, I, F).
    """
    with Image.open(path) as image:
        if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            return tv_tensors.Image(scale_high_bit_depth(np.asarray(image)).expand(3, -1, -1))
        return tv_tensors.Image(F.pil_to_tensor(image.convert("RGB")))


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
        return mask_utils.frPyObjects(segmentation, height, width)
    return segmentation


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


def complete_dataset(dataset, image_dir):
    """Fills in what some annotation tools leave out and COCOeval needs; returns a new dict.

    Images get a missing width and height from the file's header; annotations a missing id,
    iscrowd (0), and bbox and area computed from the segmentation. Existing values stay as they
    are: the training target takes its boxes from the masks anyway (see annotations_to_target).
    Annotations with neither a shape nor a box of positive size (a click exported as a
    one-point polygon) are left out: no model can find them.
    """
    images = [dict(image) for image in dataset.get("images", [])]
    for image in images:
        if "width" not in image or "height" not in image:
            with Image.open(image_path(image_dir, image["file_name"])) as opened:
                image["width"], image["height"] = opened.size
    sizes = {image["id"]: (image["height"], image["width"]) for image in images}
    annotations = []
    next_id = 1 + max((a.get("id", 0) for a in dataset.get("annotations", [])), default=0)
    for annotation in dataset.get("annotations", []):
        if not has_shape(annotation.get("segmentation")) and not has_box(annotation):
            continue
        annotation = dict(annotation)
        if "id" not in annotation:
            annotation["id"], next_id = next_id, next_id + 1
        annotation.setdefault("iscrowd", 0)
        if ("bbox" not in annotation or "area" not in annotation) and (
            annotation["image_id"] in sizes
        ):
            fill_bbox_and_area(annotation, *sizes[annotation["image_id"]])
        annotations.append(annotation)
    return {**dataset, "images": images, "annotations": annotations}


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
    """XYXY boxes around each [H,W] mask (to the pixel after the last); an empty mask keeps its
    annotation's bbox, so box-only annotations still train a detector."""
    boxes = np.zeros((len(masks), 4), dtype=np.float32)
    for i, (mask, annotation) in enumerate(zip(masks, annotations, strict=True)):
        rows, columns = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        if rows.size:
            boxes[i] = columns[0], rows[0], columns[-1] + 1, rows[-1] + 1
        elif "bbox" in annotation:
            x, y, w, h = annotation["bbox"]
            boxes[i] = x, y, x + w, y + h
    return torch.from_numpy(boxes)


def annotations_to_target(annotations, image_id, height, width, label_offset=0):
    """Builds the training target of one image from its non-crowd annotations.

    Crowd regions are left out: the model should neither learn them as objects nor as
    background, and the evaluator reads them from the annotation file itself. Boxes come from
    the masks, because exported boxes may be missing or disagree with the segmentation.
    """
    kept = [a for a in annotations if not a.get("iscrowd", 0)]
    masks = np.zeros((len(kept), height, width), dtype=np.uint8)
    for i, annotation in enumerate(kept):
        masks[i] = segmentation_to_mask(annotation.get("segmentation"), height, width)
    boxes = mask_boxes(masks, kept)
    labels = [a["category_id"] + label_offset for a in kept]
    return {
        "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
        "masks": tv_tensors.Mask(torch.from_numpy(masks)),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "image_id": image_id,
    }


def has_usable_annotation(annotations):
    """True when the image holds at least one non-crowd object with a box of positive size."""
    return any(
        not a.get("iscrowd", 0) and a["bbox"][2] > 1 and a["bbox"][3] > 1 for a in annotations
    )


class CocoDetection(torch.utils.data.Dataset):
    """Images of a COCO annotation file with their targets, for detection and instance masks.

    Model labels are category ids plus `label_offset` (by default the file's own, see
    label_offset_of()); pass the training set's to a validation set whose categories differ.
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
        check_dataset(dataset, ann_file, image_dir)
        dataset = complete_dataset(dataset, image_dir)
        self.coco = COCO()
        self.coco.dataset = dataset
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its timings
            self.coco.createIndex()
        if label_offset is None:
            label_offset = label_offset_of(self.category_names())
        self.label_offset = label_offset
        self.transforms = transforms
        ids = sorted(self.coco.imgs)
        if drop_images_without_objects:
            ids = [i for i in ids if has_usable_annotation(self.coco.imgToAnns[i])]
        self.ids = ids

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
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
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
        target = annotations_to_target(
            self.coco.imgToAnns[image_id], image_id, height, width, self.label_offset
        )
        if self.transforms is None:
            return image, target
        if self.sample_seed is None:
            return self.transforms(image, target)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.sample_seed, self.epoch, index)) % 2**63)
            return self.transforms(image, target)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def aspect_ratios(self):
        """Width / height of each image, read from the annotation file (no image is opened)."""
        return [self.coco.imgs[i]["width"] / self.coco.imgs[i]["height"] for i in self.ids]

    def category_names(self):
        """{category id: name} from the annotation file."""
        return {
            c["id"]: c.get("name", str(c["id"])) for c in self.coco.dataset.get("categories", [])
        }


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
