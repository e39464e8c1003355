"""Augmentation recipes: paired image/target transforms built from torchvision.transforms.v2."""

from torchvision.transforms import v2 as T

from transforms import SanitizeBoundingBoxes

DATA_AUGMENTATIONS = ("hflip", "lsj", "multiscale", "nuclei", "ssd", "ssdlite")
# nuclei: brightness and contrast factors drawn from [1 - j, 1 + j].
NUCLEI_INTENSITY_JITTER = 0.3
DEFAULT_CROP_SIZE = 256


def augmentation_steps(name, min_size, max_size, hflip_prob, crop_size=DEFAULT_CROP_SIZE):
    """The random steps of a recipe. Sizes follow the model's --min-size/--max-size, scaled as
    torchvision's reference scales them from its 800/1333 defaults (lsj crops 1024 = 1.28 x 800,
    multiscale draws the shorter side from 0.6 to 1.0 x 800); nuclei ignores them (see
    nuclei_steps)."""
    hflip = T.RandomHorizontalFlip(p=hflip_prob)
    if name == "hflip":
        return [hflip]
    if name == "nuclei":
        return nuclei_steps(crop_size)
    if name == "lsj":
        crop = round(1.28 * min_size)
        return [
            T.ScaleJitter(target_size=(crop, crop), scale_range=(0.1, 2.0)),
            T.RandomCrop((crop, crop), pad_if_needed=True),
            hflip,
        ]
    if name == "multiscale":
        sizes = [round(min_size * f) for f in (0.6, 0.7, 0.8, 0.9, 1.0)]
        return [T.RandomShortestSize(min_size=sizes, max_size=max_size), hflip]
    if name == "ssd":
        return [T.RandomPhotometricDistort(), T.RandomZoomOut(), T.RandomIoUCrop(), hflip]
    if name == "ssdlite":
        return [T.RandomIoUCrop(), hflip]
    raise ValueError(f"unknown data augmentation {name!r}, expected one of {DATA_AUGMENTATIONS}")


def nuclei_steps(crop_size):
    """Random crops of `crop_size` pixels at the image's own scale (padded with black where the
    image is smaller), any of the 8 flips and quarter turns, and brightness and contrast jitter.

    Nothing resizes: the model sees nuclei at the scale it meets them at inference (with a fixed
    --image-scale), and a large image gives crops of its nuclei instead of shrinking them. Flips
    and quarter turns are exact on the pixel grid, and microscopy has no preferred orientation.
    """
    quarter_turns = [T.RandomRotation((angle, angle)) for angle in (0, 90, 180, 270)]
    jitter = NUCLEI_INTENSITY_JITTER
    return [
        T.RandomCrop(crop_size, pad_if_needed=True),
        T.RandomHorizontalFlip(),
        T.RandomChoice(quarter_turns),
        T.ColorJitter(brightness=jitter, contrast=jitter),
    ]


class DetectionPresetTrain:
    """A recipe's random steps, then objects left without a box dropped.

    The image stays uint8 (16-bit images arrive as float in [0, 1] and stay so): a quarter of
    float32's bytes to flip, crop, resize, send from the loader's workers and copy to the device,
    where engine.images_to_device makes it float.
    """

    def __init__(
        self,
        data_augmentation="hflip",
        min_size=800,
        max_size=1333,
        hflip_prob=0.5,
        crop_size=DEFAULT_CROP_SIZE,
    ):
        self.transforms = T.Compose(
            [
                *augmentation_steps(data_augmentation, min_size, max_size, hflip_prob, crop_size),
                T.ClampBoundingBoxes(),
                SanitizeBoundingBoxes(),
                T.ToPureTensor(),
            ]
        )

    def __call__(self, image, target):
        return self.transforms(image, target)


class DetectionPresetEval:
    """Plain tensors, nothing else: the model resizes its input and maps predictions back to the
    original size, and engine.images_to_device makes the image float."""

    def __call__(self, image, target):
        return T.ToPureTensor()(image, target)
