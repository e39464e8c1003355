"""Outputs for the tools biologists use: label TIFFs (uint16/uint32, with the pixel size),
QuPath GeoJSON (schema, round trip), measurements (against hand computation), and predict.py
writing them for stacks, tiled or not."""

import contextlib
import csv
import io
import json

import numpy as np
import pytest
import tifffile
import torch
from scipy import ndimage
from skimage.draw import polygon as fill_polygon

import instance_crops
import label_tiff
import loading
import measurements
import microscopy_io
import predict
import qupath_geojson
from coco_results import masks_to_rles


def test_labels_switch_to_uint32_past_65535_objects(monkeypatch):
    assert label_tiff.label_dtype(65535) == np.uint16
    assert label_tiff.label_dtype(65536) == np.uint32
    masks = torch.zeros(3, 1, 6, 6)
    for k in range(3):
        masks[k, 0, 2 * k, :] = 1
    assert predict.label_image(masks, 6, 6).dtype == np.uint16
    monkeypatch.setattr(label_tiff, "UINT16_LABELS", 2)
    labels = predict.label_image(masks, 6, 6)
    assert labels.dtype == np.uint32 and labels[4].tolist() == [3] * 6


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_label_tiffs_keep_their_values_and_pixel_size(tmp_path, dtype):
    labels = np.zeros((20, 30), dtype=dtype)
    labels[2:5, 3:9] = 7
    labels[10:, 20:] = np.iinfo(dtype).max
    path = str(tmp_path / "labels.tif")
    label_tiff.write_label_tiff(path, labels, pixel_size=0.65)
    read = tifffile.imread(path)
    assert read.dtype == dtype and np.array_equal(read, labels)
    [plane] = microscopy_io.read_planes(path)
    assert plane.pixel_size == pytest.approx(0.65)
    label_tiff.write_label_tiff(path, labels)
    assert next(microscopy_io.read_planes(path)).pixel_size is None


def random_masks(count, height, width, seed):
    """Blob masks with holes and several pieces: thresholded smoothed noise."""
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.standard_normal((count, height, width)), (0, 2, 2))
    return noise > 0.05


def rasterise(geometry, height, width):
    """The pixels whose centres lie inside a Polygon or MultiPolygon of pixel-corner
    coordinates: inside an outer ring and outside its holes."""
    polygons = geometry["coordinates"]
    if geometry["type"] == "Polygon":
        polygons = [polygons]
    mask = np.zeros((height, width), dtype=bool)
    for outer, *holes in polygons:
        filled = ring_pixels(outer, height, width)
        for hole in holes:
            filled &= ~ring_pixels(hole, height, width)
        mask |= filled
    return mask


def ring_pixels(ring, height, width):
    xy = np.array(ring, dtype=float) - 0.5  # skimage puts pixel centres on integers
    rows, columns = fill_polygon(xy[:, 1], xy[:, 0], (height, width))
    pixels = np.zeros((height, width), dtype=bool)
    pixels[rows, columns] = True
    return pixels


def test_geojson_polygons_rasterised_give_back_the_masks_holes_and_pieces_included():
    masks = random_masks(12, 48, 64, seed=0)
    crops = list(instance_crops.crops(masks[:, None], 48, 64))
    found = qupath_geojson.features(crops, [0.5] * 12, ["nucleus"] * 12, range(1, 13))
    assert len(found) == 12
    kinds = {f["geometry"]["type"] for f in found}
    holes = sum(len(p) - 1 for f in found for p in polygons_of(f["geometry"]))
    assert "MultiPolygon" in kinds and holes > 0  # the case has both
    for mask, feature in zip(masks, found, strict=True):
        back = rasterise(feature["geometry"], 48, 64)
        iou = (back & mask).sum() / (back | mask).sum()
        assert iou >= 0.98, iou


def polygons_of(geometry):
    coordinates = geometry["coordinates"]
    return [coordinates] if geometry["type"] == "Polygon" else coordinates


def test_an_outline_follows_pixel_edges_so_a_square_keeps_its_area():
    mask = np.zeros((10, 10), dtype=bool)
    mask[2:6, 3:8] = True
    mask[3, 5] = False  # a one-pixel hole
    [[outer, hole]] = qupath_geojson.outline_polygons(mask[2:6, 3:8], top=2, left=3)
    assert sorted(map(tuple, outer[:-1])) == [(3, 2), (3, 6), (8, 2), (8, 6)]
    assert sorted(map(tuple, hole[:-1])) == [(5, 3), (5, 4), (6, 3), (6, 4)]
    assert outer[0] == outer[-1] and hole[0] == hole[-1]


