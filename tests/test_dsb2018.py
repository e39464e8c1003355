import json
import sys
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "datasets"))

from dsb2018 import (  # noqa: E402
    LARGE_SIDE,
    SPLIT_FILE,
    SPLIT_FRACTIONS,
    assign_splits,
    decode_kaggle_rle,
    describe,
    image_kind,
    main,
    open_source,
    read_split_file,
    split_sizes,
    write_split_file,
)

SIZE = 64


def grey_image(level, shape=(SIZE, SIZE)):
    pixels = np.full((*shape, 4), level, dtype=np.uint8)
    pixels[..., 3] = 255
    pixels[5:9, 5:9, :3] = 255 - level
    return pixels


def colour_image():
    pixels = grey_image(200)
    pixels[..., 0] = 230
    return pixels


def nucleus_masks(seed, shape=(SIZE, SIZE)):
    """Two to four non-overlapping square nuclei, one of them on the image's border."""
    rng = np.random.default_rng(seed)
    masks = []
    for i in range(2 + seed % 3):
        mask = np.zeros(shape, dtype=bool)
        y, x = 12 * i, int(rng.integers(0, shape[1] - 6))
        mask[y : y + 5 + i, x : x + 6] = True
        masks.append(mask)
    return masks


def write_sample(root, image_id, pixels, masks):
    (root / image_id / "images").mkdir(parents=True)
    (root / image_id / "masks").mkdir()
    Image.fromarray(pixels).save(root / image_id / "images" / f"{image_id}.png")
    for i, mask in enumerate(masks):
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / image_id / "masks" / f"m{i}.png")


FIXTURE_KINDS = {"fluorescence": 10, "brightfield": 3, "tissue": 6}


@pytest.fixture
def stage1(tmp_path):
    """A stage1_train folder of every kind and a large image; the masks written, by image id."""
    root = tmp_path / "stage1_train"
    written = {}
    images = {"fluorescence": lambda: grey_image(10), "brightfield": lambda: grey_image(220)}
    images["tissue"] = colour_image
    for kind, count in FIXTURE_KINDS.items():
        for i in range(count):
            image_id = f"{kind[:3]}{i:02d}"
            written[image_id] = nucleus_masks(i)
            write_sample(root, image_id, images[kind](), written[image_id])
    large_shape = (48, LARGE_SIDE)
    written["large"] = nucleus_masks(1, large_shape)
    write_sample(root, "large", grey_image(10, large_shape), written["large"])
    return root, written


@pytest.fixture
def split_file(stage1, tmp_path):
    path = tmp_path / "split.csv"
    with open_source(stage1[0]) as source:
        rows = [describe(source, sample) for sample in source.samples.values()]
    write_split_file(assign_splits(rows), path)
    return path


def run(argv):
    main([str(a) for a in argv])


def test_kinds_from_pixels():
    assert image_kind(grey_image(10)) == "fluorescence"
    assert image_kind(grey_image(220)) == "brightfield"
    assert image_kind(grey_image(220)[..., 0]) == "brightfield"
    assert image_kind(colour_image()) == "tissue"


@pytest.mark.parametrize("count", range(1, 40))
def test_split_sizes_add_up_and_fill_every_split(count):
    sizes = split_sizes(count)
    assert sum(sizes.values()) == count
    for split, fraction in SPLIT_FRACTIONS.items():
        assert abs(sizes[split] - fraction * count) < 1 + (count < 10)
        assert sizes[split] >= 1 or count < len(SPLIT_FRACTIONS)


def test_split_is_reproducible_and_stratified(split_file, stage1):
    rows = read_split_file(split_file)
    assert rows.keys() == stage1[1].keys()
    assert rows["large"]["large"] == 1 and rows["flu00"]["large"] == 0
    kinds = Counter(row["kind"] for row in rows.values())
    assert kinds == Counter(FIXTURE_KINDS) + Counter(fluorescence=1)
    per_kind = Counter((row["kind"], row["split"]) for row in rows.values())
    for kind in FIXTURE_KINDS:
        assert {split for k, split in per_kind if k == kind} == set(SPLIT_FRACTIONS)
    assert per_kind["fluorescence", "train"] == split_sizes(10)["train"] + 1  # + the large one
    shuffled = [row | {"split": "?"} for row in reversed(list(rows.values()))]
    assert {row["image_id"]: row for row in assign_splits(shuffled)} == rows
    other_seeds = [assign_splits(shuffled, seed) for seed in range(1, 4)]
    assert any(
        [r["split"] for r in other] != [rows[r["image_id"]]["split"] for r in other]
        for other in other_seeds
    )


