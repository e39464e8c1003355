"""The U-Net's training step, inference and post-processing against torchvision's Mask R-CNN
R50-FPN, on the same generated nuclei images.

    python benchmarks/unet_bench.py --json unet_bench.json
    python benchmarks/unet_bench.py --model unet_resnet50 --size 256 --nuclei 30 --repeats 5

Both models are built from scratch with 3 classes (background and two nuclei categories) and
resize to `--size` (min and max size), so they see the images at their own size. A training
step is forward, backward and an SGD step on one batch; inference is one image in eval mode
under torch.inference_mode. The U-Net's inference is its network (predict_maps) followed by its
post-processing (watershed and instance tensors, instances_from_maps), which is also timed
alone; the post-processing runs on probability maps made from the ground truth (lightly
smoothed foreground and border), which hold about one instance per nucleus as a trained
model's would, where an untrained model's maps hold noise.
Mask R-CNN's inference is untrained too: it keeps its 100 best detections, as a trained model
would on an image of 100 nuclei. Each figure is the median (min-max) of `--repeats` timings
after one untimed run.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import scipy.ndimage as ndi
import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import unet  # noqa: E402

NUM_CLASSES = 3


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="unet_resnet34", choices=sorted(unet.MODELS))
    parser.add_argument("--size", type=int, default=512, help="image side, px")
    parser.add_argument("--nuclei", type=int, default=100, help="nuclei per image")
    parser.add_argument("--batch-size", type=int, default=2, help="images per training step")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each measurement")
    parser.add_argument("--threads", type=int, help="intra-op threads (default: torch's)")
    parser.add_argument("--json", help="write the figures to this JSON file")
    return parser


def nuclei_image(rng, size, count):
    """A float [3, H, W] image of `count` touching, partly hidden ellipses and its target."""
    yy, xx = np.mgrid[0:size, 0:size]
    labels = np.zeros((size, size), dtype=np.int32)
    centres = []
    for index in range(1, count + 1):
        a = rng.uniform(0.018, 0.03) * size
        b = a / rng.uniform(1.0, 1.4)
        if centres and rng.random() < 0.6:
            px, py = centres[rng.integers(len(centres))]
            angle = rng.uniform(0, 2 * np.pi)
            cx, cy = px + 2 * a * np.cos(angle), py + 2 * a * np.sin(angle)
        else:
            cx, cy = rng.uniform(a, size - a, 2)
        centres.append((cx, cy))
        theta = rng.uniform(0, np.pi)
        u = ((xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)) / a
        v = (-(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)) / b
        labels[u**2 + v**2 <= 1] = index
    present = np.unique(labels)[1:]
    masks = torch.from_numpy(labels[None] == present[:, None, None])
    shade = np.where(labels > 0, 0.75, 0.12) + rng.normal(0, 0.03, labels.shape)
    image = np.clip(np.stack([shade, shade * 0.9, shade + 0.1]), 0, 1).astype(np.float32)
    # masks_to_boxes ends boxes at the last pixel; this repo's boxes end at the pixel after it.
    boxes = torchvision.ops.masks_to_boxes(masks) + torch.tensor([0.0, 0.0, 1.0, 1.0])
    target = {
        "boxes": boxes,
        "labels": torch.from_numpy(rng.integers(1, NUM_CLASSES, len(masks))),
        "masks": masks.to(torch.uint8),
        "image_id": 0,
    }
    return torch.from_numpy(image), target


def ideal_maps(target):
    """Probability maps a trained U-Net would give for `target`: its foreground, border and
    category maps, smoothed and kept inside (0.05, 0.95)."""
    foreground, border, category = unet.target_maps(target["masks"], target["labels"], 2)

    def smooth(mask):
        return torch.from_numpy(0.05 + 0.9 * ndi.gaussian_filter(mask.float().numpy(), 0.5))

    first = smooth(category == 0)
    return {
        "foreground": smooth(foreground),
        "border": smooth(border),
        "classes": torch.stack([first, 1 - first]),
    }


def timed(function, repeats):
    """Seconds of each of `repeats` calls of `function`, after one untimed call."""
    function()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        seconds.append(time.perf_counter() - start)
    return seconds


def training_step(model, images, targets):
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(parameters, lr=0.001, momentum=0.9)

    def step():
        model.train()
        loss = sum(model(images, targets).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def evaluation(model, function):
    """`function` run with `model` in eval mode under torch.inference_mode."""

    def run():
        model.eval()
        with torch.inference_mode():
            return function()

    return run


def measure_unet(model, images, targets, repeats):
    """The U-Net's figures; inference is the network on the image, then the post-processing of
    maps made from its ground truth."""
    maps = ideal_maps(targets[0])

    def postprocess():
        return unet.instances_from_maps(**maps)

    def inference():
        model.predict_maps(images[:1])
        return postprocess()

    return {
        "train_step_s": timed(training_step(model, images, targets), repeats),
        "inference_s": timed(evaluation(model, inference), repeats),
        "postprocess_s": timed(evaluation(model, postprocess), repeats),
        "instances": len(evaluation(model, inference)()["scores"]),
    }


def measure_maskrcnn(model, images, targets, repeats):
    def inference():
        return model(images[:1])[0]

    return {
        "train_step_s": timed(training_step(model, images, targets), repeats),
        "inference_s": timed(evaluation(model, inference), repeats),
        "instances": len(evaluation(model, inference)()["scores"]),
    }


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    images, targets = zip(
        *(nuclei_image(rng, args.size, args.nuclei) for _ in range(args.batch_size)), strict=True
    )
    images, targets = list(images), list(targets)
    size = {"min_size": args.size, "max_size": args.size}
    torch.manual_seed(0)
    unet_model = unet.MODELS[args.model](NUM_CLASSES, **size)
    maskrcnn = torchvision.models.detection.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=NUM_CLASSES, **size
    )
    measured = {
        args.model: measure_unet(unet_model, images, targets, args.repeats),
        "maskrcnn_resnet50_fpn": measure_maskrcnn(maskrcnn, images, targets, args.repeats),
    }
    figures = {
        "workload": {
            "size": args.size,
            "nuclei": args.nuclei,
            "visible_nuclei": len(targets[0]["masks"]),
            "batch_size": args.batch_size,
            "repeats": args.repeats,
        },
        "machine": common.machine("cpu"),
        "models": {
            name: {k: common.summary(v) if isinstance(v, list) else v for k, v in result.items()}
            for name, result in measured.items()
        },
    }
    print_figures(figures)
    common.write_json(args.json, figures)


def cell(figure):
    if figure is None:
        return "-"
    return f"{figure['median']:.3f} ({figure['min']:.3f}-{figure['max']:.3f})"


def print_figures(figures):
    workload, machine = figures["workload"], figures["machine"]
    print(
        f"{workload['size']} px, {workload['visible_nuclei']} visible nuclei per image, "
        f"training batch {workload['batch_size']}, cpu ({machine['threads']} threads); "
        f"seconds, median (min-max) of {workload['repeats']} runs after one"
    )
    print(
        f"{'model':<24} {'train step':>22} {'inference / image':>22} "
        f"{'of which post-processing':>24} {'instances':>9}"
    )
    for name, result in figures["models"].items():
        print(
            f"{name:<24} {cell(result['train_step_s']):>22} {cell(result['inference_s']):>22} "
            f"{cell(result.get('postprocess_s')):>24} {result['instances']:>9}"
        )


if __name__ == "__main__":
    main(get_args_parser().parse_args())
