"""Tiled inference: a detection model run on overlapping windows of an image too large to segment
at once, its instances merged into one set in image coordinates.

    result = tiling.predict_tiled(model, image, tile=512, overlap=64)

`model` speaks torchvision's detection interface in eval mode and predicts masks; `image` is a
[3, H, W] tensor or array, uint8 or float in [0, 1] (a numpy memmap is read window by window).
Windows go to the model `batch_size` at a time, each converted to float on its own. The result
holds `boxes` [N, 4] (float32, XYXY), `labels` [N] (int64) and `scores` [N] (float32) in
descending score, and `masks`: a list of N compressed RLE dicts of the whole image (pycocotools'
format, counts as bytes), built from each instance's crop without a full-size mask. Memory
follows the window and the objects, never the image size. `rle_to_crop` decodes one box of such
an RLE, to draw or measure an instance.

Windows. Along each axis a window of `tile` pixels starts every `tile - overlap` pixels, the last
one flush with the image end (an axis no longer than `tile` is one window), so neighbours share a
strip of at least `overlap` pixels. Each strip is split at its middle, which gives every window an
owned region; the owned regions partition the image.

Merge rule. Each window's masks are thresholded at `mask_threshold` and cropped to their pixels
(a detection with no pixel left is dropped). A detection is *cut* when its mask reaches an edge of
its window that lies inside the image (the object may go on beyond it), else *whole*. Only
detections of the same label from different windows are ever compared.
  1. A whole detection whose mask box centre lies in its window's owned region is kept, in
     descending score, unless at least half of it lies inside one already kept from another
     window (the same object, segmented a little differently on either side of a split line).
  2. Any other detection at least half inside a kept one is another window's view of it: dropped.
  3. The rest are objects that no window owning them saw whole. Two of them from overlapping
     windows are the same object when their masks agree where both windows look (IoU of their
     parts in the windows' intersection at least `match_iou`); chains of such pairs become one
     instance: the union of the masks and of the boxes, the label, the area-weighted mean score.

Why it is right. Take an object at most `overlap - 3` pixels across. Its mask box centre lies in
one window's owned region, at least half the overlap from that window's inner edges, so the object
lies inside that window without touching them: the owner sees it whole and keeps it (1). Every
other window sees a part of it, whole or cut, which lies inside it and is dropped (2). The result
is one instance, the view of the window that sees the object with the most context around it. A
larger object may be seen whole by no owner; its pieces are then joined through the shared strips
(3), which is right when the model segments a strip the same way from both sides, as a model
trained on crops (which cut objects) does. An object larger than a window is never seen whole and
is only as good as its pieces; raise `tile` (and `overlap`) above the largest object when you can.
Models that resize their input (torchvision's R-CNNs resize to their `min_size`/`max_size`) should
see windows at the scale they were trained at: use a `tile` equal to their input size.
"""

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from errors import ConfigError
from mask_geometry import MASK_THRESHOLD, box_overlap, crop_to_rle, shared_pixels

# A piece at least this fraction inside another is taken for a view of the same object.
INSIDE_FRACTION = 0.5


class Window(NamedTuple):
    """Pixels [top, bottom) x [left, right) go to the model; [own_top, own_bottom) x
    [own_left, own_right) is the part of the image this window answers for."""

    top: int
    left: int
    bottom: int
    right: int
    own_top: int
    own_left: int
    own_bottom: int
    own_right: int


@dataclass(frozen=True, slots=True)
class Piece:
    """One instance in image coordinates: its mask as a boolean crop at (top, left), the model's
    box, and where it came from. A window's detection, or the union of several."""

    window: int
    label: int
    score: float
    box: tuple
    top: int
    left: int
    crop: np.ndarray
    area: int
    whole: bool = True
    owned: bool = True

    @property
    def bottom(self):
        return self.top + self.crop.shape[0]

    @property
    def right(self):
        return self.left + self.crop.shape[1]

    @property
    def extent(self):
        return self.top, self.left, self.bottom, self.right


