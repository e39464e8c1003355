"""Per-object measurements and per-image summaries as CSV rows, from each instance's crop.

    rows = object_rows(crops, scores, category_names, model_names, raw, pixel_size, image)

One row per object, a CSV file per image (`OBJECT_COLUMNS`, then the mean and maximum of each
channel): object_id (its value in the label image), the centroid (x, y in pixels, from the
top-left pixel's centre), area and perimeter in pixels and, when the pixel size is known, in
microns, eccentricity and solidity (scikit-image's regionprops), the intensities of the file's
own values (every channel, not only the ones the model saw), the score and the model.
Measurements are of each instance's own mask: where two overlap, both count the shared pixels
(the label image gives them to the higher score).

One summary row per image, all images in one file (`SUMMARY_COLUMNS`): the object count, the
image area, the density (objects per mm^2 when the pixel size is known, per megapixel
otherwise) and the mean area.
"""

import csv

import numpy as np
from skimage.measure import regionprops

OBJECT_COLUMNS = (
    "image",
    "plane",
    "object_id",
    "category",
    "model",
    "score",
    "centroid_x",
    "centroid_y",
    "area_px",
    "area_um2",
    "perimeter_px",
    "perimeter_um",
    "eccentricity",
    "solidity",
)
SUMMARY_COLUMNS = (
    "image",
    "plane",
    "count",
    "image_area_px",
    "image_area_mm2",
    "density_per_mm2",
    "density_per_megapixel",
    "mean_area_px",
    "mean_area_um2",
)
SQUARE_MICRONS_PER_MM2 = 1e6


def object_row(crop, raw, pixel_size):
    """The shape and intensity columns of one instance: `crop` an instance_crops.Crop, `raw`
    the [C, H, W] file values."""
    intensities = raw[:, crop.top : crop.bottom, crop.left : crop.right].transpose(1, 2, 0)
    props = regionprops(crop.mask.astype(np.uint8), intensity_image=intensities)[0]
    row = {
        "centroid_x": crop.left + props.centroid[1],
        "centroid_y": crop.top + props.centroid[0],
        "area_px": int(props.area),
        "perimeter_px": props.perimeter,
        "eccentricity": props.eccentricity,
        "solidity": props.solidity,
    }
    if pixel_size is not None:
        row["area_um2"] = props.area * pixel_size**2
        row["perimeter_um"] = props.perimeter * pixel_size
    for c, (mean, peak) in enumerate(
        zip(np.atleast_1d(props.intensity_mean), np.atleast_1d(props.intensity_max), strict=True)
    ):
        row[f"mean_intensity_c{c}"] = float(mean)
        row[f"max_intensity_c{c}"] = peak.item()
    return row


def object_rows(crops, scores, category_names, model_names, raw, pixel_size, image, plane=None):
    """A row per instance with pixels, object_id k + 1 for the k-th crop."""
    rows = []
    objects = zip(crops, scores, category_names, model_names, strict=True)
    for k, (crop, score, name, model_name) in enumerate(objects):
        if not crop.mask.any():
            continue
        row = {"image": image, "plane": plane, "object_id": k + 1, "category": name}
        row |= {"model": model_name, "score": float(score)}
        rows.append(row | object_row(crop, raw, pixel_size))
    return rows


def summary_row(rows, height, width, pixel_size, image, plane=None):
    """One image's count, density and mean area from its object rows."""
    count = len(rows)
    row = {"image": image, "plane": plane, "count": count, "image_area_px": height * width}
    row["density_per_megapixel"] = count / (height * width / 1e6)
    row["mean_area_px"] = float(np.mean([r["area_px"] for r in rows])) if rows else None
    if pixel_size is not None:
        area_mm2 = height * width * pixel_size**2 / SQUARE_MICRONS_PER_MM2
        row["image_area_mm2"] = area_mm2
        row["density_per_mm2"] = count / area_mm2
        row["mean_area_um2"] = row["mean_area_px"] * pixel_size**2 if rows else None
    return row


def write_csv(path, rows, columns):
    """Rows as CSV with `columns` first, then any others of the first row (the intensities);
    a cell a row lacks is empty."""
    extra = [key for key in rows[0] if key not in columns] if rows else []
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, [*columns, *extra], restval="")
        writer.writeheader()
        writer.writerows(rows)
