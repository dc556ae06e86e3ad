"""OME-Zarr (NGFF multiscales) folders open lazily as slides, scale from the multiscales metadata."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from napari_virchow.errors import SlideError
from napari_virchow.slides.slide import Slide
from napari_virchow.slides.tiling import TileGrid


def _image(h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(5)
    small = rng.integers(0, 256, (h // 16, w // 16, 3), np.uint8)
    return np.ascontiguousarray(np.repeat(np.repeat(small, 16, 0), 16, 1))


def _write(path: Path, img: np.ndarray, *, mpp: float, unit: str | None, version: str, axes: str = "cyx",
           zarr_format: int = 2) -> Path:  # fmt: skip
    group = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    datasets = []
    for k in range(3):
        level = img[:: 2**k, :: 2**k]
        data = np.moveaxis(level, -1, 0) if axes == "cyx" else level[None, :, None, :, :].transpose(0, 4, 2, 1, 3)
        arr = group.create_array(str(k), shape=data.shape, dtype=data.dtype,
                                 chunks=(1,) * (data.ndim - 2) + (128, 128))  # fmt: skip
        arr[...] = data
        spatial = [mpp * 2**k, mpp * 2**k]
        datasets.append({"path": str(k), "coordinateTransformations": [
            {"type": "scale", "scale": [1.0] * (data.ndim - 2) + spatial}]})  # fmt: skip
    names = list(axes)
    kinds = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}
    axes_meta = [{"name": a, "type": kinds[a], **({"unit": unit} if unit and a in "zyx" else {})} for a in names]
    ms = {"version": version, "axes": axes_meta, "datasets": datasets, "name": "slide"}
    if version == "0.5":
        group.attrs["ome"] = {"version": "0.5", "multiscales": [ms]}
    else:
        group.attrs["multiscales"] = [ms]
    return path


@pytest.mark.parametrize(("unit", "mpp", "version", "fmt"), [
    ("micrometer", 0.25, "0.4", 2), ("nanometer", 250.0, "0.4", 2), ("micrometer", 0.5, "0.5", 3),
])  # fmt: skip
def test_ome_zarr_opens_lazily_with_its_scale(tmp_path: Path, unit: str, mpp: float, version: str, fmt: int) -> None:
    img = _image(512, 768)
    path = _write(tmp_path / "slide.ome.zarr", img, mpp=mpp, unit=unit, version=version, zarr_format=fmt)
    with Slide(path) as slide:
        assert slide.backend == "zarr" and slide.vendor == "ome-ngff"
        assert slide.mpp == pytest.approx(0.25 if unit == "nanometer" else mpp)
        assert slide.file_level_dimensions == ((768, 512), (384, 256), (192, 128))
        assert slide.levels[0].chunks[0][0] % 128 == 0
        np.testing.assert_array_equal(slide.levels[1].compute(), img[::2, ::2])
        np.testing.assert_array_equal(slide.read_region((100, 60), 0, (300, 500)),
                                      np.pad(img, ((0, 100), (0, 0), (0, 0)), constant_values=255)[60:560, 100:400])
        assert len(slide.fingerprint) == 32


def test_tczyx_layout_and_a_tile_grid(tmp_path: Path) -> None:
    img = _image(1024, 1024)
    path = _write(tmp_path / "b2r.zarr", img, mpp=0.5, unit="micrometer", version="0.4", axes="tczyx")
    with Slide(path) as slide:
        grid = TileGrid(slide, mpp=0.5, size=224)
        idx = np.arange(min(3, len(grid)))
        tiles = grid.read_tiles(idx)
        for k, (x, y) in zip(idx, grid.coords[idx], strict=True):
            np.testing.assert_array_equal(tiles[k], img[y : y + 224, x : x + 224])


def test_no_unit_means_no_scale_and_fluorescence_is_refused(tmp_path: Path) -> None:
    with Slide(_write(tmp_path / "nounit.zarr", _image(256, 256), mpp=0.5, unit=None, version="0.4")) as slide:
        assert slide.mpp is None
    group = zarr.open_group(str(tmp_path / "if.zarr"), mode="w", zarr_format=2)
    group.create_array("0", shape=(5, 256, 256), dtype="uint16", chunks=(1, 128, 128))
    group.attrs["multiscales"] = [{"version": "0.4", "axes": ["c", "y", "x"], "datasets": [{"path": "0"}]}]
    with pytest.raises(SlideError, match=r"if\.zarr.*uint16.*not a brightfield RGB slide"):
        Slide(tmp_path / "if.zarr")
    plain = zarr.open_group(str(tmp_path / "plain.zarr"), mode="w", zarr_format=2)
    plain.attrs["foo"] = json.dumps({})
    with pytest.raises(SlideError, match="without OME-NGFF 'multiscales'"):
        Slide(tmp_path / "plain.zarr")


def test_napari_reader_claims_rgb_ome_zarr_folders_only(tmp_path: Path) -> None:
    from napari_virchow._reader import napari_get_reader, read_slides

    path = _write(tmp_path / "s.ome.zarr", _image(256, 384), mpp=0.25, unit="micrometer", version="0.4")
    assert napari_get_reader(str(path)) is not None
    data, kwargs, kind = read_slides(str(path))[0]
    assert kind == "image" and tuple(kwargs["scale"])[-2:] == pytest.approx((0.25, 0.25))
    assert [tuple(d.shape) for d in data][:3] == [(256, 384, 3), (128, 192, 3), (64, 96, 3)]
    group = zarr.open_group(str(tmp_path / "if.zarr"), mode="w", zarr_format=2)
    group.create_array("0", shape=(5, 64, 64), dtype="uint16", chunks=(1, 64, 64))
    group.attrs["multiscales"] = [{"version": "0.4", "axes": ["c", "y", "x"], "datasets": [{"path": "0"}]}]
    assert napari_get_reader(str(tmp_path / "if.zarr")) is None  # napari-ome-zarr's, not ours
    (tmp_path / "folder").mkdir()
    assert napari_get_reader(str(tmp_path / "folder")) is None
