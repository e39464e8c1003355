"""Bad input gives one-line errors; training survives kills and signals and resumes exactly."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import FAST, ROOT, SMALL_MASKRCNN, write_coco, write_image

import train
from errors import CommandError


def main_error(*argv):
    """The one-line message train.main stops with."""
    args = train.get_args_parser().parse_args([*SMALL_MASKRCNN, *FAST, *argv])
    with pytest.raises(CommandError) as error:
        train.main(args)
    assert "\n" not in error.value.message
    return f"error: {error.value.message}"


@pytest.fixture
def data(tmp_path, demo_root):
    """A writable copy of the demo dataset, and a function that rewrites its train file."""
    root = tmp_path / "data"
    shutil.copytree(demo_root, root)
    ann_file = root / "annotations" / "instances_train2017.json"
    original = json.loads(ann_file.read_text())

    def edit(change):
        dataset = json.loads(json.dumps(original))
        change(dataset)
        ann_file.write_text(json.dumps(dataset))
        return ann_file

    return root, ann_file, edit


def first_annotation(dataset):
    return dataset["annotations"][0]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda d: d.pop("images"), "not a COCO annotation file (no 'images' list)"),
        (lambda d: d.pop("annotations"), "no 'annotations' list"),
        (lambda d: first_annotation(d).update(image_id=999), "unknown image_id 999"),
        (lambda d: first_annotation(d).update(category_id=77), "unknown category_id 77"),
        (
            lambda d: first_annotation(d).update(segmentation=[[1, 2, 3, 4, 5, 6, 7]]),
            "polygon with an odd number of coordinates",
        ),
        (
            lambda d: first_annotation(d).update(segmentation=[[1, 2, 3, 4]]),
            "polygon with 2 points (needs 3)",
        ),
        (
            lambda d: first_annotation(d).update(segmentation={"size": [10, 10], "counts": "0"}),
            "RLE size [10, 10] differs from its image's [height, width] [64, 64]",
        ),
        (lambda d: d["annotations"].clear(), "no image with a usable (non-crowd, non-empty)"),
    ],
)
def test_broken_annotation_file_is_named_with_the_item(data, tmp_path, change, expected):
    root, ann_file, edit = data
    edit(change)
    message = main_error("--data-path", str(root), "--output-dir", str(tmp_path / "out"))
    assert str(ann_file) in message and expected in message
    if "unknown" in expected or "polygon" in expected or "RLE" in expected:
        annotation_id = json.loads(ann_file.read_text())["annotations"][0]["id"]
        assert f"annotation {annotation_id}:" in message


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "empty file"),
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "not a COCO annotation file (top level"),
    ],
)
def test_unreadable_annotation_file(data, tmp_path, content, expected):
    root, ann_file, _ = data
    ann_file.write_bytes(content)
    message = main_error("--data-path", str(root), "--output-dir", str(tmp_path / "out"))
    assert message.startswith(f"error: {ann_file}: {expected}")


def test_missing_annotation_file_and_image_file(data, tmp_path):
    root, ann_file, _ = data
    missing = tmp_path / "nowhere.json"
    message = main_error("--data-path", str(root), "--train-ann", str(missing))
    assert message == f"error: {missing}: no such file"
    first_image = sorted((root / "train2017").iterdir())[0]
    first_image.unlink()
    message = main_error("--data-path", str(root), "--output-dir", str(tmp_path / "out"))
    assert message.startswith(f"error: {first_image}: image file missing")


@pytest.fixture
def bad_image_data(tmp_path):
    """Two good images and one of each kind of bad one, all annotated."""
    images, annotations = [], []
    kinds = ["good_a", "good_b", "truncated", "not_an_image", "wrong_size"]
    for image_id, name in enumerate(kinds, start=1):
        path = write_image(tmp_path / "images" / f"{name}.png", 64, 64, seed=image_id)
        images.append({"id": image_id, "file_name": path.name, "height": 64, "width": 64})
        polygon = [[10, 10, 40, 10, 40, 40, 10, 40]]
        annotations.append(
            {"id": image_id, "image_id": image_id, "category_id": 1, "segmentation": polygon}
        )
    (tmp_path / "images" / "truncated.png").write_bytes(
        (tmp_path / "images" / "truncated.png").read_bytes()[:200]
    )
    (tmp_path / "images" / "not_an_image.png").write_text("hello")
    write_image(tmp_path / "images" / "wrong_size.png", 48, 64)
    write_coco(tmp_path / "ann.json", images, annotations)
    return tmp_path


def data_flags(root, *names):
    flags = ["--output-dir", str(root / "out"), "--epochs", "1", "-b", "1"]
    for split in ("train", "val"):
        flags += [
            f"--{split}-ann",
            str(root / "ann.json"),
            f"--{split}-images",
            str(root / "images"),
        ]
    return flags


@pytest.mark.slow
def test_bad_images_stop_training_naming_the_file(bad_image_data):
    message = main_error(*data_flags(bad_image_data), "--aspect-ratio-group-factor", "-1")
    bad = ("truncated.png", "not_an_image.png", "wrong_size.png")
    assert any(name in message for name in bad)
    assert "cannot read image" in message or "48 px but" in message or "64x48 px" in message


@pytest.mark.slow
def test_skip_bad_images_warns_counts_and_trains(bad_image_data, capsys):
    args = train.get_args_parser().parse_args(
        [*SMALL_MASKRCNN, *FAST, *data_flags(bad_image_data), "--skip-bad-images", "-b", "1"]
    )
    train.main(args)
    out = capsys.readouterr().out
    for name in ("truncated.png", "not_an_image.png", "wrong_size.png"):
        assert f"warning: skipped {bad_image_data / 'images' / name}" in out
    assert "image is 64x48 px but" in out
    assert torch.load(bad_image_data / "out" / "checkpoint.pth", weights_only=True)["epoch"] == 0


@pytest.fixture(scope="module")
def reference_run(demo_root, tmp_path_factory):
    """An uninterrupted, deterministic 3-epoch run (the CLI, as a user starts it)."""
    output_dir = tmp_path_factory.mktemp("reference")
    result = run_cli(demo_root, output_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    return output_dir


def cli_args(data_root, output_dir):
    return [
        sys.executable, "train.py", *SMALL_MASKRCNN, *FAST, "--data-path", str(data_root),
        "--output-dir", str(output_dir), "--epochs", "3", "--use-deterministic-algorithms",
        "--resume", "auto", "--checkpoint-every", "1", "--keep-last", "2",
    ]  # fmt: skip


def run_cli(data_root, output_dir):
    return subprocess.run(
        cli_args(data_root, output_dir), cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def start_cli(data_root, output_dir):
    return subprocess.Popen(
        cli_args(data_root, output_dir),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},  # see each line as it is printed
    )


def wait_for_line(process, predicate, timeout=120):
    deadline = time.time() + timeout
    for line in process.stdout:
        if predicate(line):
            return line
        assert time.time() < deadline, "training did not reach the expected point"
    raise AssertionError("training ended before the expected point")


def kill_during_checkpoint_write(process, output_dir, timeout=120):
    """SIGKILLs the run as soon as a checkpoint's temporary file appears."""
    deadline = time.time() + timeout
    while not (output_dir / ".checkpoint.pth.tmp").exists():
        assert time.time() < deadline and process.poll() is None, "no checkpoint write seen"
        time.sleep(0.005)
    process.kill()
    process.wait()


