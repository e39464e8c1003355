"""Write a small synthetic, nuclei-like COCO dataset for smoke tests and demos.

Layout (COCO 2017 style)::

    <output>/train2017/<image>.png
    <output>/val2017/<image>.png
    <output>/annotations/instances_train2017.json
    <output>/annotations/instances_val2017.json

Each image holds 8-25 touching, partly overlapping ellipses of two categories: 1 "nucleus"
(large, bright blue-white, round-ish) and 2 "mitotic" (small, dark red, elongated). An ellipse
painted later hides the ones below it, and every annotation describes only the visible part.
Instances that are fully visible are stored as polygons, occluded ones as RLE (compressed for
odd annotation ids, uncompressed for even ones), so loaders see all three COCO forms.

    python datasets/make_demo.py --output ./datasets/demo
"""

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

CATEGORIES = [
    {"id": 1, "name": "nucleus", "supercategory": "cell"},
    {"id": 2, "name": "mitotic", "supercategory": "cell"},
]
# RGB at the centre of an object; the rim is darker so touching objects stay separable.
COLORS = {1: (185.0, 190.0, 235.0), 2: (150.0, 45.0, 40.0)}
BACKGROUND = (35.0, 30.0, 50.0)
MITOTIC_FRACTION = 0.25
TOUCHING_FRACTION = 0.6
MIN_VISIBLE_AREA_AT_192 = 20
SPLITS = ("train2017", "val2017")


def ellipse_polygon(cx, cy, a, b, theta, num_points):
    """Flat [x1, y1, x2, y2, ...] outline of a rotated ellipse."""
    phi = np.linspace(0.0, 2.0 * np.pi, num_points, endpoint=False)
    x = cx + a * np.cos(phi) * np.cos(theta) - b * np.sin(phi) * np.sin(theta)
    y = cy + a * np.cos(phi) * np.sin(theta) + b * np.sin(phi) * np.cos(theta)
    return np.stack([x, y], axis=1).round(2).ravel().tolist()


def polygon_mask(polygon, height, width):
    rle = mask_utils.merge(mask_utils.frPyObjects([polygon], height, width))
    return mask_utils.decode(rle).astype(bool)


def sample_shape(rng, size):
    """Category id and semi-axes (a >= b) of one object, scaled to the image size."""
    if rng.random() < MITOTIC_FRACTION:
        a = rng.uniform(0.045, 0.065) * size
        return 2, a, a / rng.uniform(1.6, 2.2)
    a = rng.uniform(0.05, 0.09) * size
    return 1, a, a / rng.uniform(1.0, 1.3)


def sample_centre(rng, placed, a, size):
    """A centre that keeps the ellipse inside the image, often touching an earlier object."""
    if placed and rng.random() < TOUCHING_FRACTION:
        px, py, pa = placed[rng.integers(len(placed))]
        angle = rng.uniform(0.0, 2.0 * np.pi)
        dist = (pa + a) * rng.uniform(0.7, 1.0)
        cx, cy = px + dist * np.cos(angle), py + dist * np.sin(angle)
    else:
        cx, cy = rng.uniform(0.0, size, 2)
    return float(np.clip(cx, a + 1, size - a - 1)), float(np.clip(cy, a + 1, size - a - 1))


def sample_objects(rng, size):
    """Objects in painting order: dicts with category, polygon, and ellipse parameters."""
    objects, placed = [], []
    num_points = max(16, int(size / 6))
    for _ in range(rng.integers(8, 26)):
        category, a, b = sample_shape(rng, size)
        cx, cy = sample_centre(rng, placed, a, size)
        theta = rng.uniform(0.0, np.pi)
        placed.append((cx, cy, a))
        objects.append(
            {
                "category_id": category,
                "polygon": ellipse_polygon(cx, cy, a, b, theta, num_points),
                "ellipse": (cx, cy, a, b, theta),
            }
        )
    return objects


