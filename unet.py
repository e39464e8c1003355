"""A U-Net for nuclei that speaks torchvision's detection interface.

The U-Net half of Vuola, Akram and Kannala, "Mask-RCNN and U-Net Ensembled for Nuclei
Segmentation" (ISBI 2019). This module owns the network (a decoder over a torchvision ResNet
encoder), the per-pixel targets it learns (foreground, the border where instances meet, and the
category), its losses, and the seeded watershed that turns its probability maps into instances.
Called like `torchvision.models.detection.maskrcnn_resnet50_fpn`: `model(images, targets)` in
training mode returns a dict of losses, `model(images)` in eval mode a dict per image with
`boxes`, `labels`, `scores` and `masks`, so train.py, engine.py and predict.py run it unchanged.

Targets. The per-pixel targets are made inside the model, from the instance masks of the targets
after the model's own resize: they then follow that resize and the batch padding exactly, are
made on the model's device in the one place that training and DDP share, and the data pipeline
stays the same for every model. For each image:

- foreground: pixels inside any instance;
- border: instance pixels with a pixel of another instance within `border_width` pixels
  (Chebyshev distance, at the resized size), and pixels that two instances overlap;
- category (when num_classes > 2): the label of the instance at each foreground pixel.

Losses. `loss_foreground` and `loss_border` are each binary cross-entropy plus soft Dice loss
(1 - Dice) over the batch, ignoring the batch padding; `loss_border` is multiplied by
`border_weight`. `loss_classifier` is the cross-entropy of the category over foreground pixels
only, since background is the foreground channel's job (why these losses: docs/nuclei.md).

Instances. Seeds are the connected components (4-connected) of foreground > foreground_thresh
and border <= border_thresh, of at least `min_seed_area` pixels: smaller ones are slivers cut
off where a border meets the background, whose pixels the neighbouring seeds then take. A
watershed over the border probability grows the seeds over the foreground mask, so touching
nuclei meet on the predicted border. A foreground blob without a seed (all border) becomes an
instance of its own; instances under `min_area` pixels are dropped. An instance's category is
the argmax of its pixels' mean category probabilities, and its score is its mean foreground
probability times that mean category probability (the mean foreground probability alone when
there is one category). Its mask holds the foreground probability inside the instance and 0
outside: thresholding it at 0.5 gives the instance, and the maximum over an image's masks is
the foreground probability on its instances.

The watershed is scikit-image's, on the float probabilities as they are, without watershed lines.

BatchNorm. As torchvision builds detection models: with pretrained encoder weights the
encoder's BatchNorm is FrozenBatchNorm2d (ImageNet statistics, which batches of 2 cannot
re-estimate), trained from scratch it is BatchNorm2d. The decoder uses GroupNorm, which is the
same in training and evaluation at any batch size and needs no synchronisation under DDP. A
pretrained model's state dict therefore has no `num_batches_tracked`, the sign train.py and
predict.py read to freeze BatchNorm when they rebuild a model without downloading weights.
"""

import math
import warnings

import numpy as np
import scipy.ndimage as ndi
import torch
import torch.nn.functional as F
import torchvision
from skimage.segmentation import watershed
from torch import nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FrozenBatchNorm2d

from mask_geometry import to_numpy

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Every encoder stride (2 to 32) must divide the padded batch for the skips to line up.
SIZE_DIVISIBLE = 32
DECODER_GROUPS = 8
BORDER_PRIOR = 0.05
ENCODER_LAYERS = ("layer4", "layer3", "layer2", "layer1", "conv1")


class ResNetEncoder(nn.Module):
    """The stages of a torchvision ResNet, under its own names so that its weights load as they
    are; returns the features at strides 2, 4, 8, 16 and 32."""

    def __init__(self, resnet):
        super().__init__()
        self.conv1, self.bn1, self.relu = resnet.conv1, resnet.bn1, resnet.relu
        self.maxpool = resnet.maxpool
        self.layer1, self.layer2 = resnet.layer1, resnet.layer2
        self.layer3, self.layer4 = resnet.layer3, resnet.layer4
        expansion = resnet.fc.in_features // 512
        self.channels = (64, 64 * expansion, 128 * expansion, 256 * expansion, 512 * expansion)

    def forward(self, x):
        stem = self.relu(self.bn1(self.conv1(x)))
        c2 = self.layer1(self.maxpool(stem))
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        return [stem, c2, c3, c4, self.layer4(c4)]


