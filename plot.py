"""Plots of training runs, several overlaid for comparison, as one image file.

    python plot.py output/demo output/demo-sgd --output runs.png
    python plot.py output/demo --pr --ann datasets/demo/annotations/instances_val2017.json \
        --output pr.png

The first draws, per epoch, each training loss, the learning rate, bbox and segm AP (solid) and
AP50 (dashed) and the DSB2018 score, from each run's `log.jsonl`; epochs without an evaluation
and stats of -1 (no ground truth of that size) are left out. The second draws the precision-recall
curve of every category with ground truth, at IoU 0.50 (solid) and averaged over IoU 0.50:0.95
(dashed; the curve COCO's AP averages), from each run's last `results_segm.json` and
`results_bbox.json`, evaluated against `--ann` with pycocotools (area "all", the last maxDets,
which is 100 or more as in training). Runs are told apart by colour and named by folder.

A missing folder or file, or a line of log.jsonl that is not a log record, stops with one line
`plot.py: error: ...` naming it, and exit status 2.
"""

import argparse
import json
import math
import os
from collections import Counter

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

import coco_eval
from coco_eval import precision_curves
from commands import one_line_errors
from errors import ConfigError, DataError

IOU_TYPES = ("bbox", "segm")
PANEL_SIZE = (4.0, 3.0)  # inches


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="train.py --output-dir")
    parser.add_argument(
        "--output", required=True, metavar="FILE.png", help="image file to write (.png, .pdf, .svg)"
    )
    parser.add_argument("--pr", action="store_true", help="per-category precision-recall curves")
    parser.add_argument(
        "--ann", metavar="FILE", help="with --pr: the annotation file the runs evaluated on"
    )
    return parser


def run_labels(run_dirs):
    """Each run's folder name, or its whole path where two runs share a folder name."""
    names = [os.path.basename(os.path.normpath(run_dir)) for run_dir in run_dirs]
    counts = Counter(names)
    return [
        name if counts[name] == 1 else os.path.normpath(run_dir)
        for name, run_dir in zip(names, run_dirs, strict=True)
    ]


def check_run_dir(run_dir):
    if not os.path.isdir(run_dir):
        raise ConfigError(f"{run_dir}: no such folder")


def read_log(run_dir):
    """The records of RUN_DIR/log.jsonl, checked line by line."""
    check_run_dir(run_dir)
    path = os.path.join(run_dir, "log.jsonl")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file (train.py writes it after each epoch)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read it ({e})") from None
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {number}: not valid JSON ({e.msg})") from None
        problem = record_problem(record)
        if problem:
            raise DataError(f"{path}, line {number}: {problem}")
        records.append(record)
    if not records:
        raise DataError(f"{path}: no epoch logged yet")
    return records


def record_problem(record):
    """What makes `record` no log.jsonl record, or None."""
    if not isinstance(record, dict) or not _is_number(record.get("epoch")):
        return 'not a log record (a JSON object with an "epoch")'
    train = record.get("train", {})
    if not isinstance(train, dict) or not all(_is_number(v) for v in train.values()):
        return '"train" is not an object of numbers'
    for iou_type in IOU_TYPES:
        stats = record.get(iou_type)
        if stats is not None and not (
            isinstance(stats, list) and len(stats) == 12 and all(map(_is_number, stats))
        ):
            return f'"{iou_type}" is not a list of 12 numbers'
    for key in ("lr", "dsb"):
        if key in record and not _is_number(record[key]):
            return f'"{key}" is not a number'
    return None


def _is_number(value):
    return isinstance(value, int | float) and not isinstance(value, bool)


def panel_grid(count):
    """A figure with `count` axes in rows, and the axes."""
    columns = min(count, max(4, math.ceil(math.sqrt(count))))
    rows = math.ceil(count / columns)
    figure = Figure(
        figsize=(PANEL_SIZE[0] * columns, PANEL_SIZE[1] * rows + 0.6), layout="constrained"
    )
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for unused in axes[count:]:
        unused.set_axis_off()
    return figure, axes[:count]


def _run_style(index):
    # Earlier runs are drawn wider, so that a later run's identical curve does not hide them.
    return {"color": f"C{index}", "linewidth": max(0.8, 2.6 - 0.6 * index)}


def add_run_legend(figure, labels, extra=()):
    handles = [Line2D([], [], **_run_style(i)) for i in range(len(labels))]
    handles += [Line2D([], [], color="black", linestyle=style) for _, style in extra]
    figure.legend(
        handles,
        [*labels, *(text for text, _ in extra)],
        loc="outside upper center",
        ncols=min(len(handles), 6),
    )


