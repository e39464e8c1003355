"""Images per second through dataset, training transforms and collate: torchvision's reference
way (PIL, one pycocotools call per object, v1 transforms; see reference.py) against this repo's
CocoDetection and DetectionPresetTrain, on the same generated images in the same run.

    python benchmarks/data_bench.py --repeats 5 --json data_bench.json

The images are JPEGs of COCO's sizes with COCO's instance counts (about 7 polygons per image,
a few images with 50 or more; see synthetic.py). Both pipelines apply the hflip recipe and
return images with boxes, labels and masks, batched as lists; each batch is moved to --device
with engine.to_device, which turns this repo's uint8 images into float there (the reference's
workers send float images). Passes alternate between the pipelines, and each pass starts its own
workers, as an epoch does. With 0 workers the pipelines run in this process
on --threads threads (default 1, as in a worker: on a busy machine, spinning OpenMP threads
make small tensor operations many times slower). Before timing, both pipelines run with flips
never and always taken, and their targets are compared image by image.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import reference  # noqa: E402
import synthetic  # noqa: E402

import coco_utils  # noqa: E402
import presets  # noqa: E402
import utils  # noqa: E402
from engine import images_to_device, to_device  # noqa: E402

PIPELINES = ("reference", "this_repo")


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200, help="generated images")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated images")
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts"
    )
    parser.add_argument("--batch-size", type=int, default=2, help="images per batch")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes of each pipeline")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op threads of this process (workers use one each, as DataLoader sets)",
    )
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="device the batches are moved to",
    )
    parser.add_argument("--json", help="write the figures to this JSON file")
    return parser


def build(pipeline, image_dir, ann_file, hflip_prob=0.5):
    if pipeline == "reference":
        dataset = reference.get_coco_train(
            image_dir, ann_file, reference.train_transforms(hflip_prob)
        )
        return dataset, reference.collate_fn
    transforms = presets.DetectionPresetTrain("hflip", hflip_prob=hflip_prob)
    dataset = coco_utils.CocoDetection(
        image_dir, ann_file, transforms, drop_images_without_objects=True, sample_seed=0
    )
    return dataset, utils.collate_fn


def image_ids(pipeline, dataset):
    if pipeline == "reference":
        return [dataset.dataset.ids[i] for i in dataset.indices]
    return dataset.ids


def compare_targets(image_dir, ann_file):
    """Runs both pipelines with flips never and always taken; returns what differs (nothing,
    hopefully) and the largest difference between their float images."""
    problems, largest = [], 0.0
    for hflip_prob in (0.0, 1.0):
        built = {p: build(p, image_dir, ann_file, hflip_prob)[0] for p in PIPELINES}
        index = {p: {i: k for k, i in enumerate(image_ids(p, built[p]))} for p in PIPELINES}
        shared = sorted(index["reference"].keys() & index["this_repo"].keys())
        for pipeline in PIPELINES:
            if len(shared) != len(index[pipeline]):
                problems.append(f"{pipeline} has {len(index[pipeline]) - len(shared)} more images")
        for image_id in shared:
            ref_image, ref_target = built["reference"][index["reference"][image_id]]
            image, target = built["this_repo"][index["this_repo"][image_id]]
            (image,) = images_to_device([image], "cpu")
            largest = max(largest, float((ref_image - image).abs().max()))
            same = (
                torch.equal(ref_target["boxes"], target["boxes"])
                and torch.equal(ref_target["labels"], target["labels"])
                and torch.equal(ref_target["masks"].to(torch.uint8), target["masks"])
                and ref_target["image_id"] == target["image_id"]
                and torch.equal((ref_image * 255).round(), (image * 255).round())
            )
            if not same:
                problems.append(f"image {image_id} differs with hflip_prob {hflip_prob}")
    return problems, largest, len(shared)


def one_pass(dataset, collate_fn, workers, args):
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.batch_size,
        num_workers=workers,
        collate_fn=collate_fn,
        pin_memory=args.device.startswith("cuda"),
    )
    start = time.perf_counter()
    for images, targets in loader:
        to_device(images, targets, args.device)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return len(dataset) / (time.perf_counter() - start)


def main(args):
    torch.set_num_threads(args.threads)
    image_dir, ann_file = synthetic.coco_like_images(args.images, args.seed)
    problems, largest, compared = compare_targets(image_dir, ann_file)
    pipelines = {p: build(p, image_dir, ann_file) for p in PIPELINES}
    rates = {(p, w): [] for p in PIPELINES for w in args.workers}
    for repeat in range(args.repeats):
        for workers in args.workers:
            for pipeline in PIPELINES if repeat % 2 == 0 else PIPELINES[::-1]:
                rates[pipeline, workers].append(one_pass(*pipelines[pipeline], workers, args))
    dataset = pipelines["this_repo"][0]
    figures = {
        "workload": {
            "images": len(dataset),
            "objects_per_image": coco_objects(dataset) / len(dataset),
            "max_objects": max(len(dataset.records[row][1]) for row in dataset.rows),
            "batch_size": args.batch_size,
            "repeats": args.repeats,
            "recipe": "hflip",
            "threads": args.threads,
        },
        "machine": common.machine(args.device),
        "images_per_s": {
            f"workers_{w}": {p: common.summary(rates[p, w]) for p in PIPELINES}
            for w in args.workers
        },
        "targets_identical": not problems,
        "problems": problems,
        "images_compared": compared,
        "largest_image_difference": largest,
    }
    for w in args.workers:
        speeds = figures["images_per_s"][f"workers_{w}"]
        speeds["speedup"] = speeds["this_repo"]["median"] / speeds["reference"]["median"]
    print_figures(figures)
    common.write_json(args.json, figures)


def coco_objects(dataset):
    return sum(len(dataset.records[row][1]) for row in dataset.rows)


def print_figures(figures):
    workload = figures["workload"]
    print(
        f"{workload['images']} images, {workload['objects_per_image']:.1f} objects per image "
        f"(at most {workload['max_objects']}), batch {workload['batch_size']}, "
        f"{workload['recipe']} recipe, device {figures['machine']['device']}; "
        f"images/s, median (min-max) of {workload['repeats']} passes"
    )
    print(f"{'workers':<8} {'reference':>22} {'this repo':>22} {'speed-up':>9}")
    for key, speeds in figures["images_per_s"].items():
        cells = [
            f"{speeds[p]['median']:.1f} ({speeds[p]['min']:.0f}-{speeds[p]['max']:.0f})"
            for p in PIPELINES
        ]
        print(f"{key.split('_')[1]:<8} {cells[0]:>22} {cells[1]:>22} {speeds['speedup']:>8.2f}x")
    print(
        f"targets identical on {figures['images_compared']} images (flips never and always): "
        f"{figures['targets_identical']}; largest image difference "
        f"{figures['largest_image_difference']:.2g}"
    )
    for problem in figures["problems"]:
        print(f"  {problem}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
