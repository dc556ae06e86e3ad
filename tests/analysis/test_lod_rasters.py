"""Pyramid overlays line up with the slide in µm at every level, and draw the finest level computed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_virchow.analysis.lod_rasters import cell_at_um, finest_raster, level_rasters
from napari_virchow.analysis.rasters import tile_raster
from napari_virchow.lod import Lattice, SlideGeometry
from napari_virchow.slides.slide import Slide
from napari_virchow.slides.tiling import TileGrid
from tests.conftest import PLANTED_PATTERNS

LEVELS = (0.5, 1.0, 2.0)


def planted_fraction(grid: TileGrid) -> np.ndarray:
    """Geometric truth: the fraction of each tile's footprint covered by the planted patterns."""
    t = grid.tile_size_l0
    out = np.zeros(len(grid))
    for region in PLANTED_PATTERNS:
        x0, y0, x1, y1 = region.box
        wx = np.clip(np.minimum(grid.coords[:, 0] + t, x1) - np.maximum(grid.coords[:, 0], x0), 0, None)
        wy = np.clip(np.minimum(grid.coords[:, 1] + t, y1) - np.maximum(grid.coords[:, 1], y0), 0, None)
        out += wx * wy / t**2
    return out


def measured_planted(grid: TileGrid) -> np.ndarray:
    """From the pixels read at the grid's level: the fraction of purple (planted) pixels."""
    tiles = grid.read_tiles(np.arange(len(grid))).astype(np.int16)
    return ((tiles[..., 2] - tiles[..., 1]) > 50).mean(axis=(1, 2))


@pytest.fixture(scope="module")
def grids(planted_slide: Path):
    slide = Slide(planted_slide)
    yield slide, {m: TileGrid(slide, mpp=m) for m in LEVELS}
    slide.close()


def test_each_level_raster_lines_up_with_the_slide_in_um(grids) -> None:
    slide, by_mpp = grids
    geo = SlideGeometry.of(slide)
    levels = {m: (measured_planted(g), np.ones(len(g), bool)) for m, g in by_mpp.items()}
    rasters = level_rasters(levels, geo)
    assert list(rasters) == [2.0, 1.0, 0.5]  # coarse to fine: napari stacking order
    for m, grid in by_mpp.items():
        raster, t = rasters[m], grid.tile_size_l0
        # the raster pixel of every tile is drawn at the µm centre of that tile's slide pixels
        rows, cols = np.divmod(np.arange(len(grid)), grid.grid_shape[1])
        drawn = np.stack([raster.translate_um[1] + cols * raster.scale_um,
                          raster.translate_um[0] + rows * raster.scale_um], axis=1)  # fmt: skip
        np.testing.assert_allclose(drawn, (grid.coords + (t - 1) / 2) * geo.mpp)
        # what the pixels say matches where the patterns were planted, at every level
        np.testing.assert_allclose(raster.data[rows, cols], planted_fraction(grid), atol=0.12)
        for region in PLANTED_PATTERNS:
            x0, y0, x1, y1 = region.box
            r, c = cell_at_um(raster, (y0 + y1) / 2 * geo.mpp, (x0 + x1) / 2 * geo.mpp)  # type: ignore[misc]
            assert raster.data[r, c] > 0.2
        r, c = cell_at_um(raster, 500 * geo.mpp, 1300 * geo.mpp)  # type: ignore[misc]  # plain tissue
        assert raster.data[r, c] < 0.05


