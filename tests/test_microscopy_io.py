"""microscopy_io.py: files of every kind read into planes, their pixel size, and rescaled
predictions put back on the image's own grid."""

import numpy as np
import pytest
import tifffile
import torch
from conftest import write_image
from pycocotools import mask as mask_util

import coco_utils
import microscopy_io
from errors import ConfigError, DataError


def ramp(shape, dtype, scale=1):
    return (np.arange(np.prod(shape)).reshape(shape) * scale).astype(dtype)


def test_a_16_bit_tiff_is_one_grey_plane_scaled_to_0_1_with_its_values_kept(tmp_path):
    values = ramp((40, 50), np.uint16, scale=13)
    tifffile.imwrite(tmp_path / "a.tif", values)
    [plane] = microscopy_io.read_planes(str(tmp_path / "a.tif"))
    assert plane.index is None and plane.pixel_size is None
    assert plane.raw.dtype == np.uint16 and np.array_equal(plane.raw[0], values)
    image = plane.image
    assert image.shape == (3, 40, 50) and image.dtype == torch.float32
    assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])
    assert image.min() == 0 and image.max() == 1
    assert torch.equal(image, coco_utils.load_image(str(tmp_path / "a.tif")))


def test_a_32_bit_float_tiff_is_scaled_like_the_training_reader(tmp_path):
    values = ramp((30, 20), np.float32, scale=0.01) - 2
    tifffile.imwrite(tmp_path / "f.tif", values)
    [plane] = microscopy_io.read_planes(str(tmp_path / "f.tif"))
    assert plane.raw.dtype == np.float32
    assert torch.allclose(plane.image[0], coco_utils.scale_high_bit_depth(values)[0])


@pytest.mark.parametrize(("name", "mode"), [("rgb.png", "RGB"), ("grey.jpg", "L")])
def test_png_and_jpeg_reach_the_model_as_in_training(tmp_path, name, mode):
    path = write_image(tmp_path / name, 24, 32, mode=mode)
    [plane] = microscopy_io.read_planes(str(path))
    assert torch.equal(plane.image, coco_utils.load_image(str(path)))
    assert plane.raw.shape == ((3, 24, 32) if mode == "RGB" else (1, 24, 32))


def test_an_ome_tiff_gives_its_pixel_size_in_microns_whatever_its_unit(tmp_path):
    data = ramp((2, 16, 16), np.uint16)
    metadata = {"axes": "CYX", "PhysicalSizeX": 325.0, "PhysicalSizeXUnit": "nm"}
    tifffile.imwrite(tmp_path / "a.ome.tif", data, ome=True, metadata=metadata)
    [plane] = microscopy_io.read_planes(str(tmp_path / "a.ome.tif"))
    assert plane.pixel_size == pytest.approx(0.325)
    assert "OME" in plane.pixel_size_source
    [given] = microscopy_io.read_planes(str(tmp_path / "a.ome.tif"), pixel_size=0.5)
    assert given.pixel_size == 0.5 and given.pixel_size_source == "--pixel-size"


def test_imagej_and_centimetre_resolution_give_the_pixel_size_and_inches_do_not(tmp_path):
    data = np.zeros((8, 8), dtype=np.uint16)
    tifffile.imwrite(
        tmp_path / "ij.tif", data, imagej=True, resolution=(4.0, 4.0), metadata={"unit": "um"}
    )
    tifffile.imwrite(
        tmp_path / "cm.tif", data, resolution=(1e4 / 0.2, 1e4 / 0.2), resolutionunit="CENTIMETER"
    )
    tifffile.imwrite(tmp_path / "dpi.tif", data, resolution=(72.0, 72.0), resolutionunit="INCH")
    sizes = {
        name: next(microscopy_io.read_planes(str(tmp_path / name))).pixel_size
        for name in ("ij.tif", "cm.tif", "dpi.tif")
    }
    assert sizes["ij.tif"] == pytest.approx(0.25)
    assert sizes["cm.tif"] == pytest.approx(0.2)
    assert sizes["dpi.tif"] is None


def test_channels_choose_what_the_model_sees_and_every_channel_stays_for_measuring(tmp_path):
    data = np.stack([ramp((16, 16), np.uint8), 255 - ramp((16, 16), np.uint8)] * 2)  # CYX, 4
    tifffile.imwrite(tmp_path / "c.tif", data, photometric="minisblack", metadata={"axes": "CYX"})
    path = str(tmp_path / "c.tif")
    [dapi] = microscopy_io.read_planes(path, channels=[1])
    assert dapi.raw.shape == (4, 16, 16)
    assert all(torch.equal(dapi.image[c], torch.from_numpy(data[1])) for c in range(3))
    [pair] = microscopy_io.read_planes(path, channels=[2, 1])
    assert torch.equal(pair.image[0], torch.from_numpy(data[2]))
    assert torch.equal(pair.image[1], torch.from_numpy(data[1])) and pair.image[2].max() == 0
    with pytest.raises(ConfigError, match="choose up to 3 with --channels"):
        next(microscopy_io.read_planes(path))
    with pytest.raises(ConfigError, match="has 4 channel"):
        next(microscopy_io.read_planes(path, channels=[4]))
    with pytest.raises(ConfigError, match="--channels"):
        microscopy_io.channel_list("0,x")


