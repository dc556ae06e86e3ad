from __future__ import annotations

import numpy as np
import pytest

from napari_virchow.analysis.rasters import (
    colormap,
    grid_indices,
    labels_raster,
    mask_below,
    probability_rgba,
    rasterize_annotations,
    tile_raster,
    upsample,
)

T = 448
MPP = 0.25
ORIGIN = (100, 37)  # grid offset from the slide corner, in level-0 px (x, y)


def coords_grid(cols: int, rows: int, origin: tuple[int, int] = ORIGIN) -> np.ndarray:
    i = np.arange(cols * rows)
    return np.stack([origin[0] + (i % cols) * T, origin[1] + (i // cols) * T], axis=1)


def raster_index(world: np.ndarray, translate: float, scale: float) -> np.ndarray:
    """napari's world → data mapping: pixel centres sit at index * scale + translate."""
    return np.round((world - translate) / scale).astype(int)


def test_each_slide_pixel_of_a_tile_maps_to_that_tiles_raster_pixel() -> None:
    coords = coords_grid(4, 3)
    r = tile_raster(np.arange(12.0), coords, T, (100 + 4 * T, 37 + 3 * T), mpp=MPP)
    assert r.scale_um == T * MPP
    for axis, (origin, n) in enumerate(((ORIGIN[1], 3), (ORIGIN[0], 4))):
        for tile in range(n):
            first = origin + tile * T
            pixels = np.arange(first - 1, first + T + 1)  # one pixel either side of the tile
            world = pixels * MPP  # slide layer: scale mpp, translate 0 → centres at px * mpp
            idx = raster_index(world, r.translate_um[axis], r.scale_um)
            assert (idx[1:-1] == tile).all()
            assert idx[0] == tile - 1 and idx[-1] == tile + 1


def test_translate_formula() -> None:
    r = tile_raster(np.ones(1), np.array([[T * 2 + 5, T + 9]]), T, (T * 4, T * 4), mpp=MPP)
    assert r.translate_um == pytest.approx(((9 + (T - 1) / 2) * MPP, (5 + (T - 1) / 2) * MPP))
    assert r.origin_l0 == (5, 9)
    assert r.layer_kwargs() == {"scale": (T * MPP, T * MPP), "translate": r.translate_um}


def test_raster_covers_slide_with_nan_where_not_computed() -> None:
    coords = coords_grid(4, 3)
    done = np.zeros(12, bool)
    done[[0, 5]] = True
    r = tile_raster(np.arange(12.0), coords, T, (5000, 3000), mpp=MPP, done=done)
    assert r.data.shape == (-(-(3000 - 37) // T), -(-(5000 - 100) // T))
    assert r.data.dtype == np.float32
    assert r.data[0, 0] == 0 and r.data[1, 1] == 5
    assert np.isnan(r.data).sum() == r.data.size - 2


def test_multichannel_values() -> None:
    rgb = np.arange(12 * 3, dtype=float).reshape(12, 3)
    r = tile_raster(rgb, coords_grid(4, 3), T, (4 * T, 3 * T), mpp=MPP, fill=0)
    np.testing.assert_array_equal(r.data[2, 3], rgb[11])


def test_off_grid_coords_rejected() -> None:
    with pytest.raises(ValueError, match="not on one grid"):
        grid_indices(np.array([[0, 0], [T + 3, 0]]), T)


def test_labels_raster_int32_zero_background() -> None:
    r = labels_raster(np.array([3, 1]), np.array([[0, 0], [T, T]]), T, (2 * T, 2 * T), mpp=MPP)
    assert r.data.dtype == np.int32
    np.testing.assert_array_equal(r.data, [[3, 0], [0, 1]])


@pytest.mark.parametrize("smooth", [None, "bilinear", "gaussian"])
def test_upsampled_pixels_stay_inside_their_tile(smooth) -> None:
    base = tile_raster(np.arange(12.0), coords_grid(4, 3), T, (4 * T, 3 * T), mpp=MPP)
    f = 4
    up = upsample(base, f, smooth)
    assert up.data.shape == (3 * f, 4 * f)
    assert up.scale_um == pytest.approx(base.scale_um / f)
    for axis in (0, 1):
        centres = up.translate_um[axis] + np.arange(up.data.shape[axis]) * up.scale_um
        tile = raster_index(centres, base.translate_um[axis], base.scale_um)
        np.testing.assert_array_equal(tile, np.arange(up.data.shape[axis]) // f)
        # The f sub-pixels of a tile are centred on the tile centre.
        np.testing.assert_allclose(centres.reshape(-1, f).mean(axis=1),
                                   base.translate_um[axis] + np.arange(base.data.shape[axis])
                                   * base.scale_um)


@pytest.mark.parametrize("smooth", ["bilinear", "gaussian"])
def test_smoothing_never_fills_uncomputed_tiles(smooth) -> None:
    values = np.arange(12.0)
    values[[5, 6]] = np.nan
    base = tile_raster(values, coords_grid(4, 3), T, (4 * T, 3 * T), mpp=MPP)
    up = upsample(base, 3, smooth)
    nan_tiles = np.isnan(base.data)
    np.testing.assert_array_equal(np.isnan(up.data), np.kron(nan_tiles, np.ones((3, 3))) > 0)
    assert np.nanmin(up.data) >= 0 and np.nanmax(up.data) <= 11


def test_bilinear_keeps_constant_and_interpolates() -> None:
    flat = tile_raster(np.full(4, 0.7), coords_grid(2, 2), T, (2 * T, 2 * T), mpp=MPP)
    np.testing.assert_allclose(upsample(flat, 4).data, 0.7, rtol=1e-6)
    ramp = tile_raster(np.array([0.0, 1.0]), coords_grid(2, 1), T, (2 * T, T), mpp=MPP)
    row = upsample(ramp, 4).data[0]
    assert (np.diff(row) >= 0).all() and row[0] == 0 and row[-1] == 1 and 0 < row[3] < 0.5


def test_labels_only_upsample_nearest() -> None:
    r = labels_raster(np.array([1, 2]), coords_grid(2, 1), T, (2 * T, T), mpp=MPP)
    np.testing.assert_array_equal(upsample(r, 2, None).data, [[1, 1, 2, 2], [1, 1, 2, 2]])
    with pytest.raises(ValueError, match="smooth=None"):
        upsample(r, 2, "bilinear")


def test_probability_colours_transparent_below_threshold() -> None:
    p = np.array([[np.nan, 0.2], [0.5, 0.9]])
    rgba = probability_rgba(p, 0.5, cmap="magma")
    assert rgba.shape == (2, 2, 4)
    np.testing.assert_array_equal(rgba[..., 3], [[0, 0], [1, 1]])
    np.testing.assert_allclose(rgba[1, 1, :3], colormap("magma")[round(0.9 * 255), :3])
    assert np.isnan(mask_below(p, 0.5)[0]).all() and mask_below(p, 0.5)[1, 1] == 0.9


def test_rasterize_annotations_min_overlap_and_holes() -> None:
    coords = coords_grid(6, 4, origin=(0, 0))
    # Tumour: tiles (0..2, 0..1) fully, plus a quarter of column 3 (below min_overlap).
    tumour = np.array([[0, 0], [3.25 * T, 0], [3.25 * T, 2 * T], [0, 2 * T]])
    hole = np.array([[T, T], [2 * T, T], [2 * T, 2 * T], [T, 2 * T]])  # tile (1, 1)
    stroma = np.array([[4 * T, 2 * T], [6 * T, 2 * T], [6 * T, 4 * T], [4 * T, 4 * T]])
    labels, names = rasterize_annotations([tumour, stroma, stroma], ["Tumor", "Stroma", None],
                                          coords, T, holes=[[hole], [], []])
    assert names == ["Tumor", "Stroma"]
    grid = labels.reshape(4, 6)
    expected = np.full((4, 6), -1)
    expected[0:2, 0:3] = 0
    expected[1, 1] = -1
    expected[2:4, 4:6] = 1
    np.testing.assert_array_equal(grid, expected)


def test_rasterize_overlap_goes_to_larger_cover() -> None:
    coords = coords_grid(1, 1, origin=(0, 0))
    a = np.array([[0, 0], [0.6 * T, 0], [0.6 * T, T], [0, T]])
    b = np.array([[0.3 * T, 0], [T, 0], [T, T], [0.3 * T, T]])
    labels, names = rasterize_annotations([a, b], ["a", "b"], coords, T, min_overlap=0.5)
    assert names[labels[0]] == "b"
