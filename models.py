"""Models by name: the one place train.py gets a model from, and where a checkpoint's model is
rebuilt.

`get_model(args, num_classes)` builds `args.model` (a torchvision detection model, or a U-Net of
unet.py) with the model flags of `add_model_args`, loading `--weights` and re-initialising the
class-dependent layers when the class count differs. `model_from_checkpoint(checkpoint, path)`
rebuilds the model a checkpoint of train.py was trained as, with its weights; loading.py reads
model files of every kind.
"""

import argparse
import math
import os
import re

import torch
import torchvision
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

import checkpointing
import unet
import utils
from errors import CheckpointError, ConfigError
from tiling import TiledModel
from tta import TTA

# Flags whose default (None) keeps the builder's own value, given in the help.
SIZE_AND_RCNN_FLAGS = (
    ("--trainable-backbone-layers", int, "0-5; with pretrained weights"),
    ("--min-size", int, "shorter image side fed to the model (800)"),
    ("--max-size", int, "longer image side limit (1333)"),
    ("--rpn-score-thresh", float, "RPN proposal score threshold"),
    ("--rpn-post-nms-top-n-train", int, "RPN proposals kept in training (2000)"),
    ("--rpn-post-nms-top-n-test", int, "RPN proposals kept at inference (1000)"),
    ("--box-batch-size-per-image", int, "RoIs sampled per training image (512)"),
    ("--box-positive-fraction", float, "largest fraction of positives among them (0.25)"),
    ("--box-score-thresh", float, "lowest score of a kept detection (0.05)"),
    (
        "--box-nms-thresh",
        float,
        "IoU above which a detection suppresses another (0.5); higher keeps touching objects",
    ),
)
# R-CNNs on any torchvision ResNet-family backbone (maskrcnn_resnet18_fpn, ...), built here:
# torchvision builds them on a ResNet-50 with 256 FPN channels only.
RCNN_FPN_NAME = re.compile(r"(maskrcnn|fasterrcnn)_(.+)_fpn")
RESNET_PREFIXES = ("resnet", "resnext", "wide_resnet")
# The U-Net's flags: flag, default (its type is the flag's), help.
UNET_FLAGS = (
    ("--unet-border-width", 2, "pixels (of the resized image) either side of where nuclei meet "
     "that are border"),
    ("--unet-border-weight", 2.0, "factor on the border loss"),
    ("--unet-foreground-thresh", 0.5, "foreground probability above which a pixel belongs to a "
     "nucleus; at least 0.5"),
    ("--unet-border-thresh", 0.5, "border probability above which a pixel is no seed of the "
     "watershed"),
    ("--unet-min-area", 10, "smallest instance kept, in pixels"),
)  # fmt: skip
# Layers of the R-CNN models that depend on the number of classes; fine-tuning re-initialises them.
RCNN_CLASS_DEPENDENT_PREFIXES = (
    "roi_heads.box_predictor.",
    "roi_heads.mask_predictor.mask_fcn_logits.",
)


def add_model_args(parser):
    """The model flags, shared by train.py and every command that rebuilds a saved model."""
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model",
        default="maskrcnn_resnet50_fpn",
        help="torchvision detection model name; maskrcnn_<resnet>_fpn or fasterrcnn_<resnet>_fpn "
        "for another ResNet-family backbone (maskrcnn_resnet18_fpn); or a U-Net: "
        f"{', '.join(unet.MODELS)}",
    )
    model.add_argument(
        "--weights", help="torchvision weights (MaskRCNN_ResNet50_FPN_Weights.COCO_V1) or a file"
    )
    model.add_argument("--weights-backbone", help="torchvision backbone weights name")
    model.add_argument(
        "--num-classes",
        type=int,
        help="classes including background (default: largest category id + 1; 91 for COCO)",
    )
    for flag, kind, text in SIZE_AND_RCNN_FLAGS:
        model.add_argument(flag, type=kind, help=text)
    model.add_argument(
        "--fpn-channels",
        type=int,
        help="channels of the FPN and of the mask head's convolutions (256), for "
        "maskrcnn_<resnet>_fpn and fasterrcnn_<resnet>_fpn models",
    )
    model.add_argument(
        "--image-scale",
        type=float,
        help="resize every image by this one factor (1: the images' own scale) instead of to "
        "--min-size/--max-size, in training, evaluation and predict.py alike; for objects of "
        "a fixed size in pixels, such as nuclei",
    )
    model.add_argument(
        "--box-detections-per-img", default=100, type=int, help="detections kept per image"
    )
    model.add_argument(
        "--anchor-sizes",
        type=int,
        nargs="+",
        help="RPN anchor size in pixels (of the resized image) for each of the 5 FPN levels "
        "(default 32 64 128 256 512); 8 16 32 64 128 for objects under about 32 px",
    )
    model.add_argument("--sync-bn", action="store_true", help="synchronised BatchNorm under DDP")
    add_unet_args(parser)
    return parser


