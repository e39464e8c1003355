"""Shared fixtures: small COCO-format datasets written to temporary folders, and models trained
on them once per session."""

import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.ops import masks_to_boxes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from datasets.make_demo import make_demo_dataset  # noqa: E402

# The Mask R-CNN of quick runs: a narrow ResNet-18 FPN. Tests about the ResNet-50 default, and
# U-Net runs, give their own --model.
SMALL_MASKRCNN = ["--model", "maskrcnn_resnet18_fpn", "--fpn-channels", "16"]
# A few quick iterations on the 64 px demo, with few proposals and ROIs.
FAST = [
    "-b", "2", "-j", "0", "--min-size", "64", "--max-size", "64", "--print-freq", "1",
    "--rpn-post-nms-top-n-train", "100", "--rpn-post-nms-top-n-test", "50",
    "--box-batch-size-per-image", "32", "--lr", "0.01", "--clip-grad-norm", "10", "--seed", "0",
]  # fmt: skip


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """The synthetic nuclei dataset at 64 px: 4 training and 3 validation images."""
    root = tmp_path_factory.mktemp("demo")
    make_demo_dataset(root, num_train=4, num_val=3, size=64, seed=0)
    return root


@pytest.fixture(scope="session")
def unet_checkpoint(demo_root, tmp_path_factory):
    """A unet_resnet18 trained for 6 epochs (12 iterations) on the 64 px demo."""
    import train

    output_dir = tmp_path_factory.mktemp("unet")
    argv = ["--data-path", str(demo_root), "--output-dir", str(output_dir), "--model"]
    argv += ["unet_resnet18", "--epochs", "6", "-b", "2", "-j", "0", "--min-size", "64"]
    argv += ["--max-size", "64", "--opt", "adamw", "--lr", "0.003", "--seed", "0"]
    argv += ["--eval-every", "6", "--print-freq", "10"]
    train.main(train.get_args_parser().parse_args(argv))
    return output_dir / "checkpoint.pth"


@pytest.fixture(scope="session")
def maskrcnn_checkpoint(demo_root, tmp_path_factory):
    """SMALL_MASKRCNN trained for 2 FAST epochs on the 64 px demo, with --tensorboard; its output
    folder (model_0.pth, model_best.pth, log.jsonl, ...) is the checkpoint's parent."""
    import train

    output_dir = tmp_path_factory.mktemp("maskrcnn")
    argv = ["--data-path", str(demo_root), "--output-dir", str(output_dir), *SMALL_MASKRCNN, *FAST]
    argv += ["--epochs", "2", "--tensorboard"]
    train.main(train.get_args_parser().parse_args(argv))
    return output_dir / "checkpoint.pth"


def write_coco(path, images, annotations, categories=None):
    categories = categories or [{"id": 1, "name": "thing"}, {"id": 2, "name": "other"}]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return path


def write_image(path, height, width, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode in ("I;16",):
        Image.fromarray(rng.integers(0, 65535, (height, width), dtype=np.uint16)).save(path)
    else:
        pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).convert(mode).save(path)
    return path


def make_sample(height=48, width=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    masks = torch.zeros(3, height, width, dtype=torch.uint8)
    masks[0, 5:20, 4:30] = 1
    masks[1, 25:40, 35:60] = 1
    masks[2, 10:30, 40:50] = 1
    image = torch.randint(0, 255, (3, height, width), dtype=torch.uint8, generator=generator)
    boxes = masks_to_boxes(masks)
    boxes[:, 2:] += 1
    target = {
        "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
        "masks": tv_tensors.Mask(masks),
        "labels": torch.tensor([1, 2, 1]),
        "image_id": 7,
    }
    return tv_tensors.Image(image), target


def assert_boxes_enclose_masks(target, tolerance=1.0):
    for box, mask in zip(target["boxes"], target["masks"], strict=True):
        if not mask.any():
            continue
        tight = masks_to_boxes(mask[None])[0]
        tight[2:] += 1
        assert torch.allclose(box, tight, atol=tolerance), (box, tight)


def write_dsb_split(root, split, shapes, seed=0):
    """A split in the layout of datasets/dsb2018.py: RGBA PNGs under <root>/<split>/ and
    compressed-RLE nuclei (discs of radius 3 to 6 px) in annotations/instances_<split>.json,
    each image record with its `kind`."""
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for index, (height, width) in enumerate(shapes, start=1):
        ys, xs = np.mgrid[:height, :width]
        pixels = rng.integers(0, 40, (height, width), dtype=np.uint8)
        for y in range(8, height - 8, 16):
            for x in range(8, width - 8, 16):
                disc = (ys - y) ** 2 + (xs - x) ** 2 <= rng.integers(3, 7) ** 2
                pixels[disc] = 200
                rle = mask_utils.encode(np.asfortranarray(disc.astype(np.uint8)))
                rle["counts"] = rle["counts"].decode()
                annotations.append(
                    {"id": len(annotations) + 1, "image_id": index, "category_id": 1,
                     "segmentation": rle, "area": int(disc.sum()), "iscrowd": 0,
                     "bbox": [float(v) for v in mask_utils.toBbox(rle)]}
                )  # fmt: skip
        name = f"{split}{index}.png"
        rgba = np.dstack([pixels, pixels, pixels, np.full_like(pixels, 255)])
        (root / split).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgba, "RGBA").save(root / split / name)
        images.append(
            {"id": index, "file_name": name, "height": height, "width": width,
             "kind": "fluorescence", "large": 0}
        )  # fmt: skip
    categories = [{"id": 1, "name": "nucleus"}]
    ann = root / "annotations" / f"instances_{split}.json"
    return write_coco(ann, images, annotations, categories)


@pytest.fixture(scope="session")
def dsb_root(tmp_path_factory):
    """A tiny split in the DSB 2018 converter's format: train (three images, one smaller than
    a 64 px crop), fit and val (two each)."""
    root = tmp_path_factory.mktemp("dsb2018")
    write_dsb_split(root, "train", [(96, 80), (48, 40), (80, 112)], seed=0)
    write_dsb_split(root, "fit", [(64, 64), (80, 96)], seed=1)
    write_dsb_split(root, "val", [(96, 96), (64, 80)], seed=2)
    return root
