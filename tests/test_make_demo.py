import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage as ndi
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from skimage.measure import regionprops

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "datasets"))

from make_demo import main, make_demo_dataset  # noqa: E402

SPLITS = ("train2017", "val2017")
NUCLEI_SPLITS = ("train2017", "fit2017", "val2017")
# tree_sha256 of make_demo_dataset(root, num_train=3, num_val=2, size=64, seed=0), written before
# the nuclei style was added.
DEFAULT_STYLE_SHA256 = "de5f987010aa9a20ed2e5bb162b89ea1ab9ef3478d7057859ca1e66aff0a30ab"


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    make_demo_dataset(root, num_train=4, num_val=2, size=64, seed=3)
    return root


def load(root, split):
    return COCO(str(root / "annotations" / f"instances_{split}.json"))


def segmentation_form(segmentation):
    if isinstance(segmentation, list):
        return "polygon"
    return "compressed" if isinstance(segmentation["counts"], str) else "uncompressed"


def test_same_seed_gives_identical_files(demo_root, tmp_path):
    make_demo_dataset(tmp_path, num_train=4, num_val=2, size=64, seed=3)
    files = sorted(p.relative_to(demo_root) for p in demo_root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    for rel in files:
        assert (demo_root / rel).read_bytes() == (tmp_path / rel).read_bytes(), rel


def test_other_seed_gives_other_images(demo_root, tmp_path):
    make_demo_dataset(tmp_path, num_train=1, num_val=0, size=64, seed=4)
    name = "train2017/000000000001.png"
    assert (demo_root / name).read_bytes() != (tmp_path / name).read_bytes()


def test_all_segmentation_forms_and_categories_appear(demo_root):
    forms, categories = set(), set()
    for split in SPLITS:
        data = json.loads((demo_root / "annotations" / f"instances_{split}.json").read_text())
        forms |= {segmentation_form(a["segmentation"]) for a in data["annotations"]}
        categories |= {a["category_id"] for a in data["annotations"]}
        assert {c["id"] for c in data["categories"]} == {1, 2}
        assert {"info", "licenses", "images"} <= data.keys()
    assert forms == {"polygon", "compressed", "uncompressed"}
    assert categories == {1, 2}


@pytest.mark.parametrize("split", SPLITS)
def test_ids_unique_and_start_at_one(demo_root, split):
    coco = load(demo_root, split)
    image_ids = sorted(img["id"] for img in coco.dataset["images"])
    ann_ids = sorted(ann["id"] for ann in coco.dataset["annotations"])
    assert image_ids == list(range(1, len(image_ids) + 1))
    assert ann_ids == list(range(1, len(ann_ids) + 1))


@pytest.mark.parametrize("split", SPLITS)
def test_masks_match_bbox_and_area(demo_root, split):
    coco = load(demo_root, split)
    for ann in coco.dataset["annotations"]:
        mask = coco.annToMask(ann)
        ys, xs = np.nonzero(mask)
        assert ann["area"] == mask.sum() >= 4
        x0, y0 = xs.min(), ys.min()
        assert ann["bbox"] == [x0, y0, xs.max() + 1 - x0, ys.max() + 1 - y0]
        assert ann["iscrowd"] == 0


def test_annotations_do_not_overlap(demo_root):
    coco = load(demo_root, "train2017")
    for image_id in coco.getImgIds():
        masks = [coco.annToMask(a) for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id))]
        assert np.sum(masks, axis=0).max() == 1


def test_uncompressed_rle_round_trips(demo_root):
    coco = load(demo_root, "val2017")
    for ann in coco.dataset["annotations"]:
        seg = ann["segmentation"]
        if segmentation_form(seg) == "uncompressed":
            h, w = seg["size"]
            assert sum(seg["counts"]) == h * w
            decoded = mask_utils.decode(mask_utils.frPyObjects(seg, h, w))
            assert decoded.sum() == ann["area"]


@pytest.mark.parametrize("split", SPLITS)
def test_image_files_match_metadata(demo_root, split):
    for img in load(demo_root, split).dataset["images"]:
        with Image.open(demo_root / split / img["file_name"]) as image:
            assert image.mode == "RGB"
            assert image.size == (img["width"], img["height"])


