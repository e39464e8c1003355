"""Runs the files export.py writes: `OnnxModel(path)` (onnxruntime) and `ExportedModel(path)`
(torch.export.load) are callables with the detection interface, a list of [3, H, W] images in
and per image a dict with boxes, labels, scores and masks out, the watershed of U-Net files
included. Their `category_names` and `label_offset` are the checkpoint's, read from the JSON
export.py saves in the file (see export.py for the format).
"""

import json
import os

import torch

import unet
from errors import CheckpointError, first_line

# The name of the JSON metadata in an exported file: the ONNX metadata property, and the
# torch.export extra file with ".json" appended.
METADATA_KEY = "instance_segmentation"


class ExportedFile:
    """The detection interface over an exported file's outputs: `model(images)` takes a list of
    float [3, H, W] images in [0, 1] and returns per image a dict with boxes, labels, scores and
    masks, as the eager model does; a U-Net file's maps go through the watershed here.

    `metadata` is the JSON saved at export; `category_names` ({category id: name}) and
    `label_offset` are the checkpoint's ({} and 0 for a model exported without one).
    """

    def __init__(self, path, metadata):
        self.path = path
        self.metadata = metadata
        self.predicts_masks = "masks" in metadata["outputs"] or "foreground" in metadata["outputs"]
        self.category_names = {int(k): v for k, v in metadata["category_names"].items()}
        self.label_offset = metadata["label_offset"]

    def __call__(self, images):
        return [self.detections(self.run(image)) for image in images]

    def run(self, image):
        """The file's outputs on one image, by name."""
        raise NotImplementedError

    def detections(self, outputs):
        if "foreground" in outputs:
            return unet.instances_from_maps(**outputs, **self.metadata["watershed"])
        return outputs


def read_metadata(text, path):
    if text is None:
        raise CheckpointError(f"{path}: holds no {METADATA_KEY} metadata (not from export.py)")
    return json.loads(text)


class OnnxModel(ExportedFile):
    """An ONNX file of export.py, run by onnxruntime on `providers` (the CPU's by default)."""

    def __init__(self, path, providers=None):
        import onnxruntime

        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: no such file")
        try:
            self.session = onnxruntime.InferenceSession(
                path, providers=providers or ["CPUExecutionProvider"]
            )
        except Exception as e:
            raise CheckpointError(f"{path}: not an ONNX model ({first_line(e)})") from None
        text = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        super().__init__(path, read_metadata(text, path))
        self.output_names = [output.name for output in self.session.get_outputs()]

    def run(self, image):
        arrays = self.session.run(None, {"image": image.detach().float().cpu().numpy()})
        return {
            name: torch.from_numpy(array).to(image.device)
            for name, array in zip(self.output_names, arrays, strict=True)
        }


class ExportedModel(ExportedFile):
    """A torch.export file (.pt2) of export.py, run on the CPU."""

    def __init__(self, path):
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: no such file")
        extra_files = {f"{METADATA_KEY}.json": None}
        try:
            self.module = torch.export.load(path, extra_files=extra_files).module()
        except Exception as e:
            raise CheckpointError(f"{path}: not a torch.export file ({first_line(e)})") from None
        super().__init__(path, read_metadata(extra_files[f"{METADATA_KEY}.json"], path))

    @torch.no_grad()
    def run(self, image):
        outputs = self.module(image.detach().float().cpu())
        return {
            name: output.to(image.device)
            for name, output in zip(self.metadata["outputs"], outputs, strict=True)
        }
