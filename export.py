r"""Exports a checkpoint of train.py to a file that runs without this repository's model code.

    python export.py --weights output/checkpoint.pth --format onnx --output model.onnx
    python export.py --weights output/checkpoint.pth --format torch-export --output model.pt2

A file takes one image, of any height and width (16 to 16384 pixels a side):

    image     float32 [3, H, W], RGB in [0, 1], as coco_utils.load_image reads images. No resizing
              or normalisation beforehand: the file resizes to the model's --min-size/--max-size
              and normalises as the model does.

A Mask R-CNN file returns what model([image])[0] returns in evaluation mode:

    boxes     float32 [N, 4], (x1, y1, x2, y2) in pixels of the input image
    labels    int64 [N], model labels: category id = label - label_offset
    scores    float32 [N], highest first
    masks     float32 [N, 1, H, W], mask probability at each input pixel; > 0.5 is the instance

with N up to --box-detections-per-img, and every detection scoring above --box-score-thresh
(apply a stricter threshold yourself, as predict.py's --score-thresh does). A U-Net file cannot
hold the seeded watershed that makes instances of the U-Net's maps (scipy and scikit-image code,
not tensor operations), so it returns the maps at the input size and the watershed runs outside:

    foreground  float32 [H, W], probability that a pixel belongs to an instance
    border      float32 [H, W], probability that it lies where instances meet
    classes     float32 [K, H, W], category probabilities (only with more than one category)

`unet.instances_from_maps(foreground, border, classes, **watershed)`, with the U-Net's watershed
thresholds saved in the file, turns them into detections; `--outputs detections` for a U-Net is
an error that says so.

Running a file. `exported.OnnxModel(path)` (onnxruntime) and `exported.ExportedModel(path)`
(torch.export.load) are callables with the detection interface: a list of [3, H, W] images in,
a list of dicts with boxes, labels, scores and masks out, the watershed of U-Net files included.
Their `category_names` and `label_offset` are the checkpoint's, saved as JSON in the file (the
ONNX metadata property `instance_segmentation`; the torch.export extra file
`instance_segmentation.json`), with the model name, the outputs and a U-Net's watershed
thresholds. Elsewhere, with onnxruntime alone:

    session = onnxruntime.InferenceSession("model.onnx")
    boxes, labels, scores, masks = session.run(None, {"image": image})  # image: [3, H, W]

and with torch alone: `import torchvision` first (the file calls torchvision's nms and
roi_align operators), then `torch.export.load("model.pt2").module()(image)`.

How. torchvision's Mask R-CNN does not export as it is: it branches in Python on sizes and box
counts and pastes masks in a loop over detections. RCNNDetections runs the same modules in the
same order without those, so both formats hold one graph that torch.export traces once with
symbolic sizes; the ONNX file is converted from that graph by torch.onnx's dynamo exporter.
NMS per class (per level in the RPN) shifts each class's boxes apart, as torchvision does on the
GPU and for small sets, and masks are pasted by matrix products (sums in another order, so
probabilities differ by about 1e-6). tests/test_export.py holds both files to the eager model.
ExportedModel runs on the CPU, OnnxModel on onnxruntime's providers (the CPU unless told).
"""

import argparse
import json
import os

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import boxes as box_ops
from torchvision.ops import roi_align

import loading
import unet
from commands import one_line_errors
from errors import ConfigError
from exported import METADATA_KEY

DETECTION_OUTPUTS = ("boxes", "labels", "scores", "masks")
MAP_OUTPUTS = ("foreground", "border", "classes")
# The image sides an exported file accepts; torch.export needs bounds.
MIN_SIDE, MAX_SIDE = 16, 16384


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", required=True, help="checkpoint written by train.py")
    parser.add_argument(
        "--format", required=True, choices=["onnx", "torch-export"], help="file format"
    )
    parser.add_argument("--output", required=True, help="file to write (.onnx or .pt2)")
    parser.add_argument(
        "--outputs",
        choices=["detections", "maps"],
        help="detections (boxes, labels, scores, masks: Mask R-CNN) or probability maps "
        "(U-Net); default: the model's",
    )
    return parser


