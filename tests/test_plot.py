"""plot.py on synthetic log.jsonl files and a tiny COCO ground truth with results files."""

import json

import numpy as np
import pytest
from conftest import write_coco
from pycocotools import mask as mask_util

import coco_eval
import plot

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def stats(ap, ap50, small=-1.0):
    return [ap, ap50, ap, small, ap, ap] + [ap] * 6


def write_run(root, name, records, extra_lines=()):
    run_dir = root / name
    run_dir.mkdir(parents=True)
    lines = [json.dumps(record) for record in records] + list(extra_lines)
    (run_dir / "log.jsonl").write_text("\n".join(lines) + "\n")
    return run_dir


def train_losses(epoch):
    return {"loss": 2.0 - epoch / 10, "loss_classifier": 0.5 - epoch / 100, "loss_mask": 0.7}


RUN_A = [
    {"epoch": e, "lr": 0.01 / (e + 1), "train": train_losses(e), "bbox": stats(0.1 * e, 0.2 * e)}
    | ({"segm": stats(0.05 * e, 0.1 * e), "dsb": 0.3 + e / 10} if e != 1 else {})
    for e in range(3)
]
RUN_B = [{"epoch": e, "lr": 0.02, "train": {"loss": 3.0 - e}} for e in range(2)]


def axes_by_title(figure):
    return {ax.get_title(): ax for ax in figure.axes if ax.get_title()}


def line_data(ax, colour):
    return [
        (list(line.get_xdata()), list(line.get_ydata()))
        for line in ax.get_lines()
        if line.get_color() == colour
    ]


def test_log_figure_holds_the_logged_values(tmp_path):
    runs = {"a": RUN_A, "b": RUN_B}
    figure = plot.plot_logs(runs)
    panels = axes_by_title(figure)
    assert list(panels) == [
        "train loss",
        "train loss_classifier",
        "train loss_mask",
        "learning rate",
        "bbox AP (solid), AP50 (dashed)",
        "segm AP (solid), AP50 (dashed)",
        "DSB2018 score",
    ]
    assert line_data(panels["train loss"], "C0") == [([0, 1, 2], [2.0, 1.9, 1.8])]
    assert line_data(panels["train loss"], "C1") == [([0, 1], [3.0, 2.0])]
    assert line_data(panels["train loss_mask"], "C1") == []
    assert line_data(panels["learning rate"], "C0") == [([0, 1, 2], [r["lr"] for r in RUN_A])]
    segm = line_data(panels["segm AP (solid), AP50 (dashed)"], "C0")
    assert segm == [([0, 2], [0.0, 0.1]), ([0, 2], [0.0, 0.2])]  # epoch 1 was not evaluated
    assert line_data(panels["DSB2018 score"], "C0") == [([0, 2], [0.3, 0.5])]
    assert [text.get_text() for text in figure.legends[0].get_texts()] == ["a", "b"]


def test_stats_of_minus_one_are_left_out():
    records = [{"epoch": 0, "bbox": stats(-1.0, -1.0)}, {"epoch": 1, "bbox": stats(0.4, 0.6)}]
    panels = axes_by_title(plot.plot_logs({"run": records}))
    assert line_data(panels["bbox AP (solid), AP50 (dashed)"], "C0") == [([1], [0.4]), ([1], [0.6])]


def test_command_writes_a_png_with_runs_named_by_folder(tmp_path, capsys):
    run_a = write_run(tmp_path / "x", "run", RUN_A)
    run_b = write_run(tmp_path / "y", "run", RUN_B)
    run_c = write_run(tmp_path, "other", RUN_B)
    assert plot.run_labels([str(run_a), str(run_b), str(run_c)]) == [
        str(run_a),
        str(run_b),
        "other",
    ]
    output = tmp_path / "runs.png"
    plot.main([str(run_a), str(run_c), "--output", str(output)])
    assert output.read_bytes().startswith(PNG_SIGNATURE)
    assert f"wrote {output}" in capsys.readouterr().out


