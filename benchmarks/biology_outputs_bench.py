"""Time and peak memory of predict.py --tile writing label images, QuPath GeoJSON and
measurements for one large microscope image, and a check that every object comes out once.

    python benchmarks/biology_outputs_bench.py --size 4000 --json biology_outputs_bench.json

The image is a --size square 16-bit TIFF (ImageJ, 0.5 um per pixel) of bright discs, radius 6
to 10 px, one in each cell of a 32 px grid, so the truth is one object per disc. The model is
tiling_bench's BlobModel (bright 8-connected blobs, no checkpoint). Each measurement runs in a
fresh process that imports the same modules: one only reads the image
(microscopy_io.read_planes), one runs predict.main with --tile --label-format png tif --geojson
--measurements; the figure is the second's peak resident memory over the first's. Full-size
boolean masks of the objects would take count x size^2 bytes: the point is to stay far below
that.
"""

import argparse
import csv
import json
import multiprocessing
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from tiling_bench import BlobModel  # noqa: E402

import loading  # noqa: E402
import microscopy_io  # noqa: E402
import predict  # noqa: E402

CELL = 32
PIXEL_SIZE = 0.5


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default=4000, type=int, help="image side in pixels (4000)")
    parser.add_argument("--tile", default=256, type=int, help="--tile of predict.py (256)")
    parser.add_argument("--tile-overlap", default=64, type=int, help="--tile-overlap (64)")
    parser.add_argument("--seed", default=0, type=int, help="random seed of the discs")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    return parser


def disc_image(size, seed):
    """(uint16 [size, size] image, number of discs): a disc in every CELL px grid cell."""
    rng = np.random.default_rng(seed)
    image = np.full((size, size), 400, dtype=np.uint16)
    yy, xx = np.mgrid[-CELL // 2 : CELL // 2, -CELL // 2 : CELL // 2]
    count = 0
    for top in range(0, size - CELL + 1, CELL):
        for left in range(0, size - CELL + 1, CELL):
            dy, dx = rng.integers(-4, 5, size=2)
            radius = rng.integers(6, 11)
            inside = (yy - dy) ** 2 + (xx - dx) ** 2 <= radius**2
            image[top : top + CELL, left : left + CELL][inside] = rng.integers(40000, 60000)
            count += 1
    return image, count


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def read_only(path, queue):
    planes = list(microscopy_io.read_planes(path))
    queue.put({"peak_rss_mib": peak_rss_mib(), "planes": len(planes)})


def run_predict(argv, queue):
    args = {"model": "blobs"}
    loading.load = lambda path, device: loading.LoadedModel(
        BlobModel(), "checkpoint", {1: "nucleus"}, 0, 2, args
    )
    start = time.perf_counter()
    predict.main(argv)
    queue.put({"seconds": time.perf_counter() - start, "peak_rss_mib": peak_rss_mib()})


def in_fresh_process(target, *args):
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=target, args=(*args, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def check_outputs(output, stem, discs):
    """Objects in each output, which must all equal the number of discs."""
    labels = tifffile.imread(output / f"{stem}_labels.tif")
    with open(output / f"{stem}_measurements.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    with open(output / f"{stem}.geojson") as f:
        features = json.load(f)["features"]
    counts = {
        "discs": discs,
        "label_image_objects": len(np.unique(labels)) - 1,
        "measurement_rows": len(rows),
        "geojson_features": len(features),
    }
    if len(set(counts.values())) != 1:
        print(f"objects differ between the truth and the outputs: {counts}")
    return counts


def main(args):
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        image, discs = disc_image(args.size, args.seed)
        path = folder / "large.tif"
        tifffile.imwrite(
            path, image, imagej=True, resolution=(1 / PIXEL_SIZE,) * 2, metadata={"unit": "um"}
        )
        del image
        reading = in_fresh_process(read_only, str(path))
        argv = ["--weights", "blobs", "--input", str(path), "--output", str(folder / "out")]
        argv += ["--tile", str(args.tile), "--tile-overlap", str(args.tile_overlap)]
        argv += ["--label-format", "png", "tif", "--geojson", "--measurements"]
        predicting = in_fresh_process(run_predict, argv)
        counts = check_outputs(folder / "out", "large", discs)
    figures = {
        "size": args.size,
        "tile": args.tile,
        "tile_overlap": args.tile_overlap,
        "seconds": predicting["seconds"],
        "peak_rss_mib": predicting["peak_rss_mib"],
        "peak_rss_reading_only_mib": reading["peak_rss_mib"],
        "rss_growth_mib": predicting["peak_rss_mib"] - reading["peak_rss_mib"],
        "full_size_bool_masks_mib": discs * args.size**2 / 2**20,
        **counts,
        "machine": common.machine("cpu"),
    }
    for key, value in figures.items():
        if key != "machine":
            print(f"{key}: {value:.1f}" if isinstance(value, float) else f"{key}: {value}")
    common.write_json(args.json, figures)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
