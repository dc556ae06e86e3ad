"""Tissue means the same µm² at every magnification: coarse tiles are not mostly glass."""

from __future__ import annotations

import numpy as np
import pytest

from napari_virchow.slides.slide import Slide
from napari_virchow.slides.synthetic import PlantedSource, Region, write_pyramid
from napari_virchow.slides.tiling import COARSE_TISSUE_MAJORITY, TISSUE_REFERENCE_MPP, TileGrid

#: 2688² px at 0.5 µm/px: 3 × 3 tiles of 896 px at 2.0 µm/px, 12 × 12 of 224 at 0.5
SIZE = 2688
#: tissue over the first 896 + 135 columns and 896 + 600 rows: the 2.0-µm/px tile right of the
#: block holds 15 % tissue (a 10 % rule would embed it, 85 % glass), the one below it 67 %
TISSUE = Region((0, 0, 896 + 135, 896 + 600), "tissue")


@pytest.fixture(scope="module")
def block(tmp_path_factory: pytest.TempPathFactory) -> Slide:
    path = tmp_path_factory.mktemp("tissue_levels") / "block.tif"
    write_pyramid(path, SIZE, SIZE, PlantedSource([TISSUE]), mpp=0.5, levels=3)  # type: ignore[arg-type]
    with Slide(path) as slide:
        yield slide


def _area_um2(grid: TileGrid) -> float:
    return float(grid.n_tissue * (grid.tile_size_l0 * grid.slide.require_mpp()) ** 2)


@pytest.mark.timeout(60)
def test_a_mostly_glass_coarse_tile_is_not_tissue(block: Slide) -> None:
    fine, coarse = TileGrid(block, mpp=TISSUE_REFERENCE_MPP), TileGrid(block, mpp=2.0)
    assert coarse.grid_shape == (3, 3) and fine.grid_shape == (12, 12)
    frac = coarse.tissue_fraction.reshape(3, 3)
    assert 0.12 < frac[0, 1] < 0.2 and frac[0, 1] > coarse.min_tissue  # tissue by a 10 % rule …
    assert not coarse.tissue.reshape(3, 3)[0, 1]  # … but mostly glass: not embedded at 5×
    assert coarse.tissue.reshape(3, 3)[1, 0] and frac[1, 0] > COARSE_TISSUE_MAJORITY
    assert fine.tissue.reshape(12, 12)[:6, 4].all()  # the 135-px strip is tissue at 20× (60 % of a tile)
    # the overview covers about the µm² that 20× calls tissue (the 10 % rule: 3 tiles, 2.4 ×)
    assert coarse.n_tissue == 2 and 0.7 < _area_um2(coarse) / _area_um2(fine) < 1.3


@pytest.mark.timeout(60)
def test_the_reference_level_keeps_the_fraction_rule(block: Slide) -> None:
    grid = TileGrid(block, mpp=TISSUE_REFERENCE_MPP)
    np.testing.assert_array_equal(grid.tissue, grid.tissue_fraction >= grid.min_tissue)
    strict = grid.with_tissue(min_tissue=0.9)
    np.testing.assert_array_equal(strict.tissue, strict.tissue_fraction >= 0.9)
    coarse = TileGrid(block, mpp=2.0).with_tissue(min_tissue=0.9)  # a coarse tile needs most of it 90 % tiles
    assert coarse.tissue.reshape(3, 3)[1, 0] and not coarse.tissue.reshape(3, 3)[0, 1]
