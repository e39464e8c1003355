import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

DATASETS_DIR = Path(__file__).resolve().parents[1] / "datasets"
sys.path.insert(0, str(DATASETS_DIR))

from convert_nuclei import (  # noqa: E402
    convert_dsb,
    convert_label_images,
    main,
    split_records,
    write_coco,
)

HEIGHT, WIDTH = 20, 28


def box_mask(*boxes):
    mask = np.zeros((HEIGHT, WIDTH), dtype=bool)
    for y0, y1, x0, x1 in boxes:
        mask[y0:y1, x0:x1] = True
    return mask


def raw_image(seed):
    pixels = np.random.default_rng(seed).integers(0, 256, (HEIGHT, WIDTH, 4), dtype=np.uint8)
    return Image.fromarray(pixels)


def decoded_masks(record):
    return [mask_utils.decode(a["segmentation"]).astype(bool) for a in record["annotations"]]


def as_set(masks):
    return sorted(m.tobytes() for m in masks)


def write_dsb_sample(root, name, masks):
    (root / name / "images").mkdir(parents=True)
    (root / name / "masks").mkdir()
    raw_image(len(masks)).save(root / name / "images" / f"{name}.png")
    for i, mask in enumerate(masks):
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / name / "masks" / f"m{i}.png")


@pytest.fixture
def dsb_root(tmp_path):
    root = tmp_path / "stage1_train"
    samples = {
        "a1": [box_mask((0, 5, 0, 5)), box_mask((2, 9, 6, 12), (15, 18, 20, 27))],
        "b2": [box_mask((10, 20, 0, 28))],
        "c3": [box_mask((0, 1, 0, 28)), box_mask((19, 20, 27, 28)), box_mask((5, 8, 5, 8))],
    }
    for name, masks in samples.items():
        write_dsb_sample(root, name, masks)
    return root, samples


def label_image_16bit():
    labels = np.zeros((HEIGHT, WIDTH), dtype=np.uint16)
    labels[1:4, 1:6] = 3
    labels[5:9, 2:4] = 700
    labels[14:19, 20:26] = 700
    labels[10:20, 8:12] = 65000
    return labels


def label_image_8bit():
    labels = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    labels[0:HEIGHT, 0:3] = 9
    labels[4:6, 10:20] = 2
    return labels


def instance_masks(labels):
    return [labels == value for value in np.unique(labels) if value > 0]


