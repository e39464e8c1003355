"""Tiled inference against inference on separate images: mosaics of validation images (--grid x
--grid images stitched into one, their annotations shifted) segmented window by window should
score the AP of the same images segmented one by one within 0.02, and find as many instances
within 2%. Then the time and peak memory of tiled inference on one --large-size square image.

    python datasets/make_demo.py --output datasets/demo
    python benchmarks/tiling_bench.py --weights output/demo/checkpoint.pth --data-path datasets/demo
    python benchmarks/tiling_bench.py --fake-model --json tiling_bench.json

Cells are the validation images in order, repeated when there are fewer than --mosaics x grid^2;
each is a separate image of its own in the baseline, so both sides hold the same objects. Images
of different sizes sit at the top-left of equal cells. AP is COCOeval's segm and bbox AP
(0.50:0.95, all areas) over all detections, with up to 10,000 per image so that a mosaic's
hundreds of objects all count. Instances are counted at --score-thresh (predict.py's default):
below it a model's detections are its per-image cap (100 for torchvision's R-CNNs), not objects.

A mosaic is not only a larger image: an object at a cell's edge has a neighbour's pixels beside
it instead of the image's end, and a model answers that context differently. So the mosaics are
also segmented whole, untiled (an R-CNN at the scale it sees a cell, its proposal and detection
caps raised in proportion to the cells), and the tiled figures are compared with both: with the
separate images (what the user gets) and with the whole mosaics (the error of tiling itself).

The large image is the cells repeated, segmented as predict.py --tile does it (an R-CNN drops
detections under --score-thresh before the merge); its figure is the growth of the peak resident
memory while it is segmented, over what the process held with the image loaded.

The windows should reach the model at the scale it was trained at: torchvision's R-CNNs resize
every input to their --min-size/--max-size, so --tile defaults to the model's input size.
--fake-model finds bright blobs by thresholding and connected components (needs scipy): it runs
the whole benchmark without a trained checkpoint.
"""

import argparse
import contextlib
import io
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import loading  # noqa: E402
import mask_geometry  # noqa: E402
import models  # noqa: E402
import tiling  # noqa: E402
import tta  # noqa: E402

MAX_DETS = (1, 10, 10_000)
AP_TOLERANCE = 0.02
COUNT_TOLERANCE = 0.02


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--weights", help="checkpoint written by train.py")
    model.add_argument("--fake-model", action="store_true", help="bright blobs, no checkpoint")
    parser.add_argument("--data-path", default="datasets/demo", help="COCO-layout dataset root")
    parser.add_argument("--grid", type=int, default=4, help="images per mosaic side")
    parser.add_argument("--mosaics", type=int, default=2, help="mosaics to evaluate")
    parser.add_argument("--tile", type=int, help="window size (default: the model's input size)")
    parser.add_argument("--tile-overlap", type=int, default=64, help="pixels neighbours share")
    parser.add_argument("--tile-batch-size", type=int, default=4, help="windows per model call")
    parser.add_argument("--tta", action="store_true", help="wrap the model in tta.TTA (flips)")
    parser.add_argument(
        "--score-thresh", type=float, default=0.5, help="lowest score of a counted instance"
    )
    parser.add_argument(
        "--large-size", type=int, default=8000, help="side of the timed image (0: skip it)"
    )
    parser.add_argument("--device", default="cpu", help="device the model runs on")
    parser.add_argument("--json", help="write the figures to this JSON file")
    return parser


class BlobModel:
    """A stand-in model: 8-connected blobs of pixels whose channel mean is above 0.45, mask
    probability 1 inside, score the blob's mean brightness, label 1."""

    def __call__(self, images):
        return [self.find(image) for image in images]

    def find(self, image):
        from scipy import ndimage

        brightness = image.mean(dim=0)
        ids, count = ndimage.label((brightness > 0.45).numpy(), structure=np.ones((3, 3)))
        ids = torch.from_numpy(ids)
        masks = ids[None] == torch.arange(1, count + 1)[:, None, None]
        area = masks.sum(dim=(1, 2)).clamp(min=1)
        rows, columns = masks.any(dim=2), masks.any(dim=1)
        boxes = torch.stack(
            [
                columns.float().argmax(dim=1),
                rows.float().argmax(dim=1),
                ids.shape[1] - columns.flip(1).float().argmax(dim=1),
                ids.shape[0] - rows.flip(1).float().argmax(dim=1),
            ],
            dim=1,
        )
        return {
            "boxes": boxes.float(),
            "labels": torch.ones(count, dtype=torch.int64),
            "scores": ((masks * brightness).sum(dim=(1, 2)) / area).float(),
            "masks": masks[:, None].float(),
        }