def background(rng, size):
    """Dark, slightly uneven illumination: a random linear ramp plus one broad glow."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    gx, gy = rng.uniform(-12.0, 12.0, 2)
    bx, by = rng.uniform(0.0, 1.0, 2)
    glow = 15.0 * np.exp(-((xx - bx) ** 2 + (yy - by) ** 2) / 0.15)
    shading = gx * xx + gy * yy + glow
    return np.asarray(BACKGROUND)[None, None, :] + shading[..., None]


def paint(image, mask, obj, rng):
    """Paint one object over the image with a bright centre, a darker rim, and texture."""
    cx, cy, a, b, theta = obj["ellipse"]
    ys, xs = np.nonzero(mask)
    dx, dy = xs + 0.5 - cx, ys + 0.5 - cy
    u = (dx * np.cos(theta) + dy * np.sin(theta)) / a
    v = (-dx * np.sin(theta) + dy * np.cos(theta)) / b
    shade = 1.0 - 0.35 * np.clip(u**2 + v**2, 0.0, 1.0)
    texture = rng.normal(1.0, 0.05, len(ys))
    image[ys, xs] = np.asarray(COLORS[obj["category_id"]]) * (shade * texture)[:, None]


def render_image(rng, size):
    """An RGB uint8 image, its objects, and the per-pixel index of the visible object."""
    objects = sample_objects(rng, size)
    image = background(rng, size)
    label = np.zeros((size, size), dtype=np.int32)
    for index, obj in enumerate(objects, start=1):
        obj["full_mask"] = polygon_mask(obj["polygon"], size, size)
        paint(image, obj["full_mask"], obj, rng)
        label[obj["full_mask"]] = index
    image += rng.normal(0.0, 6.0, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), objects, label


def uncompressed_rle(mask):
    """COCO uncompressed RLE: run lengths of the column-major mask, starting with zeros."""
    flat = mask.ravel(order="F").astype(np.int8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts.insert(0, 0)
    return {"size": list(mask.shape), "counts": counts}


def compressed_rle(mask):
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def segmentation(obj, visible, ann_id):
    if np.array_equal(visible, obj["full_mask"]):
        return [obj["polygon"]]
    if ann_id % 2:
        return compressed_rle(visible)
    return uncompressed_rle(visible)


def annotations_for(objects, label, image_id, first_ann_id, min_area):
    """Annotations of the visible part of each object, skipping nearly hidden ones."""
    annotations = []
    for index, obj in enumerate(objects, start=1):
        visible = label == index
        if visible.sum() < min_area:
            continue
        ann_id = first_ann_id + len(annotations)
        rle = mask_utils.encode(np.asfortranarray(visible.astype(np.uint8)))
        annotations.append(
            {
                "id": ann_id,
                "image_id": image_id,
                "category_id": obj["category_id"],
                "segmentation": segmentation(obj, visible, ann_id),
                "area": float(mask_utils.area(rle)),
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "iscrowd": 0,
            }
        )
    return annotations


def make_split(root, split, num_images, size, rng):
    image_dir = root / split
    image_dir.mkdir(parents=True, exist_ok=True)
    # Keep the "tiny instance" cut-off at the same fraction of the image for any --size.
    min_area = max(4, round(MIN_VISIBLE_AREA_AT_192 * (size / 192) ** 2))
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        pixels, objects, label = render_image(rng, size)
        file_name = f"{image_id:012d}.png"
        Image.fromarray(pixels).save(image_dir / file_name)
        images.append(
            {"id": image_id, "file_name": file_name, "height": size, "width": size, "license": 1}
        )
        annotations += annotations_for(objects, label, image_id, len(annotations) + 1, min_area)
    return {
        "info": {
            "description": "Synthetic nuclei-like demo dataset (datasets/make_demo.py)",
            "version": "1.0",
            "year": 2025,
        },
        "licenses": [
            {
                "id": 1,
                "name": "CC0 1.0",
                "url": "https://creativecommons.org/publicdomain/zero/1.0/",
            }
        ],
        "images": images,
        "annotations": annotations,
        "categories": CATEGORIES,
    }


def make_demo_dataset(root, num_train=100, num_val=10, size=192, seed=0):
    """Write the demo dataset under ``root``; the same arguments give identical files."""
    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split_index, (split, num_images) in enumerate(
        zip(SPLITS, (num_train, num_val), strict=True)
    ):
        # One stream per split, so --num-train does not change the validation images.
        rng = np.random.default_rng([seed, split_index])
        coco = make_split(root, split, num_images, size, rng)
        with open(root / "annotations" / f"instances_{split}.json", "w") as f:
            json.dump(coco, f)


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--output", default="./datasets/demo", help="dataset root to write (default: %(default)s)"
    )
    parser.add_argument(
        "--num-train", type=int, default=100, help="training images (default: %(default)s)"
    )
    parser.add_argument(
        "--num-val", type=int, default=10, help="validation images (default: %(default)s)"
    )
    parser.add_argument(
        "--size", type=int, default=192, help="image height and width in px (default: %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    return parser


def main(args):
    make_demo_dataset(args.output, args.num_train, args.num_val, args.size, args.seed)
    print(
        f"wrote {args.num_train} train and {args.num_val} val images of {args.size}x{args.size} "
        f"px with COCO annotations to {args.output}"
    )


if __name__ == "__main__":
    main(get_args_parser().parse_args())
