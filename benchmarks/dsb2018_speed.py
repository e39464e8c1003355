"""CPU inference speed of an ensemble file's Mask R-CNN, its U-Net and the ensembles, on real
images (the first `--count` of a split, each at its own size, one image at a time), and where
the ensemble's time goes.

    python benchmarks/dsb2018_speed.py --weights output/dsb2018_comparison/ensemble.pth \
        --ann data/dsb2018/annotations/instances_val.json --images data/dsb2018/val --count 20

Images per second of each mode: `maskrcnn` (the network, its mask pasting at full size),
`unet` (network, then watershed instances), `baseline` and `learned` (both models, then the
candidates, their features and the selection). The two models and the combination are also
timed apart (seconds per image). The threads are torch's default unless OMP_NUM_THREADS says.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ensemble  # noqa: E402
from engine import images_to_device  # noqa: E402


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", required=True, help="ensemble file of ensemble.py fit")
    parser.add_argument("--ann", required=True, help="annotation file of the images")
    parser.add_argument("--images", required=True, help="folder of the images")
    parser.add_argument("--count", type=int, default=20, help="images timed (20)")
    parser.add_argument("--output", help="write the figures here as JSON")
    return parser


def timed(function, images):
    """Seconds `function` takes over `images`, one at a time; outputs are dropped as they come,
    so that memory holds one image's masks at a time."""
    start = time.perf_counter()
    for image in images:
        function([image])
    return time.perf_counter() - start


def timed_ensemble(model, images):
    """Seconds of the two models, and of each mode's combination, over `images`, one at a
    time."""
    seconds = {"models": 0.0, "baseline": 0.0, "learned": 0.0}
    for image in images:
        start = time.perf_counter()
        (outputs,) = model.model_outputs([image])
        seconds["models"] += time.perf_counter() - start
        for mode in ("baseline", "learned"):
            model.mode = mode
            start = time.perf_counter()
            model.output(*outputs)
            seconds[mode] += time.perf_counter() - start
    return seconds


def main(args):
    model, info = ensemble.load_ensemble(args.weights)
    loader = ensemble.eval_loader(args.ann, args.images, info["label_offset"])
    images = []
    for batch, _ in loader:
        images += images_to_device(batch, "cpu")
        if len(images) == args.count:
            break
    pixels = sum(image.shape[-2] * image.shape[-1] for image in images)
    threads = torch.get_num_threads()
    figures = {"images": len(images), "megapixels": pixels / 1e6, "threads": threads}
    with torch.inference_mode():
        model(images[:1])  # one untimed run: first-call allocations
        maskrcnn_s = timed(model.maskrcnn, images)
        unet_s = timed(model.unet, images)
        seconds = timed_ensemble(model, images)
    figures["maskrcnn"] = len(images) / maskrcnn_s
    figures["unet"] = len(images) / unet_s
    figures["both_models_s_per_image"] = seconds["models"] / len(images)
    for mode in ("baseline", "learned"):
        figures[f"{mode}_combine_s_per_image"] = seconds[mode] / len(images)
        figures[mode] = len(images) / (seconds["models"] + seconds[mode])
    print(json.dumps(figures, indent=1))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
