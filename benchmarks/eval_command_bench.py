"""Times `python coco_eval.py` on results files against a pycocotools script, whole process
against whole process (start-up, imports, reading the files, bbox and segm evaluation, exit).

    python benchmarks/eval_command_bench.py --repeats 3 --json eval_command_bench.json

The workload is fixed by --seed and written once (synthetic.evaluation_files): ground truth of
images of 320-480 px with polygon objects in 80 categories and some crowd regions, and per image
--dets detections, half jittered ground-truth ellipses and half clutter, as a bbox and a segm
results file (compressed RLE). The baseline process loads the ground truth with pycocotools'
COCO, then for bbox and segm calls loadRes, COCOeval evaluate, accumulate and summarize; it is
this file run with --pycocotools-only. Runs alternate between the two commands, and the 24 stats
of the two are compared.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
IOU_TYPES = ("bbox", "segm")


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000, help="number of images")
    parser.add_argument("--dets", type=int, default=100, help="detections per image")
    parser.add_argument("--categories", type=int, default=80, help="number of categories")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each command")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated workload")
    parser.add_argument("--json", help="write the figures to this JSON file")
    parser.add_argument(
        "--coco-eval",
        default=str(ROOT / "coco_eval.py"),
        help="the coco_eval.py to time (default: this repo's; another revision's for a before "
        "and after)",
    )
    parser.add_argument(
        "--pycocotools-only",
        action="store_true",
        help="be the baseline process: evaluate --ann and --results with pycocotools, write the "
        "stats to --out",
    )
    parser.add_argument("--ann", help="ground truth, with --pycocotools-only")
    parser.add_argument("--results", nargs=2, help="bbox and segm results, with --pycocotools-only")
    parser.add_argument("--out", help="stats file, with --pycocotools-only")
    return parser


def pycocotools_stats(ann, results, out):
    """What a pycocotools user runs: the 12 stats of bbox, then segm, written to `out`."""
    coco_gt = COCO(ann)
    stats = {}
    for iou_type, path in zip(IOU_TYPES, results, strict=True):
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(path), iou_type)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
        stats[iou_type] = {"stats": coco_eval.stats.tolist()}
    with open(out, "w") as f:
        json.dump(stats, f)


def commands(paths, coco_eval, out_folder):
    """{name: (argv, stats file)} of the two timed processes."""
    gt, bbox, segm = map(str, paths)
    ours_out, baseline_out = Path(out_folder, "ours.json"), Path(out_folder, "baseline.json")
    ours = [coco_eval, "--ann", gt, "--results", bbox, segm]
    ours += ["--iou-types", *IOU_TYPES, "--out", str(ours_out)]
    baseline = [__file__, "--pycocotools-only", "--ann", gt, "--results", bbox, segm]
    baseline += ["--out", str(baseline_out)]
    return {
        "pycocotools": ([sys.executable, *baseline], baseline_out),
        "coco_eval.py": ([sys.executable, *ours], ours_out),
    }


def timed_process(argv):
    """Wall-clock seconds from starting `argv` to its exit, and the CPU seconds it used."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def stats_of(path):
    stats = json.loads(Path(path).read_text())
    return [value for iou_type in IOU_TYPES for value in stats[iou_type]["stats"]]


def main(args):
    # Imported here: the baseline process runs this file too, and torch (which common imports)
    # and PIL (synthetic) would add their start-up to its time.
    import common
    import synthetic

    paths = synthetic.evaluation_files(args.images, args.dets, args.categories, args.seed)
    seconds = {"pycocotools": [], "coco_eval.py": []}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as folder:
        runs = commands(paths, args.coco_eval, folder)
        for _ in range(args.repeats):
            for name, (argv, _) in runs.items():
                seconds[name].append(timed_process(argv))
        stats = {name: stats_of(out) for name, (_, out) in runs.items()}
    baseline, ours = (common.summary([wall for wall, _ in seconds[name]]) for name in runs)
    baseline_cpu, ours_cpu = (common.summary([cpu for _, cpu in seconds[name]]) for name in runs)
    figures = {
        "workload": {
            "images": args.images,
            "detections_per_image": args.dets,
            "categories": args.categories,
            "annotations": len(json.loads(paths[0].read_text())["annotations"]),
            "repeats": args.repeats,
            "files_mib": {p.stem: os.path.getsize(p) / 2**20 for p in paths},
        },
        "machine": common.machine("cpu"),
        "load_average": [load_before, os.getloadavg()[0]],
        "coco_eval": args.coco_eval,
        "pycocotools_s": baseline,
        "coco_eval_s": ours,
        "speedup": baseline["median"] / ours["median"],
        "pycocotools_cpu_s": baseline_cpu,
        "coco_eval_cpu_s": ours_cpu,
        "cpu_speedup": baseline_cpu["median"] / ours_cpu["median"],
        "stats_identical": stats["pycocotools"] == stats["coco_eval.py"],
        "stats": stats["coco_eval.py"],
    }
    print_figures(figures)
    common.write_json(args.json, figures)


def print_figures(figures):
    workload = figures["workload"]
    print(
        f"{workload['images']} images x {workload['detections_per_image']} detections, "
        f"{workload['annotations']} ground-truth objects, bbox + segm, "
        f"{workload['repeats']} repeats, whole processes"
    )
    for label, key in (("pycocotools", "pycocotools"), ("coco_eval.py", "coco_eval")):
        s, cpu = figures[f"{key}_s"], figures[f"{key}_cpu_s"]
        print(
            f"{label:<13} median {s['median']:6.2f} s  (min {s['min']:.2f}, max {s['max']:.2f}), "
            f"CPU {cpu['median']:.2f} s"
        )
    print(f"speed-up {figures['speedup']:.1f}x (CPU time {figures['cpu_speedup']:.1f}x)")
    before, after = figures["load_average"]
    print(f"load average {before:.1f} before, {after:.1f} after")
    print(f"24 stats identical: {figures['stats_identical']}")


if __name__ == "__main__":
    parsed = get_args_parser().parse_args()
    if parsed.pycocotools_only:
        pycocotools_stats(parsed.ann, parsed.results, parsed.out)
    else:
        main(parsed)