def test_cli_writes_dataset(tmp_path, capsys):
    args = ["--output", str(tmp_path), "--num-train", "1", "--num-val", "1", "--size", "48"]
    main(args)
    assert str(tmp_path) in capsys.readouterr().out
    assert (tmp_path / "annotations" / "instances_val2017.json").is_file()
    assert (tmp_path / "val2017" / "000000000001.png").is_file()


def test_runs_as_a_script_from_any_folder(tmp_path):
    script = Path(__file__).resolve().parents[1] / "datasets" / "make_demo.py"
    args = ["--output", str(tmp_path / "demo"), "--num-train", "1", "--num-val", "1"]
    subprocess.run([sys.executable, str(script), *args, "--size", "32"], check=True, cwd=tmp_path)
    assert load(tmp_path / "demo", "val2017").getImgIds() == [1]


def tree_sha256(root):
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def test_default_style_is_unchanged(tmp_path):
    # The README's first dataset: adding styles must not change a byte of it.
    make_demo_dataset(tmp_path, num_train=3, num_val=2, size=64, seed=0)
    assert tree_sha256(tmp_path) == DEFAULT_STYLE_SHA256


@pytest.fixture(scope="module")
def nuclei_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("nuclei")
    make_demo_dataset(root, num_train=3, num_val=2, size=128, seed=0, style="nuclei", num_fit=2)
    return root


def test_nuclei_style_writes_three_splits_of_one_category(nuclei_root):
    counts = {}
    for split in NUCLEI_SPLITS:
        coco = load(nuclei_root, split)
        assert coco.dataset["categories"] == [{"id": 1, "name": "nucleus", "supercategory": "cell"}]
        assert {a["category_id"] for a in coco.dataset["annotations"]} == {1}
        counts[split] = len(coco.getImgIds())
        for img in coco.dataset["images"]:
            assert (nuclei_root / split / img["file_name"]).is_file()
    assert counts == {"train2017": 3, "fit2017": 2, "val2017": 2}


def test_nuclei_splits_hold_different_images(nuclei_root):
    name = "000000000001.png"
    images = {(nuclei_root / split / name).read_bytes() for split in NUCLEI_SPLITS}
    assert len(images) == 3


def test_nuclei_touch_and_do_not_overlap(nuclei_root):
    touching = 0
    coco = load(nuclei_root, "train2017")
    for image_id in coco.getImgIds():
        masks = np.array(
            [coco.annToMask(a) for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id))]
        )
        assert masks.sum(0).max() == 1
        grown = np.array([ndi.binary_dilation(m) for m in masks])
        # Ordered pairs of different nuclei with neighbouring pixels.
        touching += (np.einsum("ihw,jhw->ij", grown.astype(int), masks.astype(int)) > 0).sum()
        touching -= len(masks)
    # Most nuclei are in clusters: at least one touching pair per two nuclei.
    assert touching / 2 >= len(coco.dataset["annotations"]) / 2


def test_nuclei_are_grey_and_vary_in_size_and_brightness(nuclei_root):
    coco = load(nuclei_root, "train2017")
    areas = [a["area"] for a in coco.dataset["annotations"]]
    assert max(areas) > 4 * min(areas)
    means = []
    for img in coco.dataset["images"]:
        with Image.open(nuclei_root / "train2017" / img["file_name"]) as image:
            pixels = np.asarray(image)
        assert image.mode == "RGB"
        assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=img["id"])):
            means.append(pixels[..., 0][coco.annToMask(ann) > 0].mean())
    # Dim nuclei sit a few grey levels above the background, bright ones far above it.
    assert max(means) > 2.5 * min(means)


def test_nuclei_shapes_are_not_only_ellipses(nuclei_root):
    coco = load(nuclei_root, "train2017")
    solidities = []
    for ann in coco.dataset["annotations"]:
        if isinstance(ann["segmentation"], list):
            region = regionprops(coco.annToMask(ann))[0]
            solidities.append(region.solidity)
    assert min(solidities) < 0.97


def test_nuclei_cli_names_the_fit_split(tmp_path, capsys):
    args = ["--output", str(tmp_path), "--style", "nuclei", "--num-train", "1", "--num-fit", "1"]
    main([*args, "--num-val", "1", "--size", "64"])
    assert "1 fit" in capsys.readouterr().out
    assert load(tmp_path, "fit2017").getImgIds() == [1]
