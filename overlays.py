"""Overlays that stay readable with hundreds of small, touching instances (nuclei): translucent
masks with contours, captions only where they fit, and an error overlay with a legend.

draw_instances and draw_errors take the image as a uint8 [3, H, W] tensor or an [H, W, 3] numpy
array and masks as [N, H, W] booleans (tensor or array), and return an [H', W', 3] uint8 numpy
array (what PIL.Image.fromarray saves). Images whose shorter side is under MIN_SHORT_SIDE are
enlarged by a whole factor, nearest neighbour for the image and the masks, so that a contour one
drawn pixel wide is finer than an image pixel and touching instances keep a visible line each;
enlarging stops before the long side passes MAX_LONG_SIDE.

Fills and contours are numpy on each instance's box: a contour is the ring of the instance's own
pixels next to a pixel outside it, so two touching instances show two lines of their two colours
and no line crosses a neighbour. Text is Pillow's ImageDraw with ImageFont.load_default(size=...)
(Pillow >= 10.1: a scalable font with no font file to ship). OpenCV is not needed.

Captions (`text`):
- "auto": instances are taken in the order given (predict.py's is by descending score) and each
  caption goes to the first of these places (above its box, below it, centred on it, right of
  it, left of it) that lies inside the image, overlaps no caption placed before and covers no
  pixel of any other instance; an instance without such a place gets no caption.
- "on": every caption is drawn, at the first place inside the image that overlaps no earlier
  caption (else above the box, moved into the image), whatever it covers.
- "off": no text.
"""

import colorsys
import math
from functools import partial

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mask_geometry import mask_boxes, to_numpy

MIN_SHORT_SIDE = 512
MAX_LONG_SIDE = 4096
FILL_ALPHA = 0.4
# Errors are filled more strongly than instances: they are what the error overlay is for.
ERROR_FILL_ALPHA = 0.6
PALETTE_SIZE = 12
TEXT_MODES = ("auto", "on", "off")
# Okabe-Ito colours, told apart by people with the common colour-vision deficiencies.
ERROR_COLOURS = {
    "true_positive": (0, 158, 115),
    "missed": (213, 94, 0),
    "extra": (240, 228, 66),
    "split": (86, 180, 233),
    "merged": (204, 121, 167),
}
LEGEND_BACKGROUND = (32, 32, 32)


def draw_instances(image, masks, captions=None, colours=None, text="auto"):
    """The (enlarged) image with each instance's mask filled translucently and outlined, and its
    caption where `text` allows (module docstring). `colours` are RGB tuples, one per instance;
    by default touching instances get different colours (neighbour_colours)."""
    if text not in TEXT_MODES:
        raise ValueError(f"text must be one of {', '.join(TEXT_MODES)}, got {text!r}")
    pixels = _image_array(image)
    masks = _mask_array(masks, pixels.shape[:2])
    scale = drawing_scale(*pixels.shape[:2])
    canvas = _enlarge(pixels, scale).astype(np.float32)
    boxes = mask_boxes(masks)
    colours = neighbour_colours(boxes) if colours is None else list(colours)
    _check_count("colours", colours, len(masks))
    # Drawn last to first so that the first (highest-scoring) instance ends on top.
    for k in range(len(masks) - 1, -1, -1):
        _fill(canvas, masks[k], boxes[k], scale, colours[k])
        _outline(canvas, masks[k], boxes[k], scale, colours[k])
    drawn = Image.fromarray(canvas.round().astype(np.uint8))
    if captions is not None and text != "off":
        font = caption_font(drawn.size)
        places = _caption_places(masks, boxes, captions, text)
        _draw_captions(ImageDraw.Draw(drawn), places, captions, colours, font)
    return np.asarray(drawn)