def assert_checkpoints_loadable(output_dir):
    for path in output_dir.glob("*.pth"):
        torch.load(path, weights_only=True)


def final_weights(output_dir):
    return torch.load(output_dir / "checkpoint.pth", weights_only=True)["model"]


@pytest.mark.slow
def test_reference_run_keeps_the_last_two_epoch_checkpoints(reference_run):
    assert sorted(p.name for p in reference_run.glob("model_*.pth")) == [
        "model_1.pth",
        "model_2.pth",
        "model_best.pth",  # kept whatever --keep-last says
    ]
    assert [json.loads(line)["epoch"] for line in open(reference_run / "log.jsonl")] == [0, 1, 2]


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_auto_gives_identical_weights(
    demo_root, reference_run, tmp_path
):
    rng = random.Random(0)
    kills = [
        lambda p: (wait_for_line(p, lambda line: "Epoch: [0]  [1/2]" in line), rng.random()),
        lambda p: kill_during_checkpoint_write(p, tmp_path),
        lambda p: (wait_for_line(p, lambda line: line.startswith("Test:")), rng.random() / 2),
    ]
    for kill in kills:
        process = start_cli(demo_root, tmp_path)
        wait = kill(process)
        if process.poll() is None:
            time.sleep(wait[1])
            process.kill()
            process.wait()
        assert_checkpoints_loadable(tmp_path)
    result = run_cli(demo_root, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert_checkpoints_loadable(tmp_path)
    expected, resumed = final_weights(reference_run), final_weights(tmp_path)
    assert expected.keys() == resumed.keys()
    difference = max((expected[k].double() - resumed[k].double()).abs().max() for k in expected)
    assert difference == 0


@pytest.mark.slow
def test_sigterm_writes_a_mid_epoch_checkpoint_and_exits_143(demo_root, reference_run, tmp_path):
    process = start_cli(demo_root, tmp_path)
    wait_for_line(process, lambda line: "Epoch: [1]  [0/2]" in line)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 128 + signal.SIGTERM
    checkpoint = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    # The ranks learn of a signal in the next step's loss reduction: one that lands after the
    # epoch's last reduction stops the run at the next epoch's start, after the epoch's checkpoint.
    assert checkpoint["epoch"] == 1 and checkpoint.get("iteration", 2) in (1, 2)
    result = run_cli(demo_root, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    expected, resumed = final_weights(reference_run), final_weights(tmp_path)
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)


@pytest.mark.slow
def test_resume_errors_name_the_problem(demo_root, reference_run, tmp_path):
    common = ["--data-path", str(demo_root), "--output-dir", str(tmp_path)]
    assert main_error(*common, "--resume", str(tmp_path / "none.pth")).endswith("no such file")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes((reference_run / "checkpoint.pth").read_bytes()[:1000])
    assert "not a loadable checkpoint" in main_error(*common, "--resume", str(truncated))
    foreign = tmp_path / "foreign.pth"
    torch.save({"weights": torch.zeros(3)}, foreign)
    assert "not a checkpoint of this repo" in main_error(*common, "--resume", str(foreign))
    checkpoint = str(reference_run / "model_2.pth")
    message = main_error(*common, "--resume", checkpoint, "--model", "fasterrcnn_resnet50_fpn")
    assert "a maskrcnn_resnet18_fpn checkpoint, not fasterrcnn_resnet50_fpn" in message
    message = main_error(*common, "--resume", checkpoint, "--num-classes", "7")
    assert "trained for 3 classes, --num-classes is 7" in message


def test_unwritable_output_dir_and_impossible_numbers(demo_root, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    message = main_error("--data-path", str(demo_root), "--output-dir", str(blocker / "out"))
    assert message.startswith(f"error: --output-dir {blocker / 'out'}: cannot write there")
    assert "--keep-last must be at least 1" in main_error("--keep-last", "0")
    assert "--epochs must be at least 1" in main_error("--epochs", "0")


@pytest.mark.slow
def test_cli_error_has_no_traceback_unless_debug(tmp_path):
    argv = [sys.executable, "train.py", "--device", "cpu", "--data-path", str(tmp_path / "x")]
    quiet = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 2
    assert quiet.stderr.strip() == f"train.py: error: --data-path {tmp_path / 'x'}: no such folder"
    debug = subprocess.run([*argv, "--debug"], cwd=ROOT, capture_output=True, text=True)
    assert "Traceback" in debug.stderr and debug.returncode == 2
    assert os.path.basename(train.__file__) in debug.stderr