def add_unet_args(parser):
    """The U-Net's own flags: the targets and losses it learns, and its watershed."""
    group = parser.add_argument_group("U-Net (unet_*)")
    for flag, default, text in UNET_FLAGS:
        group.add_argument(flag, default=default, type=type(default), help=f"{text} ({default})")


def add_inference_args(parser):
    """How evaluation and predict.py run a model: window by window, and over flipped views."""
    group = parser.add_argument_group("inference")
    group.add_argument(
        "--tile",
        type=int,
        help="run window by window: windows of this many pixels (the model's input size), for "
        "images too large to segment at once",
    )
    group.add_argument(
        "--tile-overlap", default=64, type=int, help="pixels neighbouring windows share (64)"
    )
    group.add_argument(
        "--tta",
        action="store_true",
        help="test-time augmentation: horizontal and vertical flips, merged mask by mask",
    )


def inference_model(args, model):
    """`model` as evaluation and predict.py run it: with --tta over flipped views, with --tile
    window by window."""
    if args.tta:
        model = TTA(model)
    if args.tile is not None:
        model = TiledModel(model, args.tile, args.tile_overlap)
    return model


def raise_score_threshold(model, score_thresh):
    """Makes an R-CNN drop detections scoring under `score_thresh` itself, before its mask head
    and before tiling merges windows; other models are left as they are. The detections kept are
    those it gave before, scoring at least `score_thresh`: NMS and the per-image cap only ever
    prefer higher scores."""
    heads = getattr(model, "roi_heads", None)
    if heads is not None and hasattr(heads, "score_thresh"):
        # torchvision keeps scores above its threshold, predict.py those at or above; both
        # compare float32 scores with the threshold as float32.
        threshold = torch.tensor(score_thresh, dtype=torch.float32)
        below = torch.nextafter(threshold, torch.tensor(-math.inf)).item()
        heads.score_thresh = max(heads.score_thresh, below)


def model_defaults():
    """The model flags' defaults, as a namespace."""
    return add_model_args(argparse.ArgumentParser(add_help=False)).parse_args([])


def dests(flags):
    """The argparse destinations of a table of flags."""
    return [flag[0].removeprefix("--").replace("-", "_") for flag in flags]


def model_kwargs(args):
    """Keyword arguments for the model builder; unset options keep the builder's defaults."""
    kwargs = {"min_size": args.min_size, "max_size": args.max_size}
    if args.trainable_backbone_layers is not None:
        kwargs["trainable_backbone_layers"] = args.trainable_backbone_layers
    if is_unet(args.model):
        # --unet-border-width is the U-Net's border_width, and so on.
        kwargs.update({dest[len("unet_") :]: getattr(args, dest) for dest in dests(UNET_FLAGS)})
    if "rcnn" in args.model:
        # --rpn-score-thresh is torchvision's rpn_score_thresh, and so on.
        rcnn = [dest for dest in dests(SIZE_AND_RCNN_FLAGS) if dest.startswith(("rpn_", "box_"))]
        kwargs.update({dest: getattr(args, dest) for dest in [*rcnn, "box_detections_per_img"]})
        kwargs["anchor_sizes"] = args.anchor_sizes
    kwargs["fpn_channels"] = args.fpn_channels
    kwargs["image_scale"] = args.image_scale
    return {k: v for k, v in kwargs.items() if v is not None}


def set_anchor_sizes(model, sizes):
    """One anchor size per FPN level, three aspect ratios each: the count per location of every
    torchvision R-CNN builder, so its RPN head fits. Set after building because some builders
    (the _v2 ones) pass their own anchor generator."""
    model.rpn.anchor_generator = AnchorGenerator(
        sizes=tuple((s,) for s in sizes), aspect_ratios=((0.5, 1.0, 2.0),) * len(sizes)
    )


