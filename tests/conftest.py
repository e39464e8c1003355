"""Shared fixtures: small COCO-format datasets written to temporary folders."""

import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from datasets.make_demo import make_demo_dataset  # noqa: E402


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """The synthetic nuclei dataset at 64 px: 4 training and 3 validation images."""
    root = tmp_path_factory.mktemp("demo")
    make_demo_dataset(root, num_train=4, num_val=3, size=64, seed=0)
    return root


def write_coco(path, images, annotations, categories=None):
    categories = categories or [{"id": 1, "name": "thing"}, {"id": 2, "name": "other"}]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return path


def write_image(path, height, width, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode in ("I;16",):
        Image.fromarray(rng.integers(0, 65535, (height, width), dtype=np.uint16)).save(path)
    else:
        pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).convert(mode).save(path)
    return path