def run(args):
    folder = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(folder):
        raise ConfigError(f"--output {args.output}: no such folder {folder}")
    loaded = loading.load(args.weights)
    model = loaded.model
    outputs = output_names(model, args.outputs)
    metadata = file_metadata(model, outputs, vars(loaded))
    program = exported_program(model)
    if args.format == "onnx":
        save_onnx(program, args.output, metadata)
    else:
        save_torch(program, args.output, metadata)
    print(f"wrote {args.output}: image [3, H, W] -> {', '.join(outputs)}")


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    with one_line_errors("export.py"):
        run(args)


def output_names(model, requested=None):
    """The outputs an exported file of `model` returns; ConfigError for what no file can hold.

    `requested` is "detections", "maps" or None for the model's own.
    """
    if isinstance(model, unet.UNet):
        if requested == "detections":
            raise ConfigError(
                "--outputs detections: a U-Net's instances come from a seeded watershed "
                "(scipy, scikit-image) that neither ONNX nor torch.export can hold; export "
                "--outputs maps and run unet.instances_from_maps on them (exported.OnnxModel does)"
            )
        return MAP_OUTPUTS if model.class_head is not None else MAP_OUTPUTS[:2]
    if isinstance(model, MaskRCNN):
        if requested == "maps":
            raise ConfigError("--outputs maps: Mask R-CNN has no probability maps to export")
        return DETECTION_OUTPUTS
    raise ConfigError(f"{type(model).__name__}: export.py exports Mask R-CNN and U-Net models")


def file_metadata(model, outputs, checkpoint=None):
    """What a program needs besides the outputs to use them, as saved in the exported file."""
    checkpoint = checkpoint or {}
    metadata = {
        "model": checkpoint.get("args", {}).get("model", type(model).__name__),
        "outputs": list(outputs),
        "category_names": {str(k): v for k, v in (checkpoint.get("category_names") or {}).items()},
        "label_offset": checkpoint.get("label_offset", 0),
    }
    if isinstance(model, unet.UNet):
        metadata["watershed"] = dict(model.watershed_kwargs)
    return metadata


