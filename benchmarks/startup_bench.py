"""Seconds from `python train.py` to its first training iteration with an annotation file the
size of COCO train2017 (118k images, 860k polygons): this repo against the reference way of
loading it (pycocotools' COCO(ann_file), then dropping images without a valid annotation; see
reference.py), in the same run.

    python benchmarks/startup_bench.py --repeats 3 --json startup_bench.json

Both runs are the same train.py command line: Mask R-CNN at 128 px, batch 2, 2 workers, a
small validation set, on --device, with fewer proposals and one CPU thread, so that the first
step (the same in both) takes seconds, not most of the time. For the reference, train.py's
get_coco builds the training set the reference way (this script with --as-reference runs
train.py so). A run is timed from its start to the log line train.py prints after the first
iteration, then stopped; runs alternate. Also given: when train.py prints its "categories:"
line, once both datasets are built.
"""

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import reference  # noqa: E402
import synthetic  # noqa: E402

import coco_utils  # noqa: E402

METHODS = ("reference", "this_repo")


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each method")
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="train.py --device"
    )
    parser.add_argument("--json", help="write the figures to this JSON file")
    parser.add_argument(
        "--as-reference", nargs=argparse.REMAINDER, help="run train.py with these arguments, "
        "building its training set the reference way"
    )  # fmt: skip
    return parser


class ReferenceTrainSet(torch.utils.data.Dataset):
    """reference.get_coco_train, with what train.py asks of a training set."""

    label_offset = 0

    def __init__(self, image_dir, ann_file):
        self.subset = reference.get_coco_train(image_dir, ann_file, reference.train_transforms())
        self.coco = self.subset.dataset.coco

    def __len__(self):
        return len(self.subset)

    def __getitem__(self, index):
        return self.subset[index]

    def set_epoch(self, epoch):
        pass

    def category_names(self):
        return {c["id"]: c["name"] for c in self.coco.dataset["categories"]}

    def aspect_ratios(self):
        ids = self.subset.dataset.ids
        images = [self.coco.imgs[ids[i]] for i in self.subset.indices]
        return [image["width"] / image["height"] for image in images]


def reference_get_coco(args, split, transforms, label_offset=None, sample_seed=None):
    if split != "train":
        return coco_utils.get_coco(args, split, transforms, label_offset, sample_seed)
    return ReferenceTrainSet(*coco_utils.split_paths(args, split))


def run_train_as_reference(argv):
    import train

    train.get_coco = reference_get_coco
    train.cli(argv)


def train_argv(args, output_dir):
    train_images, train_ann = synthetic.coco_sized_annotations()
    val_images, val_ann = synthetic.coco_like_images(num_images=8, seed=1)
    return [
        "--train-ann", str(train_ann), "--train-images", str(train_images),
        "--val-ann", str(val_ann), "--val-images", str(val_images),
        "--output-dir", output_dir, "--epochs", "1", "-b", "2", "-j", "2",
        "--min-size", "128", "--max-size", "128", "--print-freq", "1", "--seed", "0",
        "--rpn-post-nms-top-n-train", "100", "--box-batch-size-per-image", "32",
        "--device", args.device,
    ]  # fmt: skip


def timed_run(method, args):
    """Seconds to the "categories:" line and to the first iteration's log line."""
    with tempfile.TemporaryDirectory() as output_dir:
        argv = train_argv(args, output_dir)
        if method == "reference":
            command = [sys.executable, __file__, "--as-reference", *argv]
        else:
            command = [sys.executable, str(ROOT / "train.py"), *argv]
        start = time.perf_counter()
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group: stopped with its workers
        )
        marks, lines = {}, []
        for line in process.stdout:
            lines.append(line)
            if line.startswith("categories:"):
                marks["datasets_s"] = time.perf_counter() - start
            if line.startswith("Epoch: [0]"):
                marks["first_iteration_s"] = time.perf_counter() - start
                break
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    if "first_iteration_s" not in marks:
        raise RuntimeError(
            f"{method}: train.py ended before its first iteration:\n" + "".join(lines[-20:])
        )
    return marks


def main(args):
    if args.as_reference is not None:
        run_train_as_reference(args.as_reference)
        return
    train_images, train_ann = synthetic.coco_sized_annotations()  # written once, untimed
    synthetic.coco_like_images(num_images=8, seed=1)
    runs = {method: [] for method in METHODS}
    for repeat in range(args.repeats):
        for method in METHODS if repeat % 2 == 0 else METHODS[::-1]:
            runs[method].append(timed_run(method, args))
    figures = {
        "workload": {
            "annotation_file_mib": os.path.getsize(train_ann) / 2**20,
            "images": synthetic.COCO_TRAIN2017_IMAGES,
            "annotations": synthetic.COCO_TRAIN2017_ANNOTATIONS,
            "repeats": args.repeats,
        },
        "machine": common.machine(args.device),
        "seconds": {
            method: {key: common.summary([r[key] for r in runs[method]]) for key in runs[method][0]}
            for method in METHODS
        },
    }
    seconds = figures["seconds"]
    figures["ratio"] = {
        key: seconds["this_repo"][key]["median"] / seconds["reference"][key]["median"]
        for key in seconds["this_repo"]
    }
    print_figures(figures)
    common.write_json(args.json, figures)


def print_figures(figures):
    workload = figures["workload"]
    print(
        f"python train.py on {workload['images']:,} images / {workload['annotations']:,} "
        f"annotations ({workload['annotation_file_mib']:.0f} MiB), "
        f"{figures['machine']['device']}; seconds, median (min-max) of {workload['repeats']} runs"
    )
    print(f"{'until':<18} {'reference':>20} {'this repo':>20} {'this repo / ref':>16}")
    for key, label in (("datasets_s", "datasets built"), ("first_iteration_s", "first iteration")):
        cells = [
            f"{figures['seconds'][m][key]['median']:.1f} "
            f"({figures['seconds'][m][key]['min']:.1f}-{figures['seconds'][m][key]['max']:.1f})"
            for m in METHODS
        ]
        print(f"{label:<18} {cells[0]:>20} {cells[1]:>20} {figures['ratio'][key]:>16.2f}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
