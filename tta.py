"""Test-time augmentation: a detection model run on flipped (and, if asked, rescaled) copies of
each image, its detections mapped back onto the image and merged mask by mask.

    model = tta.TTA(model)                      # flips none, h, v, hv at scale 1
    model = tta.TTA(model, scales=(1.0, 1.5))   # the four flips at each scale: eight views

`TTA` wraps a model in eval mode that speaks torchvision's detection interface and predicts masks,
and speaks it too: a list of [3, H, W] float images in, per image a dict of `boxes` [N, 4] XYXY,
`labels`, `scores` (descending) and `masks` [N, 1, H, W] probabilities at the image's size. So
evaluation, predict.py and tiling.predict_tiled take it in place of the model. All views of a batch
go to the model in one call, which costs views x the model's time and memory.

Merge rule. Each view's masks and boxes are flipped back (and resized to the image). Then all
detections of all views, in descending score, are clustered: a detection joins the cluster whose
first (highest-scoring) member's mask it overlaps most, if that IoU of the masks thresholded at
`mask_threshold` is at least `match_iou`, the labels are equal and the cluster holds no detection
of its view yet; otherwise it starts a cluster. Each cluster becomes one instance:
  - mask: the mean of its members' mask probabilities. Views that missed the object are left out
    rather than counted as zeros: with zeros an object found by fewer than half the views would
    fall below the 0.5 threshold everywhere, and the rest would shrink to the pixels most views
    agree on, so how many views found an object would be counted twice, in the mask and the score;
  - score: the sum of its members' scores over the number of views, i.e. the mean score times the
    fraction of views that found it, so an object one view in four found ranks lower;
  - box: the mean of its members' boxes (a box head's regression is kept, not replaced by the
    mask's pixel box); label: the members' label.
"""

import torch
import torch.nn.functional as F

from errors import ConfigError
from mask_geometry import MASK_THRESHOLD, box_overlap, mask_boxes, shared_pixels

# The image dimensions each flip reverses.
FLIPS = {"none": (), "h": (-1,), "v": (-2,), "hv": (-2, -1)}


def check_tta(flips, scales):
    """Raises ConfigError for unknown flips or non-positive scales."""
    unknown = [f for f in flips if f not in FLIPS]
    if unknown or not flips:
        raise ConfigError(f"--tta-flips {' '.join(flips)}: choose from {', '.join(FLIPS)}")
    if not scales or min(scales) <= 0:
        raise ConfigError(f"--tta-scales {' '.join(map(str, scales))}: scales must be positive")


class TTA(torch.nn.Module):
    """A model that answers with the merged detections of `model` on several views of each image
    (see the module docstring)."""

    # What models.predicts_masks asks of a model without roi_heads: the merge needs masks.
    predicts_masks = True

    def __init__(
        self, model, flips=tuple(FLIPS), scales=(1.0,), match_iou=0.5, mask_threshold=MASK_THRESHOLD
    ):
        super().__init__()
        check_tta(flips, scales)
        self.model = model
        self.views = [(flip, scale) for scale in scales for flip in flips]
        self.match_iou = match_iou
        self.mask_threshold = mask_threshold

    def forward(self, images):
        inputs = [view_image(image, *view) for image in images for view in self.views]
        outputs = self.model(inputs)
        n = len(self.views)
        return [
            self.merge(outputs[k * n : (k + 1) * n], image.shape[-2:])
            for k, image in enumerate(images)
        ]

    def merge(self, outputs, size):
        """One image's detections from the outputs of its views."""
        undone = [
            undo_view(out, flip, size) for out, (flip, _) in zip(outputs, self.views, strict=True)
        ]
        return merge_views(undone, self.match_iou, self.mask_threshold)


def view_image(image, flip, scale=1.0):
    """The image as the model sees it in one view: resized by `scale`, then flipped."""
    if scale != 1.0:
        size = [max(1, round(s * scale)) for s in image.shape[-2:]]
        image = F.interpolate(image[None], size=size, mode="bilinear", antialias=True)[0]
    return _flip(image, flip)


def _flip(tensor, flip):
    return tensor.flip(FLIPS[flip]) if FLIPS[flip] else tensor


def undo_view(output, flip, size):
    """A view's detections on the image of `size` (H, W): masks and boxes flipped back and resized;
    `flip` is the view's flip."""
    if "masks" not in output:
        raise ConfigError("test-time augmentation merges masks: the model must predict them")
    masks = _flip(output["masks"], flip)
    view_height, view_width = masks.shape[-2:]
    boxes = output["boxes"].clone()
    if -1 in FLIPS[flip]:
        boxes[:, [0, 2]] = view_width - boxes[:, [2, 0]]
    if -2 in FLIPS[flip]:
        boxes[:, [1, 3]] = view_height - boxes[:, [3, 1]]
    height, width = size
    if (view_height, view_width) != (height, width):
        masks = F.interpolate(masks, size=(height, width), mode="bilinear")
        scale = [width / view_width, height / view_height] * 2
        boxes = boxes * torch.tensor(scale, dtype=boxes.dtype, device=boxes.device)
    return {**output, "boxes": boxes, "masks": masks}


def merge_views(outputs, match_iou=0.5, mask_threshold=MASK_THRESHOLD):
    """One image's instances from the un-flipped outputs of its views, by the rule of the module
    docstring."""
    masks = torch.cat([out["masks"] for out in outputs])
    boxes = torch.cat([out["boxes"] for out in outputs])
    scores = torch.cat([out["scores"] for out in outputs])
    labels = torch.cat([out["labels"] for out in outputs])
    view_ids = torch.cat([torch.full((len(out["scores"]),), k) for k, out in enumerate(outputs)])
    clusters = cluster(masks[:, 0] > mask_threshold, scores, labels, view_ids, match_iou)
    if not clusters:
        return {"boxes": boxes, "labels": labels, "scores": scores, "masks": masks}
    merged = {
        "boxes": torch.stack([boxes[c].mean(dim=0) for c in clusters]),
        "labels": torch.stack([labels[c[0]] for c in clusters]),
        "scores": torch.stack([scores[c].sum() / len(outputs) for c in clusters]),
        "masks": torch.stack([masks[c].mean(dim=0) for c in clusters]),
    }
    order = merged["scores"].argsort(descending=True, stable=True)
    return {key: value[order] for key, value in merged.items()}


def cluster(binary, scores, labels, view_ids, match_iou):
    """Lists of detection indices, one per object: the clusters of the module docstring, from
    [N, H, W] boolean masks and per-detection scores, labels and views."""
    boxes = mask_boxes(binary)
    areas = binary.flatten(1).sum(dim=1).tolist()
    labels, view_ids = labels.tolist(), view_ids.tolist()
    clusters = []
    for i in scores.argsort(descending=True, stable=True).tolist():
        best, best_iou = None, match_iou
        for members in clusters:
            seed = members[0]
            if labels[seed] != labels[i] or view_ids[i] in (view_ids[m] for m in members):
                continue
            inter = shared_pixels(binary[seed], binary[i], box_overlap(boxes[seed], boxes[i]))
            iou = inter / (areas[seed] + areas[i] - inter) if inter else 0.0
            if iou >= best_iou:
                best, best_iou = members, iou
        if best is None:
            clusters.append([i])
        else:
            best.append(i)
    return clusters