def plot_logs(runs):
    """The figure of losses, learning rate and evaluations per epoch; `runs` is {label: records}."""
    losses = sorted(
        {key for records in runs.values() for r in records for key in r.get("train", {})},
        key=lambda key: (key != "loss", key),
    )
    panels = [(f"train {key}", [(_train_value(key), "-")], "linear") for key in losses]
    # Runs compared often differ in lr by orders of magnitude (SGD against AdamW).
    panels.append(("learning rate", [(_value("lr"), "-")], "log"))
    for iou_type in IOU_TYPES:
        if _any_record_has(runs, iou_type):
            lines = [(_stat(iou_type, 0), "-"), (_stat(iou_type, 1), "--")]
            panels.append((f"{iou_type} AP (solid), AP50 (dashed)", lines, "linear"))
    if _any_record_has(runs, "dsb"):
        panels.append(("DSB2018 score", [(_value("dsb"), "-")], "linear"))
    figure, axes = panel_grid(len(panels))
    for ax, (title, lines, scale) in zip(axes, panels, strict=True):
        for colour, records in enumerate(runs.values()):
            for value_of, style in lines:
                points = [(r["epoch"], value_of(r)) for r in records]
                points = [(epoch, value) for epoch, value in points if value is not None]
                if points:
                    ax.plot(*zip(*points, strict=True), style, marker=".", **_run_style(colour))
        ax.set(title=title, xlabel="epoch", yscale=scale)
        ax.grid(alpha=0.3)
    add_run_legend(figure, list(runs))
    return figure


def _any_record_has(runs, key):
    return any(key in record for records in runs.values() for record in records)


def _train_value(key):
    return lambda record: record.get("train", {}).get(key)


def _value(key):
    return lambda record: record.get(key)


def _stat(iou_type, index):
    """The stat at `index` of `iou_type`; None without an evaluation or at -1 (nothing to score)."""

    def value_of(record):
        stats = record.get(iou_type)
        return stats[index] if stats is not None and stats[index] >= 0 else None

    return value_of


def evaluate_run(run_dir, dataset, coco_gt, backend):
    """{iou_type: accumulated COCOeval} for each results file in `run_dir`."""
    check_run_dir(run_dir)
    paths = {
        iou_type: os.path.join(run_dir, f"results_{iou_type}.json")
        for iou_type in IOU_TYPES
        if os.path.isfile(os.path.join(run_dir, f"results_{iou_type}.json"))
    }
    if not paths:
        raise DataError(
            f"{run_dir}: no results_bbox.json or results_segm.json (each evaluation writes them)"
        )
    image_ids = {image["id"] for image in dataset["images"]}
    evaluations = {}
    for iou_type, results in coco_eval.read_results(paths, image_ids).items():
        most = max(Counter(r["image_id"] for r in results).values(), default=0)
        # As in training: the last maxDets is at least 100 and keeps every detection.
        max_dets = (1, 10, max(100, most))
        evaluations[iou_type] = coco_eval.run_cocoeval(
            backend, coco_gt, results, iou_type, max_dets
        )
    return evaluations


def plot_pr(curves, categories, recall):
    """The figure of precision-recall curves; `curves` is {label: {iou_type: precision_curves}},
    `categories` {id: name}, `recall` the recall points."""
    panels = sorted(
        {
            (iou_type, category_id)
            for by_type in curves.values()
            for iou_type, by_category in by_type.items()
            for category_id in by_category
        },
        key=lambda panel: (IOU_TYPES.index(panel[0]), panel[1]),
    )
    if not panels:
        raise DataError("no category of the annotation file has ground truth to draw")
    figure, axes = panel_grid(len(panels))
    for ax, (iou_type, category_id) in zip(axes, panels, strict=True):
        for colour, by_type in enumerate(curves.values()):
            pair = by_type.get(iou_type, {}).get(category_id)
            if pair is not None:
                ax.plot(recall, pair[0], "-", **_run_style(colour))
                ax.plot(recall, pair[1], "--", **_run_style(colour))
        ax.set_title(f"{categories[category_id]} ({iou_type})")
        ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    add_run_legend(figure, list(curves), [("IoU 0.50", "-"), ("IoU 0.50:0.95", "--")])
    return figure


def draw(args):
    """The figure the command line asks for."""
    labels = run_labels(args.run_dirs)
    if not args.pr:
        if args.ann:
            raise ConfigError("--ann is used only with --pr")
        return plot_logs(
            {label: read_log(d) for label, d in zip(labels, args.run_dirs, strict=True)}
        )
    if not args.ann:
        raise ConfigError("--pr needs --ann, the annotation file the runs evaluated on")
    dataset = coco_eval.read_gt(args.ann)
    backend = coco_eval.get_backend("pycocotools")
    coco_gt = coco_eval.load_gt(backend, dataset)
    curves, recall = {}, None
    for label, run_dir in zip(labels, args.run_dirs, strict=True):
        evaluations = evaluate_run(run_dir, dataset, coco_gt, backend)
        curves[label] = {t: precision_curves(e) for t, e in evaluations.items()}
        recall = next(iter(evaluations.values())).params.recThrs
    categories = {category["id"]: category["name"] for category in dataset["categories"]}
    return plot_pr(curves, categories, recall)


def save(figure, path):
    try:
        figure.savefig(path, dpi=100)
    except OSError as e:
        raise ConfigError(f"--output {path}: cannot write it ({e.strerror or e})") from None
    except ValueError as e:  # an extension matplotlib has no writer for
        raise ConfigError(f"--output {path}: {e}") from None


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    with one_line_errors("plot.py"):
        save(draw(args), args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
