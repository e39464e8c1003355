"""Generated COCO-format data for the benchmarks, with COCO's instance statistics.

About 7 polygon objects per image on average, a few crowded images with 50-90, object sizes
from a few pixels to half the image, 6-40 points per polygon and about 1% crowd regions stored
as uncompressed RLE, as in instances_train2017.json. For the evaluation benchmarks: ellipse
ground truth and detections as COCO results (make_ground_truth, detection_results,
evaluation_files). Files are written once per set of parameters and reused.
"""

import json
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from mask_geometry import uncompressed_rle

COCO_TRAIN2017_IMAGES = 118_287
COCO_TRAIN2017_ANNOTATIONS = 860_001
CROWDED_FRACTION = 0.03
CROWD_FRACTION = 0.01
IMAGE_SIZES = ((640, 480), (480, 640), (640, 427), (500, 375), (640, 512))
CATEGORIES = [{"id": i, "name": f"class{i}", "supercategory": "thing"} for i in range(1, 91)]
CACHE = Path(tempfile.gettempdir()) / "maskrcnn_benchmarks"


def instance_counts(rng, num_images, total=None, mean=7.3):
    """Objects per image: geometric around `mean`, 3% of images crowded (50-90); `total` fixes
    the sum, by moving objects between the ordinary images."""
    crowded = rng.random(num_images) < CROWDED_FRACTION
    counts = np.where(
        crowded,
        rng.integers(50, 91, num_images),
        rng.geometric(1 / max(mean - 70 * CROWDED_FRACTION, 1.5), num_images),
    )
    if total is not None:
        ordinary = np.flatnonzero(~crowded)
        while counts.sum() != total:
            excess = int(counts.sum() - total)
            step = np.sign(excess)
            chosen = rng.choice(ordinary, size=min(abs(excess), ordinary.size), replace=False)
            counts[chosen] -= step
            counts = np.maximum(counts, 1)
    return counts


def random_polygon(rng, width, height, scale):
    """A star-shaped polygon inside the image, as COCO's flat [x1, y1, x2, y2, ...]."""
    radius = min(float(rng.lognormal(np.log(25 * scale), 0.9)), 0.45 * min(width, height))
    radius = max(radius, 2 * scale)
    cx = rng.uniform(radius, width - radius)
    cy = rng.uniform(radius, height - radius)
    num_points = int(rng.integers(6, 41))
    angles = np.sort(rng.uniform(0, 2 * np.pi, num_points))
    radii = radius * rng.uniform(0.5, 1.0, num_points)
    xs = np.clip(cx + radii * np.cos(angles), 0, width)
    ys = np.clip(cy + radii * np.sin(angles), 0, height)
    return np.stack([xs, ys], axis=1).ravel()


def image_annotations(rng, image_id, width, height, count, first_id, decimals, exact):
    """`count` annotations of one image; boxes and areas exact from the rasterised shapes when
    `exact` (the reference takes boxes from the file, this repo from the masks), else from the
    polygon's extent (fast, for the large file)."""
    annotations = []
    scale = width / 640
    for k in range(count):
        polygon = random_polygon(rng, width, height, scale).round(decimals)
        crowd = rng.random() < CROWD_FRACTION
        if exact or crowd:
            rle = mask_utils.merge(mask_utils.frPyObjects([polygon.tolist()], height, width))
            bbox, area = mask_utils.toBbox(rle).tolist(), float(mask_utils.area(rle))
        else:
            x0, y0 = polygon[0::2].min(), polygon[1::2].min()
            w, h = polygon[0::2].max() - x0, polygon[1::2].max() - y0
            bbox, area = [round(float(v), decimals) for v in (x0, y0, w, h)], float(w * h / 2)
        if crowd:
            segmentation = uncompressed_rle(mask_utils.decode(rle))
        else:
            segmentation = [polygon.tolist()]
        annotations.append(
            {
                "segmentation": segmentation,
                "area": area,
                "iscrowd": int(crowd),
                "image_id": image_id,
                "bbox": bbox,
                "category_id": int(rng.integers(1, 91)),
                "id": first_id + k,
            }
        )
    return annotations