def conv_gn_relu(in_channels, out_channels):
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.GroupNorm(DECODER_GROUPS, out_channels),
        nn.ReLU(inplace=True),
    )


class DecoderBlock(nn.Module):
    """Doubles the resolution, joins the encoder's skip features, and mixes them."""

    def __init__(self, in_channels, skip_channels, out_channels):
        super().__init__()
        self.convs = nn.Sequential(
            conv_gn_relu(in_channels + skip_channels, out_channels),
            conv_gn_relu(out_channels, out_channels),
        )

    def forward(self, x, skip=None):
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.convs(x)


class UNet(nn.Module):
    """U-Net with foreground, border and (num_classes > 2) category outputs; see the module
    docstring for targets, losses and instances.

    Args:
        encoder: a ResNetEncoder.
        num_classes: categories counting background, as in torchvision (at least 2).
        min_size, max_size: the resize of GeneralizedRCNNTransform, as for Mask R-CNN.
        image_mean, image_std: normalisation (ImageNet's by default).
        decoder_channels: output channels of the five decoder blocks, deepest first.
        border_width: pixels (at the resized size) either side of where instances meet that
            count as border in the targets.
        border_weight: factor on loss_border.
        foreground_thresh, border_thresh: probabilities above which a pixel is foreground or
            border when making instances. foreground_thresh must be at least 0.5 so that the
            masks, thresholded at 0.5, are the instances.
        min_area: instances of fewer pixels (at the image's own size) are dropped.
        min_seed_area: seeds of fewer pixels are dropped (see the module docstring).
    These last four are held in `watershed_kwargs`, which may be changed after building.
    """

    predicts_masks = True
    CLASS_DEPENDENT_PREFIXES = ("class_head.",)

    def __init__(
        self,
        encoder,
        num_classes,
        min_size=800,
        max_size=1333,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        decoder_channels=(256, 128, 64, 32, 16),
        border_width=2,
        border_weight=2.0,
        foreground_thresh=0.5,
        border_thresh=0.5,
        min_area=10,
        min_seed_area=4,
    ):
        super().__init__()
        if foreground_thresh < 0.5:
            raise ValueError(
                f"foreground_thresh {foreground_thresh} < 0.5: masks thresholded at 0.5 "
                "would lose instance pixels"
            )
        self.transform = GeneralizedRCNNTransform(
            min_size, max_size, image_mean, image_std, size_divisible=SIZE_DIVISIBLE
        )
        self.encoder = encoder
        skips = encoder.channels[-2::-1] + (0,)
        in_channels = (encoder.channels[-1],) + tuple(decoder_channels[:-1])
        self.decoder = nn.ModuleList(
            DecoderBlock(i, s, o)
            for i, s, o in zip(in_channels, skips, decoder_channels, strict=True)
        )
        for module in self.decoder.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        self.head = nn.Conv2d(decoder_channels[-1], 2, 1)
        # Border pixels are a few percent of an image: starting that output at their prior
        # (as RetinaNet does for rare classes) spares the first steps unlearning border everywhere.
        with torch.no_grad():
            self.head.bias[1] = math.log(BORDER_PRIOR / (1 - BORDER_PRIOR))
        self.num_classes = num_classes
        self.class_head = class_head(decoder_channels[-1], num_classes)
        self.border_width = border_width
        self.border_weight = border_weight
        self.watershed_kwargs = {
            "foreground_thresh": foreground_thresh,
            "border_thresh": border_thresh,
            "min_area": min_area,
            "min_seed_area": min_seed_area,
        }

    def network(self, x):
        """[B, 2 + K, H, W] logits of a padded batch: foreground, border, then K categories."""
        features = self.encoder(x)
        x = features[-1]
        for block, skip in zip(self.decoder, features[-2::-1] + [None], strict=True):
            x = block(x, skip)
        if self.class_head is None:
            return self.head(x)
        return torch.cat([self.head(x), self.class_head(x)], dim=1)

    def forward(self, images, targets=None):
        """Training: a dict of scalar losses. Evaluation: per image a dict with `boxes` [N, 4]
        (XYXY), `labels` int64 [N], `scores` [N] and `masks` [N, 1, H, W], at the image's size."""
        if not self.training:
            return [
                instances_from_maps(**maps, **self.watershed_kwargs)
                for maps in self.predict_maps(images)
            ]
        if targets is None:
            raise ValueError("targets are needed in training mode")
        batch, targets = self.transform(images, targets)
        logits = self.network(batch.tensors)
        maps = batch_target_maps(
            targets, batch.image_sizes, batch.tensors.shape[-2:], self.border_width
        )
        return unet_losses(logits, maps, self.border_weight)

    @torch.no_grad()
    def predict_maps(self, images):
        """Per image a dict of probability maps at the image's own size: `foreground` and
        `border` [H, W], and `classes` [K, H, W] (summing to 1 over K) when num_classes > 2."""
        original_sizes = [image.shape[-2:] for image in images]
        batch, _ = self.transform(images)
        logits = self.network(batch.tensors).float()
        return [
            image_maps(image_logits[:, :h, :w], original_size)
            for image_logits, (h, w), original_size in zip(
                logits, batch.image_sizes, original_sizes, strict=True
            )
        ]

    def replace_class_head(self, num_classes):
        """Swaps in a freshly initialised class head for `num_classes` (none for 2) and returns
        the names of the replaced layers."""
        replaced = [] if self.class_head is None and num_classes == 2 else ["class_head"]
        head = class_head(self.head.in_channels, num_classes)
        self.class_head = None if head is None else head.to(self.head.weight.device)
        self.num_classes = num_classes
        return replaced


