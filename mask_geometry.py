"""Mask geometry and encoding, the one home of each: numpy arrays of tensors, instance stacks,
boxes, areas, shared pixels and IoU of binary masks, and COCO RLE both ways.

Boxes here are (top, left, bottom, right) in pixels, ends exclusive; torchvision's XYXY boxes
are (x0, y0, x1, y1) and say so where they appear. Two RLE encoders, for two inputs:
`masks_to_rles` encodes a batch of mask probabilities (a tensor of whole-image masks, on any
device) reading only the rows that hold pixels; `crop_to_rle` encodes one binary mask from the
crop that holds its pixels, never building the whole mask (compressed_rle and uncompressed_rle
are it for a whole numpy mask). `rle_to_crop` decodes one box of a mask.

Imports numpy and pycocotools' mask module, never torch: tensors are read through their own
methods, so that `python coco_eval.py` stays light.
"""

import numpy as np
from pycocotools import mask as mask_util

# A mask probability above this is the instance, as COCO evaluation binarises masks.
MASK_THRESHOLD = 0.5
# Detections scoring at least this are what predict.py writes by default, and what the DSB score,
# error analysis and TensorBoard's images count.
SCORE_THRESHOLD = 0.5


def to_numpy(values):
    """A numpy array of a tensor (detached, on the CPU) or of anything np.asarray takes, in the
    same dtype, but floats of 16 bits become float32 (numpy has no bfloat16)."""
    if not hasattr(values, "numpy"):
        return np.asarray(values)
    tensor = values.detach().cpu()
    if tensor.is_floating_point() and tensor.element_size() < 4:
        tensor = tensor.float()
    return tensor.numpy()


def instance_stack(masks):
    """[K, H, W] boolean masks from a stack or from an [H, W] label image, whose instance k is
    its k-th smallest nonzero label."""
    masks = to_numpy(masks)
    if masks.ndim == 2:
        labels = np.unique(masks)
        return masks[None] == labels[labels != 0][:, None, None]
    return masks.astype(bool, copy=False)


def mask_boxes(masks):
    """[N, 4] int64 (top, left, bottom, right) of each of [N, H, W] masks (arrays or tensors),
    ends exclusive; (0, 0, 0, 0) for an empty mask."""
    rows, columns = to_numpy(masks.any(2)), to_numpy(masks.any(1))
    first_row, first_column = rows.argmax(1), columns.argmax(1)
    end_row = rows.shape[1] - rows[:, ::-1].argmax(1)
    end_column = columns.shape[1] - columns[:, ::-1].argmax(1)
    boxes = np.stack([first_row, first_column, end_row, end_column], 1).astype(np.int64)
    return np.where(rows.any(1)[:, None], boxes, 0)


def mask_boxes_xyxy(masks):
    """[N, 4] float32 torchvision boxes (x0, y0, x1, y1) of mask_boxes: around each mask, to the
    pixel after the last; zeros for an empty mask."""
    return mask_boxes(masks)[:, [1, 0, 3, 2]].astype(np.float32)


def mask_areas(masks):
    """[N] int64 pixel counts of [N, H, W] boolean numpy masks."""
    return np.count_nonzero(masks, axis=(1, 2)).astype(np.int64, copy=False)


def box_overlap(*boxes):
    """The box (top, left, bottom, right) that all `boxes` share, as ints; None when they share
    no pixel."""
    top, left = max(int(b[0]) for b in boxes), max(int(b[1]) for b in boxes)
    bottom, right = min(int(b[2]) for b in boxes), min(int(b[3]) for b in boxes)
    return (top, left, bottom, right) if top < bottom and left < right else None


def shared_pixels(a, b, box, a_origin=(0, 0), b_origin=(0, 0)):
    """Pixels set in both boolean masks (numpy arrays or tensors) within `box` (top, left,
    bottom, right) of the image; each mask's pixel [0, 0] lies at its origin (a crop), or at
    (0, 0) when it covers the whole image. 0 when `box` is None."""
    if box is None:
        return 0
    both = _window(a, box, a_origin) & _window(b, box, b_origin)
    return int(np.count_nonzero(both) if isinstance(both, np.ndarray) else both.sum())


