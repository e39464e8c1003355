"""Write a small synthetic, nuclei-like COCO dataset for smoke tests and demos.

Layout (COCO 2017 style)::

    <output>/train2017/<image>.png
    <output>/val2017/<image>.png
    <output>/annotations/instances_train2017.json
    <output>/annotations/instances_val2017.json

Two styles. The default (`--style demo`) is the README's first dataset. Each image holds 8-25
touching, partly overlapping ellipses of two categories: 1 "nucleus" (large, bright blue-white,
round-ish) and 2 "mitotic" (small, dark red, elongated). An ellipse painted later hides the ones
below it, and every annotation describes only the visible part. Instances that are fully visible
are stored as polygons, occluded ones as RLE (compressed for odd annotation ids, uncompressed for
even ones), so loaders see all three COCO forms.

`--style nuclei` is made hard the way fluorescence images of nuclei are hard, for comparing
Mask R-CNN, the U-Net and their ensemble (ensemble.py): one category "nucleus"; grey images;
irregular outlines (a radius that varies with the angle) over a threefold range of sizes; most
nuclei in touching clusters with no dark rim between them; brightness varying tenfold, so some
nuclei are barely above the background; chromatin texture, an uneven background, optical blur
and shot-like noise. It writes a third split, `fit2017` (`--num-fit` images, with its own
annotation file), held out from model training to fit the ensemble's combiner, so that
`val2017` fits nothing and can be reported on. Annotations are the visible part of each nucleus
(a later one hides an earlier one where they overlap), in the same three COCO forms.

    python datasets/make_demo.py --output ./datasets/demo
    python datasets/make_demo.py --style nuclei --output ./datasets/nuclei \\
        --num-train 100 --num-fit 30 --num-val 30
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import scipy.ndimage as ndi
from PIL import Image
from pycocotools import mask as mask_utils

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mask_geometry import compressed_rle, uncompressed_rle  # noqa: E402

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
NUCLEI_SPLITS = ("train2017", "fit2017", "val2017")
NUCLEUS_CATEGORIES = [{"id": 1, "name": "nucleus", "supercategory": "cell"}]


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


DESCRIPTIONS = {
    "demo": "Synthetic nuclei-like demo dataset (datasets/make_demo.py)",
    "nuclei": "Synthetic hard nuclei dataset (datasets/make_demo.py --style nuclei)",
}
# Nucleus radius as a fraction of the image size: about 5-15 px at 192 px.
NUCLEUS_RADIUS = (0.025, 0.075)
HARMONICS = (2, 3, 4, 5)
DIM_FRACTION = 0.3


def blob_polygon(cx, cy, radius, rng, num_points):
    """Flat [x1, y1, ...] outline of an irregular nucleus: an elongated circle whose radius
    wobbles with the angle (low harmonics), so outlines are lumpy, kidney- or pear-shaped."""
    phi = np.linspace(0.0, 2.0 * np.pi, num_points, endpoint=False)
    wobble = np.ones_like(phi)
    for k in HARMONICS:
        wobble += rng.uniform(0.0, 0.22 / k) * np.cos(k * phi + rng.uniform(0.0, 2.0 * np.pi))
    elongation, theta = rng.uniform(1.0, 1.6), rng.uniform(0.0, np.pi)
    r = radius * wobble
    x, y = r * np.cos(phi) * np.sqrt(elongation), r * np.sin(phi) / np.sqrt(elongation)
    xr = cx + x * np.cos(theta) - y * np.sin(theta)
    yr = cy + x * np.sin(theta) + y * np.cos(theta)
    return np.stack([xr, yr], axis=1).round(2).ravel().tolist()


def nucleus_centres(rng, size):
    """(cx, cy, radius) of each nucleus: most in touching clusters, some alone."""
    lo, hi = NUCLEUS_RADIUS
    nuclei = []
    for _ in range(rng.integers(3, 7)):
        r = rng.uniform(lo, hi) * size
        cluster = [(*rng.uniform(r, size - r, 2), r)]
        for _ in range(rng.integers(1, 7)):
            px, py, pr = cluster[rng.integers(len(cluster))]
            r = rng.uniform(lo, hi) * size
            angle = rng.uniform(0.0, 2.0 * np.pi)
            # Centres a little closer than the radii: neighbours touch or slightly overlap.
            dist = (pr + r) * rng.uniform(0.8, 0.98)
            cluster.append((px + dist * np.cos(angle), py + dist * np.sin(angle), r))
        nuclei += cluster
    for _ in range(rng.integers(3, 10)):
        r = rng.uniform(lo, hi) * size
        nuclei.append((*rng.uniform(r, size - r, 2), r))
    return [
        (float(np.clip(x, 2, size - 2)), float(np.clip(y, 2, size - 2)), r) for x, y, r in nuclei
    ]


def nucleus_brightness(rng):
    """Peak intensity above the background: bright, or (about a third) dim and near it."""
    if rng.random() < DIM_FRACTION:
        return rng.uniform(12.0, 35.0)
    return rng.uniform(50.0, 170.0)


def smooth_noise(rng, size, sigma):
    noise = ndi.gaussian_filter(rng.normal(0.0, 1.0, (size, size)), sigma)
    return noise / (noise.std() + 1e-8)


def nuclei_background(rng, size):
    """Uneven illumination: an offset, a linear ramp and broad blotches."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    gx, gy = rng.uniform(-15.0, 15.0, 2)
    return rng.uniform(15.0, 35.0) + gx * xx + gy * yy + 6.0 * smooth_noise(rng, size, size / 6)


