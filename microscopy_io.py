"""Microscope images in: PNG/JPEG/TIFF/OME-TIFF of any bit depth, channels and planes, with their
physical pixel size; and the rescaling that shows a model images at the scale it was trained at.

    planes = microscopy_io.read_planes("stack.ome.tif", channels=[0], plane=None)

Each `Plane` holds one 2-D image of the file: `raw` [C, H, W] with the file's own values (every
channel, for measurements), `image` the model's [3, H, W] input made of the chosen channels,
`pixel_size` (microns per pixel, None when unknown) and where that size came from.

Channels. The chosen channels (`channels`, indices into the file's channels; all of them by
default, at most three) fill the model's three input channels: one is repeated three times (a DAPI
channel reaches a model trained on grey images as they do), two fill the first two and leave the
third at 0, three are taken in order. 8-bit values are kept; deeper ones (16/32-bit, float) are
scaled per channel between their 0.1 and 99.9 percentiles, as coco_utils.load_image does for
training. PNG and JPEG files with every channel go through coco_utils.load_image itself.

Planes. Axes other than Y, X and the channels (Z, T, ...) are planes, numbered in file order
(the last axis fastest); `plane` picks one, None keeps them all.

Pixel size, in this order: `pixel_size` given by the caller (--pixel-size); an OME-TIFF's
PhysicalSizeX; ImageJ's unit and XResolution; TIFF resolution tags in centimetres. Resolution in
inches is left out: it is the 72 or 96 dpi of a screen, not a microscope's scale.

Scale. A model trained at `train_pixel_size` sees an image of `pixel_size` rescaled by
pixel_size / train_pixel_size (`scale_factor`); `to_original_grid` maps its detections back:
boxes scaled, probability masks resized, RLE masks (tiled inference) resampled instance by
instance from their crops, so no full-size mask is made.
"""

import os
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass

import cv2
import numpy as np
import tifffile
import torch
from PIL import Image
from pycocotools import mask as mask_util
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from coco_utils import load_image, scale_high_bit_depth
from errors import ConfigError, DataError
from mask_geometry import MASK_THRESHOLD, crop_to_rle, rle_to_crop

TIFF_EXTENSIONS = (".tif", ".tiff")
CHANNEL_AXES = "CS"
MODEL_CHANNELS = 3
# Microns per unit of OME's PhysicalSizeXUnit and ImageJ's unit.
MICRONS_PER_UNIT = {
    "pm": 1e-6,
    "nm": 1e-3,
    "µm": 1.0,
    "\u03bcm": 1.0,
    "um": 1.0,
    "micron": 1.0,
    "microns": 1.0,
    "mm": 1e3,
    "cm": 1e4,
    "m": 1e6,
}


@dataclass(frozen=True)
class Plane:
    """One 2-D image of a file; `index` is its plane number, None for a file of one plane."""

    raw: np.ndarray
    image: tv_tensors.Image
    pixel_size: float | None
    pixel_size_source: str
    index: int | None = None


def add_microscopy_args(parser):
    group = parser.add_argument_group("microscopy")
    group.add_argument(
        "--channels",
        type=channel_list,
        help="the file's channels the model sees, by index from 0, comma-separated (at most 3; "
        "e.g. 0 for a DAPI channel); default: all of them",
    )
    group.add_argument(
        "--plane",
        type=int,
        help="the one plane (Z, T, ...) of a stack to segment, from 0; default: every plane, one "
        "result per plane",
    )
    group.add_argument(
        "--pixel-size",
        type=float,
        help="microns per pixel of the images, over what their files say (OME-XML, ImageJ or "
        "TIFF resolution tags)",
    )


