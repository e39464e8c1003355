"""Each detection's mask as a boolean crop of its box, from probability masks or from compressed
RLE (tiled inference), so that label images, polygons and measurements of a large image never
need a full-size mask.

    for k, crop in enumerate(instance_crops.crops(detections["masks"], height, width)):
        crop.mask  # bool [bottom - top, right - left], pixels of the image at (crop.top, crop.left)
"""

from typing import NamedTuple

import numpy as np
from pycocotools import mask as mask_util

from mask_geometry import MASK_THRESHOLD, rle_to_crop


class Crop(NamedTuple):
    top: int
    left: int
    mask: np.ndarray

    @property
    def bottom(self):
        return self.top + self.mask.shape[0]

    @property
    def right(self):
        return self.left + self.mask.shape[1]


def crops(masks, height, width):
    """One Crop per mask, in order: `masks` is [N, 1, H, W] probabilities (cut at MASK_THRESHOLD)
    or a list of compressed RLE; an empty mask gives an empty crop at (0, 0)."""
    if isinstance(masks, list):
        return (rle_crop(rle) for rle in masks)
    return (dense_crop(probabilities[0] > MASK_THRESHOLD) for probabilities in masks)


def rle_crop(rle):
    x, y, w, h = (int(v) for v in mask_util.toBbox(rle))
    return Crop(y, x, rle_to_crop(rle, y, x, y + h, x + w))


def dense_crop(mask):
    mask = np.asarray(mask.cpu() if hasattr(mask, "cpu") else mask, dtype=bool)
    rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        return Crop(0, 0, np.zeros((0, 0), dtype=bool))
    top, bottom, left, right = rows[0], rows[-1] + 1, columns[0], columns[-1] + 1
    return Crop(int(top), int(left), mask[top:bottom, left:right].copy())


def label_image(masks, height, width, dtype):
    """[H, W] labels of `dtype`: k + 1 on the pixels of mask k, an earlier (higher-scoring) mask
    winning where masks overlap; painted crop by crop."""
    labels = np.zeros((height, width), dtype=dtype)
    for k, crop in reversed(list(enumerate(crops(masks, height, width)))):
        labels[crop.top : crop.bottom, crop.left : crop.right][crop.mask] = k + 1
    return labels