def paint_nucleus(image, base, mask, cx, cy, brightness, texture):
    """Fill one nucleus over the background (hiding any nucleus below it): a gently domed
    intensity with chromatin texture."""
    ys, xs = np.nonzero(mask)
    rho = np.hypot(xs + 0.5 - cx, ys + 0.5 - cy)
    dome = 1.0 - 0.3 * (rho / (rho.max() + 1e-8)) ** 2
    image[ys, xs] = base[ys, xs] + brightness * dome * (1.0 + 0.18 * texture[ys, xs])


def render_nuclei_image(rng, size):
    """A grey RGB uint8 image, its nuclei, and the per-pixel index of the visible nucleus."""
    base = nuclei_background(rng, size)
    image = base.copy()
    texture = smooth_noise(rng, size, 1.2)
    label = np.zeros((size, size), dtype=np.int32)
    objects = []
    num_points = max(24, int(size / 4))
    for cx, cy, radius in nucleus_centres(rng, size):
        polygon = blob_polygon(cx, cy, radius, rng, num_points)
        mask = polygon_mask(polygon, size, size)
        if not mask.any():
            continue
        paint_nucleus(image, base, mask, cx, cy, nucleus_brightness(rng), texture)
        label[mask] = len(objects) + 1
        objects.append({"category_id": 1, "polygon": polygon, "full_mask": mask})
    image = ndi.gaussian_filter(image, rng.uniform(0.8, 1.6))
    # Shot-like noise: stronger where the image is brighter.
    image += rng.normal(0.0, 1.0, image.shape) * (3.0 + 0.5 * np.sqrt(np.clip(image, 0, None)))
    grey = np.clip(image, 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2), objects, label


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


def make_split(root, split, num_images, size, rng, style="demo"):
    image_dir = root / split
    image_dir.mkdir(parents=True, exist_ok=True)
    # Keep the "tiny instance" cut-off at the same fraction of the image for any --size.
    min_area = max(4, round(MIN_VISIBLE_AREA_AT_192 * (size / 192) ** 2))
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        render = render_nuclei_image if style == "nuclei" else render_image
        pixels, objects, label = render(rng, size)
        file_name = f"{image_id:012d}.png"
        Image.fromarray(pixels).save(image_dir / file_name)
        images.append(
            {"id": image_id, "file_name": file_name, "height": size, "width": size, "license": 1}
        )
        annotations += annotations_for(objects, label, image_id, len(annotations) + 1, min_area)
    return {
        "info": {
            "description": DESCRIPTIONS[style],
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
        "categories": NUCLEUS_CATEGORIES if style == "nuclei" else CATEGORIES,
    }


def split_streams(style, num_train, num_val, num_fit, seed):
    """(split, image count, random stream) for each split of the style."""
    if style == "nuclei":
        counts = dict(zip(NUCLEI_SPLITS, (num_train, num_fit, num_val), strict=True))
        # A third seed word keeps the nuclei streams apart from the default style's.
        return [
            (split, counts[split], np.random.default_rng([seed, index, 1]))
            for index, split in enumerate(NUCLEI_SPLITS)
        ]
    return [
        (split, count, np.random.default_rng([seed, index]))
        for index, (split, count) in enumerate(zip(SPLITS, (num_train, num_val), strict=True))
    ]


def make_demo_dataset(root, num_train=100, num_val=10, size=192, seed=0, style="demo", num_fit=30):
    """Write the demo dataset under ``root``; the same arguments give identical files."""
    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    # One stream per split, so --num-train does not change the validation images.
    for split, num_images, rng in split_streams(style, num_train, num_val, num_fit, seed):
        coco = make_split(root, split, num_images, size, rng, style)
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
    parser.add_argument(
        "--style",
        choices=("demo", "nuclei"),
        default="demo",
        help="demo: two categories of bright ellipses; nuclei: one category of hard, grey "
        "nuclei and a fit2017 split (default: %(default)s)",
    )
    parser.add_argument(
        "--num-fit",
        type=int,
        default=30,
        help="fit2017 images, held out from model training (nuclei style; default: %(default)s)",
    )
    return parser


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    make_demo_dataset(
        args.output, args.num_train, args.num_val, args.size, args.seed, args.style, args.num_fit
    )
    fit = f", {args.num_fit} fit" if args.style == "nuclei" else ""
    print(
        f"wrote {args.num_train} train{fit} and {args.num_val} val images of "
        f"{args.size}x{args.size} px with COCO annotations to {args.output}"
    )


if __name__ == "__main__":
    main()