def test_every_plane_of_a_stack_is_an_image_of_its_own_or_the_one_asked_for(tmp_path):
    stack = ramp((2, 3, 12, 10), np.uint16)  # TZYX: 6 planes
    tifffile.imwrite(tmp_path / "s.tif", stack, imagej=True, metadata={"axes": "TZYX"})
    planes = list(microscopy_io.read_planes(str(tmp_path / "s.tif")))
    assert [p.index for p in planes] == list(range(6))
    assert all(np.array_equal(p.raw[0], stack.reshape(6, 12, 10)[p.index]) for p in planes)
    [fourth] = microscopy_io.read_planes(str(tmp_path / "s.tif"), plane=4)
    assert fourth.index == 4 and np.array_equal(fourth.raw[0], stack[1, 1])
    with pytest.raises(ConfigError, match="--plane 6: .* has planes 0 to 5"):
        next(microscopy_io.read_planes(str(tmp_path / "s.tif"), plane=6))


def test_a_file_that_is_no_image_is_a_one_line_data_error_naming_it(tmp_path):
    for name, content in (("x.tif", b"II*\x00 broken"), ("x.png", b"nope")):
        path = str(tmp_path / name)
        (tmp_path / name).write_bytes(content)
        for read in (microscopy_io.check_readable, lambda p: list(microscopy_io.read_planes(p))):
            with pytest.raises(DataError, match=f"{name}: cannot read image") as error:
                read(path)
            assert "\n" not in error.value.message


def test_the_scale_factor_is_the_ratio_of_pixel_sizes_and_unknowns_leave_the_image_alone():
    factor, notice = microscopy_io.scale_factor(0.5, 0.25)
    assert factor == 2 and "rescaled by 2" in notice
    for sizes in ((None, 0.25), (0.5, None), (None, None)):
        factor, notice = microscopy_io.scale_factor(*sizes)
        assert factor == 1 and notice.startswith("scale: ")
    with pytest.raises(ConfigError, match="--pixel-size"):
        microscopy_io.scale_factor(0.0, 0.25)


def squares_image(height, width, boxes):
    """A uint8 [3, H, W] image: bright (top, left, bottom, right) boxes on black."""
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    for top, left, bottom, right in boxes:
        image[:, top:bottom, left:right] = 255
    return image


def bright_squares(image):
    """A stand-in model's detections: each given box, its mask where the image is bright."""
    bright = image.float().mean(0) > 127
    from scipy import ndimage

    ids, count = ndimage.label(bright.numpy())
    masks = torch.from_numpy(ids)[None] == torch.arange(1, count + 1)[:, None, None]
    boxes = [ndimage.find_objects(ids)[k] for k in range(count)]
    xyxy = [[s[1].start, s[0].start, s[1].stop, s[0].stop] for s in boxes]
    return {
        "boxes": torch.tensor(xyxy, dtype=torch.float32).reshape(-1, 4),
        "masks": masks[:, None].float(),
    }


@pytest.mark.parametrize("factor", [2.0, 0.5])
def test_rescaled_predictions_come_back_on_the_original_grid(factor):
    boxes = [(8, 12, 28, 36), (40, 44, 60, 56)]
    image = squares_image(64, 72, boxes)
    scaled = microscopy_io.rescale(image, factor)
    assert scaled.shape[-2:] == (64 * factor, 72 * factor)
    detections = bright_squares(scaled)
    dense = microscopy_io.to_original_grid(detections, scaled.shape[-2:], 64, 72)
    rles = [mask_util.encode(np.asfortranarray(m[0].numpy() > 0.5)) for m in detections["masks"]]
    tiled = microscopy_io.to_original_grid({**detections, "masks": rles}, scaled.shape[-2:], 64, 72)
    expected = [[left, top, right, bottom] for top, left, bottom, right in boxes]
    assert torch.allclose(dense["boxes"], torch.tensor(expected, dtype=torch.float32))
    for k, (top, left, bottom, right) in enumerate(boxes):
        truth = np.zeros((64, 72), dtype=bool)
        truth[top:bottom, left:right] = True
        for mask in (dense["masks"][k, 0].numpy() > 0.5, mask_util.decode(tiled["masks"][k])):
            iou = (truth & (mask > 0)).sum() / (truth | (mask > 0)).sum()
            assert iou >= 0.95, (k, iou)
