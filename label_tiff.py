"""Label images as TIFF files napari, Fiji and QuPath open with their physical scale.

    write_label_tiff("cells_labels.tif", labels, pixel_size=0.325)

0 is background and k the k-th object. Up to 65,535 objects the labels are uint16 in an ImageJ
TIFF (its unit and XResolution say microns per pixel, which Fiji shows as the image's scale);
past that uint32, which the ImageJ format cannot hold, so the scale goes into the standard
resolution tags in centimetres (Fiji opens such a file as 32-bit; napari and tifffile read the
integers as they are). Either is zlib-compressed: label images are mostly runs of one value.
"""

import numpy as np
import tifffile

UINT16_LABELS = np.iinfo(np.uint16).max
MICRONS_PER_CM = 1e4


def label_dtype(count):
    """The narrowest unsigned type for labels 0 to `count`: uint16, or uint32 past 65,535."""
    return np.uint16 if count <= UINT16_LABELS else np.uint32


def write_label_tiff(path, labels, pixel_size=None):
    """Writes [H, W] uint16 or uint32 labels; `pixel_size` in microns per pixel, or None."""
    if labels.dtype == np.uint16:
        metadata = {"axes": "YX"}
        resolution = None
        if pixel_size is not None:
            metadata["unit"] = "um"
            resolution = (1 / pixel_size, 1 / pixel_size)
        tifffile.imwrite(
            path,
            labels,
            imagej=True,
            resolution=resolution,
            metadata=metadata,
            compression="zlib",
        )
        return
    scale = {}
    if pixel_size is not None:
        per_cm = MICRONS_PER_CM / pixel_size
        scale = {"resolution": (per_cm, per_cm), "resolutionunit": "CENTIMETER"}
    tifffile.imwrite(path, labels.astype(np.uint32, copy=False), compression="zlib", **scale)