def test_the_feature_collection_is_what_qupath_imports(tmp_path):
    masks = random_masks(3, 32, 32, seed=1)
    crops = list(instance_crops.crops(masks_to_rles(torch.from_numpy(masks[:, None])), 32, 32))
    found = qupath_geojson.features(crops, [0.9, 0.8, 0.7], ["a", "b", "a"], [1, 2, 3])
    qupath_geojson.write_geojson(tmp_path / "x.geojson", found)
    collection = json.loads((tmp_path / "x.geojson").read_text())
    assert collection["type"] == "FeatureCollection" and len(collection["features"]) == 3
    for feature, name, score, object_id in zip(
        collection["features"], "aba", [0.9, 0.8, 0.7], [1, 2, 3], strict=True
    ):
        assert feature["type"] == "Feature"
        properties = feature["properties"]
        assert properties["objectType"] == "detection"
        assert properties["classification"] == {"name": name}
        assert properties["measurements"] == {"object_id": object_id, "score": score}
        for polygon in polygons_of(feature["geometry"]):
            for ring in polygon:
                assert len(ring) >= 4 and ring[0] == ring[-1]
                assert all(len(point) == 2 and isinstance(point[0], int) for point in ring)


def test_measurements_of_a_rectangle_are_those_computed_by_hand():
    raw = np.zeros((2, 10, 12), dtype=np.uint16)
    raw[0, 2:6, 3:9] = 100
    raw[0, 2, 3] = 400  # channel 0 mean (23 * 100 + 400) / 24
    raw[1] = np.arange(12)  # channel 1: x, so its mean over columns 3..8 is 5.5 and max 8
    mask = np.zeros((1, 1, 10, 12), dtype=bool)
    mask[0, 0, 2:6, 3:9] = True
    crops = list(instance_crops.crops(torch.from_numpy(mask).float(), 10, 12))
    [row] = measurements.object_rows(crops, [0.75], ["nucleus"], ["unet"], raw, 0.5, "x.tif")
    assert row["object_id"] == 1 and row["score"] == 0.75 and row["model"] == "unet"
    assert (row["centroid_x"], row["centroid_y"]) == (5.5, 3.5)
    assert row["area_px"] == 24 and row["area_um2"] == pytest.approx(24 * 0.25)
    # A w x h block of pixels has variances (w^2 - 1) / 12 and (h^2 - 1) / 12 along its axes.
    assert row["eccentricity"] == pytest.approx(np.sqrt(1 - 15 / 35))
    assert row["solidity"] == 1.0
    assert 2 * (6 + 4) - 4 <= row["perimeter_px"] <= 2 * (6 + 4)
    assert row["perimeter_um"] == pytest.approx(row["perimeter_px"] * 0.5)
    assert row["mean_intensity_c0"] == pytest.approx((23 * 100 + 400) / 24)
    assert row["max_intensity_c0"] == 400
    assert row["mean_intensity_c1"] == pytest.approx(5.5) and row["max_intensity_c1"] == 8
    summary = measurements.summary_row([row, {**row, "area_px": 16}], 10, 12, 0.5, "x.tif")
    area_mm2 = 120 * 0.25 / 1e6
    assert summary["count"] == 2 and summary["mean_area_px"] == 20
    assert summary["density_per_mm2"] == pytest.approx(2 / area_mm2)
    assert summary["mean_area_um2"] == pytest.approx(5.0)
    unknown = measurements.summary_row([row], 10, 12, None, "x.tif")
    assert "density_per_mm2" not in unknown and unknown["density_per_megapixel"] == 1e6 / 120


def test_objects_are_credited_to_the_model_or_the_ensemble_member_they_came_from():
    sources = {0: "maskrcnn_resnet50_fpn", 1: "unet_resnet18"}
    ensemble = loading.LoadedModel(None, "ensemble", {}, 0, 2, {}, sources)
    found = {"scores": torch.tensor([0.9, 0.8, 0.7]), "sources": torch.tensor([1, 0, 1])}
    assert predict.object_models(found, ensemble, "e.pth") == [
        "ensemble:unet_resnet18",
        "ensemble:maskrcnn_resnet50_fpn",
        "ensemble:unet_resnet18",
    ]
    tiled = {"scores": found["scores"]}
    assert predict.object_models(tiled, ensemble, "e.pth") == ["ensemble"] * 3
    checkpoint = loading.LoadedModel(None, "checkpoint", {}, 0, 2, {"model": "unet_resnet18"})
    assert predict.object_models(tiled, checkpoint, "c.pth") == ["unet_resnet18"] * 3


class BrightBlobs(torch.nn.Module):
    """A stand-in mask model: each 8-connected blob brighter than half is an instance, scored
    by its mean brightness."""

    predicts_masks = True

    def forward(self, images):
        return [self.find(image) for image in images]

    def find(self, image):
        brightness = image.float().mean(0)
        brightness = brightness / 255 if image.dtype == torch.uint8 else brightness
        ids, count = ndimage.label((brightness > 0.5).numpy(), structure=np.ones((3, 3)))
        masks = torch.from_numpy(ids)[None] == torch.arange(1, count + 1)[:, None, None]
        slices = ndimage.find_objects(ids)
        boxes = [[s[1].start, s[0].start, s[1].stop, s[0].stop] for s in slices]
        area = masks.sum((1, 2)).clamp(min=1)
        return {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.ones(count, dtype=torch.int64),
            "scores": ((masks * brightness).sum((1, 2)) / area).float() * 0.9,
            "masks": masks[:, None].float(),
        }