def exported_program(model):
    """torch.export's program of `model` (Mask R-CNN or U-Net; put in eval mode) on one image
    of any size: Mask R-CNN as RCNNDetections, a U-Net as UNetMaps."""
    output_names(model)
    module = UNetMaps(model) if isinstance(model, unet.UNet) else RCNNDetections(model)
    module.eval()
    side = model.transform.min_size[-1]
    example = torch.rand(3, side, side + side // 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # torchvision's poolers infer the scales of the feature maps on their first call and
        # keep them: this call makes them constants of the program.
        model([example])
    height = torch.export.Dim("height", min=MIN_SIDE, max=MAX_SIDE)
    width = torch.export.Dim("width", min=MIN_SIDE, max=MAX_SIDE)
    return torch.export.export(
        module, (example,), dynamic_shapes=({1: height, 2: width},), strict=False
    )


def save_torch(program, path, metadata):
    torch.export.save(program, path, extra_files={f"{METADATA_KEY}.json": json.dumps(metadata)})


def save_onnx(program, path, metadata):
    onnx_program = torch.onnx.export(
        program, input_names=["image"], output_names=metadata["outputs"], verbose=False
    )
    onnx_program.model.metadata_props[METADATA_KEY] = json.dumps(metadata)
    onnx_program.save(path)


def export_torch(model, path, metadata=None):
    """Writes `model` (Mask R-CNN or U-Net) as a torch.export file (.pt2)."""
    metadata = metadata or file_metadata(model, output_names(model))
    save_torch(exported_program(model), path, metadata)


def export_onnx(model, path, metadata=None):
    """Writes `model` (Mask R-CNN or U-Net) as an ONNX file."""
    metadata = metadata or file_metadata(model, output_names(model))
    save_onnx(exported_program(model), path, metadata)


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
    mean = torch.as_tensor(transform.image_mean, dtype=image.dtype)[:, None, None]
    std = torch.as_tensor(transform.image_std, dtype=image.dtype)[:, None, None]
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


def multiscale_roi_align(pool, features, boxes):
    """MultiScaleRoIAlign on one image's boxes [N, 4] without taking N as a Python int: each
    box is pooled from its level's feature map, at the scales the pooler cached on its first
    call (exported_program makes that call)."""
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
    pixel = torch.arange(image_size, dtype=torch.float32)[None] - start[:, None].to(torch.float32)
    inside = (pixel >= 0) & (pixel <= (stop - start)[:, None].to(torch.float32))
    source = ((pixel + 0.5) * (source_size / length) - 0.5).clamp(min=0)
    first = source.floor().clamp(max=source_size - 1)
    fraction = (source - first).clamp(0, 1)
    second = (first + 1).clamp(max=source_size - 1)
    index = torch.arange(source_size, dtype=torch.float32)
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


class RCNNDetections(nn.Module):
    """A torchvision Mask R-CNN's evaluation forward pass on one image, returning (boxes, labels,
    scores, masks) as model([image])[0] does.

    The same computation as torchvision's, arranged so that torch.export can trace it with any
    image size: no Python branch on a size or a count of boxes, per-group NMS by offsets, and
    masks pasted by matrix products instead of a loop over detections.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image):
        height, width = image.shape[-2:]
        batch, size = resize_and_pad(self.model.transform, image)
        features = self.model.backbone(batch)
        proposals = self.proposals(batch, size, features)
        boxes, scores, labels = self.detections(features, proposals, size)
        masks = self.mask_probabilities(features, boxes, labels, size)
        boxes = scale_boxes(boxes, size, (height, width))
        return boxes, labels, scores, paste_masks(masks, boxes, height, width)

    def proposals(self, batch, size, features):
        """The RPN's proposals [P, 4] (RegionProposalNetwork.forward and filter_proposals)."""
        rpn = self.model.rpn
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
            levels.append(torch.full((k,), level, dtype=torch.int64))
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

    def detections(self, features, proposals, size):
        """Boxes, scores and labels after the box head (RoIHeads.postprocess_detections)."""
        heads = self.model.roi_heads
        x = heads.box_head(multiscale_roi_align(heads.box_roi_pool, features, proposals))
        class_logits, deltas = heads.box_predictor(x)
        num_classes = class_logits.shape[-1]
        boxes = heads.box_coder.decode_single(deltas, proposals).reshape(-1, num_classes, 4)
        boxes = box_ops.clip_boxes_to_image(boxes, size)[:, 1:].reshape(-1, 4)
        scores = F.softmax(class_logits, -1)[:, 1:].reshape(-1)
        labels = torch.arange(1, num_classes).repeat(proposals.shape[0])
        keep = torch.where(scores > heads.score_thresh)[0]
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = box_ops.remove_small_boxes(boxes, min_size=1e-2)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = batched_nms(boxes, scores, labels, heads.nms_thresh, size)
        keep = keep[: heads.detections_per_img]
        return boxes[keep], scores[keep], labels[keep]

    def mask_probabilities(self, features, boxes, labels, size):
        """[N, 1, M, M] mask probabilities of each detection's label (maskrcnn_inference)."""
        heads = self.model.roi_heads
        x = heads.mask_head(multiscale_roi_align(heads.mask_roi_pool, features, boxes))
        logits = heads.mask_predictor(x)
        return logits[torch.arange(labels.shape[0]), labels][:, None].sigmoid()


class UNetMaps(nn.Module):
    """A U-Net's probability maps of one image at its size, as UNet.predict_maps: (foreground,
    border) or (foreground, border, classes)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image):
        batch, (height, width) = resize_and_pad(self.model.transform, image)
        logits = self.model.network(batch)[0, :, :height, :width].float()
        return tuple(unet.image_maps(logits, image.shape[-2:]).values())


if __name__ == "__main__":
    main()