def load_model(args):
    """(model, default window size)."""
    if args.fake_model:
        return BlobModel(), 256
    model = loading.load(args.weights, args.device).model
    transform = getattr(model, "transform", None)
    return model, transform.min_size[0] if transform is not None else 512


def read_cells(data_path, count):
    """`count` validation images (uint8 arrays, repeated when too few) and the COCO index."""
    root = Path(data_path)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(root / "annotations" / "instances_val2017.json"))
    ids = sorted(coco.getImgIds())
    cells = []
    for k in range(count):
        info = coco.imgs[ids[k % len(ids)]]
        pixels = np.array(Image.open(root / "val2017" / info["file_name"]).convert("RGB"))
        cells.append((info["id"], pixels))
    return coco, cells


def annotation_crop(coco, annotation):
    """(mask crop, top, left) of an annotation's segmentation, cut to its pixels."""
    mask = coco.annToMask(annotation).astype(bool)
    rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    top, left = rows[0], columns[0]
    return mask[top : rows[-1] + 1, left : columns[-1] + 1], int(top), int(left)


def ground_truth(coco, cells, grid, cell_size):
    """Two COCO datasets of the same objects: one image per cell, and one per mosaic of grid x
    grid cells, annotations shifted to where their cell lies."""
    cell_height, cell_width = cell_size
    per_mosaic = grid * grid
    separate = {"images": [], "annotations": [], "categories": list(coco.cats.values())}
    mosaics = {"images": [], "annotations": [], "categories": list(coco.cats.values())}
    for k, (source_id, pixels) in enumerate(cells):
        height, width = pixels.shape[:2]
        mosaic_id, position = divmod(k, per_mosaic)
        top, left = cell_height * (position // grid), cell_width * (position % grid)
        separate["images"].append({"id": k + 1, "height": height, "width": width})
        if position == 0:
            size = {"height": grid * cell_height, "width": grid * cell_width}
            mosaics["images"].append({"id": mosaic_id + 1, **size})
        for annotation in coco.imgToAnns[source_id]:
            found = annotation_crop(coco, annotation)
            if found is None:
                continue
            crop, y, x = found
            for dataset, image_id, (dy, dx), (h, w) in (
                (separate, k + 1, (0, 0), (height, width)),
                (mosaics, mosaic_id + 1, (top, left), (grid * cell_height, grid * cell_width)),
            ):
                rle = mask_geometry.crop_to_rle(crop, y + dy, x + dx, h, w)
                x0, y0, bw, bh = annotation["bbox"]
                dataset["annotations"].append(
                    {
                        "id": len(dataset["annotations"]) + 1,
                        "image_id": image_id,
                        "category_id": annotation["category_id"],
                        "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                        "area": annotation["area"],
                        "bbox": [x0 + dx, y0 + dy, bw, bh],
                        "iscrowd": annotation.get("iscrowd", 0),
                    }
                )
    return separate, mosaics


def stitch(cells, grid, cell_size):
    """The mosaics: uint8 [3, H, W] tensors of grid x grid cells each."""
    cell_height, cell_width = cell_size
    per_mosaic = grid * grid
    mosaics = []
    for first in range(0, len(cells), per_mosaic):
        canvas = np.zeros((grid * cell_height, grid * cell_width, 3), dtype=np.uint8)
        for position, (_, pixels) in enumerate(cells[first : first + per_mosaic]):
            top, left = cell_height * (position // grid), cell_width * (position % grid)
            canvas[top : top + pixels.shape[0], left : left + pixels.shape[1]] = pixels
        mosaics.append(torch.from_numpy(canvas).permute(2, 0, 1))
    return mosaics


def results_of(image_id, boxes, labels, scores, rles):
    """{"bbox": [...], "segm": [...]}: COCO results of one image's detections (XYXY boxes,
    compressed RLE masks)."""
    results = {"bbox": [], "segm": []}
    for box, label, score, rle in zip(
        boxes.tolist(), labels.tolist(), scores.tolist(), rles, strict=True
    ):
        x0, y0, x1, y1 = box
        fields = {"image_id": image_id, "category_id": label, "score": score}
        results["bbox"].append({**fields, "bbox": [x0, y0, x1 - x0, y1 - y0]})
        segmentation = {"size": list(rle["size"]), "counts": rle["counts"].decode()}
        results["segm"].append({**fields, "segmentation": segmentation})
    return results


def extend(results, more):
    for iou_type, items in more.items():
        results[iou_type] += items
    return results


def predict_separate(model, cells, device):
    """COCO results of the model on each cell as an image of its own (each source image once)."""
    outputs, results = {}, {"bbox": [], "segm": []}
    with torch.inference_mode():
        for k, (source_id, pixels) in enumerate(cells):
            if source_id not in outputs:
                image = torch.from_numpy(pixels).permute(2, 0, 1).to(device).float() / 255
                output = model([image])[0]
                binary = (output["masks"][:, 0] > 0.5).cpu().numpy().astype(np.uint8)
                rles = mask_util.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
                outputs[source_id] = (output["boxes"], output["labels"], output["scores"], rles)
            extend(results, results_of(k + 1, *outputs[source_id]))
    return results


def predict_mosaics(model, mosaics, args):
    """COCO results of the model on each mosaic, window by window."""
    results = {"bbox": [], "segm": []}
    for k, mosaic in enumerate(mosaics):
        output = tiling.predict_tiled(
            model, mosaic, args.tile, args.tile_overlap, args.tile_batch_size
        )
        detections = (output["boxes"], output["labels"], output["scores"], output["masks"])
        extend(results, results_of(k + 1, *detections))
    return results


def predict_whole(model, mosaics, cell_size, cells_per_mosaic, device):
    """COCO results of the model on each mosaic as one image, untiled."""
    results = {"bbox": [], "segm": []}
    with whole_image_settings(model, cell_size, mosaics[0].shape[-2:], cells_per_mosaic):
        with torch.inference_mode():
            for k, mosaic in enumerate(mosaics):
                output = model([mosaic.to(device).float() / 255])[0]
                binary = (output["masks"][:, 0] > 0.5).cpu().numpy().astype(np.uint8)
                rles = mask_util.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
                detections = (output["boxes"], output["labels"], output["scores"], rles)
                extend(results, results_of(k + 1, *detections))
    return results


@contextlib.contextmanager
def whole_image_settings(model, cell_size, mosaic_size, cells):
    """An R-CNN (also inside tta.TTA) set to resize a mosaic by the factor it resizes a cell by,
    its proposal and detection caps multiplied by the cells; other models as they are."""
    rcnn = getattr(model, "model", model)
    if not hasattr(rcnn, "rpn"):
        yield
        return
    transform, rpn, heads = rcnn.transform, rcnn.rpn, rcnn.roi_heads
    saved = (transform.min_size, transform.max_size, dict(rpn._pre_nms_top_n))
    saved += (dict(rpn._post_nms_top_n), heads.detections_per_img)
    scale = min(transform.min_size[-1] / min(cell_size), transform.max_size / max(cell_size))
    transform.min_size = (round(scale * min(mosaic_size)),)
    transform.max_size = round(scale * max(mosaic_size))
    rpn._pre_nms_top_n["testing"] *= cells
    rpn._post_nms_top_n["testing"] *= cells
    heads.detections_per_img *= cells
    try:
        yield
    finally:
        transform.min_size, transform.max_size, rpn._pre_nms_top_n = saved[:3]
        rpn._post_nms_top_n, heads.detections_per_img = saved[3:]


@contextlib.contextmanager
def score_threshold(model, score_thresh):
    """The model dropping detections under `score_thresh` itself, as predict.py sets it."""
    heads = getattr(model, "roi_heads", None)
    saved = getattr(heads, "score_thresh", None)
    models.raise_score_threshold(model, score_thresh)
    try:
        yield
    finally:
        if saved is not None:
            heads.score_thresh = saved


def evaluate(dataset, results, score_thresh):
    """{"segm_AP", "bbox_AP", "instances"} of COCO results against a ground-truth dataset;
    instances are the detections scoring at least `score_thresh`."""
    counted = [r for r in results["segm"] if r["score"] >= score_thresh]
    figures = {"instances": len(counted), "ground_truth": len(dataset["annotations"])}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools narrates
        coco_gt = COCO()
        coco_gt.dataset = dataset
        coco_gt.createIndex()
        for iou_type, chosen in results.items():
            coco_dt = coco_gt.loadRes(chosen) if chosen else COCO()
            coco_eval = COCOeval(coco_gt, coco_dt, iou_type)
            coco_eval.params.maxDets = list(MAX_DETS)
            coco_eval.evaluate()
            coco_eval.accumulate()
            precision = coco_eval.eval["precision"][:, :, :, 0, -1]  # all areas, last maxDets
            valid = precision[precision > -1]
            figures[f"{iou_type}_AP"] = float(valid.mean()) if valid.size else -1.0
    return figures


def large_image(cells, size):
    """A size x size uint8 [3, H, W] tensor of the cells repeated."""
    height, width = (max(p.shape[i] for _, p in cells) for i in (0, 1))
    padded = [
        np.pad(p, ((0, height - p.shape[0]), (0, width - p.shape[1]), (0, 0))) for _, p in cells
    ]
    row = np.concatenate(padded, axis=1)
    reps = (-(-size // row.shape[0]), -(-size // row.shape[1]), 1)
    pixels = np.ascontiguousarray(np.tile(row, reps)[:size, :size])
    return torch.from_numpy(pixels).permute(2, 0, 1)


def time_large(model, image, args):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with score_threshold(model, args.score_thresh):
        output = tiling.predict_tiled(
            model, image, args.tile, args.tile_overlap, args.tile_batch_size
        )
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    height, width = image.shape[-2:]
    return {
        "size": [height, width],
        "seconds": seconds,
        "windows": len(tiling.make_windows(height, width, args.tile, args.tile_overlap)),
        "instances": len(output["masks"]),
        "peak_rss_mib": after / 1024,
        "rss_growth_mib": (after - before) / 1024,
        "full_size_float_masks_mib": len(output["masks"]) * height * width * 4 / 2**20,
    }


def main(args):
    model, default_tile = load_model(args)
    if args.tta:
        model = tta.TTA(model)
    args.tile = args.tile or default_tile
    tiling.check_tiling(args.tile, args.tile_overlap, args.tile_batch_size)
    coco, cells = read_cells(args.data_path, args.mosaics * args.grid**2)
    cell_size = tuple(max(p.shape[i] for _, p in cells) for i in (0, 1))
    figures = {"machine": common.machine(args.device), "args": vars(args)}
    if args.large_size:
        # First, so that the peak memory before it is the model and the image, nothing else.
        image = large_image(cells, args.large_size)
        figures["large"] = time_large(model, image, args)
        del image
        print(json.dumps(figures["large"]))
    separate_gt, mosaic_gt = ground_truth(coco, cells, args.grid, cell_size)
    separate = predict_separate(model, cells, args.device)
    figures["separate"] = evaluate(separate_gt, separate, args.score_thresh)
    mosaics = stitch(cells, args.grid, cell_size)
    whole = predict_whole(model, mosaics, cell_size, args.grid**2, args.device)
    figures["whole_mosaic"] = evaluate(mosaic_gt, whole, args.score_thresh)
    figures["tiled"] = evaluate(mosaic_gt, predict_mosaics(model, mosaics, args), args.score_thresh)
    figures["checks"] = {
        "against_separate_images": checks(figures["separate"], figures["tiled"]),
        "against_whole_mosaics": checks(figures["whole_mosaic"], figures["tiled"]),
    }
    shown = ("separate", "whole_mosaic", "tiled", "checks")
    print(json.dumps({k: figures[k] for k in shown}))
    common.write_json(args.json, figures)
    return figures


def checks(reference, tiled):
    """Whether tiled AP is within AP_TOLERANCE of the reference's and the instance count within
    COUNT_TOLERANCE; differences are signed, tiled minus reference."""
    count_change = (tiled["instances"] - reference["instances"]) / max(reference["instances"], 1)
    ap_changes = {k: tiled[k] - reference[k] for k in ("segm_AP", "bbox_AP")}
    return {
        "ap_difference": ap_changes,
        "count_difference": count_change,
        "passed": max(map(abs, ap_changes.values())) <= AP_TOLERANCE
        and abs(count_change) <= COUNT_TOLERANCE,
    }


if __name__ == "__main__":
    main(get_args_parser().parse_args())
