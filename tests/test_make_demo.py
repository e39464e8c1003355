import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "datasets"))

from make_demo import get_args_parser, main, make_demo_dataset  # noqa: E402

SPLITS = ("train2017", "val2017")


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
    main(get_args_parser().parse_args(args))
    assert str(tmp_path) in capsys.readouterr().out
    assert (tmp_path / "annotations" / "instances_val2017.json").is_file()
    assert (tmp_path / "val2017" / "000000000001.png").is_file()
