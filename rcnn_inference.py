"""torchvision Mask R-CNN's evaluation forward pass in stages: the one inference path that
predict.py (mask_crops.predict) and export.py (RCNNDetections) both run, through `detect`.

The stages, in order: resize_and_pad (GeneralizedRCNNTransform), backbone_features,
rpn_proposals (RegionProposalNetwork), box_detections and mask_probabilities (RoIHeads' two
branches; masks as [N, 1, M, M] probabilities in their boxes) and scale_boxes (back to the
input's pixels). Then `paste_masks` gives masks of the whole image (the exported files), or
mask_crops.paste_crops each mask inside its box only (predict.py).

They give the boxes, scores and labels of model([image])[0], running the same modules in the
same order as torchvision, arranged so that torch.export can trace them with any image size: no
Python branch on a size or a count of boxes, NMS per group by shifting each group's boxes apart
(as torchvision does on the GPU and for small sets), and masks pasted by matrix products instead
of a loop over detections (sums in another order, so probabilities differ by about 1e-6).
"""

import torch
import torch.nn.functional as F
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import boxes as box_ops
from torchvision.ops import roi_align


def detect(model, image, choose=None):
    """One [3, H, W] float image through every stage but the paste: (boxes in the image's pixels,
    scores, labels, [N, 1, M, M] mask probabilities). `choose(scores, labels)`, if given, returns
    the indices of the detections to keep, in order; only those go through the mask head."""
    batch, size = resize_and_pad(model.transform, image)
    features = backbone_features(model.backbone, batch)
    proposals = rpn_proposals(model.rpn, batch, size, features)
    boxes, scores, labels = box_detections(model.roi_heads, features, proposals, size)
    if choose is not None:
        order = choose(scores, labels).to(boxes.device)
        boxes, scores, labels = boxes[order], scores[order], labels[order]
    masks = mask_probabilities(model.roi_heads, features, boxes, labels, size)
    return scale_boxes(boxes, size, image.shape[-2:]), scores, labels, masks


def backbone_features(backbone, batch):
    """The backbone's feature maps of a padded batch, as {name: map}."""
    features = backbone(batch)
    return {"0": features} if isinstance(features, torch.Tensor) else features


def sizes_tensor(sizes, dtype=torch.float32):
    """Image sides (ints, or the symbols torch.export traces them as) as a tensor."""
    return torch.stack([torch.full((), side, dtype=dtype) for side in sizes])


def resize_and_pad(transform, image):
    """GeneralizedRCNNTransform's evaluation path for one image: the normalised image resized and
    padded as a batch [1, 3, H', W'], and its size (h, w) before padding.

    The sizes are computed in tensors and read back as new symbols: the resized size as
    F.interpolate computes it from a scale factor (in double precision, rounded down), the
    padded one as a number of blocks of `size_divisible`. torch.export then traces the network
    over multiples of two symbols instead of expressions of the input size, which made the
    export, the ONNX conversion and torch.export.load each several times slower.
    """
    like_image = {"dtype": image.dtype, "device": image.device}
    mean = torch.as_tensor(transform.image_mean, **like_image)[:, None, None]
    std = torch.as_tensor(transform.image_std, **like_image)[:, None, None]
    # Double precision tensors, not Python floats: the ONNX exporter lowers Python float
    # arithmetic on sizes to float32, which can round a side down by a pixel
    # (301 * (160 / 301) = 159.99998).
    shape = sizes_tensor(image.shape[-2:], torch.float64)
    scale = torch.minimum(transform.min_size[-1] / shape.min(), transform.max_size / shape.max())
    size = (shape * scale).floor()
    divisor = transform.size_divisible
    height, width, blocks_y, blocks_x = torch.cat([size, (size / divisor).ceil()]).long().tolist()
    for side in (height, width):
        torch._check(side >= 1)
        torch._check(side <= transform.max_size)
    for blocks in (blocks_y, blocks_x):
        torch._check(blocks >= 1)
    batch = F.interpolate(
        ((image - mean) / std)[None], size=(height, width), mode="bilinear", align_corners=False
    )
    padding = (0, blocks_x * divisor - width, 0, blocks_y * divisor - height)
    return F.pad(batch, padding), (height, width)


