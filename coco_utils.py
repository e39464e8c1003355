"""COCO-format datasets: images and annotations as tensors and tv_tensors."""

import contextlib
import io
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


def segmentation_to_mask(segmentation, height, width):
    """Decodes a polygon list, compressed RLE or uncompressed RLE into an [H,W] uint8 array."""
    if not segmentation:
        return np.zeros((height, width), dtype=np.uint8)
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation["counts"], list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return mask_utils.decode(rle)


def annotations_to_target(annotations, image_id, height, width):
    """Builds the training target of one image from its non-crowd annotations.

    Crowd regions are left out: the model should neither learn them as objects nor as
    background, and the evaluator reads them from the annotation file itself.
    """
    kept = [a for a in annotations if not a.get("iscrowd", 0)]
    boxes = torch.tensor([a["bbox"] for a in kept], dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    masks = np.zeros((len(kept), height, width), dtype=np.uint8)
    for i, annotation in enumerate(kept):
        masks[i] = segmentation_to_mask(annotation["segmentation"], height, width)
    return {
        "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
        "masks": tv_tensors.Mask(torch.from_numpy(masks)),
        "labels": torch.tensor([a["category_id"] for a in kept], dtype=torch.int64),
        "image_id": image_id,
    }


def has_usable_annotation(annotations):
    """True when the image holds at least one non-crowd object with a box of positive size."""
    return any(
        not a.get("iscrowd", 0) and a["bbox"][2] > 1 and a["bbox"][3] > 1 for a in annotations
    )


class CocoDetection(torch.utils.data.Dataset):
    """Images of a COCO annotation file with their targets, for detection and instance masks."""

    def __init__(self, image_dir, ann_file, transforms=None, drop_images_without_objects=False):
        self.image_dir = image_dir
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its timings
            self.coco = COCO(ann_file)
        self.transforms = transforms
        ids = sorted(self.coco.imgs)
        if drop_images_without_objects:
            ids = [i for i in ids if has_usable_annotation(self.coco.imgToAnns[i])]
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        image = load_image(os.path.join(self.image_dir, info["file_name"]))
        height, width = image.shape[-2:]
        target = annotations_to_target(self.coco.imgToAnns[image_id], image_id, height, width)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def aspect_ratios(self):
        """Width / height of each image, read from the annotation file (no image is opened)."""
        return [self.coco.imgs[i]["width"] / self.coco.imgs[i]["height"] for i in self.ids]

    def category_names(self):
        return {c["id"]: c["name"] for c in self.coco.dataset.get("categories", [])}


def split_paths(args, split):
    """Image folder and annotation file of a split: the --{split}-* flags, else COCO 2017's."""
    image_folder, ann_file = COCO_2017_SPLITS[split]
    image_dir = getattr(args, f"{split}_images") or os.path.join(args.data_path, image_folder)
    ann_path = getattr(args, f"{split}_ann") or os.path.join(args.data_path, ann_file)
    return image_dir, ann_path


def get_coco(args, split, transforms):
    image_dir, ann_file = split_paths(args, split)
    return CocoDetection(
        image_dir, ann_file, transforms, drop_images_without_objects=(split == "train")
    )
