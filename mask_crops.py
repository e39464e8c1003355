"""torchvision Mask R-CNN inference whose masks never exist at the image's full size: predict.py's
model path.

    detections = mask_crops.predict(model, image, choose)

In eval mode torchvision's `MaskRCNN` pastes every detection's 28x28 mask probabilities into a
zero float tensor of the whole image (`paste_masks_in_image`, a Python loop over detections)
and stacks them: N x H x W x 4 bytes written, read again to threshold them, for masks that cover
a box each. `predict` runs rcnn_inference.detect (the path export.py traces) and stops before
that paste. `choose` picks and orders the detections to keep from their scores and labels; only
those go through the mask head, and `paste_crops` resizes each one's mask exactly as torchvision
does, thresholds it inside its box only, and `paste_rles` encodes the crop as compressed RLE of
the whole image (mask_geometry.crop_to_rle). Boxes, labels, scores and binary masks are those of
`model(images)` with masks above MASK_THRESHOLD
(tests/test_mask_crops.py).

`keep_freed_memory()` makes glibc's malloc keep the memory that tensors free for the next ones,
instead of handing it back to the kernel and faulting it in again, page by page, on every image.
"""

import ctypes
import ctypes.util
import functools

import torch
import torch.nn.functional as F
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.roi_heads import expand_boxes, expand_masks

from mask_geometry import MASK_THRESHOLD, crop_to_rle
from rcnn_inference import detect

# glibc's mallopt parameters, and the size from which map_large_blocks maps blocks on their own.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
LARGE_BLOCK_BYTES = 2**20


def c_mallopt():
    """The C library's mallopt, or None where it has none."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return None


@functools.cache
def keep_freed_memory():
    """Makes malloc serve every block from its heap and keep freed memory there (up to 2 GiB
    above what is in use); does nothing where the C library has no mallopt."""
    # glibc maps each block above its mmap threshold (32 MiB at most) afresh and unmaps it when
    # freed; the feature maps of an image at full size are such blocks, so every image would
    # page-fault its gigabytes of activations in again.
    mallopt = c_mallopt()
    if mallopt is not None:
        mallopt(M_MMAP_MAX, 0)
        mallopt(M_TRIM_THRESHOLD, 2**31 - 1)


@functools.cache
def map_large_blocks():
    """Makes malloc map every block of LARGE_BLOCK_BYTES or more on its own and unmap it when
    freed, for tiled inference; does nothing where the C library has no mallopt."""
    # Each window's activations and masks are freed while its pieces' small crops live on. Served
    # from the heap, the freed blocks stay trapped between the crops and the heap grows with
    # every window, to gigabytes over a large image whose crops take megabytes. Mapping costs a
    # few page faults per window, little beside a model's compute.
    mallopt = c_mallopt()
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, LARGE_BLOCK_BYTES)


def is_mask_rcnn(model):
    """Whether `predict` can run `model`: a torchvision Mask R-CNN in eval mode."""
    return isinstance(model, MaskRCNN) and not model.training


def predict(model, image, choose):
    """The detections of one [3, H, W] float image that `choose(scores, labels)` keeps, in the
    order of the indices it returns: boxes, labels and scores on the CPU, and masks as a list of
    compressed RLE dicts of the whole image (pycocotools' format, counts as bytes)."""
    boxes, scores, labels, probabilities = detect(model, image, choose)
    return {
        "boxes": boxes.cpu(),
        "labels": labels.cpu(),
        "scores": scores.cpu(),
        "masks": paste_rles(probabilities, boxes, *image.shape[-2:]),
    }


def paste_crops(masks, boxes, height, width, threshold=MASK_THRESHOLD):
    """torchvision's paste_masks_in_image above `threshold`, box by box: for [N, 1, M, M] mask
    probabilities and their [N, 4] boxes (x0, y0, x1, y1) in a height x width image, a list of
    (top, left, crop): the boolean numpy crop of the pasted mask inside the image at (top, left),
    outside which the pasted mask is empty."""
    # The same padding, box expansion, size rounding and interpolation as paste_mask_in_image,
    # so that every pixel inside the box gets the very same probability.
    padded, scale = expand_masks(masks, padding=1)
    corners = expand_boxes(boxes, scale).to(dtype=torch.int64).tolist()
    crops = []
    for mask, (x0, y0, x1, y1) in zip(padded, corners, strict=True):
        size = (max(y1 - y0 + 1, 1), max(x1 - x0 + 1, 1))
        resized = F.interpolate(
            mask[0].expand((1, 1, -1, -1)), size=size, mode="bilinear", align_corners=False
        )[0, 0]
        top, left = max(y0, 0), max(x0, 0)
        bottom, right = max(min(y1 + 1, height), top), max(min(x1 + 1, width), left)
        crop = resized[top - y0 : bottom - y0, left - x0 : right - x0] > threshold
        crops.append((top, left, crop.cpu().numpy()))
    return crops


def paste_rles(masks, boxes, height, width, threshold=MASK_THRESHOLD):
    """Compressed RLE of each mask of paste_crops, as pycocotools.mask.encode of the full-size
    binary mask gives it."""
    return [
        crop_to_rle(crop, top, left, height, width)
        for top, left, crop in paste_crops(masks, boxes, height, width, threshold)
    ]