def _window(mask, box, origin):
    top, left, bottom, right = box
    return mask[top - origin[0] : bottom - origin[0], left - origin[1] : right - origin[1]]


def mask_ious(gt, pred):
    """[K, P] IoU of every ground-truth instance (rows) with every predicted one (columns).

    `gt` and `pred` are stacks or label images (see instance_stack) of the same height and width.
    An empty mask has IoU 0 with everything.
    """
    gt, pred = instance_stack(gt), instance_stack(pred)
    # Comparing only masks whose boxes overlap, on the overlap, keeps a few hundred nuclei in a
    # megapixel image cheap; a dense [K, H*W] @ [H*W, P] product would need gigabytes.
    iou = np.zeros((len(gt), len(pred)))
    gt_boxes, pred_boxes = mask_boxes(gt), mask_boxes(pred)
    gt_areas, pred_areas = mask_areas(gt), mask_areas(pred)
    top_left = np.maximum(gt_boxes[:, None, :2], pred_boxes[None, :, :2])
    bottom_right = np.minimum(gt_boxes[:, None, 2:], pred_boxes[None, :, 2:])
    for g, p in np.argwhere((top_left < bottom_right).all(-1)):
        intersection = shared_pixels(gt[g], pred[p], (*top_left[g, p], *bottom_right[g, p]))
        iou[g, p] = intersection / (gt_areas[g] + pred_areas[p] - intersection)
    return iou


def pairwise_intersections(gt, pred):
    """[K, P] pixel counts of gt object k AND prediction p (int64), for stacks or label images,
    derived from mask_ious."""
    gt, pred = instance_stack(gt), instance_stack(pred)
    return intersections_from_ious(mask_ious(gt, pred), mask_areas(gt), mask_areas(pred))


def intersections_from_ious(iou, gt_areas, pred_areas):
    """[K, P] int64 intersections of masks from their IoU and areas."""
    # IoU = I / (A + B - I) gives I = IoU (A + B) / (1 + IoU); rounding makes it exact again.
    areas = gt_areas[:, None] + pred_areas[None, :]
    return np.rint(iou * areas / (1 + iou)).astype(np.int64)


def masks_to_rles(masks, threshold=MASK_THRESHOLD):
    """Compressed RLEs (pycocotools format, counts as bytes) of an [N, 1, H, W] tensor of mask
    probabilities above `threshold`; the same as pycocotools.mask.encode of each thresholded
    mask. The masks may live on any device."""
    n, _, height, width = masks.shape
    if n == 0:
        return []
    masks = masks[:, 0].detach()
    first, stop = _rows_to_compare(masks, threshold)
    if masks.device.type != "cpu":
        # Compared where they are, one byte per pixel crosses to the host instead of four.
        masks = (masks > threshold).cpu()
    # Floats become float32 (which numpy reads; bfloat16 it does not); bool and integer masks
    # compare as they are.
    masks = masks.float().numpy() if masks.dtype.is_floating_point else masks.numpy()
    counts = _rle_counts(masks, first, stop, threshold)
    uncompressed = [{"size": [height, width], "counts": c} for c in counts]
    return mask_util.frPyObjects(uncompressed, height, width)


def _rows_to_compare(masks, threshold):
    """Per [H, W] mask tensor, the rows [first, stop) that can start a run: from the first row
    with a pixel above `threshold` to the row after the last one (0, 0 for an empty mask)."""
    # A max per row reads the masks at memory speed and writes almost nothing; comparing every
    # pixel would write a byte for each. A NaN propagates into the max and keeps its row.
    foreground = ~(masks.amax(dim=2) <= threshold)
    height = foreground.shape[1]
    first = foreground.byte().argmax(dim=1)  # 0 for an empty mask: argmax takes the first max
    last = height - 1 - foreground.flip(1).byte().argmax(dim=1)
    stop = (last + 2).clamp(max=height) * foreground.any(dim=1)  # 0 = first for an empty mask
    return first.cpu().numpy(), stop.cpu().numpy()