def class_head(in_channels, num_classes):
    """1x1 convolution to the category logits (background excluded), or None for one category."""
    if num_classes < 2:
        raise ValueError(f"num_classes {num_classes}: needs background and at least one category")
    return nn.Conv2d(in_channels, num_classes - 1, 1) if num_classes > 2 else None


def image_maps(logits, size):
    """Probability maps of one image from its [2 + K, h, w] logits, resized to `size`."""
    logits = F.interpolate(logits[None], size=tuple(size), mode="bilinear", align_corners=False)[0]
    maps = {"foreground": torch.sigmoid(logits[0]), "border": torch.sigmoid(logits[1])}
    if len(logits) > 2:
        maps["classes"] = torch.softmax(logits[2:], dim=0)
    return maps


def target_maps(masks, labels, border_width):
    """Foreground (bool), border (bool) and category (int64, -100 off the foreground) [H, W]
    maps of one image's instance masks [N, H, W] and labels [N]; see the module docstring."""
    count = masks.sum(0)
    foreground = count > 0
    category = torch.full(foreground.shape, -100, dtype=torch.int64, device=masks.device)
    if not len(masks):
        return foreground, foreground.clone(), category
    index = masks.argmax(0)
    category[foreground] = labels[index[foreground]] - 1
    # Instance numbers as floats (exact below 2**24) so that max-pooling finds, in each
    # neighbourhood, the largest and (on the negated map, background pushed away) the smallest.
    instance = torch.where(foreground, index + 1, 0).float()[None, None]
    negated = torch.where(foreground[None, None], -instance, -float("inf"))
    size = 2 * border_width + 1
    largest = F.max_pool2d(instance, size, stride=1, padding=border_width)
    smallest = -F.max_pool2d(negated, size, stride=1, padding=border_width)
    other_nearby = ((largest != instance) | (smallest != instance))[0, 0]
    border = foreground & (other_nearby | (count > 1))
    return foreground, border, category