def batched_nms(boxes, scores, groups, threshold, size):
    """NMS within each group, as torchvision's batched_nms, for boxes clipped to `size`: shifting
    each group by more than the image size keeps groups apart without reading the boxes."""
    offsets = groups.to(boxes) * (torch.sym_max(size[0], size[1]) + 1)
    return box_ops.nms(boxes + offsets[:, None], scores, threshold)


def multiscale_roi_align(pool, features, boxes, size):
    """MultiScaleRoIAlign on one image's boxes [N, 4] without taking N as a Python int: each
    box is pooled from its level's feature map, at the scales the pooler cached on its first
    call (exported_program makes that call before tracing)."""
    if pool.scales is None:
        # torchvision's pooler infers the feature maps' scales on its first call and keeps them.
        return pool(features, [boxes], [size])
    maps = [feature for name, feature in features.items() if name in pool.featmap_names]
    rois = torch.cat([torch.zeros_like(boxes[:, :1]), boxes], dim=1)
    levels = pool.map_levels([boxes])
    pooled = boxes.new_zeros((boxes.shape[0], maps[0].shape[1], *pool.output_size))
    for level, (feature, scale) in enumerate(zip(maps, pool.scales, strict=True)):
        index = torch.where(levels == level)[0]
        level_pooled = roi_align(feature, rois[index], pool.output_size, scale, pool.sampling_ratio)
        pooled = pooled.index_put((index,), level_pooled)
    return pooled


def resampling_weights(start, stop, source_size, image_size):
    """[N, image_size, source_size] weights that place N rows of `source_size` samples, resized
    bilinearly (align_corners=False, as F.interpolate) to stop - start + 1 pixels, at pixels
    start..stop of an image row of `image_size` pixels, and zero elsewhere."""
    length = (stop - start + 1).clamp(min=1).to(torch.float32)[:, None]
    pixel = torch.arange(image_size, dtype=torch.float32, device=start.device)[None]
    pixel = pixel - start[:, None].to(torch.float32)
    inside = (pixel >= 0) & (pixel <= (stop - start)[:, None].to(torch.float32))
    source = ((pixel + 0.5) * (source_size / length) - 0.5).clamp(min=0)
    first = source.floor().clamp(max=source_size - 1)
    fraction = (source - first).clamp(0, 1)
    second = (first + 1).clamp(max=source_size - 1)
    index = torch.arange(source_size, dtype=torch.float32, device=start.device)
    weights = (1 - fraction)[..., None] * (index == first[..., None]) + fraction[..., None] * (
        index == second[..., None]
    )
    return weights * inside[..., None]


def paste_masks(masks, boxes, height, width, padding=1):
    """torchvision's paste_masks_in_image without its loop over detections: [N, 1, M, M] mask
    probabilities in their boxes to [N, 1, height, width]. Bilinear resizing is separable, so
    each mask is resized and placed by two matrix products."""
    size = masks.shape[-1]
    scale = (size + 2 * padding) / size
    masks = F.pad(masks[:, 0], (padding,) * 4)
    half_width = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale
    half_height = (boxes[:, 3] - boxes[:, 1]) * 0.5 * scale
    centre_x = (boxes[:, 2] + boxes[:, 0]) * 0.5
    centre_y = (boxes[:, 3] + boxes[:, 1]) * 0.5
    x0, x1 = (centre_x - half_width).to(torch.int64), (centre_x + half_width).to(torch.int64)
    y0, y1 = (centre_y - half_height).to(torch.int64), (centre_y + half_height).to(torch.int64)
    rows = resampling_weights(y0, y1, masks.shape[-2], height)
    columns = resampling_weights(x0, x1, masks.shape[-1], width)
    return (rows @ masks @ columns.transpose(1, 2))[:, None]


