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
counts and pastes masks in a loop over detections. RCNNDetections runs rcnn_inference's stages,
the inference path predict.py runs too, written without those, so both formats hold one graph
that torch.export traces once with symbolic sizes; the ONNX file is converted from that graph by
torch.onnx's dynamo exporter. tests/test_export.py holds both files to the eager model.
ExportedModel runs on the CPU, OnnxModel on onnxruntime's providers (the CPU unless told).
"""

import argparse
import json
import os

import torch
from torch import nn
from torchvision.models.detection import MaskRCNN

import loading
import unet
from commands import one_line_errors
from errors import ConfigError
from exported import METADATA_KEY
from rcnn_inference import detect, paste_masks, resize_and_pad

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


class RCNNDetections(nn.Module):
    """A torchvision Mask R-CNN's evaluation forward pass on one image, returning (boxes, labels,
    scores, masks) as model([image])[0] does: rcnn_inference.detect, masks pasted at the image's
    size."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image):
        boxes, scores, labels, masks = detect(self.model, image)
        return boxes, labels, scores, paste_masks(masks, boxes, *image.shape[-2:])


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