class FixedScaleTransform(GeneralizedRCNNTransform):
    """GeneralizedRCNNTransform resizing every image by one factor, whatever its size: objects
    keep the size in pixels they were trained at, where --min-size/--max-size make it depend on
    the image's. Normalisation, batching and mapping predictions back are torchvision's."""

    def __init__(self, scale, image_mean, image_std, size_divisible):
        super().__init__(1, 1, image_mean, image_std, size_divisible=size_divisible)
        self.scale = scale

    def resize(self, image, target=None):
        if self.scale == 1:
            return image, target
        size = [round(side * self.scale) for side in image.shape[-2:]]
        resized = torch.nn.functional.interpolate(
            image[None], size=size, mode="bilinear", align_corners=False
        )[0]
        if target is None:
            return resized, target
        target = dict(target, boxes=resize_boxes(target["boxes"], image.shape[-2:], size))
        if "masks" in target:
            masks = target["masks"][:, None].float()
            target["masks"] = torch.nn.functional.interpolate(masks, size=size)[:, 0].byte()
        return resized, target

    def __repr__(self):
        return f"{type(self).__name__}(scale={self.scale:g})"


def set_image_scale(model, scale):
    """Makes `model` (an R-CNN or U-Net) resize its images by the fixed factor `scale`."""
    if scale <= 0:
        raise ConfigError(f"--image-scale {scale:g}: must be positive")
    old = model.transform
    model.transform = FixedScaleTransform(scale, old.image_mean, old.image_std, old.size_divisible)


def resnet_rcnn_parts(name):
    """(family, backbone) of an R-CNN name built on a ResNet-family backbone, else None."""
    match = RCNN_FPN_NAME.fullmatch(name)
    backbones = torchvision.models.list_models(module=torchvision.models)
    if match is None or match[2] not in backbones or not match[2].startswith(RESNET_PREFIXES):
        return None
    return match[1], match[2]


def frozen_stages(pretrained, trainable_layers):
    """The backbone stages frozen, by torchvision's detection builders' rule: a pretrained
    backbone trains its top `trainable_layers` stages (3 by default), one from scratch all 5."""
    if not pretrained:
        return []
    trainable = 3 if trainable_layers is None else trainable_layers
    return ["conv1", "layer1", "layer2", "layer3", "layer4"][: 5 - trainable]