def scale_boxes(boxes, size, original_size):
    """Boxes of the resized image in pixels of the original one, with torchvision's float32
    ratios (resize_boxes)."""
    ratio_y, ratio_x = (sizes_tensor(original_size) / sizes_tensor(size)).unbind()
    x0, y0, x1, y1 = boxes.unbind(1)
    return torch.stack((x0 * ratio_x, y0 * ratio_y, x1 * ratio_x, y1 * ratio_y), dim=1)


def rpn_proposals(rpn, batch, size, features):
    """The RPN's proposals [P, 4] (RegionProposalNetwork.forward and filter_proposals)."""
    maps = list(features.values())
    objectness, deltas = rpn.head(maps)
    anchors = rpn.anchor_generator(ImageList(batch, [size]), maps)[0]
    # Anchor order (y, x, anchor) as concat_box_prediction_layers, whose views with an
    # inferred (-1) size make torch.export minutes slower.
    objectness = [o[0].permute(1, 2, 0).flatten() for o in objectness]
    deltas = [d[0].unflatten(0, (d.shape[1] // 4, 4)).permute(2, 3, 0, 1) for d in deltas]
    boxes = rpn.box_coder.decode_single(torch.cat([d.flatten(0, 2) for d in deltas]), anchors)
    top, levels = [], []
    start = 0
    for level, level_objectness in enumerate(objectness):
        k = torch.sym_min(level_objectness.shape[0], rpn.pre_nms_top_n())
        top.append(level_objectness.topk(k).indices + start)
        levels.append(torch.full((k,), level, dtype=torch.int64, device=boxes.device))
        start = start + level_objectness.shape[0]
    top, levels = torch.cat(top), torch.cat(levels)
    boxes = box_ops.clip_boxes_to_image(boxes[top], size)
    scores = torch.sigmoid(torch.cat(objectness)[top])
    keep = box_ops.remove_small_boxes(boxes, rpn.min_size)
    boxes, scores, levels = boxes[keep], scores[keep], levels[keep]
    keep = torch.where(scores >= rpn.score_thresh)[0]
    boxes, scores, levels = boxes[keep], scores[keep], levels[keep]
    keep = batched_nms(boxes, scores, levels, rpn.nms_thresh, size)
    return boxes[keep[: rpn.post_nms_top_n()]]


def box_detections(heads, features, proposals, size):
    """Boxes, scores and labels after the box head (RoIHeads.postprocess_detections)."""
    x = heads.box_head(multiscale_roi_align(heads.box_roi_pool, features, proposals, size))
    class_logits, deltas = heads.box_predictor(x)
    num_classes = class_logits.shape[-1]
    boxes = heads.box_coder.decode_single(deltas, proposals).reshape(-1, num_classes, 4)
    boxes = box_ops.clip_boxes_to_image(boxes, size)[:, 1:].reshape(-1, 4)
    scores = F.softmax(class_logits, -1)[:, 1:].reshape(-1)
    labels = torch.arange(1, num_classes, device=proposals.device).repeat(proposals.shape[0])
    keep = torch.where(scores > heads.score_thresh)[0]
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    keep = box_ops.remove_small_boxes(boxes, min_size=1e-2)
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    keep = batched_nms(boxes, scores, labels, heads.nms_thresh, size)
    keep = keep[: heads.detections_per_img]
    return boxes[keep], scores[keep], labels[keep]


def mask_probabilities(heads, features, boxes, labels, size):
    """[N, 1, M, M] mask probabilities of each detection's label (maskrcnn_inference)."""
    x = heads.mask_head(multiscale_roi_align(heads.mask_roi_pool, features, boxes, size))
    logits = heads.mask_predictor(x)
    return logits[torch.arange(labels.shape[0], device=labels.device), labels][:, None].sigmoid()
