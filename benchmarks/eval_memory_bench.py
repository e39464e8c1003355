"""Peak memory of evaluation against the number of images: `ensemble.py evaluate` (all four
modes in one pass) and train.py's evaluation (--test-only, with --nuclei-metrics and
--error-analysis), each run in a fresh process per image count.

    python benchmarks/eval_memory_bench.py --images 10 100 --json eval_memory_bench.json

The images are synthetic: --size px squares, each with --nuclei discs. Stub models stand in for
Mask R-CNN and the U-Net (their cost is not the point): the stub Mask R-CNN returns --nuclei
detections as full-size float masks, as torchvision's does, and the stub U-Net foreground and
border maps whose watershed gives the instances, so every evaluation step past the models runs
as in a real evaluation. Peak RSS is the process's high-water mark (getrusage), imports
included; flat in the number of images means the peak at 100 images is that at 10 plus what
the evaluator keeps per image (boxes, scores and RLE strings), a few kB per detection at most.
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_util

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import coco_eval  # noqa: E402
import engine  # noqa: E402
import ensemble  # noqa: E402
import train  # noqa: E402
import unet  # noqa: E402

PATHS = ("ensemble", "train_eval")
MIB = 2**20


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, nargs="+", default=[10, 100], help="image counts")
    parser.add_argument("--size", type=int, default=512, help="image side in px (512)")
    parser.add_argument("--nuclei", type=int, default=150, help="nuclei per image (150)")
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--child", nargs=3, metavar=("PATH", "IMAGES", "FOLDER"), help="internal")
    return parser


def discs(rng, count, size):
    """[count, size, size] boolean discs of radius 5-10 px at random places."""
    ys, xs = np.mgrid[:size, :size]
    centres = rng.integers(10, size - 10, (count, 2))
    radii = rng.integers(5, 11, count)
    masks = np.zeros((count, size, size), dtype=bool)
    for mask, (cy, cx), r in zip(masks, centres, radii, strict=True):
        box = np.s_[max(cy - r, 0) : cy + r + 1, max(cx - r, 0) : cx + r + 1]
        mask[box] = (ys[box] - cy) ** 2 + (xs[box] - cx) ** 2 <= r * r
    return masks


def write_dataset(folder, num_images, size, nuclei):
    """A COCO split of synthetic nuclei images in `folder`; returns the annotation file."""
    rng = np.random.default_rng(0)
    images, annotations = [], []
    (folder / "images").mkdir(parents=True)
    for image_id in range(1, num_images + 1):
        name = f"{image_id}.png"
        pixels = rng.integers(0, 64, (size, size), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / "images" / name)
        images.append({"id": image_id, "file_name": name, "height": size, "width": size})
        images[-1]["kind"] = ("fluorescence", "tissue")[image_id % 2]
        for mask in discs(rng, nuclei, size):
            rle = mask_util.encode(np.asfortranarray(mask, dtype=np.uint8))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": 1,
                    "segmentation": {"size": [size, size], "counts": rle["counts"].decode()},
                    "area": float(mask.sum()),
                    "bbox": [float(v) for v in mask_util.toBbox(rle)],
                    "iscrowd": 0,
                }
            )
    dataset = {"images": images, "annotations": annotations}
    dataset["categories"] = [{"id": 1, "name": "nucleus"}]
    ann = folder / "instances.json"
    ann.write_text(json.dumps(dataset))
    return ann


def image_rng(image):
    return np.random.default_rng(int(image.sum().item() * 1000) % 2**32)


class StubMaskRCNN(torch.nn.Module):
    """Detections of `count` random discs per image, with full-size float masks."""

    def __init__(self, count):
        super().__init__()
        self.count = count

    def forward(self, images):
        outputs = []
        for image in images:
            rng = image_rng(image)
            masks = discs(rng, self.count, image.shape[-1])
            boxes = [
                mask_util.toBbox(mask_util.encode(np.asfortranarray(m, np.uint8))) for m in masks
            ]
            boxes = torch.tensor(np.array(boxes), dtype=torch.float32)
            boxes[:, 2:] += boxes[:, :2]
            outputs.append(
                {
                    "boxes": boxes,
                    "labels": torch.ones(self.count, dtype=torch.int64),
                    "scores": torch.from_numpy(rng.uniform(0.3, 1.0, self.count)).float(),
                    "masks": torch.from_numpy(masks[:, None].astype(np.float32) * 0.9),
                }
            )
        return outputs


class StubUNet(torch.nn.Module):
    """Foreground and border maps of `count` random discs per image."""

    watershed_kwargs = {"foreground_thresh": 0.5, "border_thresh": 0.5, "min_area": 10}

    def __init__(self, count):
        super().__init__()
        self.count = count

    def predict_maps(self, images):
        maps = []
        for image in images:
            foreground = discs(image_rng(image), self.count, image.shape[-1]).any(0)
            maps.append(
                {
                    "foreground": torch.from_numpy(foreground * np.float32(0.95)),
                    "border": torch.full(foreground.shape, 0.05),
                }
            )
        return maps

    def forward(self, images):
        return [
            unet.instances_from_maps(**m, **self.watershed_kwargs)
            for m in self.predict_maps(images)
        ]


def run_ensemble(ann, images, nuclei):
    model = ensemble.EnsembleModel(
        StubMaskRCNN(nuclei), StubUNet(nuclei), combiner=lambda f: f[:, 1], mode="learned"
    )
    loader = ensemble.eval_loader(str(ann), str(images), 0)
    info = {"label_offset": 0, "num_classes": 2}
    return ensemble.evaluate_modes(model, list(ensemble.MODES), loader, "cpu", info, 500)


def run_train_eval(ann, images, nuclei):
    args = train.get_args_parser().parse_args(["--nuclei-metrics", "--error-analysis"])
    loader = ensemble.eval_loader(str(ann), str(images), 0)
    evaluator = coco_eval.CocoEvaluator(loader.dataset.coco, ["bbox", "segm"], (1, 10, 500))
    return engine.evaluate(
        StubMaskRCNN(nuclei), loader, "cpu", evaluator, image_metrics=train.image_metrics(args)
    )


def child(path, num_images, folder, size, nuclei):
    """Runs one path on `num_images` images; prints its peak RSS and wall time as JSON."""
    folder = Path(folder)
    ann = write_dataset(folder, num_images, size, nuclei)
    start = time.perf_counter()
    {"ensemble": run_ensemble, "train_eval": run_train_eval}[path](ann, folder / "images", nuclei)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps({"peak_rss_mib": peak / MIB, "seconds": seconds}))


def measure(path, num_images, args):
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, __file__, "--child", path, str(num_images), folder]
        command += ["--size", str(args.size), "--nuclei", str(args.nuclei)]
        finished = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(finished.stdout.strip().splitlines()[-1])


def main(args):
    if args.child:
        path, num_images, folder = args.child
        child(path, int(num_images), folder, args.size, args.nuclei)
        return
    figures = {"machine": common.machine("cpu"), "size": args.size, "nuclei": args.nuclei}
    for path in args.paths:
        figures[path] = {}
        for num_images in args.images:
            result = measure(path, num_images, args)
            figures[path][num_images] = result
            print(
                f"{path}: {num_images} images: peak RSS {result['peak_rss_mib']:.0f} MiB, "
                f"{result['seconds']:.1f} s",
                flush=True,
            )
    common.write_json(args.json, figures)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
