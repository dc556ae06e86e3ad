"""The one tile lattice: the whole slide covered, partial edge tiles flagged, read padded with white."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_virchow.analysis.rasters import tile_raster
from napari_virchow.slides.lattice import EDGES, LATTICE_VERSION, Lattice, SlideGeometry
from napari_virchow.slides.slide import Slide
from napari_virchow.slides.synthetic import PlantedSource, Region, write_pyramid
from napari_virchow.slides.tiling import TileGrid

SAMPLE = Path(__file__).resolve().parents[2] / "sample_data" / "cmu_small_region.svs"
#: 4 whole 224-px tiles + 40 px across, 3 whole + 100 px down: thin partial strips on both edges
W, H = 4 * 224 + 40, 3 * 224 + 100


@pytest.fixture(scope="module")
def full_tissue(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tissue to the very edge of the slide (so the edge strips hold tissue), at 0.5 µm/px."""
    path = tmp_path_factory.mktemp("lattice") / "edge.tif"
    return write_pyramid(path, W, H, PlantedSource([Region((0, 0, W, H), "tissue")]), mpp=0.5, levels=3)  # type: ignore[arg-type]


@pytest.mark.parametrize(("w", "h"), [(W, H), (896, 672), (2220, 2967), (1, 1)])
def test_every_slide_pixel_is_in_exactly_one_tile(w: int, h: int) -> None:
    lat = Lattice.at(SlideGeometry(w, h, 0.5), 0.5)
    t = lat.tile_size_l0
    assert (lat.rows, lat.cols) == (-(-h // t), -(-w // t)) and len(lat.coords) == len(lat)
    cover = np.zeros((h, w), np.int32)
    for x, y in lat.coords:
        cover[y : y + t, x : x + t] += 1
    assert (cover == 1).all()  # tiles tile the slide: nothing dropped, nothing twice
    for x, y in [(0, 0), (w - 1, h - 1), (w - 1, 0), (0, h - 1)]:
        i = lat.index_at(x, y)
        assert i is not None and lat.coords[i, 0] <= x < lat.coords[i, 0] + t
    assert lat.index_at(w, 0) is None and lat.index_at(0, h) is None and lat.index_at(-0.5, 0) is None


def test_partial_tiles_are_the_last_row_and_column() -> None:
    lat = Lattice.at(SlideGeometry(W, H, 0.5), 0.5)
    partial = lat.partial.reshape(lat.rows, lat.cols)
    assert (lat.rows, lat.cols) == (4, 5)
    assert partial[-1].all() and partial[:, -1].all() and not partial[:-1, :-1].any()
    inside = lat.inside_fraction.reshape(lat.rows, lat.cols)
    np.testing.assert_allclose(inside[0, -1], 40 / 224)
    np.testing.assert_allclose(inside[-1, 0], 100 / 224)
    np.testing.assert_allclose(inside[-1, -1], 40 * 100 / 224**2)
    assert (inside[:-1, :-1] == 1).all()
    exact = Lattice.at(SlideGeometry(896, 672, 0.5), 0.5)
    assert not exact.partial.any() and (exact.rows, exact.cols) == (3, 4)
    assert exact.as_attrs() == {"version": LATTICE_VERSION, "edges": EDGES, "rows": 3, "cols": 4,
                                "tile_size_l0": 224, "slide_size": [896, 672]}  # fmt: skip


def test_a_slide_smaller_than_a_tile_has_no_whole_tile() -> None:
    assert not Lattice.at(SlideGeometry(200, 1000, 0.5), 0.5).has_full_tile
    assert Lattice.at(SlideGeometry(224, 224, 0.5), 0.5).has_full_tile


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mpp", [0.5, 1.0])
@pytest.mark.parametrize("backend", ["tifffile", "openslide"])
def test_partial_tiles_read_white_outside_the_slide(full_tissue: Path, mpp: float, backend: str) -> None:
    """Batch reads (tifffile) and OpenSlide's read_region both pad a partial tile with white."""
    with Slide(full_tissue, backend=backend) as slide:  # type: ignore[arg-type]
        grid = TileGrid(slide, mpp=mpp)
        idx = np.flatnonzero(grid.lattice.partial)
        tiles = grid.read_tiles(idx)
        t, s = grid.tile_size_l0, grid.size
        for k, (x, y) in zip(range(len(idx)), grid.coords[idx], strict=True):
            # output px inside the slide (with a 2-px margin for the resampling filter at 1.0)
            iw, ih = (W - x) * s // t, (H - y) * s // t
            tile = tiles[k]
            assert (tile[:, iw + 2 :] == 255).all() and (tile[ih + 2 :, :] == 255).all()
            inner = tile[: max(ih - 2, 0), : max(iw - 2, 0)]
            assert inner.size == 0 or (inner.astype(int).sum(-1) < 3 * 250).mean() > 0.9  # tissue, not white


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mpp", [0.5, 1.0])  # (the slide holds no whole tile at 2.0)
def test_partial_tiles_count_tissue_over_their_part_on_the_slide(full_tissue: Path, mpp: float) -> None:
    """A 40-px strip of tissue is 18 % of a 224-px tile's footprint but all of its part on the slide."""
    with Slide(full_tissue) as slide:
        grid = TileGrid(slide, mpp=mpp)
        partial = grid.lattice.partial
        assert partial.any() and grid.tissue[partial].all() and grid.tissue.all()
        np.testing.assert_allclose(grid.tissue_fraction[partial], 1.0, atol=0.15)


@pytest.mark.timeout(60)
def test_the_bottom_strip_of_the_sample_is_covered() -> None:
    """The sample's last 55 px (27 µm) of rows hold tissue: tissue tiles and an overlay cover them."""
    with Slide(SAMPLE) as slide:
        grid = TileGrid(slide)
        w, h = slide.dimensions
        rows, cols = grid.grid_shape
        assert rows * grid.tile_size_l0 >= h and cols * grid.tile_size_l0 >= w and h % 224 == 55
        last = np.arange((rows - 1) * cols, rows * cols)
        assert grid.lattice.partial[last].all() and grid.tissue[last].sum() >= 3
        # the thumbnail's tissue in the strip lies in tissue tiles (none is left uncovered)
        sy = grid.mask_downsample[1]
        strip = grid.tissue_mask[int(np.ceil((rows - 1) * grid.tile_size_l0 / sy)) :]
        assert strip.any()
        sx = grid.mask_downsample[0]
        strip_cols = np.flatnonzero(strip.any(axis=0))
        tile_cols = np.unique((strip_cols * sx // grid.tile_size_l0).astype(int))
        assert grid.tissue[(rows - 1) * cols + tile_cols].mean() > 0.6
        # an overlay of every tile reaches the slide's bottom edge in µm (napari pixel centres)
        raster = tile_raster(np.ones(len(grid)), grid.coords, grid.tile_size_l0, (w, h), mpp=slide.require_mpp())
        bottom_um = raster.translate_um[0] + (raster.data.shape[0] - 0.5) * raster.scale_um
        assert raster.data.shape == (rows, cols) and not np.isnan(raster.data[-1]).any()
        assert bottom_um >= (h - 0.5) * slide.require_mpp()