@pytest.fixture
def label_dirs(tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    sources = {"png16.png": label_image_16bit(), "tiff.tif": label_image_8bit()}
    raw_image(1).save(images / "png16.png")
    Image.fromarray(sources["png16.png"]).save(labels / "png16.png")
    raw_image(2).convert("L").save(images / "tiff.tif")
    Image.fromarray(sources["tiff.tif"].astype(np.uint16)).save(labels / "tiff.tif")
    return images, labels, sources


def check_annotations_match(record, expected_masks):
    masks = decoded_masks(record)
    assert as_set(masks) == as_set(expected_masks)
    for ann, mask in zip(record["annotations"], masks, strict=True):
        assert isinstance(ann["segmentation"]["counts"], str)
        assert ann["area"] == mask.sum()
        ys, xs = np.nonzero(mask)
        x0, y0 = xs.min(), ys.min()
        assert ann["bbox"] == [x0, y0, xs.max() + 1 - x0, ys.max() + 1 - y0]


def test_dsb_masks_round_trip(dsb_root):
    root, samples = dsb_root
    records = convert_dsb(root)
    assert [r["file_name"] for r in records] == [f"{name}.png" for name in sorted(samples)]
    for record in records:
        assert (record["height"], record["width"]) == (HEIGHT, WIDTH)
        check_annotations_match(record, samples[Path(record["file_name"]).stem])


def test_label_images_round_trip(label_dirs):
    images, labels, sources = label_dirs
    with Image.open(labels / "png16.png") as image:
        assert image.mode.startswith("I")
    records = {r["file_name"]: r for r in convert_label_images(images, labels)}
    assert records.keys() == sources.keys()
    for name, source in sources.items():
        check_annotations_match(records[name], instance_masks(source))
    assert len(records["png16.png"]["annotations"]) == 3


def test_label_suffix_pairs_files(tmp_path, label_dirs):
    images, labels, sources = label_dirs
    for path in labels.iterdir():
        path.rename(labels / f"{path.stem}_masks{path.suffix}")
    records = convert_label_images(images, labels, label_suffix="_masks")
    assert sorted(r["file_name"] for r in records) == sorted(sources)


def fake_records(count):
    return [{"file_name": f"{i:03d}.png"} for i in range(count)]


def names(records):
    return [r["file_name"] for r in records]


def test_split_is_reproducible_and_disjoint():
    train, val = split_records(fake_records(10), val_fraction=0.2, seed=5)
    again_train, again_val = split_records(fake_records(10)[::-1], val_fraction=0.2, seed=5)
    assert (names(train), names(val)) == (names(again_train), names(again_val))
    assert len(val) == 2
    assert not set(names(train)) & set(names(val))
    assert sorted(names(train) + names(val)) == names(fake_records(10))
    splits = {tuple(names(split_records(fake_records(10), 0.2, seed)[1])) for seed in range(5)}
    assert len(splits) > 1


def test_split_keeps_both_sides_non_empty():
    train, val = split_records(fake_records(2), val_fraction=0.01, seed=0)
    assert len(train) == len(val) == 1


def test_write_coco_copies_or_links_images(dsb_root, tmp_path):
    records = convert_dsb(dsb_root[0])
    out = tmp_path / "out"
    ann_path = write_coco(records, out, "val", category_name="cell", symlink=True)
    coco = json.loads(ann_path.read_text())
    assert coco["categories"] == [{"id": 1, "name": "cell", "supercategory": "cell"}]
    assert [img["id"] for img in coco["images"]] == [1, 2, 3]
    assert [a["id"] for a in coco["annotations"]] == list(range(1, 7))
    for img in coco["images"]:
        assert (out / "val" / img["file_name"]).is_symlink()
        with Image.open(out / "val" / img["file_name"]) as image:
            assert image.size == (img["width"], img["height"])


def run_main(argv):
    main([str(a) for a in argv])


def test_cli_writes_both_splits_and_prints_train_flags(dsb_root, tmp_path, capsys):
    out = tmp_path / "out"
    run_main(["--dsb", dsb_root[0], "--output", out, "--val-fraction", "0.34", "--seed", "1"])
    stdout = capsys.readouterr().out
    assert "train: 2 images" in stdout and "val: 1 images" in stdout
    for split in ("train", "val"):
        ann_path = out / "annotations" / f"instances_{split}.json"
        assert f"--{split}-ann {ann_path}" in stdout
        assert f"--{split}-images {out / split}" in stdout
        coco = json.loads(ann_path.read_text())
        for img in coco["images"]:
            assert (out / split / img["file_name"]).is_file()
            assert not (out / split / img["file_name"]).is_symlink()


def test_val_fraction_one_writes_one_evaluation_split(dsb_root, tmp_path, capsys):
    out = tmp_path / "out"
    run_main(["--dsb", dsb_root[0], "--output", out, "--val-fraction", "1"])
    assert "evaluate with: python train.py --test-only" in capsys.readouterr().out
    coco = json.loads((out / "annotations" / "instances_val.json").read_text())
    assert sorted(img["file_name"] for img in coco["images"]) == ["a1.png", "b2.png", "c3.png"]
    assert not (out / "annotations" / "instances_train.json").exists()


def expect_exit_2(argv, capsys, fragment):
    with pytest.raises(SystemExit) as excinfo:
        run_main(argv)
    assert excinfo.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(fragment) in err


def test_missing_folder(tmp_path, capsys):
    expect_exit_2(["--dsb", tmp_path / "nope", "--output", tmp_path / "o"], capsys, "nope")


def test_dsb_image_without_masks(dsb_root, tmp_path, capsys):
    root = dsb_root[0]
    for mask in (root / "b2" / "masks").iterdir():
        mask.unlink()
    expect_exit_2(["--dsb", root, "--output", tmp_path / "o"], capsys, root / "b2" / "masks")


def test_unreadable_mask(dsb_root, tmp_path, capsys):
    bad = dsb_root[0] / "c3" / "masks" / "m1.png"
    bad.write_bytes(b"not a png")
    expect_exit_2(["--dsb", dsb_root[0], "--output", tmp_path / "o"], capsys, bad)


def test_image_without_label(label_dirs, tmp_path, capsys):
    images, labels, _ = label_dirs
    raw_image(3).save(images / "extra.png")
    argv = ["--images", images, "--labels", labels, "--output", tmp_path / "o"]
    expect_exit_2(argv, capsys, images / "extra.png")


def test_label_without_image(label_dirs, tmp_path, capsys):
    images, labels, _ = label_dirs
    Image.fromarray(label_image_8bit()).save(labels / "orphan.png")
    argv = ["--images", images, "--labels", labels, "--output", tmp_path / "o"]
    expect_exit_2(argv, capsys, labels / "orphan.png")


def test_label_of_other_size(label_dirs, tmp_path, capsys):
    images, labels, _ = label_dirs
    Image.fromarray(np.ones((HEIGHT + 1, WIDTH), dtype=np.uint8)).save(labels / "png16.png")
    argv = ["--images", images, "--labels", labels, "--output", tmp_path / "o"]
    expect_exit_2(argv, capsys, images / "png16.png")


def test_script_reports_bad_input_without_traceback(tmp_path):
    script = DATASETS_DIR / "convert_nuclei.py"
    argv = [sys.executable, script, "--dsb", tmp_path / "missing", "--output", tmp_path / "o"]
    result = subprocess.run(argv, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("convert_nuclei.py: error: ") and "missing" in result.stderr
    assert "Traceback" not in result.stderr
