"""Renders the README's overlay figures from a synthetic, crowded nuclei tile (256 px, 60 nuclei,
most touching) and a made-up prediction of it:

    python docs/make_overlay_figures.py --output docs

overlay_before.png  torchvision's draw_segmentation_masks + draw_bounding_boxes with a
                    "category score" caption on every instance, as predict.py drew it before
overlay_after.png   overlays.draw_instances (text "auto")
overlay_errors.png  overlays.draw_errors of error_analysis.classify's kinds, with its legend

The prediction is the ground truth with each nucleus shifted by up to a pixel, one nucleus cut
in two, two touching ones merged, two missed and one debris blob found, so that every error kind
appears once or more.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from error_analysis import classify  # noqa: E402
from mask_geometry import mask_boxes, mask_boxes_xyxy  # noqa: E402
from overlays import draw_errors, draw_instances, neighbour_colours  # noqa: E402

SIZE = 256


def nuclei_tile(rng, count=60):
    """A grey, fluorescence-like RGB tile and its [N, SIZE, SIZE] nucleus masks: ellipses placed
    closer than their sizes allow, the later one winning where two overlap, so most touch."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    masks, centres = [], []
    while len(masks) < count:
        cy, cx = rng.uniform(8, SIZE - 8, 2)
        a, b = rng.uniform(9, 14), rng.uniform(6.5, 10.5)
        if any(np.hypot(cy - y, cx - x) < 0.54 * (a + r) for y, x, r in centres):
            continue
        theta = rng.uniform(0, np.pi)
        u = ((xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)) / a
        v = (-(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)) / b
        masks.append(u**2 + v**2 <= 1)
        centres.append((cy, cx, a))
    masks = np.stack(masks)
    # Where two ellipses overlap the later one wins, as in a label image.
    for k in range(len(masks) - 1):
        masks[k] &= ~masks[k + 1 :].any(0)
    brightness = rng.uniform(110, 220, len(masks))
    grey = 18 + (masks * brightness[:, None, None]).sum(0)
    grey *= 1 + 0.08 * np.sin(xx / 3.1) * np.sin(yy / 2.3)
    tile = np.clip(grey, 0, 255).astype(np.uint8)
    return np.stack([tile] * 3, -1), masks


def made_up_prediction(rng, gt):
    """Predicted masks and scores: gt shifted, with a split, a merge, two misses and debris."""
    first, second = next(
        (i, j) for i in range(1, len(gt)) for j in range(i + 1, len(gt)) if _touch(gt[i], gt[j])
    )
    _, x0, _, x1 = mask_boxes(gt[:1])[0]
    left = np.arange(SIZE) < (x0 + x1) // 2
    pred = [gt[0] & left, gt[0] & ~left]
    for k, mask in enumerate(gt[1:-2], start=1):
        if k == first:
            pred.append(mask | gt[second] | (_dilate(mask) & _dilate(gt[second])))
        elif k != second:
            pred.append(np.roll(mask, tuple(rng.integers(-1, 2, 2)), (0, 1)))
    debris = np.zeros((SIZE, SIZE), bool)
    debris[240:250, 6:16] = True
    pred.append(debris)
    scores = np.sort(rng.uniform(0.5, 1.0, len(pred)))[::-1]
    return np.stack(pred), scores


def _touch(a, b):
    return bool((_dilate(a) & b).any())


def _dilate(mask):
    padded = np.pad(mask, 1)
    return mask | padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]


def torchvision_overlay(image, masks, captions):
    """predict.py's drawing before overlays.py: masks, boxes and a caption on every instance."""
    pixels = torch.from_numpy(image).permute(2, 0, 1)
    masks = torch.from_numpy(masks)
    colours = neighbour_colours(mask_boxes(masks.numpy()))
    pixels = draw_segmentation_masks(pixels, masks, alpha=0.45, colors=colours)
    boxes = torch.from_numpy(mask_boxes_xyxy(masks.numpy()))
    drawn = draw_bounding_boxes(
        pixels,
        boxes,
        labels=captions,
        colors=colours,
        width=1,
        label_colors="black",
        label_background_colors=colours,
        fill_labels=True,
    )
    return drawn.permute(1, 2, 0).numpy()


def save_small(array, path):
    Image.fromarray(array).save(path, optimize=True)
    print(f"{path}: {path.stat().st_size // 1024} KB")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default="docs", type=Path, help="folder for the PNGs")
    parser.add_argument("--seed", default=0, type=int, help="seed of the synthetic tile")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    image, gt = nuclei_tile(rng)
    pred, scores = made_up_prediction(rng, gt)
    captions = [f"nucleus {score:.2f}" for score in scores]
    args.output.mkdir(parents=True, exist_ok=True)
    save_small(torchvision_overlay(image, pred, captions), args.output / "overlay_before.png")
    save_small(draw_instances(image, pred, captions), args.output / "overlay_after.png")
    errors = classify(gt, pred)
    drawn = draw_errors(image, gt, pred, errors.gt_kinds, errors.pred_kinds)
    save_small(drawn, args.output / "overlay_errors.png")
    print(errors.counts())


if __name__ == "__main__":
    main()