def channel_list(text):
    try:
        channels = [int(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(f"--channels {text!r}: give channel indices such as 0 or 0,2") from None
    if not 1 <= len(channels) <= MODEL_CHANNELS or min(channels) < 0:
        raise ConfigError(f"--channels {text!r}: give 1 to 3 channel indices from 0")
    return channels


def is_tiff(path):
    return path.lower().endswith(TIFF_EXTENSIONS)


def check_readable(path):
    """Fails on a file that is no image, reading only its header."""
    try:
        if is_tiff(path):
            with tifffile.TiffFile(path) as tif:
                first_series(tif, path)
        else:
            with Image.open(path):
                pass
    except (OSError, SyntaxError, ValueError, tifffile.TiffFileError) as e:
        raise DataError(f"{path}: cannot read image ({e})") from None


def file_stem(path):
    """The file name without its extension, nor the .ome of an OME-TIFF."""
    stem = os.path.splitext(os.path.basename(path))[0]
    return stem.removesuffix(".ome") if is_tiff(path) else stem


def read_planes(path, channels=None, plane=None, pixel_size=None):
    """The file's planes (all, or the one numbered `plane`) as Plane records, one at a time: a
    stack's model inputs are made as they are used."""
    try:
        if is_tiff(path):
            stack, axes, file_size, source = read_tiff(path)
        else:
            stack, axes, file_size, source = read_flat_image(path)
    except (OSError, SyntaxError, ValueError, tifffile.TiffFileError) as e:
        raise DataError(f"{path}: cannot read image ({e})") from None
    if pixel_size is not None:
        file_size, source = pixel_size, "--pixel-size"
    planes = to_planes(stack, axes, path)
    if plane is not None and not 0 <= plane < len(planes):
        raise ConfigError(f"--plane {plane}: {path} has planes 0 to {len(planes) - 1}")
    if len(planes) == 1:
        # PNG and JPEG files reach the model as coco_utils.load_image read them for training.
        flat = channels is None and not is_tiff(path)
        image = load_image(path) if flat else model_image(planes[0], channels, path)
        yield Plane(planes[0], image, file_size, source)
        return
    for n in range(len(planes)) if plane is None else [plane]:
        yield Plane(planes[n], model_image(planes[n], channels, path), file_size, source, n)


def read_tiff(path):
    """(array, its axes as tifffile names them, microns per pixel or None, where it came from)."""
    with tifffile.TiffFile(path) as tif:
        series = first_series(tif, path)
        stack, axes = series.asarray(), series.axes
        size, source = tiff_pixel_size(tif)
    return stack, axes, size, source


def first_series(tif, path):
    if not tif.series:
        raise DataError(f"{path}: cannot read image (no image in the TIFF file)")
    return tif.series[0]


def read_flat_image(path):
    """A PNG, JPEG, ... as (array, axes, None, source): it holds no pixel size."""
    with Image.open(path) as image:
        if image.mode not in ("L", "RGB", "I;16", "I;16B", "I;16L", "I", "F"):
            image = image.convert("RGB")
        array = np.asarray(image)
    return array, "YXS" if array.ndim == 3 else "YX", None, "no pixel size in the file"


def tiff_pixel_size(tif):
    """Microns per pixel from OME-XML, ImageJ metadata or resolution tags; (None, why) if none."""
    if tif.is_ome and tif.ome_metadata:
        size = ome_pixel_size(tif.ome_metadata)
        if size is not None:
            return size, "OME-XML PhysicalSizeX"
    page = tif.pages[0]
    resolution = page.tags.get("XResolution")
    if resolution is None or not resolution.value[0]:
        return None, "no pixel size in the file"
    pixels_per_unit = resolution.value[0] / resolution.value[1]
    imagej_unit = (tif.imagej_metadata or {}).get("unit")
    if imagej_unit in MICRONS_PER_UNIT:
        return MICRONS_PER_UNIT[imagej_unit] / pixels_per_unit, "ImageJ unit and XResolution"
    if page.tags.get("ResolutionUnit") and page.tags["ResolutionUnit"].value == 3:
        return 1e4 / pixels_per_unit, "TIFF resolution tags (pixels per cm)"
    return None, "no pixel size in the file"


def ome_pixel_size(ome_xml):
    """PhysicalSizeX of the first Pixels element, in microns; None when absent."""
    try:
        root = ElementTree.fromstring(ome_xml)
    except ElementTree.ParseError:
        return None
    for element in root.iter():
        if element.tag.rsplit("}", 1)[-1] == "Pixels" and "PhysicalSizeX" in element.attrib:
            unit = element.attrib.get("PhysicalSizeXUnit", "µm")
            if unit in MICRONS_PER_UNIT:
                return float(element.attrib["PhysicalSizeX"]) * MICRONS_PER_UNIT[unit]
    return None


def to_planes(stack, axes, path):
    """The [C, H, W] planes of an array with the given axes (e.g. 'TZCYX', 'YXS')."""
    axes = axes.upper()
    if "Y" not in axes or "X" not in axes:
        raise DataError(f"{path}: no Y and X axes in its image (axes {axes})")
    channel_axes = [i for i, axis in enumerate(axes) if axis in CHANNEL_AXES]
    plane_axes = [i for i, axis in enumerate(axes) if axis not in CHANNEL_AXES + "YX"]
    order = [*plane_axes, *channel_axes, axes.index("Y"), axes.index("X")]
    arranged = np.transpose(stack, order)
    num_channels = int(np.prod([stack.shape[i] for i in channel_axes]))
    return list(arranged.reshape(-1, num_channels, *arranged.shape[-2:]))


def model_image(raw, channels, path):
    """The model's [3, H, W] input from a [C, H, W] plane's chosen channels."""
    chosen = list(range(len(raw))) if channels is None else channels
    if max(chosen) >= len(raw):
        raise ConfigError(f"--channels {chosen}: {path} has {len(raw)} channel(s)")
    if len(chosen) > MODEL_CHANNELS:
        raise ConfigError(f"{path} has {len(raw)} channels: choose up to 3 with --channels")
    scaled = [scaled_channel(raw[c]) for c in chosen]
    if len(scaled) == 1:  # a view, not three copies: tiling reads a large image window by window
        return tv_tensors.Image(scaled[0].expand(MODEL_CHANNELS, -1, -1))
    scaled += [torch.zeros_like(scaled[0])] * (MODEL_CHANNELS - len(scaled))
    return tv_tensors.Image(torch.cat(scaled))


def scaled_channel(values):
    """[1, H, W]: uint8 as it is, anything else scaled to [0, 1] between its percentiles."""
    if values.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(values))[None]
    return scale_high_bit_depth(values)


def scale_factor(pixel_size, train_pixel_size):
    """How much to enlarge an image of `pixel_size` for a model trained at `train_pixel_size`
    (1 when either is unknown), and the sentence that says which scale was used."""
    for flag, size in (("--pixel-size", pixel_size), ("--train-pixel-size", train_pixel_size)):
        if size is not None and not size > 0:
            raise ConfigError(f"{flag} {size}: a pixel size must be positive")
    if pixel_size is None and train_pixel_size is None:
        return 1.0, "scale: no pixel size for the image nor the model; images used as they are"
    if train_pixel_size is None:
        return 1.0, (
            f"scale: the model has no training pixel size (train.py --train-pixel-size); images "
            f"of {pixel_size:g} um/px are used as they are"
        )
    if pixel_size is None:
        return 1.0, (
            f"scale: the image has no pixel size (--pixel-size); it is taken to be the model's "
            f"{train_pixel_size:g} um/px"
        )
    factor = pixel_size / train_pixel_size
    return factor, (
        f"scale: images of {pixel_size:g} um/px rescaled by {factor:.4g} to the model's "
        f"{train_pixel_size:g} um/px, results mapped back"
    )


def rescaled_size(height, width, factor):
    return max(1, round(height * factor)), max(1, round(width * factor))


def rescale(image, factor):
    """The [3, H, W] image resized by `factor` (antialiased when shrinking)."""
    if factor == 1.0:
        return image
    size = list(rescaled_size(*image.shape[-2:], factor))
    return tv_tensors.Image(F.resize(image, size, antialias=True))


def to_original_grid(detections, scaled_size, height, width):
    """Detections on an image rescaled to `scaled_size` put back on the height x width grid it
    came from."""
    scaled_height, scaled_width = scaled_size
    if (scaled_height, scaled_width) == (height, width):
        return detections
    sy, sx = height / scaled_height, width / scaled_width
    mapped = dict(detections)
    mapped["boxes"] = detections["boxes"] * torch.tensor([sx, sy, sx, sy])
    masks = detections.get("masks")
    if isinstance(masks, list):
        mapped["masks"] = [resample_rle(rle, height, width) for rle in masks]
    elif masks is not None:
        mapped["masks"] = torch.nn.functional.interpolate(
            masks.float(), size=(height, width), mode="bilinear", align_corners=False
        )
    return mapped


def resample_rle(rle, height, width):
    """A compressed RLE mask moved to a height x width grid covering the same field, through
    its box's crop (bilinear, then thresholded at one half): no full-size mask is made."""
    scaled_height, scaled_width = rle["size"]
    sy, sx = height / scaled_height, width / scaled_width
    x, y, w, h = (int(v) for v in mask_util.toBbox(rle))
    crop = rle_to_crop(rle, y, x, y + h, x + w).astype(np.float32)
    top, left = int(np.floor(y * sy)), int(np.floor(x * sx))
    bottom = min(height, int(np.ceil((y + h) * sy)))
    right = min(width, int(np.ceil((x + w) * sx)))
    # Pixel centres line up as in a whole-image resize: scaled pixel u sits at (u + 0.5) * s - 0.5.
    matrix = np.array(
        [[sx, 0.0, (x + 0.5) * sx - 0.5 - left], [0.0, sy, (y + 0.5) * sy - 0.5 - top]]
    )
    size = (max(1, right - left), max(1, bottom - top))
    resampled = cv2.warpAffine(crop, matrix, size, flags=cv2.INTER_LINEAR, borderValue=0.0)
    return crop_to_rle(resampled >= MASK_THRESHOLD, top, left, height, width)