def build_resnet_rcnn(
    name,
    weights=None,
    weights_backbone=None,
    trainable_backbone_layers=None,
    num_classes=None,
    fpn_channels=256,
    **kwargs,
):
    """An R-CNN with an FPN on any torchvision ResNet-family backbone, laid out as torchvision's
    ResNet-50 builders lay theirs out (same state dict keys), with `fpn_channels` channels in the
    FPN and in the mask head's convolutions."""
    if weights is not None:
        raise ConfigError(
            f"--weights {weights}: torchvision's detection weights fit its own builders only "
            f"(ResNet-50, 256 FPN channels), not {name} as built here with --fpn-channels "
            f"{fpn_channels}; give a checkpoint file of this repo"
        )
    if fpn_channels < 1:
        raise ConfigError(f"--fpn-channels {fpn_channels}: must be at least 1")
    family, backbone_name = resnet_rcnn_parts(name)
    pretrained = weights_backbone is not None
    # A pretrained backbone keeps its BatchNorm statistics, as in torchvision's builders.
    body = torchvision.models.get_model(
        backbone_name,
        weights=weights_backbone,
        norm_layer=FrozenBatchNorm2d if pretrained else torch.nn.BatchNorm2d,
    )
    for stage in frozen_stages(pretrained, trainable_backbone_layers):
        getattr(body, stage).requires_grad_(False)
    # Each ResNet stage has half the channels of the next; fc reads the last one's.
    top = body.fc.in_features
    backbone = BackboneWithFPN(
        body,
        return_layers={f"layer{i}": str(i - 1) for i in range(1, 5)},
        in_channels_list=[top // 8, top // 4, top // 2, top],
        out_channels=fpn_channels,
        extra_blocks=LastLevelMaxPool(),
    )
    if family == "fasterrcnn":
        return FasterRCNN(backbone, num_classes=num_classes, **kwargs)
    return MaskRCNN(
        backbone,
        box_predictor=FastRCNNPredictor(1024, num_classes),  # TwoMLPHead's 1024 features
        mask_head=MaskRCNNHeads(fpn_channels, [fpn_channels] * 4, dilation=1),
        mask_predictor=MaskRCNNPredictor(fpn_channels, fpn_channels, num_classes),
        **kwargs,
    )


def built_here(name, kwargs):
    """Whether `name` is an R-CNN this module builds rather than torchvision."""
    if resnet_rcnn_parts(name) is None:
        if kwargs.get("fpn_channels") is not None:
            raise ConfigError(
                f"--fpn-channels: only for maskrcnn_<resnet>_fpn and fasterrcnn_<resnet>_fpn "
                f"models, not {name}"
            )
        return False
    return name not in torchvision.models.list_models() or kwargs.get("fpn_channels") is not None


def build(name, anchor_sizes=None, image_scale=None, **kwargs):
    """A model by name: a U-Net of unet.py, an R-CNN on a ResNet-family backbone or any
    torchvision model; with `image_scale`, resizing its images by that fixed factor."""
    model = build_by_name(name, anchor_sizes, **kwargs)
    if image_scale is not None:
        set_image_scale(model, image_scale)
    return model


def build_by_name(name, anchor_sizes=None, **kwargs):
    if built_here(name, kwargs):
        model = build_resnet_rcnn(name, **kwargs)
        if anchor_sizes:
            set_anchor_sizes(model, anchor_sizes)
        return model
    kwargs.pop("fpn_channels", None)
    if is_unet(name):
        try:
            return unet.MODELS[name](**kwargs)
        except ValueError as e:
            raise ConfigError(f"--model {name}: {e}") from None
    try:
        model = torchvision.models.get_model(name, **kwargs)
    except ValueError as e:
        if name not in torchvision.models.list_models():
            raise ConfigError(f"--model {name}: no such torchvision model or U-Net") from None
        raise ConfigError(f"--model {name}: {e}") from None
    if anchor_sizes:
        set_anchor_sizes(model, anchor_sizes)
    return model


def get_model(args, num_classes):
    """Builds `args.model`; `--weights` may name torchvision weights or a local file."""
    kwargs = model_kwargs(args)
    if args.weights and not os.path.isfile(args.weights):
        try:
            weights = torchvision.models.get_weight(args.weights)
        except (ValueError, KeyError):
            raise ConfigError(
                f"--weights {args.weights}: neither a file nor a torchvision weights name"
            ) from None
        model = build(args.model, weights=weights, **kwargs)
        if len(weights.meta["categories"]) != num_classes:
            replace_class_layers(model, num_classes)
        return model
    model = build(
        args.model,
        weights=None,
        weights_backbone=args.weights_backbone,
        num_classes=num_classes,
        **kwargs,
    )
    if args.weights:
        load_fitting_weights(model, args.weights)
    return model


def class_dependent_prefixes(model):
    return getattr(model, "CLASS_DEPENDENT_PREFIXES", RCNN_CLASS_DEPENDENT_PREFIXES)


def replace_class_layers(model, num_classes):
    """Fresh class-dependent layers, for fine-tuning to another class count; prints which."""
    if hasattr(model, "replace_class_head"):
        replaced = model.replace_class_head(num_classes)
    else:
        replaced = replace_rcnn_predictors(model, num_classes)
    print_reinitialised(replaced)


def replace_rcnn_predictors(model, num_classes):
    """Fresh box and mask predictors of an R-CNN model; returns the replaced layers' names.

    The mask predictor keeps its class-independent upsampling layer (conv5_mask).
    """
    heads = getattr(model, "roi_heads", None)
    if heads is None:
        raise ConfigError("fine-tuning to another number of classes needs an R-CNN or U-Net model")
    heads.box_predictor = FastRCNNPredictor(heads.box_predictor.cls_score.in_features, num_classes)
    replaced = ["roi_heads.box_predictor.cls_score", "roi_heads.box_predictor.bbox_pred"]
    if heads.has_mask():
        logits = torch.nn.Conv2d(heads.mask_predictor.conv5_mask.out_channels, num_classes, 1)
        # MaskRCNNPredictor's initialisation.
        torch.nn.init.kaiming_normal_(logits.weight, mode="fan_out", nonlinearity="relu")
        torch.nn.init.zeros_(logits.bias)
        heads.mask_predictor.mask_fcn_logits = logits
        replaced.append("roi_heads.mask_predictor.mask_fcn_logits")
    return replaced


def print_reinitialised(layers):
    utils.print_main(f"re-initialised (class count differs): {', '.join(layers)}")


def freeze_batch_norm(module):
    """Swaps BatchNorm2d layers for FrozenBatchNorm2d, as torchvision builds pretrained models."""
    for name, child in module.named_children():
        if isinstance(child, torch.nn.BatchNorm2d):
            setattr(module, name, FrozenBatchNorm2d(child.num_features, eps=child.eps))
        else:
            freeze_batch_norm(child)


def has_frozen_batch_norm(state):
    """A state dict saved from a model whose BatchNorm was frozen (pretrained torchvision models)
    has no num_batches_tracked buffers."""
    return not any(k.endswith("num_batches_tracked") for k in state)


def read_state_dict(path):
    """The state dict of a weights file: a plain state dict or a checkpoint's 'model' entry."""
    try:
        state = checkpointing.load_file(path)
    except CheckpointError as e:
        raise CheckpointError(f"--weights {e.message}") from None
    state = state.get("model", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"--weights {path}: holds no state dict (or 'model' entry)")
    return state


def load_fitting_weights(model, path):
    """Loads a state dict or checkpoint file, re-initialising class-dependent layers that differ.

    Any other difference is an error naming the tensor.
    """
    state = read_state_dict(path)
    if has_frozen_batch_norm(state):
        freeze_batch_norm(model)
    own = model.state_dict()
    classes = class_dependent_prefixes(model)
    # A class head may exist on one side only (the U-Net has none for one category).
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own and not k.startswith(classes)]
    if [k for k in missing if not k.startswith(classes)] or unexpected:
        raise CheckpointError(
            f"--weights {path}: not weights of this {type(model).__name__}: "
            f"{len(missing)} tensors missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    state = {k: v for k, v in state.items() if k in own}
    different = [k for k, v in state.items() if v.shape != own[k].shape]
    for key in different:
        if not key.startswith(classes):
            raise CheckpointError(
                f"--weights {path}: tensor {key} has shape {tuple(state[key].shape)}, "
                f"the model expects {tuple(own[key].shape)}"
            )
    model.load_state_dict({k: v for k, v in state.items() if k not in different}, strict=False)
    fresh = [*different, *missing]
    if fresh:
        print_reinitialised(list(dict.fromkeys(k.rsplit(".", 1)[0] for k in fresh)))


def is_unet(name):
    return name in unet.MODELS


def is_mask_model(name):
    """Whether the model called `name` predicts instance masks."""
    return "maskrcnn" in name or is_unet(name)


def predicts_masks(model):
    heads = getattr(model, "roi_heads", None)
    if heads is not None:
        return heads.has_mask()
    return getattr(model, "predicts_masks", False)


def iou_types_of(model):
    return ["bbox", "segm"] if predicts_masks(model) else ["bbox"]


def saved_args(checkpoint):
    """The model flags a checkpoint was trained with, over today's defaults."""
    args = model_defaults()
    vars(args).update(checkpoint["args"])
    # Everything comes from the checkpoint: no pretrained weights to download or merge.
    args.weights = args.weights_backbone = args.trainable_backbone_layers = None
    return args


def model_from_checkpoint(checkpoint, path):
    """The model a checkpoint of train.py was trained as, holding its weights (on the CPU)."""
    args = saved_args(checkpoint)
    state = checkpoint["model"]
    num_classes = checkpoint.get("num_classes") or args.num_classes
    if num_classes is None and "roi_heads.box_predictor.cls_score.weight" in state:
        num_classes = len(state["roi_heads.box_predictor.cls_score.weight"])
    try:
        model = get_model(args, num_classes)
    except (ConfigError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: cannot build model {args.model!r} ({e})") from None
    if has_frozen_batch_norm(state):
        freeze_batch_norm(model)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = " ".join(str(e).strip().splitlines())
        raise CheckpointError(f"{path}: weights do not fit {args.model} ({first})") from None
    return model
