"""One way from a model file to a model: `load(path)` reads a checkpoint of train.py, an ensemble
file of ensemble.py, or an ONNX (.onnx) or torch.export (.pt2) file of export.py, and returns a
LoadedModel: the model in evaluation mode with the categories it predicts.

predict.py, export.py and the benchmarks load models through it; train.py resumes with
checkpointing.read_checkpoint, since it restores more than a model.
"""

import dataclasses

import checkpointing
import ensemble
import models
from coco_utils import num_classes_of
from exported import ExportedModel, OnnxModel

KINDS = ("checkpoint", "ensemble", "onnx", "torch-export")


@dataclasses.dataclass
class LoadedModel:
    """A model from a file, in evaluation mode, with what turns its labels into categories:
    category id = label - label_offset."""

    model: object  # the detection interface: a list of [3, H, W] images in, dicts out
    kind: str  # one of KINDS
    category_names: dict  # {category id: name}; {} when the file holds none
    label_offset: int
    num_classes: int | None  # classes the model was built for, background included
    args: dict  # train.py's flags the model was trained with; {} for other files
    sources: dict = dataclasses.field(default_factory=dict)  # ensemble: {source: member model}


def load(path, device="cpu"):
    """The model a file holds, on `device` (exported files run where their runtime does), or
    CheckpointError naming the file."""
    if path.endswith(".onnx"):
        return from_exported(OnnxModel(path), "onnx")
    if path.endswith(".pt2"):
        return from_exported(ExportedModel(path), "torch-export")
    record = checkpointing.load_file(path)
    if isinstance(record, dict) and record.get("kind") == "ensemble":
        model, info = ensemble.ensemble_from_checkpoint(record, path, device)
        names, offset = info["category_names"] or {}, info["label_offset"]
        num_classes, sources = info["num_classes"], info["sources"]
        return LoadedModel(model, "ensemble", names, offset, num_classes, {}, sources)
    checkpoint = checkpointing.checked_checkpoint(record, path)
    model = models.model_from_checkpoint(checkpoint, path).to(device).eval()
    return LoadedModel(
        model,
        "checkpoint",
        checkpoint.get("category_names") or {},
        checkpoint.get("label_offset", 0),
        checkpoint.get("num_classes"),
        checkpoint["args"],
    )


def from_exported(model, kind):
    names, offset = model.category_names, model.label_offset
    return LoadedModel(model, kind, names, offset, num_classes_of(names, offset), {})