def batch_target_maps(targets, image_sizes, padded_size, border_width):
    """Target maps [B, H, W] of a padded batch, and `valid`, the pixels of the images."""
    batch = len(targets)
    device = targets[0]["masks"].device
    maps = {
        "foreground": torch.zeros(batch, *padded_size, device=device),
        "border": torch.zeros(batch, *padded_size, device=device),
        "category": torch.full((batch, *padded_size), -100, dtype=torch.int64, device=device),
        "valid": torch.zeros(batch, *padded_size, device=device),
    }
    for i, (target, (h, w)) in enumerate(zip(targets, image_sizes, strict=True)):
        foreground, border, category = target_maps(target["masks"], target["labels"], border_width)
        maps["foreground"][i, :h, :w] = foreground
        maps["border"][i, :h, :w] = border
        maps["category"][i, :h, :w] = category
        maps["valid"][i, :h, :w] = 1
    return maps


def bce_dice_loss(logits, target, valid):
    """Binary cross-entropy (mean over valid pixels) plus soft Dice loss over the batch."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    bce = (bce * valid).sum() / valid.sum().clamp(min=1)
    probability = torch.sigmoid(logits) * valid
    # The +1 keeps the loss finite, and 0 for an empty prediction, on a batch without objects.
    dice = (2 * (probability * target).sum() + 1) / (probability.sum() + target.sum() + 1)
    return bce + 1 - dice


def unet_losses(logits, maps, border_weight):
    """The named losses of a batch's logits [B, 2 + K, H, W] against its target maps."""
    logits = logits.float()
    losses = {
        "loss_foreground": bce_dice_loss(logits[:, 0], maps["foreground"], maps["valid"]),
        "loss_border": border_weight * bce_dice_loss(logits[:, 1], maps["border"], maps["valid"]),
    }
    if logits.shape[1] > 2:
        # A sum over the foreground pixels, not a mean, so that a batch without any is a zero
        # loss (whose gradient still reaches the class head, as DDP needs) rather than NaN.
        total = F.cross_entropy(logits[:, 2:], maps["category"], reduction="sum")
        losses["loss_classifier"] = total / (maps["category"] >= 0).sum().clamp(min=1)
    return losses


def probability_map(values):
    """A float32 numpy array of a probability map, a tensor or an array."""
    return to_numpy(values).astype(np.float32, copy=False)


def watershed_instances(
    foreground, border, foreground_thresh=0.5, border_thresh=0.5, min_area=10, min_seed_area=4
):
    """Instance labels [H, W] int32 (0 background, 1..N) from foreground and border probability
    maps [H, W] (numpy arrays or tensors); see the module docstring."""
    foreground, border = probability_map(foreground), probability_map(border)
    mask = foreground > foreground_thresh
    seeds, num_seeds = ndi.label(mask & (border <= border_thresh))
    seeds[small_labels(seeds, min_seed_area)[seeds]] = 0
    labels = watershed(border, seeds, mask=mask)
    orphans, _ = ndi.label(mask & (labels == 0))
    labels = np.where(orphans > 0, orphans + num_seeds, labels)
    keep = ~small_labels(labels, min_area)
    keep[0] = False
    renumber = np.zeros(len(keep), dtype=np.int32)
    renumber[keep] = np.arange(1, keep.sum() + 1)
    return renumber[labels]


def small_labels(labels, min_area):
    """Per label value of `labels`, whether it covers fewer than `min_area` pixels."""
    return np.bincount(labels.ravel()) < min_area


