"""The baseline the benchmarks measure against: torchvision's references/detection data path
(v1 transforms, PIL backend), re-implemented compactly to behave the same way.

The dataset keeps pycocotools' COCO index (Python dicts and lists of the whole file), decodes
images with PIL, turns each object's polygons into a mask with one pycocotools call per object,
takes boxes from the file's bbox, and applies hand-written paired transforms; training drops
images without a valid annotation by looking each one up in the index.
"""

import contextlib
import io
import os

import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torchvision.transforms import functional as F


class CocoDetection(torch.utils.data.Dataset):
    """torchvision.datasets.CocoDetection plus the reference's wrapper: (PIL image, target)."""

    def __init__(self, image_dir, ann_file, transforms=None):
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco = COCO(ann_file)
        self.ids = sorted(self.coco.imgs)
        self.image_dir = image_dir
        self.transforms = transforms

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        image_id = self.ids[index]
        file_name = self.coco.loadImgs(image_id)[0]["file_name"]
        image = Image.open(os.path.join(self.image_dir, file_name)).convert("RGB")
        annotations = self.coco.loadAnns(self.coco.getAnnIds(imgIds=image_id))
        target = {"image_id": image_id, "annotations": annotations}
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def polygons_to_masks(segmentations, height, width):
    masks = []
    for polygons in segmentations:
        rles = mask_utils.frPyObjects(polygons, height, width)
        mask = torch.as_tensor(mask_utils.decode(rles), dtype=torch.uint8)
        if mask.dim() < 3:
            mask = mask[..., None]
        masks.append(mask.any(dim=2))
    if not masks:
        return torch.zeros((0, height, width), dtype=torch.uint8)
    return torch.stack(masks)


class ConvertCocoPolysToMask:
    def __call__(self, image, target):
        width, height = image.size
        annotations = [a for a in target["annotations"] if a["iscrowd"] == 0]
        boxes = torch.as_tensor([a["bbox"] for a in annotations], dtype=torch.float32)
        boxes = boxes.reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2].clamp_(min=0, max=width)
        boxes[:, 1::2].clamp_(min=0, max=height)
        labels = torch.tensor([a["category_id"] for a in annotations], dtype=torch.int64)
        masks = polygons_to_masks([a["segmentation"] for a in annotations], height, width)
        keep = (boxes[:, 3] > boxes[:, 1]) & (boxes[:, 2] > boxes[:, 0])
        target = {
            "boxes": boxes[keep],
            "labels": labels[keep],
            "masks": masks[keep],
            "image_id": target["image_id"],
            "area": torch.tensor([a["area"] for a in annotations])[keep],
            "iscrowd": torch.tensor([a["iscrowd"] for a in annotations])[keep],
        }
        return image, target


class Compose:
    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, image, target):
        for transform in self.transforms:
            image, target = transform(image, target)
        return image, target


class RandomHorizontalFlip:
    def __init__(self, p=0.5):
        self.p = p

    def __call__(self, image, target):
        if torch.rand(1) < self.p:
            image = F.hflip(image)
            width = image.size[0] if isinstance(image, Image.Image) else image.shape[-1]
            target = dict(target)
            boxes = target["boxes"].clone()
            boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
            target["boxes"] = boxes
            target["masks"] = target["masks"].flip(-1)
        return image, target


class PILToTensor:
    def __call__(self, image, target):
        return F.pil_to_tensor(image), target


class ToFloat:
    def __call__(self, image, target):
        return F.convert_image_dtype(image, torch.float), target


def train_transforms(hflip_prob=0.5):
    """The reference's --data-augmentation hflip preset, PIL backend, v1 transforms."""
    return Compose(
        [ConvertCocoPolysToMask(), RandomHorizontalFlip(hflip_prob), PILToTensor(), ToFloat()]
    )


def has_valid_annotation(annotations):
    return bool(annotations) and not all(
        any(side <= 1 for side in a["bbox"][2:]) for a in annotations
    )


def get_coco_train(image_dir, ann_file, transforms):
    """The reference's training set: every image with a valid annotation, as a Subset."""
    dataset = CocoDetection(image_dir, ann_file, transforms)
    coco = dataset.coco
    keep = [
        i
        for i, image_id in enumerate(dataset.ids)
        if has_valid_annotation(coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=None)))
    ]
    return torch.utils.data.Subset(dataset, keep)


def collate_fn(batch):
    return tuple(zip(*batch, strict=True))
