"""COCO results encoding: masks as RLE, boxes as XYWH, model labels as category ids.

Owns every conversion from a model's output, or a binary mask, to what COCO files hold:
`masks_to_rles` (a batch of float mask probabilities to compressed RLE, the same as pycocotools'
`mask.encode` of each thresholded mask), `compressed_rle` and `uncompressed_rle` (one binary
mask), `xyxy_to_xywh`, and the records built from them: `Detections` and `to_coco_results` for
the evaluator, `prediction_records` for predict.py's results.json.

Imports numpy and pycocotools' mask module, never torch: model outputs are read through their
own tensor methods, so that `python coco_eval.py` stays light.
"""

from typing import NamedTuple

import numpy as np
from pycocotools import mask as mask_util

MASK_THRESHOLD = 0.5


def to_numpy(values):
    """A numpy array of a tensor (detached, on the CPU) or of anything np.asarray takes."""
    if hasattr(values, "numpy"):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def uncompressed_rle(mask):
    """COCO uncompressed RLE of an [H, W] binary mask: the lengths of the runs of equal pixels in
    column-major order, beginning with a run of zeros (empty when the first pixel is set)."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    bounds = np.concatenate([[0], np.flatnonzero(flat[1:] != flat[:-1]) + 1, [flat.size]])
    counts = np.diff(bounds).tolist()
    return {"size": list(mask.shape), "counts": [0, *counts] if flat[:1].any() else counts}


def compressed_rle(mask):
    """COCO compressed RLE of an [H, W] binary mask, counts as str (as JSON files hold them)."""
    rle = mask_util.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def xyxy_to_xywh(boxes):
    """[N, 4] boxes (x0, y0, x1, y1), a tensor or an array, as a numpy array of (x, y, width,
    height) in the same dtype."""
    boxes = np.array(to_numpy(boxes))
    boxes[:, 2:] -= boxes[:, :2]
    return boxes


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


class Detections(NamedTuple):
    """One image's predictions as kept until evaluation: boxes and RLE, never full masks."""

    boxes: np.ndarray  # [N, 4] XYWH, in the model's float dtype
    scores: np.ndarray  # [N]
    category_ids: list
    mask_size: tuple | None  # (H, W) of the masks
    mask_counts: list | None  # compressed RLE counts, as str


def to_detections(prediction, label_to_category_id=None, with_masks=True):
    """One image's model output ({"boxes": XYXY, "scores", "labels", "masks": [N, 1, H, W]
    probabilities}, tensors) as Detections; labels become category ids through the mapping
    `label_to_category_id` (None: they are equal), masks RLE above MASK_THRESHOLD. Masks may also
    be a list of compressed RLE of the whole image (tiled inference)."""
    labels = prediction["labels"].tolist()
    if label_to_category_id is not None:
        labels = [label_to_category_id[label] for label in labels]
    mask_size = mask_counts = None
    if with_masks:
        mask_size, rles = _mask_rles(prediction["masks"], prediction.get("image_size"))
        mask_counts = [rle["counts"].decode("ascii") for rle in rles]
    boxes = xyxy_to_xywh(prediction["boxes"])
    return Detections(boxes, to_numpy(prediction["scores"]), labels, mask_size, mask_counts)


def _mask_rles(masks, image_size):
    """(H, W) and the RLE of each mask: [N, 1, H, W] probabilities are encoded; a list of RLE
    (tiled inference, which never holds whole-image masks) is taken as it is."""
    if isinstance(masks, list):
        size = tuple(masks[0]["size"]) if masks else tuple(image_size or (0, 0))
        return size, masks
    return tuple(masks.shape[-2:]), masks_to_rles(masks)


def to_coco_results(image_id, detections, iou_type):
    """One image's Detections as COCO results dicts for `iou_type` ("bbox" or "segm")."""
    common = zip(detections.category_ids, detections.scores.tolist(), strict=True)
    if iou_type == "bbox":
        boxes = detections.boxes.tolist()
        return [
            {"image_id": image_id, "category_id": c, "bbox": box, "score": s}
            for (c, s), box in zip(common, boxes, strict=True)
        ]
    size = list(detections.mask_size)
    return [
        {
            "image_id": image_id,
            "category_id": c,
            "segmentation": {"size": size, "counts": counts},
            "score": s,
        }
        for (c, s), counts in zip(common, detections.mask_counts, strict=True)
    ]


def prediction_records(
    prediction, image_id, label_to_category_id=None, category_names=None, extra=None
):
    """One image's model output as records for people and programs: image_id, the `extra` keys
    (e.g. file_name), category_id, category_name, bbox (XYWH, 2 decimals), score (5 decimals),
    and segmentation (compressed RLE, counts as str) when the output has masks.

    `category_names` is {category id: name}; an id without a name is named by its number.
    """
    detections = to_detections(prediction, label_to_category_id, "masks" in prediction)
    names = category_names or {}
    records = [
        {
            "image_id": image_id,
            **(extra or {}),
            "category_id": category_id,
            "category_name": names.get(category_id, str(category_id)),
            "bbox": [round(v, 2) for v in box],
            "score": round(score, 5),
        }
        for category_id, box, score in zip(
            detections.category_ids,
            detections.boxes.tolist(),
            detections.scores.tolist(),
            strict=True,
        )
    ]
    if detections.mask_counts is not None:
        size = list(detections.mask_size)
        for record, counts in zip(records, detections.mask_counts, strict=True):
            record["segmentation"] = {"size": size, "counts": counts}
    return records