def converted(out, split):
    return json.loads((out / "annotations" / f"instances_{split}.json").read_text())


def test_conversion_round_trips_masks_and_kinds(stage1, split_file, tmp_path, capsys):
    root, written = stage1
    out = tmp_path / "out"
    run(["--source", root, "--output", out, "--split-file", split_file])
    printed = capsys.readouterr().out
    rows = read_split_file(split_file)
    seen = set()
    for split in SPLIT_FRACTIONS:
        coco = converted(out, split)
        assert f"{split}: {len(coco['images'])} images" in printed
        for image in coco["images"]:
            image_id = Path(image["file_name"]).stem
            seen.add(image_id)
            assert rows[image_id]["split"] == split
            assert image["kind"] == rows[image_id]["kind"]
            copied = out / split / image["file_name"]
            assert (
                copied.read_bytes()
                == (root / image_id / "images" / image["file_name"]).read_bytes()
            )
            anns = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
            masks = [mask_utils.decode(a["segmentation"]).astype(bool) for a in anns]
            assert sorted(m.tobytes() for m in masks) == sorted(
                m.tobytes() for m in written[image_id]
            )
            assert [a["area"] for a in anns] == [float(m.sum()) for m in masks]
        assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])
    assert seen == written.keys()
    assert "densest image 4 nuclei" in printed


def test_zip_and_checkout_sources_convert_alike(stage1, split_file, tmp_path):
    root, _ = stage1
    archive = tmp_path / "stage1_train.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(root.rglob("*.png")):
            zf.write(path, path.relative_to(root).as_posix())
    run(["--source", archive, "--output", tmp_path / "from_zip", "--split-file", split_file])
    # A checkout of the fixed copy holds stage1_train/ among other folders.
    run(["--source", root.parent, "--output", tmp_path / "from_dir", "--split-file", split_file])
    for split in SPLIT_FRACTIONS:
        assert converted(tmp_path / "from_zip", split) == converted(tmp_path / "from_dir", split)


def expect_error(argv, capsys):
    with pytest.raises(SystemExit) as excinfo:
        run(argv)
    assert excinfo.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    return err


def test_changed_mask_fails_verification_unless_images_only(stage1, split_file, tmp_path, capsys):
    root, _ = stage1
    mask_path = root / "tis02" / "masks" / "m0.png"
    mask = np.asarray(Image.open(mask_path)).copy()
    mask[0, 0] = 255 - mask[0, 0]
    Image.fromarray(mask).save(mask_path)
    argv = ["--source", root, "--output", tmp_path / "out", "--split-file", split_file]
    err = expect_error(argv, capsys)
    assert "tis02/masks" in err and "checksum" in err
    run([*argv, "--verify", "images"])
    assert (tmp_path / "out" / "annotations" / "instances_val.json").is_file()


def test_changed_image_fails_verification(stage1, split_file, tmp_path, capsys):
    root, _ = stage1
    image_path = root / "flu03" / "images" / "flu03.png"
    Image.fromarray(grey_image(11)).save(image_path)
    argv = ["--source", root, "--output", tmp_path / "out", "--split-file", split_file]
    for verify in ("all", "images"):
        err = expect_error([*argv, "--verify", verify], capsys)
        assert str(image_path) in err
    run([*argv, "--verify", "none"])