def _rle_counts(masks, first, stop, threshold):
    """Uncompressed RLE counts (uint32 arrays) of [N, H, W] masks above `threshold`, whose rows
    outside [first, stop) hold nothing (see _rows_to_compare)."""
    n, height, width = masks.shape
    rows, packed = _compare_and_pack(masks, first, stop, threshold)
    edges = masks[:, [0, -1]]  # first and last rows, where columns meet
    if edges.dtype != bool:
        edges = edges > threshold
    size = height * width
    # RLE counts are the gaps between run starts, beginning with a run of zeros: each mask's first
    # pixel starts a run, and again (an empty run of zeros) when it is set.
    dtype = np.int32 if (n + 1) * size < 2**31 else np.int64  # half the bytes for the sort
    starts = np.concatenate(
        [
            _starts_below(packed, rows, height, width).astype(dtype),
            _starts_across(edges, height).astype(dtype),
            np.flatnonzero(edges[:, 0, 0]).astype(dtype) * size,
            np.arange(n + 1, dtype=dtype) * size,
        ]
    )
    starts.sort()
    counts = np.diff(starts).astype(np.uint32)
    return np.split(counts, np.searchsorted(starts, np.arange(1, n) * size))


def _compare_and_pack(masks, first, stop, threshold):
    """Rows [first, stop) of each [H, W] mask compared with `threshold` (or taken as they are if
    boolean) and packed eight pixels to a byte, and their flat indices mask * H + row."""
    n, height, width = masks.shape
    spans = stop - first
    row_bytes = (width + 7) // 8
    # Rows padded to whole bytes let packbits pack the whole array in one flat call.
    padded = np.empty((spans.sum(), 8 * row_bytes), dtype=bool)
    padded[:, width:] = False
    offset = 0
    for mask, begin, end in zip(masks, first, stop, strict=True):
        compared = padded[offset : offset + end - begin, :width]
        if mask.dtype == bool:
            np.copyto(compared, mask[begin:end])
        else:
            np.greater(mask[begin:end], threshold, out=compared)
        offset += end - begin
    packed = np.packbits(padded.reshape(-1)).reshape(-1, row_bytes)
    span_offsets = np.cumsum(spans) - spans
    rows = np.arange(spans.sum()) + np.repeat(np.arange(n) * height + first - span_offsets, spans)
    return rows, packed