def run_error(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        plot.main(argv)
    assert exited.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("plot.py: error: ")
    return lines[0]


def test_missing_folder(tmp_path, capsys):
    missing = tmp_path / "nope"
    line = run_error([str(missing), "--output", str(tmp_path / "p.png")], capsys)
    assert line == f"plot.py: error: {missing}: no such folder"


def test_folder_without_log(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    line = run_error([str(tmp_path / "empty"), "--output", str(tmp_path / "p.png")], capsys)
    assert f"{tmp_path / 'empty' / 'log.jsonl'}: no such file" in line


@pytest.mark.parametrize(
    ("bad_line", "problem"),
    [
        ('{"epoch": 3, "lr": 0.1', "line 4: not valid JSON"),
        ("[1, 2]", "line 4: not a log record"),
        ('{"epoch": 3, "bbox": [0.1, 0.2]}', 'line 4: "bbox" is not a list of 12 numbers'),
        ('{"epoch": 3, "train": {"loss": "nan?"}}', 'line 4: "train" is not an object'),
    ],
)
def test_bad_log_line(tmp_path, capsys, bad_line, problem):
    run_dir = write_run(tmp_path, "run", RUN_A, [bad_line])
    output = tmp_path / "p.png"
    line = run_error([str(run_dir), "--output", str(output)], capsys)
    assert f"{run_dir / 'log.jsonl'}, {problem}" in line
    assert not output.exists()


def test_unwritable_output(tmp_path, capsys):
    run_dir = write_run(tmp_path, "run", RUN_B)
    target = tmp_path / "no" / "such" / "p.png"
    line = run_error([str(run_dir), "--output", str(target)], capsys)
    assert f"--output {target}: cannot write it" in line


SIZE = 32


def box_mask(x0, y0, x1, y1):
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


def rle(mask):
    encoded = mask_util.encode(np.asfortranarray(mask))
    return {"size": encoded["size"], "counts": encoded["counts"].decode("ascii")}


def xywh(mask):
    return [float(v) for v in mask_util.toBbox(mask_util.encode(np.asfortranarray(mask)))]


# image id -> [(category id, box x0, y0, x1, y1)]: category 1 "cell" twice per image, category 2
# "debris" once; category 3 "absent" has no ground truth.
GROUND_TRUTH = {
    1: [(1, (2, 2, 12, 12)), (1, (16, 16, 28, 28)), (2, (2, 18, 10, 30))],
    2: [(1, (4, 4, 14, 14)), (1, (18, 2, 30, 12)), (2, (20, 20, 30, 30))],
}


def write_ground_truth(path):
    images = [{"id": i, "file_name": f"{i}.png", "height": SIZE, "width": SIZE} for i in (1, 2)]
    annotations = [
        {
            "id": image_id * 10 + n,
            "image_id": image_id,
            "category_id": category_id,
            "segmentation": rle(box_mask(*box)),
            "bbox": xywh(box_mask(*box)),
            "area": float(box_mask(*box).sum()),
            "iscrowd": 0,
        }
        for image_id, objects in GROUND_TRUTH.items()
        for n, (category_id, box) in enumerate(objects)
    ]
    categories = [
        {"id": 1, "name": "cell"},
        {"id": 2, "name": "debris"},
        {"id": 3, "name": "absent"},
    ]
    return write_coco(path, images, annotations, categories)


def write_results(run_dir, cell_exact=True):
    """Exact cells (or cells shifted by 3 px) and a debris found once, beside a false positive."""
    results = []
    for image_id, objects in GROUND_TRUTH.items():
        for n, (category_id, (x0, y0, x1, y1)) in enumerate(objects):
            if category_id == 2 and image_id == 2:
                continue  # a missed debris
            shift = 0 if cell_exact or category_id == 2 else 3
            found = box_mask(x0 + shift, y0, x1 + shift, y1)
            results.append(
                {"image_id": image_id, "category_id": category_id, "score": 0.9 - n / 10}
            )
            results[-1] |= {"segmentation": rle(found), "bbox": xywh(found)}
    wrong = box_mask(0, 0, 6, 6)
    results.append(
        {"image_id": 1, "category_id": 2, "score": 0.95, "segmentation": rle(wrong)}
        | {"bbox": xywh(wrong)}
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    for iou_type in ("bbox", "segm"):
        (run_dir / f"results_{iou_type}.json").write_text(json.dumps(results))
    return run_dir


@pytest.fixture
def pr_setup(tmp_path):
    ann = write_ground_truth(tmp_path / "instances_val.json")
    exact = write_results(tmp_path / "exact")
    shifted = write_results(tmp_path / "shifted", cell_exact=False)
    return ann, exact, shifted


def evaluations(ann, run_dir):
    dataset = coco_eval.read_gt(ann)
    backend = coco_eval.get_backend("pycocotools")
    return plot.evaluate_run(run_dir, dataset, coco_eval.load_gt(backend, dataset), backend)


def test_precision_curves_match_cocoeval(pr_setup):
    ann, exact, shifted = pr_setup
    evaluated = evaluations(ann, exact)
    assert set(evaluated) == {"bbox", "segm"}
    curves = plot.precision_curves(evaluated["segm"])
    assert set(curves) == {1, 2}  # "absent" has no ground truth
    at_50, mean = curves[1]
    assert at_50.shape == (101,) and (at_50 == 1.0).all() and (mean == 1.0).all()
    # debris: the false positive outranks the one true positive, and half the debris is missed
    debris_at_50 = curves[2][0]
    assert (debris_at_50[:51] == 0.5).all() and (debris_at_50[51:] == 0.0).all()
    categories = {1: {"name": "cell"}, 2: {"name": "debris"}, 3: {"name": "absent"}}
    for iou_type in ("bbox", "segm"):
        for evaluated_run in (evaluated, evaluations(ann, shifted)):
            rows = coco_eval.per_category_ap({iou_type: evaluated_run[iou_type]}, categories)
            curves = plot.precision_curves(evaluated_run[iou_type])
            for row, category_id in zip(rows[:2], (1, 2), strict=True):
                assert curves[category_id][1].mean() == pytest.approx(row[iou_type], abs=1e-12)


def test_shifted_cells_lose_precision_at_strict_iou_only(pr_setup):
    ann, _, shifted = pr_setup
    at_50, mean = plot.precision_curves(evaluations(ann, shifted)["segm"])[1]
    assert (at_50 == 1.0).all()  # IoU of a 3 px shift of 10-12 px boxes is above 0.5
    assert mean.max() < 1.0


def test_pr_command_draws_a_panel_per_category_and_iou_type(pr_setup, tmp_path):
    ann, exact, shifted = pr_setup
    curves = {
        label: {t: plot.precision_curves(e) for t, e in evaluations(ann, d).items()}
        for label, d in (("exact", exact), ("shifted", shifted))
    }
    figure = plot.plot_pr(curves, {1: "cell", 2: "debris", 3: "absent"}, np.linspace(0, 1, 101))
    assert list(axes_by_title(figure)) == [
        "cell (bbox)",
        "debris (bbox)",
        "cell (segm)",
        "debris (segm)",
    ]
    output = tmp_path / "pr.png"
    plot.main([str(exact), str(shifted), "--pr", "--ann", str(ann), "--output", str(output)])
    assert output.read_bytes().startswith(PNG_SIGNATURE)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--pr"], "--pr needs --ann"),
        (["--ann", "x.json"], "--ann is used only with --pr"),
    ],
)
def test_pr_flag_combinations(tmp_path, capsys, extra, message):
    run_dir = write_run(tmp_path, "run", RUN_B)
    line = run_error([str(run_dir), *extra, "--output", str(tmp_path / "p.png")], capsys)
    assert message in line


def test_pr_run_without_results(pr_setup, tmp_path, capsys):
    ann, _, _ = pr_setup
    run_dir = write_run(tmp_path, "fresh", RUN_B)
    argv = [str(run_dir), "--pr", "--ann", str(ann), "--output", str(tmp_path / "p.png")]
    assert f"{run_dir}: no results_bbox.json or results_segm.json" in run_error(argv, capsys)


def test_pr_missing_annotation_file(pr_setup, tmp_path, capsys):
    _, exact, _ = pr_setup
    missing = tmp_path / "missing.json"
    argv = [str(exact), "--pr", "--ann", str(missing), "--output", str(tmp_path / "p.png")]
    assert str(missing) in run_error(argv, capsys)