def draw_errors(image, gt_masks, pred_masks, gt_kinds, pred_kinds):
    """The (enlarged) image with each object coloured by its error kind (ERROR_COLOURS; kinds as
    error_analysis.classify gives them) and a legend band below it with the count of each kind.

    Matched predictions (true positive) are only outlined, so that the errors stand out; filled
    and outlined are missed ground truth, extra predictions, split ground-truth objects (their
    pieces outlined inside) and merged predictions (the ground-truth objects they merge outlined
    inside). The legend counts matched pairs, extra predictions, and ground-truth objects for
    missed, split and merged.
    """
    pixels = _image_array(image)
    gt_masks = _mask_array(gt_masks, pixels.shape[:2])
    pred_masks = _mask_array(pred_masks, pixels.shape[:2])
    _check_count("gt_kinds", gt_kinds, len(gt_masks))
    _check_count("pred_kinds", pred_kinds, len(pred_masks))
    scale = drawing_scale(*pixels.shape[:2])
    canvas = _enlarge(pixels, scale).astype(np.float32)
    fill = partial(_fill, alpha=ERROR_FILL_ALPHA)
    # Pieces of a split and parts of a merge are outlined in a darker shade inside the fill.
    inner = partial(_outline, shade=0.45)
    gt = (gt_masks, mask_boxes(gt_masks), gt_kinds)
    pred = (pred_masks, mask_boxes(pred_masks), pred_kinds)
    layers = [
        (gt, ("missed", "split"), fill),
        (pred, ("extra", "merged"), fill),
        (gt, ("missed", "split"), _outline),
        (pred, ("true_positive", "extra", "merged"), _outline),
        (gt, ("merged",), inner),
        (pred, ("split",), inner),
    ]
    for (masks, boxes, kinds), drawn_kinds, draw in layers:
        for k, kind in enumerate(kinds):
            if kind in drawn_kinds:
                draw(canvas, masks[k], boxes[k], scale, ERROR_COLOURS[kind])
    counts = {kind: list(gt_kinds).count(kind) for kind in ("missed", "split", "merged")}
    counts.update({kind: list(pred_kinds).count(kind) for kind in ("true_positive", "extra")})
    return _with_legend(canvas.round().astype(np.uint8), counts)


