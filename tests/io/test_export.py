"""export.py: TRIDENT-layout HDF5, heatmap TIFFs aligned with the slide, GeoJSON regions."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile

from napari_virchow.io.export import (
    FEATURES_FORMAT,
    HEATMAP_NODATA,
    cluster_features,
    magnification,
    read_features_h5,
    threshold_features,
    trident_coords_attrs,
    write_features_h5,
    write_heatmap_tiff,
)
from napari_virchow.slides.slide import Slide

#: the attributes TRIDENT's coords_to_h5 writes on `coords`
TRIDENT_COORDS_ATTRS = {
    "patch_size", "patch_size_level0", "level0_magnification", "target_magnification", "overlap", "name",
    "savetodir", "level0_width", "level0_height",
}  # fmt: skip


def _grid(rows: int, cols: int, t: int) -> np.ndarray:
    r, c = np.divmod(np.arange(rows * cols), cols)
    return np.stack([c, r], axis=1).astype(np.int64) * t


@pytest.mark.timeout(30)
def test_features_h5_has_trident_layout(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(7, 96)).astype(np.float16)  # as stored; written as float32
    coords = _grid(1, 7, 448)
    attrs = trident_coords_attrs("slide1", patch_size=224, patch_size_level0=448, level0_mpp=0.25, target_mpp=0.5,
                                 level0_size=(4000, 3000), savetodir=str(tmp_path))  # fmt: skip
    path = write_features_h5(tmp_path / "slide1.h5", feats, coords, attrs=attrs, file_attrs={"encoder": "virchow2"})
    with h5py.File(path, "r") as f:
        assert set(f.keys()) == {"features", "coords"}
        assert f["features"].dtype == np.float32 and f["features"].shape == (7, 96)
        assert f["coords"].dtype == np.int64 and f["coords"].shape == (7, 2)
        assert f["features"].maxshape == (None, 96)  # appendable, as TRIDENT's save_h5 makes them
        ca = dict(f["coords"].attrs)
        assert set(ca) >= TRIDENT_COORDS_ATTRS
        assert (ca["patch_size"], ca["patch_size_level0"], ca["overlap"]) == (224, 448, 0)
        assert (ca["level0_magnification"], ca["target_magnification"]) == (40, 20)
        assert f["features"].attrs["name"] == "slide1"
        assert f.attrs["format"] == FEATURES_FORMAT and f.attrs["encoder"] == "virchow2"
    back = read_features_h5(path)
    np.testing.assert_array_equal(back.features, feats.astype(np.float32))
    np.testing.assert_array_equal(back.coords, coords)
    assert back.attrs["name"] == "slide1" and back.file_attrs["encoder"] == "virchow2"
    assert not list(tmp_path.glob(".*.tmp"))  # written through a temp file, none left over


@pytest.mark.timeout(30)
def test_features_h5_empty_slide_and_bad_shapes(tmp_path: Path) -> None:
    attrs = {"patch_size": 224, "name": "blank"}
    path = write_features_h5(tmp_path / "blank.h5", np.zeros((0, 8)), np.zeros((0, 2)), attrs=attrs)
    assert read_features_h5(path).features.shape == (0, 8)
    with pytest.raises(ValueError, match="coords"):
        write_features_h5(tmp_path / "bad.h5", np.zeros((3, 8)), np.zeros((2, 2)), attrs=attrs)
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(ValueError, match="not a TRIDENT-style"):
        read_features_h5(tmp_path / "other.h5")


def test_magnification_conventions() -> None:
    assert magnification(0.5) == 20 and magnification(0.25) == 40 and magnification(0.2522, 40.0) == 40
    a = trident_coords_attrs("s", patch_size=224, patch_size_level0=444, level0_mpp=0.2522, target_mpp=0.5,
                             level0_size=(10, 10), objective_power=40)  # fmt: skip
    # target follows the file's objective power: 40 × 0.2522 / 0.5
    assert a["level0_magnification"] == 40 and a["target_magnification"] == pytest.approx(20.176)


@pytest.mark.timeout(30)
def test_heatmap_tiff_is_pyramidal_and_as_large_as_the_slide(tmp_path: Path) -> None:
    rows, cols, t, mpp = 600, 400, 224, 0.5
    values = np.linspace(0, 1, rows * cols, dtype=np.float32).reshape(rows, cols)
    values[:10, :10] = np.nan
    dims = (cols * t - 100, rows * t - 50)  # the last tile column/row is partial
    path = write_heatmap_tiff(tmp_path / "h.tif", values, mpp_l0=mpp, tile_size_l0=t, slide_dims=dims,
                              metadata={"encoder": "virchow2"})  # fmt: skip
    with tifffile.TiffFile(path) as tif:
        pages = list(tif.pages)
        assert [p.shape for p in pages] == [(600, 400), (300, 200), (150, 100)]
        assert all(p.is_tiled and p.dtype == np.uint8 for p in pages)
        assert [int(p.subfiletype) for p in pages] == [0, 1, 1]
        level0 = pages[0].asarray()
        x_res = pages[0].tags["XResolution"].value
        assert '"encoder": "virchow2"' in pages[0].description
    assert level0[0, 0] == HEATMAP_NODATA and level0[-1, -1] == 255
    np.testing.assert_array_equal(level0[20], np.rint(values[20] * 255).astype(np.uint8))
    assert 1e4 / (x_res[0] / x_res[1]) == pytest.approx(t * mpp)  # µm per heatmap pixel
    with Slide(path) as heat:
        assert heat.mpp == pytest.approx(t * mpp)
        w_um, h_um = (d * heat.mpp for d in heat.dimensions)
        assert 0 <= w_um - dims[0] * mpp < t * mpp and 0 <= h_um - dims[1] * mpp < t * mpp


@pytest.mark.timeout(30)
def test_heatmap_tiff_float32_crop_and_wrong_raster(tmp_path: Path) -> None:
    values = np.full((5, 6), 0.25, np.float32)
    values[1, 1] = np.nan
    # upsampled ×2: 112 px per pixel; one column lies wholly beyond a 600-px-wide slide and goes
    path = write_heatmap_tiff(tmp_path / "f.tif", values, mpp_l0=0.5, tile_size_l0=112, slide_dims=(600, 500),
                              dtype="float32")  # fmt: skip
    data = tifffile.imread(path)
    assert data.dtype == np.float32 and data.shape == (5, 6) and np.isnan(data[1, 1])
    cropped = tifffile.imread(write_heatmap_tiff(tmp_path / "c.tif", values, mpp_l0=0.5, tile_size_l0=112,
                                                 slide_dims=(500, 400)))  # fmt: skip
    assert cropped.shape == (4, 5)
    with pytest.raises(ValueError, match="another slide"):
        write_heatmap_tiff(tmp_path / "w.tif", values, mpp_l0=0.5, tile_size_l0=112, slide_dims=(5000, 400))


def test_threshold_features_trace_tile_borders() -> None:
    coords = _grid(4, 4, 224)
    values = np.zeros(16, np.float32)
    values[[5, 6, 9, 10]] = 0.9  # the 2 × 2 block at rows 1-2, cols 1-2
    values[0] = np.nan
    feats = threshold_features(values, coords, 224, 0.5, class_name="Tumor")
    assert len(feats) == 1
    geom = feats[0]["geometry"]
    assert geom["type"] == "Polygon"
    ring = np.asarray(geom["coordinates"][0])
    assert (ring.min(axis=0) == 224).all() and (ring.max(axis=0) == 672).all()
    assert feats[0]["properties"]["classification"]["name"] == "Tumor"
    assert threshold_features(values, coords, 224, 0.95, class_name="Tumor") == []


def test_cluster_features_one_per_cluster() -> None:
    coords = _grid(2, 3, 100)
    feats = cluster_features(np.array([1, 1, 2, 0, 2, 2]), coords, 100)
    names = [f["properties"]["classification"]["name"] for f in feats]
    assert names == ["Cluster 1", "Cluster 2"]
    assert feats[0]["properties"]["n_tiles"] == 2 and feats[1]["properties"]["n_tiles"] == 3
    assert feats[0]["properties"]["classification"]["color"] != feats[1]["properties"]["classification"]["color"]