def disc_stack(planes, size, seed):
    """[planes, size, size] uint16 planes of bright discs of radius 5 to 7, one in most cells of
    a 24-pixel grid, apart from each other."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    stack = np.full((planes, size, size), 500, dtype=np.uint16)
    for plane in stack:
        for cy in range(12, size - 11, 24):
            for cx in range(12, size - 11, 24):
                if rng.random() < 0.2:
                    continue
                y, x = cy + rng.integers(-3, 4), cx + rng.integers(-3, 4)
                inside = (yy - y) ** 2 + (xx - x) ** 2 <= rng.integers(5, 8) ** 2
                plane[inside] = rng.integers(20000, 40000)
    return stack


@pytest.fixture
def fake_model(monkeypatch):
    """The loaded file's train.py flags, which a test may change before predict runs."""
    args = {"model": "blobs"}

    def load(path, device):
        return loading.LoadedModel(BrightBlobs(), "checkpoint", {1: "nucleus"}, 0, 2, args)

    monkeypatch.setattr(loading, "load", load)
    return {"args": args}


def run_predict(tmp_path, name, *flags):
    argv = ["--weights", "fake.pth", "--input", str(tmp_path / "in"), "--output"]
    argv += [str(tmp_path / name), "--label-format", "png", "tif", "--geojson", "--measurements"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        predict.main([*argv, *flags])
    return tmp_path / name, out.getvalue()


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_predict_writes_labels_geojson_and_measurements_for_each_plane_of_a_stack(
    tmp_path, fake_model
):
    stack = disc_stack(2, 96, seed=0)
    (tmp_path / "in").mkdir()
    metadata = {"axes": "ZYX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5}
    tifffile.imwrite(tmp_path / "in" / "cells.ome.tif", stack, ome=True, metadata=metadata)
    out, printed = run_predict(tmp_path, "out")
    assert printed.count("pixel size: 0.5 um/px from OME-XML") == 1
    assert printed.count("scale: the model has no training pixel size") == 1
    results = json.loads((out / "results.json").read_text())
    summary = read_csv(out / "summary.csv")
    assert [row["plane"] for row in summary] == ["0", "1"]
    for z in range(2):
        stem = out / f"cells_plane{z}"
        records = [r for r in results if r["plane"] == z]
        labels = tifffile.imread(f"{stem}_labels.tif")
        assert labels.max() == len(records) > 5
        assert np.array_equal(labels, np.asarray(predict.Image.open(f"{stem}_labels.png")))
        assert next(microscopy_io.read_planes(f"{stem}_labels.tif")).pixel_size == 0.5
        features = json.loads((out / f"cells_plane{z}.geojson").read_text())["features"]
        rows = read_csv(f"{stem}_measurements.csv")
        assert len(features) == len(rows) == len(records) == int(summary[z]["count"])
        for row, record in zip(rows, records, strict=True):
            assert float(row["score"]) == pytest.approx(record["score"])
            k = int(row["object_id"])
            assert float(row["area_px"]) >= (labels == k).sum() > 0
            assert float(row["area_um2"]) == pytest.approx(float(row["area_px"]) * 0.25)
            assert float(row["mean_intensity_c0"]) >= 20000


def test_tiled_predict_writes_the_same_objects_once(tmp_path, fake_model):
    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "big.tif", disc_stack(1, 160, seed=1)[0])
    whole, _ = run_predict(tmp_path, "whole")
    tiled, _ = run_predict(tmp_path, "tiled", "--tile", "64", "--tile-overlap", "24")
    for name in ("big_labels.tif", "big_measurements.csv", "big.geojson"):
        assert (tiled / name).exists()
    assert np.array_equal(
        tifffile.imread(tiled / "big_labels.tif") > 0, tifffile.imread(whole / "big_labels.tif") > 0
    )
    tiled_rows, whole_rows = (
        read_csv(tiled / "big_measurements.csv"),
        read_csv(whole / "big_measurements.csv"),
    )
    assert len(tiled_rows) == len(whole_rows)

    assert areas(tiled_rows) == areas(whole_rows)


def areas(rows):
    return sorted(int(r["area_px"]) for r in rows)


def test_a_rescaled_image_is_measured_on_its_own_pixels(tmp_path, fake_model):
    fake_model["args"]["train_pixel_size"] = 0.25
    (tmp_path / "in").mkdir()
    image = disc_stack(1, 96, seed=2)[0]
    tifffile.imwrite(
        tmp_path / "in" / "x.tif",
        image,
        imagej=True,
        resolution=(2.0, 2.0),
        metadata={"unit": "um"},
    )
    out, printed = run_predict(tmp_path, "out")
    assert "rescaled by 2 to the model's 0.25 um/px" in printed
    labels = tifffile.imread(out / "x_labels.tif")
    assert labels.shape == (96, 96)
    truth = image > 10000
    iou = ((labels > 0) & truth).sum() / ((labels > 0) | truth).sum()
    assert iou >= 0.9