def drawing_scale(height, width):
    """The whole factor an image of this size is enlarged by before drawing."""
    wanted = math.ceil(MIN_SHORT_SIDE / min(height, width))
    return max(1, min(wanted, MAX_LONG_SIDE // max(height, width)))


def caption_font(drawn_size):
    """The caption font for a drawn image of (width, height): about 1/40 of the shorter side."""
    return ImageFont.load_default(size=min(40, max(11, round(min(drawn_size) / 40))))


def caption_boxes(masks, captions, text="auto"):
    """Where draw_instances puts each caption: (x0, y0, x1, y1) in drawn pixels, ends exclusive,
    or None for a caption left out (module docstring)."""
    masks = _mask_array(masks)
    return _caption_places(masks, mask_boxes(masks), captions, text)


def _caption_places(masks, boxes, captions, text):
    _check_count("captions", captions, len(masks))
    if text == "off":
        return [None] * len(masks)
    scale = drawing_scale(*masks.shape[1:])
    height, width = (scale * side for side in masks.shape[1:])
    font = caption_font((width, height))
    coverage = _enlarge(_coverage(masks, boxes), scale)
    taken = np.zeros((height, width), dtype=bool)
    places = []
    for k, caption in enumerate(captions):
        size = _caption_size(font, caption)
        candidates = [
            place
            for place in _candidate_places(boxes[k] * scale, size)
            if place[0] >= 0 and place[1] >= 0 and place[2] <= width and place[3] <= height
        ]
        margin = _padding(font)
        free = [place for place in candidates if not taken[_region(place, margin)].any()]
        if text == "auto":
            free = [
                place
                for place in free
                if not _covers_others(_region(place, margin), coverage, masks[k], scale)
            ]
            place = free[0] if free else None
        else:
            above = _candidate_places(boxes[k] * scale, size)[0]
            place = free[0] if free else _inside(above, width, height)
        if place is not None:
            taken[_region(place)] = True
        places.append(place)
    return places


def neighbour_colours(boxes):
    """One RGB colour per instance, from a palette of PALETTE_SIZE: instance k takes palette
    colour k (modulo the size), or the next one that none of its earlier neighbours (boxes
    within a pixel of its box) has, or the one they use least."""
    palette = _palette(PALETTE_SIZE)
    near = _boxes_touch(np.asarray(boxes))
    chosen = []
    for k in range(len(boxes)):
        used = np.bincount([chosen[j] for j in np.flatnonzero(near[k, :k])], minlength=PALETTE_SIZE)
        # Rolling makes argmin's first-of-the-least start at colour k, not always at colour 0.
        start = k % PALETTE_SIZE
        chosen.append((start + int(np.argmin(np.roll(used, -start)))) % PALETTE_SIZE)
    return [palette[index] for index in chosen]


def boxes_to_masks(boxes, height, width):
    """[N, height, width] masks filling (x0, y0, x1, y1) boxes (torchvision's order), so that
    models without masks draw through draw_instances too: the box becomes the contour."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    ys, xs = np.arange(height) + 0.5, np.arange(width) + 0.5
    inside_y = (ys >= boxes[:, 1, None]) & (ys <= boxes[:, 3, None])
    inside_x = (xs >= boxes[:, 0, None]) & (xs <= boxes[:, 2, None])
    return inside_y[:, :, None] & inside_x[:, None, :]


def _image_array(image):
    # Tensors are [3, H, W] (torchvision's layout), arrays [H, W, 3] (PIL's).
    if hasattr(image, "numpy"):
        image = to_numpy(image).transpose(1, 2, 0)
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(
            f"image must be uint8 [3, H, W] (tensor) or [H, W, 3] (array), got {image.dtype} "
            f"{list(image.shape)}"
        )
    return image


def _mask_array(masks, size=None):
    """[N, H, W] bool numpy masks; None is no mask. With `size`, (H, W) must equal it."""
    if masks is None:
        return np.zeros((0, *size), dtype=bool)
    masks = np.asarray(to_numpy(masks), dtype=bool)
    size = masks.shape[1:] if size is None else tuple(size)
    if masks.ndim != 3 or masks.shape[1:] != size:
        raise ValueError(f"masks must be [N, {size[0]}, {size[1]}], got {list(masks.shape)}")
    return masks


def _check_count(name, items, count):
    if len(items) != count:
        raise ValueError(f"{name}: {len(items)} given for {count} masks")


def _enlarge(array, scale):
    return array if scale == 1 else array.repeat(scale, 0).repeat(scale, 1)


def _drawn_crop(mask, box, scale):
    """The mask inside its box, enlarged, and the drawn-pixel slices it belongs to."""
    y0, x0, y1, x1 = box
    crop = _enlarge(mask[y0:y1, x0:x1], scale)
    return crop, np.s_[y0 * scale : y1 * scale, x0 * scale : x1 * scale]


def _fill(canvas, mask, box, scale, colour, alpha=FILL_ALPHA):
    crop, region = _drawn_crop(mask, box, scale)
    patch = canvas[region]
    patch[crop] = (1 - alpha) * patch[crop] + alpha * np.asarray(colour, np.float32)


def _outline(canvas, mask, box, scale, colour, shade=1.0):
    crop, region = _drawn_crop(mask, box, scale)
    width = max(1, round(min(canvas.shape[:2]) / 600))
    canvas[region][crop & ~_erode(crop, width)] = shade * np.asarray(colour, np.float32)


def _erode(mask, iterations):
    """4-neighbour erosion; pixels outside the array count as outside the mask."""
    for _ in range(iterations):
        padded = np.pad(mask, 1)
        mask = mask & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask


def _palette(count):
    # Hues stepped by the golden ratio, so colours close in the list are far apart in hue.
    return [
        tuple(round(255 * c) for c in colorsys.hsv_to_rgb((0.13 + 0.618034 * i) % 1, 0.8, 1))
        for i in range(count)
    ]


def _boxes_touch(boxes):
    """[N, N] whether two boxes overlap or lie within one pixel of each other."""
    top_left = np.maximum(boxes[:, None, :2], boxes[None, :, :2])
    bottom_right = np.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    return (top_left <= bottom_right + 1).all(-1)


def _coverage(masks, boxes):
    """[H, W] number of instances on each pixel, summed box by box."""
    coverage = np.zeros(masks.shape[1:], dtype=np.int16)
    for mask, (y0, x0, y1, x1) in zip(masks, boxes, strict=True):
        coverage[y0:y1, x0:x1] += mask[y0:y1, x0:x1]
    return coverage


def _caption_size(font, caption):
    left, top, right, bottom = font.getbbox(caption)
    pad = _padding(font)
    return right - left + 2 * pad, bottom - top + 2 * pad


def _padding(font):
    return max(1, round(font.size / 6))


def _candidate_places(drawn_box, size):
    """(x0, y0, x1, y1) above, below, centred on, right of and left of a (y0, x0, y1, x1) box."""
    y0, x0, y1, x1 = (int(v) for v in drawn_box)
    width, height = size
    cx, cy = (x0 + x1 - width) // 2, (y0 + y1 - height) // 2
    corners = [(cx, y0 - height), (cx, y1), (cx, cy), (x1, cy), (x0 - width, cy)]
    return [(x, y, x + width, y + height) for x, y in corners]


def _inside(place, width, height):
    x0, y0, x1, y1 = place
    dx = min(max(0, -x0), width - x1) if x1 - x0 <= width else -x0
    dy = min(max(0, -y0), height - y1) if y1 - y0 <= height else -y0
    return x0 + dx, y0 + dy, x1 + dx, y1 + dy


def _region(place, margin=0):
    """Slices of the (x0, y0, x1, y1) place grown by `margin`; starts clipped at 0."""
    x0, y0, x1, y1 = place
    return np.s_[
        max(0, y0 - margin) : max(0, y1 + margin), max(0, x0 - margin) : max(0, x1 + margin)
    ]


def _covers_others(region, coverage, own_mask, scale):
    """Whether drawn pixels `region` hold a pixel of an instance other than the own one."""
    others = coverage[region]
    rows = np.arange(region[0].start, region[0].start + others.shape[0]) // scale
    columns = np.arange(region[1].start, region[1].start + others.shape[1]) // scale
    return bool((others - own_mask[np.ix_(rows, columns)] > 0).any())


def _draw_captions(draw, places, captions, colours, font):
    pad = _padding(font)
    for place, caption, colour in zip(places, captions, colours, strict=True):
        if place is None:
            continue
        x0, y0, x1, y1 = place
        left, top, _, _ = font.getbbox(caption)
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=tuple(colour))
        draw.text((x0 + pad - left, y0 + pad - top), caption, fill=_ink(colour), font=font)


def _ink(colour):
    """Black text on light backgrounds, white on dark ones."""
    red, green, blue = colour[:3]
    return (0, 0, 0) if 0.299 * red + 0.587 * green + 0.114 * blue > 140 else (255, 255, 255)


def _with_legend(pixels, counts):
    """The image with a band below it: one swatch and "<kind> <count>" per error kind, wrapped
    to the image's width."""
    width = pixels.shape[1]
    font = caption_font((width, pixels.shape[0]))
    line = font.size + 2 * _padding(font)
    entries = [(kind, f"{kind.replace('_', ' ')} {counts[kind]}") for kind in ERROR_COLOURS]
    positions, x, y = [], line // 2, line // 2
    for _, label in entries:
        entry_width = 2 * line + round(font.getlength(label))
        if x + entry_width > width and x > line // 2:
            x, y = line // 2, y + line + line // 2
        positions.append((x, y))
        x += entry_width
    band = Image.new("RGB", (width, y + line + line // 2), LEGEND_BACKGROUND)
    draw = ImageDraw.Draw(band)
    for (kind, label), (x, y) in zip(entries, positions, strict=True):
        draw.rectangle((x, y, x + line - 1, y + line - 1), fill=ERROR_COLOURS[kind])
        draw.text(
            (x + line + line // 3, y + line // 2), label, fill="white", font=font, anchor="lm"
        )
    return np.concatenate([pixels, np.asarray(band)])
