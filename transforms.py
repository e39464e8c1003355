"""Paired transforms that torchvision.transforms.v2 lacks: copy-paste across a batch, and box
sanitising that copies nothing when every box is kept."""

import torch
from torchvision.ops import masks_to_boxes
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as F

import utils


class SanitizeBoundingBoxes(T.SanitizeBoundingBoxes):
    """T.SanitizeBoundingBoxes, returning boxes, masks and labels as they are when every box is
    valid (nearly always): indexing them with an all-true mask copies every mask."""

    def transform(self, inpt, params):
        if params["valid"].all():
            return inpt
        return super().transform(inpt, params)


def paste_objects(image, target, source_image, source_target):
    """Pastes a random, non-empty subset of the source's objects onto `image`.

    Returns a new image and target: objects of `target` lose the pixels covered by the pasted
    ones, and those left with no pixel are dropped; their boxes are recomputed from the masks.
    Images of different sizes are returned unchanged (lsj, the recipe this serves, crops to one
    size).
    """
    num_source = len(source_target["labels"])
    if num_source == 0 or image.shape[-2:] != source_image.shape[-2:]:
        return image, target
    if image.dtype != source_image.dtype:  # an 8-bit and a 16-bit image (float in [0, 1])
        image = F.to_dtype(image, torch.float32, scale=True)
        source_image = F.to_dtype(source_image, torch.float32, scale=True)
    count = int(torch.randint(1, num_source + 1, ()))
    chosen = torch.randperm(num_source)[:count]
    pasted_masks = source_target["masks"][chosen].bool()
    paste_region = pasted_masks.any(dim=0)

    kept_masks = target["masks"].bool() & ~paste_region
    visible = kept_masks.flatten(1).any(dim=1)
    kept_masks = kept_masks[visible]

    masks = torch.cat([kept_masks, pasted_masks]).to(target["masks"].dtype)
    boxes = masks_to_boxes(masks)
    boxes[:, 2:] += 1  # masks_to_boxes gives the last pixel; boxes end one pixel after it
    new_target = dict(target)
    new_target.update(
        masks=masks,
        boxes=boxes,
        labels=torch.cat([target["labels"][visible], source_target["labels"][chosen]]),
    )
    return torch.where(paste_region, source_image, image), new_target


def copy_paste_collate_fn(batch):
    """Collates a batch, pasting objects of the previous image in the batch onto each image."""
    images, targets = zip(*batch, strict=True)
    pasted = [
        paste_objects(images[i], targets[i], images[i - 1], targets[i - 1])
        for i in range(len(images))
    ]
    return utils.collate_fn(pasted)
