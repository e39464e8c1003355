"""Detections as a GeoJSON FeatureCollection QuPath (0.4 to 0.6) imports as detection objects.

    write_geojson("cells.geojson", features(crops, scores, category_names, object_ids))

One Feature per instance: its outline traced by OpenCV's contours along the pixel edges (holes
kept; an instance in several pieces is a MultiPolygon), coordinates in image pixels with (0, 0)
the top-left corner of the top-left pixel, as QuPath reads them. Properties: `objectType`
"detection", `classification` {"name": category}, and `measurements` {"object_id", "score"}
(object_id is the instance's value in the label image and its row in the measurements CSV).

Outlines along pixel edges, not through the centres of the boundary pixels, keep an object's
area: a polygon through the centres loses half a pixel all round (a tenth of a nucleus 20 pixels
across). OpenCV traces pixel centres, so the mask is traced at twice its size, where the centres
of the boundary pixels of each 2 x 2 block lie on the block's edges once mapped back.
"""

import json

import cv2
import numpy as np

UPSAMPLING = 2


def outline_polygons(mask, top=0, left=0):
    """The polygons of a boolean mask crop at (top, left): a list of polygons, each a list of
    rings (outer first, then its holes), each ring a closed list of [x, y] pixel corners."""
    if not mask.any():
        return []
    enlarged = np.pad(mask.repeat(UPSAMPLING, 0).repeat(UPSAMPLING, 1), 1).astype(np.uint8)
    contours, hierarchy = cv2.findContours(enlarged, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    rings = [pixel_corners(contour[:, 0] - 1, top, left) for contour in contours]
    parents = hierarchy[0][:, 3]
    polygons = []
    for i in np.flatnonzero(parents == -1):
        holes = [rings[j] for j in np.flatnonzero(parents == i) if len(rings[j]) >= 4]
        if len(rings[i]) >= 4:
            polygons.append([rings[i], *holes])
    return polygons


def pixel_corners(points, top, left):
    """A closed ring of pixel corners from the boundary points of the mask traced at twice its
    size: point u of the enlarged mask is corner (u + 1) // 2 of the original one."""
    corners = (points + 1) // UPSAMPLING + np.array([left, top])
    corners = corners[np.any(corners != np.roll(corners, 1, axis=0), axis=1)]
    corners = corners[~collinear(corners)]
    ring = corners.tolist()
    return [*ring, ring[0]] if ring else []


def collinear(points):
    """Whether each point of a ring lies on the straight line through its neighbours."""
    before, after = np.roll(points, 1, axis=0), np.roll(points, -1, axis=0)
    cross = (points - before)[:, 0] * (after - points)[:, 1]
    cross -= (points - before)[:, 1] * (after - points)[:, 0]
    return cross == 0


def geometry(polygons):
    if len(polygons) == 1:
        return {"type": "Polygon", "coordinates": polygons[0]}
    return {"type": "MultiPolygon", "coordinates": polygons}


def feature(polygons, category_name, score, object_id):
    return {
        "type": "Feature",
        "geometry": geometry(polygons),
        "properties": {
            "objectType": "detection",
            "classification": {"name": category_name},
            "measurements": {"object_id": object_id, "score": round(float(score), 6)},
        },
    }


def features(crops, scores, category_names, object_ids):
    """A Feature per crop with pixels (instance_crops.Crop), in order."""
    found = []
    for crop, score, name, object_id in zip(crops, scores, category_names, object_ids, strict=True):
        polygons = outline_polygons(crop.mask, crop.top, crop.left)
        if polygons:
            found.append(feature(polygons, name, score, object_id))
    return found


def write_geojson(path, found):
    with open(path, "w") as f:
        json.dump({"type": "FeatureCollection", "features": found}, f)
