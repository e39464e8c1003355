"""Memory of the main process and its DataLoader workers over one pass of a training set the
size of COCO train2017 (118k images, 860k polygons): torchvision's reference way (pycocotools'
index of Python dicts, see reference.py) against this repo's CocoDetection (packed records),
each in a fresh process of the same run.

    pip install psutil
    python benchmarks/memory_bench.py --json memory_bench.json

The images are 64x48 px files shared by all records (see synthetic.py): the annotations are the
point. Each worker decodes and transforms its samples as in training, then returns only their
object counts, so that batches in flight do not blur the figure.

Memory is summed over the main process and its workers. RSS cannot show what the workers cost:
a forked worker's RSS counts every page it shares with the main process from the start, and
copying such a page on write changes no one's RSS. PSS divides each shared page among the
processes that map it, so its sum is the memory the group occupies and grows with every page a
worker copies; USS counts the pages each process owns alone. Reading an item of a Python list
of dicts writes the reference counts stored beside it, which copies its page into the worker.
"""

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import reference  # noqa: E402
import synthetic  # noqa: E402

import coco_utils  # noqa: E402
import presets  # noqa: E402

METHODS = ("reference", "this_repo")
MIB = 2**20


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--batch-size", type=int, default=2, help="images per batch")
    parser.add_argument(
        "--max-images", type=int, help="images in the pass (default: the whole training set)"
    )
    parser.add_argument("--repeats", type=int, default=1, help="passes of each method")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between samples")
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="device the batches go to (host memory is what is measured)",
    )
    parser.add_argument("--json", help="write the figures to this JSON file")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    return parser


def build_dataset(method, image_dir, ann_file):
    if method == "reference":
        return reference.get_coco_train(image_dir, ann_file, reference.train_transforms())
    transforms = presets.DetectionPresetTrain("hflip")
    return coco_utils.CocoDetection(
        image_dir, ann_file, transforms, drop_images_without_objects=True, sample_seed=0
    )


def count_objects(batch):
    return torch.tensor([len(target["labels"]) for _, target in batch])


def memory(process):
    info = process.memory_full_info()
    return {"rss": info.rss, "pss": info.pss, "uss": info.uss}


def snapshot():
    """Memory of this process, of its workers, and their totals, in bytes."""
    main = psutil.Process()
    workers = []
    for child in main.children(recursive=True):
        try:
            workers.append(memory(child))
        except psutil.NoSuchProcess:
            continue
    own = memory(main)
    total = {key: own[key] + sum(w[key] for w in workers) for key in own}
    return {"main": own, "workers": workers, "total": total, "time": time.perf_counter()}


def run_child(args):
    """One pass of one method; prints its figures as a JSON line."""
    image_dir, ann_file = synthetic.coco_sized_annotations()
    start = time.perf_counter()
    dataset = build_dataset(args.child, image_dir, ann_file)
    build_seconds = time.perf_counter() - start
    num_images = min(args.max_images or len(dataset), len(dataset))
    sampler = torch.utils.data.RandomSampler(
        dataset, num_samples=num_images, generator=torch.Generator().manual_seed(0)
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.batch_size,
        sampler=sampler,
        num_workers=args.workers,
        collate_fn=count_objects,
        pin_memory=args.device.startswith("cuda"),
    )
    if args.child == "this_repo":  # as train.py does before training
        gc.collect()
        gc.freeze()
    before = snapshot()
    samples, objects = [], 0
    start = time.perf_counter()
    for i, counts in enumerate(loader):
        objects += int(counts.to(args.device).sum())
        due = not samples or time.perf_counter() - samples[-1]["time"] > args.interval
        if due or i == len(loader) - 1:
            samples.append(snapshot())
    pass_seconds = time.perf_counter() - start
    first, last = samples[0]["total"], samples[-1]["total"]
    figures = {
        "method": args.child,
        "images": num_images,
        "objects": objects,
        "build_s": build_seconds,
        "pass_s": pass_seconds,
        "main_before": before["main"],
        "first_batch": samples[0],
        "end": samples[-1],
        "growth": {key: last[key] - first[key] for key in first},
        "peak": {key: max(s["total"][key] for s in samples) for key in first},
        "timeline": [{"s": s["time"] - start, **s["total"]} for s in samples],
    }
    print(json.dumps(figures))