def test_finest_raster_draws_the_finest_level_computed_at_each_place(grids) -> None:
    slide, by_mpp = grids
    geo = SlideGeometry.of(slide)
    rng = np.random.default_rng(0)
    done = {2.0: np.ones(len(by_mpp[2.0]), bool)}  # the overview everywhere
    done[1.0] = rng.random(len(by_mpp[1.0])) < 0.5  # refined in places
    done[0.5] = rng.random(len(by_mpp[0.5])) < 0.3
    code = {2.0: 3000.0, 1.0: 2000.0, 0.5: 1000.0}  # value = level code + tile index
    levels = {m: (code[m] + np.arange(len(g)), done[m]) for m, g in by_mpp.items()}
    raster, source = finest_raster(levels, geo)
    fine = tile_raster(np.zeros(len(by_mpp[0.5])), by_mpp[0.5].coords, 224, slide.dimensions, mpp=geo.mpp)
    assert (raster.scale_um, raster.translate_um) == (fine.scale_um, fine.translate_um)
    for _ in range(300):
        y_um, x_um = rng.uniform(0, 2048 * geo.mpp, 2)
        r, c = cell_at_um(raster, y_um, x_um)  # type: ignore[misc]
        x_l0, y_l0 = x_um / geo.mpp + 0.5, y_um / geo.mpp + 0.5  # pixel centres sit at index * mpp
        expected, level = np.nan, np.nan
        for m in (0.5, 1.0, 2.0):  # finest first
            i = by_mpp[m].index_at(x_l0, y_l0)
            if i is not None and done[m][i]:
                expected, level = code[m] + i, m
                break
        np.testing.assert_equal(raster.data[r, c], expected)
        np.testing.assert_equal(source[r, c], level)


def test_non_nested_lattices_take_the_coarse_tile_under_each_cell_centre() -> None:
    geo = SlideGeometry(20000, 15000, 0.499)  # 224 px at 0.5 µm/px, 898 (not 4 × 224) at 2.0
    fine, coarse = Lattice.at(geo, 0.5), Lattice.at(geo, 2.0)
    assert coarse.tile_size_l0 == 898 and fine.tile_size_l0 == 224
    levels = {2.0: (np.arange(len(coarse), dtype=float), np.ones(len(coarse), bool)),
              0.5: (np.zeros(len(fine)), np.zeros(len(fine), bool))}  # fmt: skip
    raster, source = finest_raster(levels, geo)
    rows, cols = raster.data.shape
    cy, cx = np.mgrid[:rows, :cols] * 224 + 112  # cell centres, level-0 px
    inside = (cy < coarse.rows * 898) & (cx < coarse.cols * 898)
    expected = np.where(inside, (cy // 898) * coarse.cols + cx // 898, np.nan)
    np.testing.assert_array_equal(raster.data, expected)
    np.testing.assert_array_equal(np.isnan(source), ~inside)


def test_labels_stay_integers_with_zero_where_not_computed() -> None:
    geo = SlideGeometry(4096, 4096, 0.5)
    coarse, fine = Lattice.at(geo, 2.0), Lattice.at(geo, 0.5)
    done_fine = np.zeros(len(fine), bool)
    done_fine[:2] = True  # fine row 0, cols 0-1; coarse tile 0 spans fine cols 0-3
    levels = {2.0: (np.full(len(coarse), 7), np.eye(1, len(coarse), 0, dtype=bool)[0]),
              0.5: (np.full(len(fine), 3), done_fine)}  # fmt: skip
    raster, _ = finest_raster(levels, geo)
    assert raster.data.dtype == np.int32
    assert raster.data[0, :5].tolist() == [3, 3, 7, 7, 0] and raster.data[-1, -1] == 0
    assert level_rasters(levels, geo)[2.0].data.dtype == np.int32


def test_bad_levels_are_refused() -> None:
    geo = SlideGeometry(4096, 4096, 0.5)
    n = len(Lattice.at(geo, 0.5))
    with pytest.raises(ValueError, match="values must be"):
        finest_raster({0.5: (np.zeros(n - 1), np.ones(n, bool))}, geo)
    with pytest.raises(ValueError, match="bool mask"):
        level_rasters({0.5: (np.zeros(n), np.ones(n))}, geo)
    with pytest.raises(ValueError, match="mix integer labels"):
        finest_raster({0.5: (np.zeros(n), np.ones(n, bool)), 2.0: (np.zeros(16, int), np.ones(16, bool))}, geo)
    with pytest.raises(ValueError, match="no levels"):
        finest_raster({}, geo)