def _starts_below(packed, rows, height, width):
    """Run starts at pixels unlike the pixel above them, as positions mask * H * W + column * H +
    row, from the packed `rows` (flat indices); a row not among them holds nothing and has nothing
    above it."""
    # Reading columns top to bottom, as RLE does, a run starts where a pixel differs from the one
    # above it. Finding these in packed rows and sorting the few positions touches far less
    # memory than transposing every pixel, as mask.encode needs.
    row_bytes = packed.shape[1]
    above = np.zeros_like(packed)
    below_a_row = np.flatnonzero(rows[1:] == rows[:-1] + 1) + 1
    above[below_a_row] = packed[below_a_row - 1]
    changed = packed ^ above
    changed[rows % height == 0] = 0  # a column's first pixel follows the previous column's last
    changed = changed.reshape(-1)
    changed_bytes = np.flatnonzero(changed != 0)
    changed_bits = np.flatnonzero(np.unpackbits(changed[changed_bytes]))
    packed_row, byte = np.divmod(changed_bytes[changed_bits // 8], row_bytes)
    mask, row = np.divmod(rows[packed_row], height)
    column = 8 * byte + changed_bits % 8
    return mask * (height * width) + column * height + row


def _starts_across(edges, height):
    """Run starts at a column's first pixel when unlike the previous column's last, as positions;
    `edges` [N, 2, W] holds each mask's first and last row."""
    n, _, width = edges.shape
    across = np.flatnonzero(edges[:, 1, :-1] != edges[:, 0, 1:])
    mask, column = np.divmod(across, max(width - 1, 1))
    return mask * (height * width) + (column + 1) * height


def crop_to_rle(crop, top, left, height, width):
    """Compressed RLE (counts as bytes) of the height x width mask that holds the boolean `crop`
    at (top, left) and nothing else, built from the crop alone: what pycocotools.mask.encode of
    the full mask gives."""
    counts = crop_rle_counts(crop, top, left, height, width)
    return mask_util.frPyObjects([{"size": [height, width], "counts": counts}], height, width)[0]


def crop_rle_counts(crop, top, left, height, width):
    """Uncompressed RLE counts (uint32) of the mask of crop_to_rle: the lengths of the runs of
    equal pixels in column-major order, beginning with a run of zeros."""
    rows, columns = crop.shape
    # RLE reads the image column by column: a run starts wherever a pixel differs from the one
    # above it, the crop's outside being empty.
    padded = np.zeros((columns, rows + 2), dtype=np.int8)
    padded[:, 1:-1] = crop.T
    column, row = np.nonzero(np.diff(padded, axis=1))
    starts = (left + column.astype(np.int64)) * height + top + row
    # A run that reaches the image's last row and one that starts on the next column's first row
    # are one run, so the same position appears twice: it starts nothing.
    twice = np.flatnonzero(starts[1:] == starts[:-1])
    starts = np.delete(starts, np.concatenate([twice, twice + 1]))
    starts = starts[starts < height * width]  # a run ending with the image starts nothing
    return np.diff(np.concatenate([[0], starts, [height * width]])).astype(np.uint32)


def compressed_rle(mask):
    """COCO compressed RLE of an [H, W] binary mask, counts as str (as JSON files hold them)."""
    mask = np.asarray(mask, dtype=bool)
    rle = crop_to_rle(mask, 0, 0, *mask.shape)
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def uncompressed_rle(mask):
    """COCO uncompressed RLE of an [H, W] binary mask: the lengths of the runs of equal pixels in
    column-major order, beginning with a run of zeros (empty when the first pixel is set)."""
    mask = np.asarray(mask, dtype=bool)
    return {"size": list(mask.shape), "counts": crop_rle_counts(mask, 0, 0, *mask.shape).tolist()}


def rle_to_crop(rle, top, left, bottom, right):
    """Pixels [top, bottom) x [left, right) of the mask a compressed RLE holds, as a boolean
    array, decoded without the full-size mask."""
    height = rle["size"][0]
    ends = np.cumsum(_uncompress(rle["counts"]))
    run_starts, run_stops = ends[0:-1:2], ends[1::2]  # runs alternate, zeros first
    first_column, last_column = run_starts // height, (run_stops - 1) // height
    # Each run, split into its pieces of one column.
    spans = last_column - first_column + 1
    column = np.repeat(first_column, spans) + _ranges(spans)
    begin = np.where(
        column == np.repeat(first_column, spans), np.repeat(run_starts % height, spans), 0
    )
    end = np.where(
        column == np.repeat(last_column, spans),
        np.repeat((run_stops - 1) % height + 1, spans),
        height,
    )
    begin, end = np.clip(begin, top, bottom), np.clip(end, top, bottom)
    inside = (left <= column) & (column < right) & (begin < end)
    edges = np.zeros((bottom - top + 1, right - left), dtype=np.int32)
    np.add.at(edges, (begin[inside] - top, column[inside] - left), 1)
    np.add.at(edges, (end[inside] - top, column[inside] - left), -1)
    return np.cumsum(edges, axis=0)[:-1] > 0


def _ranges(lengths):
    """0, 1, ..., n - 1 for each n in `lengths`, concatenated."""
    offsets = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.arange(lengths.sum()) - offsets


def _uncompress(counts):
    """The run lengths of pycocotools' compressed counts (bytes or str)."""
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    values = []
    value = shift = 0
    # Each count is written in 5-bit groups, low bits first, as characters from '0'; bit 0x20
    # says another group follows, and 0x10 of the last one is the sign. From the third count on,
    # it is the difference from the count two before.
    for char in counts:
        group = char - 48
        value |= (group & 0x1F) << shift
        shift += 5
        if group & 0x20:
            continue
        if group & 0x10:
            value -= 1 << shift
        if len(values) > 2:
            value += values[-2]
        values.append(value)
        value = shift = 0
    return np.array(values, dtype=np.int64)