def run_method(method, args):
    command = [sys.executable, __file__, "--child", method, "--workers", str(args.workers)]
    command += ["--batch-size", str(args.batch_size), "--interval", str(args.interval)]
    command += ["--device", args.device]
    if args.max_images:
        command += ["--max-images", str(args.max_images)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main(args):
    if args.child:
        run_child(args)
        return
    synthetic.coco_sized_annotations()  # written once, outside the measurements
    runs = {method: [] for method in METHODS}
    for repeat in range(args.repeats):
        for method in METHODS if repeat % 2 == 0 else METHODS[::-1]:
            runs[method].append(run_method(method, args))
            print(f"  {method}: pass {repeat + 1} took {runs[method][-1]['pass_s']:.0f} s")
    rows = [
        ("main process before the pass", lambda r, key: r["main_before"][key]),
        ("total at the first batch", lambda r, key: r["first_batch"]["total"][key]),
        ("total at the end of the pass", lambda r, key: r["end"]["total"][key]),
        ("growth over the pass", lambda r, key: r["growth"][key]),
        ("peak total", lambda r, key: r["peak"][key]),
    ]
    figures = {
        "workload": {
            "images": runs["this_repo"][0]["images"],
            "workers": args.workers,
            "batch_size": args.batch_size,
            "repeats": args.repeats,
            "annotation_file_mib": os.path.getsize(synthetic.coco_sized_annotations()[1]) / MIB,
        },
        "machine": common.machine(args.device),
        "mib": {
            method: {
                key: {
                    row: common.summary([get(r, key) / MIB for r in runs[method]])
                    for row, get in rows
                }
                for key in ("pss", "uss", "rss")
            }
            for method in METHODS
        },
        "seconds": {
            method: {
                "build": common.summary([r["build_s"] for r in runs[method]]),
                "pass": common.summary([r["pass_s"] for r in runs[method]]),
            }
            for method in METHODS
        },
        "runs": runs,
    }
    figures["growth_ratio"] = {
        key: figures["mib"]["this_repo"][key]["growth over the pass"]["median"]
        / max(figures["mib"]["reference"][key]["growth over the pass"]["median"], 1e-9)
        for key in ("pss", "uss", "rss")
    }
    print_figures(figures)
    common.write_json(args.json, figures)


def print_figures(figures):
    workload = figures["workload"]
    print(
        f"one pass over {workload['images']:,} images, {workload['workers']} workers, "
        f"batch {workload['batch_size']}, annotation file {workload['annotation_file_mib']:.0f} "
        f"MiB; medians of {workload['repeats']} run(s), MiB"
    )
    for key in ("pss", "uss", "rss"):
        print(f"{key.upper():<30} {'reference':>12} {'this repo':>12}")
        for row in figures["mib"]["reference"][key]:
            values = [figures["mib"][m][key][row]["median"] for m in METHODS]
            print(f"  {row:<28} {values[0]:>12.0f} {values[1]:>12.0f}")
    for method in METHODS:
        seconds = figures["seconds"][method]
        print(
            f"{method}: dataset built in {seconds['build']['median']:.1f} s, "
            f"pass {seconds['pass']['median']:.0f} s"
        )
    ratio = figures["growth_ratio"]
    print(
        "growth over the pass, this repo / reference: "
        + ", ".join(f"{key.upper()} {ratio[key]:.3f}" for key in ("pss", "uss", "rss"))
    )


if __name__ == "__main__":
    main(get_args_parser().parse_args())
