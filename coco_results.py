"""COCO results encoding: masks as RLE, boxes as XYWH, model labels as category ids.

Owns every conversion from a model's output to what COCO files hold: `xyxy_to_xywh`, and the
records built with mask_geometry's RLE: `Detections` and `to_coco_results` for the evaluator,
`prediction_records` for predict.py's results.json.

Imports numpy and mask_geometry, never torch: model outputs are read through their own tensor
methods, so that `python coco_eval.py` stays light.
"""

from typing import NamedTuple

import numpy as np

from mask_geometry import masks_to_rles, to_numpy


def xyxy_to_xywh(boxes):
    """[N, 4] boxes (x0, y0, x1, y1), a tensor or an array, as a numpy array of (x, y, width,
    height) in the same dtype."""
    boxes = np.array(to_numpy(boxes))
    boxes[:, 2:] -= boxes[:, :2]
    return boxes


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
    `label_to_category_id` (None: they are equal), masks RLE above
    mask_geometry.MASK_THRESHOLD. Masks may also
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