def instances_from_maps(foreground, border, classes=None, **watershed_kwargs):
    """One image's detections (torchvision's format, highest score first, on the device of
    `foreground`) from its probability maps: foreground and border [H, W], classes [K, H, W] or
    None for one category; `watershed_kwargs` go to watershed_instances."""
    instances = watershed_instances(foreground, border, **watershed_kwargs)
    count = int(instances.max())
    flat = instances.ravel()
    probability = probability_map(foreground).ravel()
    area = np.bincount(flat, minlength=count + 1)[1:]
    scores = np.bincount(flat, probability, count + 1)[1:] / area
    labels = np.ones(count, dtype=np.int64)
    if classes is not None:
        sums = [np.bincount(flat, c.ravel(), count + 1)[1:] for c in probability_map(classes)]
        means = np.stack(sums, axis=1) / area[:, None]
        labels = means.argmax(1) + 1
        scores = scores * means.max(1)
    order = np.argsort(-scores, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(count)
    boxes = np.array(
        [(x.start, y.start, x.stop, y.stop) for y, x in ndi.find_objects(instances)],
        dtype=np.float32,
    ).reshape(-1, 4)
    # Each pixel is written once, into its instance's row in score order: the masks, by far the
    # largest tensor here, are filled in place and never reordered.
    inside = np.flatnonzero(flat)
    device = foreground.device
    masks = torch.zeros(count, flat.size, device=device)
    masks[torch.from_numpy(rank[flat[inside] - 1]), torch.from_numpy(inside)] = torch.from_numpy(
        probability[inside]
    ).to(device)
    return {
        "boxes": torch.from_numpy(boxes[order]).to(device),
        "labels": torch.from_numpy(labels[order]).to(device),
        "scores": torch.from_numpy(scores[order].astype(np.float32)).to(device),
        "masks": masks.reshape(count, 1, *instances.shape),
    }


def trainable_layers(pretrained, requested):
    """How many encoder stages train, as torchvision decides for detection backbones: all five
    from scratch, else `requested` (3 by default)."""
    if not pretrained:
        if requested is not None:
            warnings.warn(
                "trainable_backbone_layers has no effect without weights_backbone: "
                "all encoder layers train",
                stacklevel=3,
            )
        return len(ENCODER_LAYERS)
    requested = 3 if requested is None else requested
    if not 0 <= requested <= len(ENCODER_LAYERS):
        raise ValueError(f"trainable_backbone_layers {requested}: must be 0 to 5")
    return requested


def build_unet(
    arch,
    num_classes=2,
    weights_backbone=None,
    trainable_backbone_layers=None,
    weights=None,
    **kwargs,
):
    """A UNet over torchvision's ResNet `arch`, whose ImageNet weights (`weights_backbone`: a
    weights enum or its name, e.g. "ResNet34_Weights.IMAGENET1K_V1") load as for Mask R-CNN's
    backbone. `weights` exists for torchvision's calling convention; there are no U-Net
    weights to load. Other keyword arguments go to UNet."""
    if weights is not None:
        raise ValueError(f"weights {weights}: no pretrained U-Net weights; use weights_backbone")
    if isinstance(weights_backbone, str):
        try:
            weights_backbone = torchvision.models.get_weight(weights_backbone)
        except (ValueError, KeyError):
            raise ValueError(
                f"weights_backbone {weights_backbone!r}: not a torchvision weights name"
            ) from None
    pretrained = weights_backbone is not None
    norm_layer = FrozenBatchNorm2d if pretrained else nn.BatchNorm2d
    resnet = torchvision.models.get_model(arch, weights=weights_backbone, norm_layer=norm_layer)
    encoder = ResNetEncoder(resnet)
    trained = ENCODER_LAYERS[: trainable_layers(pretrained, trainable_backbone_layers)]
    if len(trained) == len(ENCODER_LAYERS):
        trained += ("bn1",)
    for name, parameter in encoder.named_parameters():
        if not name.startswith(trained):
            parameter.requires_grad_(False)
    return UNet(encoder, num_classes, **kwargs)


def unet_resnet18(num_classes=2, weights_backbone=None, **kwargs):
    return build_unet("resnet18", num_classes, weights_backbone, **kwargs)


def unet_resnet34(num_classes=2, weights_backbone=None, **kwargs):
    return build_unet("resnet34", num_classes, weights_backbone, **kwargs)


def unet_resnet50(num_classes=2, weights_backbone=None, **kwargs):
    return build_unet("resnet50", num_classes, weights_backbone, **kwargs)


def unet_resnet101(num_classes=2, weights_backbone=None, **kwargs):
    return build_unet("resnet101", num_classes, weights_backbone, **kwargs)


def unet_resnext50_32x4d(num_classes=2, weights_backbone=None, **kwargs):
    return build_unet("resnext50_32x4d", num_classes, weights_backbone, **kwargs)


MODELS = {
    builder.__name__: builder
    for builder in (
        unet_resnet18,
        unet_resnet34,
        unet_resnet50,
        unet_resnet101,
        unet_resnext50_32x4d,
    )
}