def test_image_missing_from_source_is_an_error(stage1, split_file, tmp_path, capsys):
    root, _ = stage1
    for path in sorted((root / "bri01").rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    (root / "bri01").rmdir()
    err = expect_error(["--source", root, "--output", tmp_path, "--split-file", split_file], capsys)
    assert "1 images of the split file are missing (first: bri01)" in err


def test_committed_split_file_follows_the_split_rule():
    rows = read_split_file(SPLIT_FILE).values()
    assert len(rows) == 664
    strata = Counter((row["kind"], row["large"]) for row in rows)
    assert {kind for kind, _ in strata} == set(FIXTURE_KINDS)
    for (kind, large), count in strata.items():
        splits = Counter(
            row["split"] for row in rows if (row["kind"], row["large"]) == (kind, large)
        )
        assert splits == {split: n for split, n in split_sizes(count).items() if n}


def pixels(height, width, *positions):
    mask = np.zeros((height, width), dtype=bool)
    for y, x in positions:
        mask[y, x] = True
    return mask


@pytest.mark.parametrize(
    ("encoded", "expected"),
    [
        ("1 1", pixels(3, 4, (0, 0))),
        ("3 1", pixels(3, 4, (2, 0))),
        ("4 1", pixels(3, 4, (0, 1))),
        # Pixel 2 to 4: the run wraps from the first column into the second.
        ("2 3", pixels(3, 4, (1, 0), (2, 0), (0, 1))),
        ("3 4 10 3", pixels(3, 4, (2, 0), (0, 1), (1, 1), (2, 1), (0, 3), (1, 3), (2, 3))),
        ("1 12", np.ones((3, 4), dtype=bool)),
        ("12 1", pixels(3, 4, (2, 3))),
    ],
)
def test_kaggle_rle_decodes_column_major_one_based(encoded, expected):
    assert np.array_equal(decode_kaggle_rle(encoded, 3, 4), expected)


@pytest.mark.parametrize("encoded", ["", "1", "0 2", "1 0", "5 2 6 1", "5 2 3 1", "12 2"])
def test_kaggle_rle_rejects_bad_runs(encoded):
    with pytest.raises(ValueError):
        decode_kaggle_rle(encoded, 3, 4)


def kaggle_runs(mask):
    flat = np.r_[0, mask.ravel(order="F"), 0]
    edges = np.flatnonzero(np.diff(flat)) + 1
    return " ".join(
        f"{start} {end - start}" for start, end in zip(edges[::2], edges[1::2], strict=True)
    )


def test_solution_file_converts_a_test_folder_as_one_split(stage1, tmp_path, capsys):
    root, written = stage1
    rows = ["ImageId,EncodedPixels,Height,Width,Usage"]
    for image_id, masks in written.items():
        rows += [f"{image_id},{kaggle_runs(m)},{m.shape[0]},{m.shape[1]},Public" for m in masks]
        for mask_path in (root / image_id / "masks").iterdir():
            mask_path.unlink()
    (tmp_path / "solution.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    run(["--source", root, "--solution", tmp_path / "solution.csv", "--output", out])
    coco = converted(out, "test")
    assert "test: 20 images" in capsys.readouterr().out
    for image in coco["images"]:
        anns = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
        masks = [mask_utils.decode(a["segmentation"]).astype(bool) for a in anns]
        expected = written[Path(image["file_name"]).stem]
        assert [m.tobytes() for m in masks] == [m.tobytes() for m in expected]


def test_split_name_writes_the_whole_folder_without_the_split_file(stage1, tmp_path):
    root, written = stage1
    run(["--source", root, "--split-name", "all", "--output", tmp_path / "out"])
    coco = converted(tmp_path / "out", "all")
    assert {Path(image["file_name"]).stem for image in coco["images"]} == written.keys()
    assert len(coco["annotations"]) == sum(len(masks) for masks in written.values())


def test_solution_without_rows_for_an_image(stage1, tmp_path, capsys):
    root, _ = stage1
    (tmp_path / "solution.csv").write_text("ImageId,EncodedPixels,Height,Width\nflu00,1 3,64,64\n")
    argv = ["--source", root, "--solution", tmp_path / "solution.csv", "--output", tmp_path / "o"]
    assert "has no rows of 19 images" in expect_error(argv, capsys)