def paint(width, height, annotations, rng):
    """A photo-like RGB image: a shaded background, noise, and each object filled in a colour."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    gradient = rng.uniform(40, 200, 3) + rng.uniform(-60, 60, 3) * (xx / width)[..., None]
    pixels = gradient + 25 * np.sin(yy / rng.uniform(5, 40))[..., None]
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for annotation in annotations:
        if isinstance(annotation["segmentation"], list):
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            draw.polygon(annotation["segmentation"][0].copy(), fill=colour)
    noisy = np.asarray(image, dtype=np.int16) + rng.integers(-12, 13, (height, width, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def write_json(dataset, path):
    temporary = path.with_suffix(".tmp")
    with open(temporary, "w") as f:
        json.dump(dataset, f)
    os.replace(temporary, path)


def coco_like_images(num_images=200, seed=0):
    """JPEG images of COCO's sizes with painted objects, and their annotation file; returns
    (image folder, annotation file)."""
    root = CACHE / f"images_{num_images}_{seed}"
    ann_file = root / "annotations.json"
    if ann_file.exists():
        return root / "images", ann_file
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id, count in enumerate(instance_counts(rng, num_images), start=1):
        width, height = IMAGE_SIZES[rng.integers(len(IMAGE_SIZES))]
        objects = image_annotations(
            rng, image_id, width, height, int(count), len(annotations) + 1, 2, exact=True
        )
        file_name = f"{image_id:012d}.jpg"
        paint(width, height, objects, rng).save(root / "images" / file_name, quality=90)
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        annotations += objects
    write_json({"images": images, "annotations": annotations, "categories": CATEGORIES}, ann_file)
    return root / "images", ann_file


def coco_sized_annotations(
    num_images=COCO_TRAIN2017_IMAGES, num_annotations=COCO_TRAIN2017_ANNOTATIONS, seed=0
):
    """An annotation file of instances_train2017.json's size (118k images, 860k objects) whose
    images are 64x48 px and share a few files: the annotations are the point, not the pixels.
    Coordinates keep three decimals at this scale, so the file is about as large as COCO's."""
    width, height, num_files = 64, 48, 4
    root = CACHE / f"coco_sized_{num_images}_{num_annotations}_{seed}"
    ann_file = root / "annotations.json"
    if ann_file.exists():
        return root / "images", ann_file
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    for i in range(num_files):
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{i}.png")
    counts = instance_counts(rng, num_images, total=num_annotations)
    images, annotations = [], []
    for image_id, count in enumerate(counts, start=1):
        images.append(
            {
                "license": 1,
                "file_name": f"{image_id % num_files}.png",
                "coco_url": f"http://images.cocodataset.org/train2017/{image_id:012d}.jpg",
                "height": height,
                "width": width,
                "date_captured": "2013-11-14 11:18:45",
                "flickr_url": f"http://farm4.staticflickr.com/{image_id:012d}.jpg",
                "id": image_id,
            }
        )
        annotations += image_annotations(
            rng, image_id, width, height, int(count), len(annotations) + 1, 3, exact=False
        )
    dataset = {
        "info": {"description": "synthetic, COCO train2017-sized"},
        "licenses": [{"id": 1, "name": "synthetic"}],
        "images": images,
        "annotations": annotations,
        "categories": CATEGORIES,
    }
    write_json(dataset, ann_file)
    return root / "images", ann_file


def ellipse_polygon(cx, cy, rx, ry, points=16):
    """An axis-aligned ellipse as COCO's flat [x1, y1, x2, y2, ...], 2 decimals."""
    angles = np.linspace(0, 2 * np.pi, points, endpoint=False)
    xy = np.stack([cx + rx * np.cos(angles), cy + ry * np.sin(angles)], axis=1)
    return xy.round(2).ravel().tolist()