def check_tiling(tile, overlap, batch_size=1):
    """Raises ConfigError unless windows of `tile` pixels overlapping by `overlap` make sense."""
    if tile <= 0:
        raise ConfigError(f"--tile {tile} must be positive")
    if overlap < 0:
        raise ConfigError(f"--tile-overlap {overlap} must not be negative")
    if tile <= overlap:
        raise ConfigError(f"--tile {tile} must be larger than --tile-overlap {overlap}")
    if batch_size <= 0:
        raise ConfigError(f"--tile-batch-size {batch_size} must be positive")


def axis_spans(length, tile, overlap):
    """Windows along one axis as (start, stop, own_start, own_stop)."""
    if length <= tile:
        return [(0, length, 0, length)]
    stride = tile - overlap
    count = -(-(length - tile) // stride) + 1
    starts = [min(i * stride, length - tile) for i in range(count)]
    splits = [(starts[i + 1] + starts[i] + tile) // 2 for i in range(count - 1)]
    bounds = [0, *splits, length]
    return [(s, s + tile, bounds[i], bounds[i + 1]) for i, s in enumerate(starts)]


def make_windows(height, width, tile, overlap):
    """The windows covering a height x width image, row by row."""
    rows = axis_spans(height, tile, overlap)
    columns = axis_spans(width, tile, overlap)
    return [
        Window(top, left, bottom, right, own_top, own_left, own_bottom, own_right)
        for top, bottom, own_top, own_bottom in rows
        for left, right, own_left, own_right in columns
    ]


def predict_tiled(
    model, image, tile=512, overlap=64, batch_size=4, mask_threshold=MASK_THRESHOLD, match_iou=0.5
):
    """The model's instances on a [3, H, W] image, found window by window and merged (see the
    module docstring); masks come back as compressed RLE of the whole image."""
    check_tiling(tile, overlap, batch_size)
    height, width = image.shape[-2:]
    windows = make_windows(height, width, tile, overlap)
    device = _device_of(model)
    pieces = []
    with torch.inference_mode():
        for first in range(0, len(windows), batch_size):
            indices = range(first, min(first + batch_size, len(windows)))
            outputs = model([_window_input(image, windows[i], device) for i in indices])
            for index, output in zip(indices, outputs, strict=True):
                pieces += window_pieces(
                    output, windows[index], index, (height, width), mask_threshold
                )
    return _to_output(merge_pieces(pieces, windows, match_iou), height, width)


class TiledModel(torch.nn.Module):
    """`model` run window by window on each image (predict_tiled): the detection interface, with
    `masks` a list of compressed RLE of the whole image instead of an [N, 1, H, W] tensor."""

    predicts_masks = True

    def __init__(self, model, tile, overlap, batch_size=4):
        super().__init__()
        check_tiling(tile, overlap, batch_size)
        self.model = model
        self.tile, self.overlap, self.batch_size = tile, overlap, batch_size

    def forward(self, images):
        return [
            predict_tiled(self.model, image, self.tile, self.overlap, self.batch_size)
            for image in images
        ]


def _device_of(model):
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def _window_input(image, window, device):
    crop = torch.as_tensor(image[:, window.top : window.bottom, window.left : window.right])
    crop = crop.to(device)
    if crop.dtype == torch.uint8:
        return crop.float().div_(255)
    return crop.float()


def window_pieces(output, window, index, image_size, threshold=MASK_THRESHOLD):
    """One window's detections as Pieces in image coordinates, masks thresholded and cropped to
    their pixels; detections without a pixel above `threshold` are left out."""
    if "masks" not in output:
        raise ConfigError("tiled inference needs a model that predicts masks")
    masks = output["masks"][:, 0]
    # Per-row and per-column maxima find each mask's pixels without comparing the whole window.
    rows = (masks.amax(dim=2) > threshold).cpu().numpy()
    columns = (masks.amax(dim=1) > threshold).cpu().numpy()
    boxes = (output["boxes"].detach().cpu().double() + _shift(window)).tolist()
    labels = output["labels"].tolist()
    scores = output["scores"].tolist()
    pieces = []
    for n in np.flatnonzero(rows.any(axis=1)):
        y0, y1 = _span(rows[n])
        x0, x1 = _span(columns[n])
        crop = (masks[n, y0:y1, x0:x1] > threshold).cpu().numpy()
        top, left = window.top + y0, window.left + x0
        pieces.append(
            Piece(
                window=index,
                label=labels[n],
                score=scores[n],
                box=tuple(boxes[n]),
                top=top,
                left=left,
                crop=crop,
                area=int(np.count_nonzero(crop)),
                whole=not _reaches_inner_edge(window, image_size, top, left, crop.shape),
                owned=_owns(window, top + (y1 - y0) / 2, left + (x1 - x0) / 2),
            )
        )
    return pieces


def _shift(window):
    return torch.tensor([window.left, window.top, window.left, window.top], dtype=torch.float64)


def _span(flags):
    """[first, last + 1) of the True entries of a 1-D boolean array with at least one."""
    return int(flags.argmax()), len(flags) - int(flags[::-1].argmax())


def _reaches_inner_edge(window, image_size, top, left, shape):
    height, width = image_size
    bottom, right = top + shape[0], left + shape[1]
    return (
        (top == window.top and window.top > 0)
        or (left == window.left and window.left > 0)
        or (bottom == window.bottom and window.bottom < height)
        or (right == window.right and window.right < width)
    )


def _owns(window, y, x):
    return window.own_top <= y < window.own_bottom and window.own_left <= x < window.own_right


def merge_pieces(pieces, windows, match_iou=0.5):
    """The instances of the image: the pieces of all windows merged by the rule of the module
    docstring, each object once."""
    shared = _shared_pixels(pieces, windows)
    kept = _keep_owned(pieces, shared)
    rest = [
        i
        for i in range(len(pieces))
        if i not in kept and not any(j in kept for j in _containers(pieces, shared, i))
    ]
    groups = _chains(pieces, windows, shared, rest, match_iou)
    return [pieces[i] for i in sorted(kept)] + [_union(pieces, group) for group in groups]


def _shared_pixels(pieces, windows):
    """{i: {j: pixels the masks of pieces i and j share}} for every pair of pieces of the same
    label from different windows whose masks meet."""
    by_window = {}
    for i, piece in enumerate(pieces):
        by_window.setdefault(piece.window, []).append(i)
    shared = {}
    for a, b in _overlapping_windows(windows):
        for i, j in _meeting_boxes(pieces, by_window.get(a, []), by_window.get(b, [])):
            pixels = _intersection(pieces[i], pieces[j])
            if pixels:
                shared.setdefault(i, {})[j] = pixels
                shared.setdefault(j, {})[i] = pixels
    return shared


def _overlapping_windows(windows):
    """Pairs (a, b), a < b, of windows that share pixels. The windows form a grid, so each meets
    only its neighbours: pairs come from the rows and columns that meet, never from comparing
    every window with every other (which would grow with the square of the image's area)."""
    index = {(w.top, w.left): k for k, w in enumerate(windows)}
    rows = sorted({(w.top, w.bottom) for w in windows})
    columns = sorted({(w.left, w.right) for w in windows})
    for r1, r2 in _meeting_spans(rows):
        for c1, c2 in _meeting_spans(columns):
            a, b = index[rows[r1][0], columns[c1][0]], index[rows[r2][0], columns[c2][0]]
            if a < b:
                yield a, b


def _meeting_spans(spans):
    """Pairs (i, j), in both orders and with i == j, of spans (start, stop) sorted by start that
    share pixels; every span is equally long, so those after i that meet it come right after."""
    pairs = []
    for i, (_, stop) in enumerate(spans):
        j = i
        while j < len(spans) and spans[j][0] < stop:
            pairs += [(i, j)] if i == j else [(i, j), (j, i)]
            j += 1
    return pairs


def _meeting_boxes(pieces, first, second):
    """Pairs (i, j) of pieces of the same label, i from `first` and j from `second`, whose crops
    cover some of the same pixels."""
    if not first or not second:
        return []
    labels_first = np.array([pieces[i].label for i in first])
    labels_second = np.array([pieces[j].label for j in second])
    meet = _boxes_meet(_extents(pieces, first), _extents(pieces, second))
    a, b = np.nonzero(meet & (labels_first[:, None] == labels_second[None, :]))
    return [(first[x], second[y]) for x, y in zip(a.tolist(), b.tolist(), strict=True)]


def _extents(pieces, indices):
    return np.array([pieces[i].extent for i in indices])


def _boxes_meet(a, b):
    """[len(a), len(b)] whether boxes (top, left, bottom, right) share pixels."""
    return (np.maximum(a[:, None, 0], b[None, :, 0]) < np.minimum(a[:, None, 2], b[None, :, 2])) & (
        np.maximum(a[:, None, 1], b[None, :, 1]) < np.minimum(a[:, None, 3], b[None, :, 3])
    )


def _intersection(a, b):
    """Pixels set in both pieces' masks."""
    box = box_overlap(a.extent, b.extent)
    return shared_pixels(a.crop, b.crop, box, (a.top, a.left), (b.top, b.left))


def _pixels_in(piece, region):
    origin = (piece.top, piece.left)
    return shared_pixels(piece.crop, piece.crop, box_overlap(piece.extent, region), origin, origin)


def _containers(pieces, shared, i):
    """The pieces that hold at least INSIDE_FRACTION of piece i."""
    area = pieces[i].area
    return [j for j, pixels in shared.get(i, {}).items() if pixels >= INSIDE_FRACTION * area]


def _keep_owned(pieces, shared):
    """Rule 1: the whole, owned pieces, by descending score, less those mostly inside one kept
    before them."""
    owned = [i for i, p in enumerate(pieces) if p.whole and p.owned]
    kept = set()
    for i in sorted(owned, key=lambda i: -pieces[i].score):
        if not any(j in kept for j in _containers(pieces, shared, i)):
            kept.add(i)
    return kept


def _chains(pieces, windows, shared, rest, match_iou):
    """Rule 3: the pieces `rest` grouped into chains of pieces whose masks agree where their two
    windows overlap."""
    parent = {i: i for i in rest}

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in rest:
        for j, pixels in shared.get(i, {}).items():
            if (
                j > i
                and j in parent
                and _strip_iou(pieces[i], pieces[j], windows, pixels) >= match_iou
            ):
                parent[root(j)] = root(i)
    groups = {}
    for i in rest:
        groups.setdefault(root(i), []).append(i)
    return list(groups.values())


def _strip_iou(a, b, windows, pixels):
    """IoU of two pieces within the intersection of their windows, given the pixels they share
    (all inside it, since each mask lies in its own window)."""
    wa, wb = windows[a.window], windows[b.window]
    region = (
        max(wa.top, wb.top),
        max(wa.left, wb.left),
        min(wa.bottom, wb.bottom),
        min(wa.right, wb.right),
    )
    return pixels / (_pixels_in(a, region) + _pixels_in(b, region) - pixels)


def _union(pieces, group):
    """One Piece from the pieces `group`: union of masks and boxes, area-weighted mean score."""
    members = [pieces[i] for i in group]
    if len(members) == 1:
        return members[0]
    top, left = min(p.top for p in members), min(p.left for p in members)
    bottom, right = max(p.bottom for p in members), max(p.right for p in members)
    crop = np.zeros((bottom - top, right - left), dtype=bool)
    for p in members:
        crop[p.top - top : p.bottom - top, p.left - left : p.right - left] |= p.crop
    areas = np.array([p.area for p in members], dtype=np.float64)
    boxes = np.array([p.box for p in members])
    box = (*boxes[:, :2].min(axis=0), *boxes[:, 2:].max(axis=0))
    score = float(np.dot(areas, [p.score for p in members]) / areas.sum())
    area = int(np.count_nonzero(crop))
    return Piece(members[0].window, members[0].label, score, tuple(box), top, left, crop, area)


def _to_output(pieces, height, width):
    """The model interface for instances of a height x width image, in descending score, masks
    as compressed RLE."""
    pieces = sorted(pieces, key=lambda p: -p.score)
    return {
        "boxes": torch.tensor([p.box for p in pieces], dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor([p.label for p in pieces], dtype=torch.int64),
        "scores": torch.tensor([p.score for p in pieces], dtype=torch.float32),
        "masks": [crop_to_rle(p.crop, p.top, p.left, height, width) for p in pieces],
    }