def make_ground_truth(num_images, num_categories, rng):
    """Ground truth for the evaluation benchmarks: images of 320-480 px with 3-15 ellipses each
    in `num_categories` categories, 5% of them crowd regions (compressed RLE), the others
    polygons. Returns the COCO dataset dict, and per image the (cx, cy, rx, ry, category) of its
    objects."""
    images, annotations, objects = [], [], {}
    for image_id in range(1, num_images + 1):
        height, width = (int(v) for v in rng.integers(320, 481, size=2))
        images.append({"id": image_id, "height": height, "width": width})
        objects[image_id] = []
        for _ in range(int(rng.integers(3, 16))):
            rx, ry = rng.uniform(4, width / 5), rng.uniform(4, height / 5)
            cx, cy = rng.uniform(rx, width - rx), rng.uniform(ry, height - ry)
            polygon = ellipse_polygon(cx, cy, rx, ry)
            rle = mask_utils.frPyObjects([polygon], height, width)[0]
            crowd = rng.random() < 0.05
            segmentation = {"size": [height, width], "counts": rle["counts"].decode()}
            category_id = int(rng.integers(1, num_categories + 1))
            objects[image_id].append((cx, cy, rx, ry, category_id))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category_id,
                    "segmentation": segmentation if crowd else [polygon],
                    "area": float(mask_utils.area(rle)),
                    "bbox": mask_utils.toBbox(rle).tolist(),
                    "iscrowd": int(crowd),
                }
            )
    categories = [{"id": c, "name": f"class{c}"} for c in range(1, num_categories + 1)]
    return {"images": images, "annotations": annotations, "categories": categories}, objects


def random_detection(objects, height, width, num_categories, rng):
    """(cx, cy, rx, ry, label) of one detection: as often as not a ground-truth ellipse of
    `objects` jittered by 5%, else clutter of any category anywhere in the image."""
    if objects and rng.random() < 0.5:
        *ellipse, label = objects[int(rng.integers(len(objects)))]
        cx, cy, rx, ry = np.asarray(ellipse) * rng.normal(1, 0.05, size=4)
    else:
        rx, ry = rng.uniform(4, width / 5), rng.uniform(4, height / 5)
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        label = int(rng.integers(1, num_categories + 1))
    return cx, cy, rx, ry, label


def detection_results(image, objects, num_dets, num_categories, rng):
    """One image's detections as {"bbox": COCO results, "segm": COCO results}, the same
    detections in both: half jittered ground-truth ellipses (`objects` from make_ground_truth),
    half clutter, with descending scores; masks are the ellipses, boxes their extent."""
    height, width = image["height"], image["width"]
    polygons, labels = [], []
    for _ in range(num_dets):
        cx, cy, rx, ry, label = random_detection(objects, height, width, num_categories, rng)
        polygons.append(ellipse_polygon(cx, cy, rx, ry))
        labels.append(label)
    rles = mask_utils.frPyObjects(polygons, height, width)
    boxes = mask_utils.toBbox(rles).tolist()
    scores = np.sort(rng.random(num_dets))[::-1].tolist()
    common = [
        {"image_id": image["id"], "category_id": c, "score": s}
        for c, s in zip(labels, scores, strict=True)
    ]
    segmentations = [{"size": [height, width], "counts": r["counts"].decode()} for r in rles]
    return {
        "bbox": [{**r, "bbox": box} for r, box in zip(common, boxes, strict=True)],
        "segm": [{**r, "segmentation": s} for r, s in zip(common, segmentations, strict=True)],
    }


def evaluation_files(num_images=1000, num_dets=100, num_categories=80, seed=0):
    """A ground-truth file (make_ground_truth) and its bbox and segm results files
    (detection_results); returns the three paths."""
    folder = CACHE / f"evaluation_{num_images}_{num_dets}_{num_categories}_{seed}"
    paths = [folder / f"{stem}.json" for stem in ("gt", "bbox", "segm")]
    if all(path.exists() for path in paths):
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    dataset, objects = make_ground_truth(num_images, num_categories, rng)
    results = {"bbox": [], "segm": []}
    for image in dataset["images"]:
        image_results = detection_results(
            image, objects[image["id"]], num_dets, num_categories, rng
        )
        for iou_type, records in image_results.items():
            results[iou_type] += records
    for path, content in zip(paths, (dataset, results["bbox"], results["segm"]), strict=True):
        write_json(content, path)
    return paths
