"""Tiles at any µm/px: level choice, coarse levels for coarse targets, batch resampling in torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from napari_virchow.slides.resample import resize_batch
from napari_virchow.slides.slide import Slide
from napari_virchow.slides.synthetic import PlantedSource, Region, write_pyramid
from napari_virchow.slides.tiling import TileGrid

#: a 40× slide: 0.25 µm/px, levels /1 /4 /16 (1.0 and 4.0 µm/px)
W40, H40 = 4096, 3840


@pytest.fixture(scope="module")
def slide40(tmp_path_factory: pytest.TempPathFactory) -> Path:
    regions = [Region((200, 200, 3900, 3600), "tissue"), Region((1000, 1000, 2000, 2000), "planted")]
    path = tmp_path_factory.mktemp("mag") / "s40.tif"
    return write_pyramid(path, W40, H40, PlantedSource(regions), mpp=0.25, levels=3, downsample=4)


def _reference(grid: TileGrid, idx: np.ndarray) -> np.ndarray:
    """One read_region per tile of the stored pixels: a twin without OpenSlide, which reads the
    nearest level pixel where OpenSlide would interpolate (a non-integer downsample, e.g. 2.0003),
    as the tile lattice does (``read_regions(blend=False)``)."""
    rs = grid.read_size
    with Slide(grid.slide.path, backend="tifffile") as twin:
        return np.stack([twin.read_region((int(x), int(y)), grid.read_level, (rs, rs)) for x, y in grid.coords[idx]])


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("mpp", "level", "read_size"),
    [(0.25, 0, 224), (0.5, 0, 448), (1.0, 1, 224), (2.0, 1, 448), (4.0, 2, 224), (0.27, 0, 224), (0.7, 0, 627)],
)
def test_level_is_nearest_not_coarser(slide40: Path, mpp: float, level: int, read_size: int) -> None:
    grid = TileGrid(Slide(slide40), mpp=mpp, size=224)
    assert (grid.read_level, grid.read_size, grid.resized) == (level, read_size, read_size != 224)
    assert grid.tile_size_l0 == round(224 * mpp / 0.25)
    tiles = grid.read_tiles(grid.tissue_indices[:4])
    assert tiles.shape == (min(4, grid.n_tissue), 224, 224, 3) and tiles.dtype == np.uint8


@pytest.mark.timeout(60)
def test_2_mpp_never_decodes_level_0(slide40: Path) -> None:
    slide = Slide(slide40)
    grid = TileGrid(slide, mpp=2.0)
    levels = slide._tiff.levels
    tiles = grid.read_tiles(np.arange(len(grid)))
    assert len(grid) == -(-H40 // 1792) * -(-W40 // 1792) and tiles.shape[0] == len(grid)  # edge tiles too
    assert levels[0].decodes == 0  # neither the thumbnail nor any tile touched level 0
    assert levels[1].decodes > 0
    np.testing.assert_array_equal(tiles, resize_batch(_reference(grid, np.arange(len(grid))), 224))


@pytest.mark.timeout(60)
def test_20x_from_40x_is_one_torch_resize_per_batch(slide40: Path) -> None:
    grid = TileGrid(Slide(slide40), mpp=0.5)
    assert (grid.read_level, grid.read_size, grid.resized) == (0, 448, True)
    idx = grid.tissue_indices[:12]
    raw = _reference(grid, idx)
    tiles = grid.read_tiles(idx)
    np.testing.assert_array_equal(tiles, resize_batch(raw, 224))
    pil = np.stack([np.asarray(Image.fromarray(r).resize((224, 224), Image.Resampling.BICUBIC)) for r in raw])
    diff = np.abs(tiles.astype(int) - pil)
    assert diff.max() <= 1 and diff.mean() < 0.05  # the documented filter: PIL's antialiased bicubic


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mpp", [0.25, 0.5, 1.0, 2.0])
def test_any_trained_magnification_on_a_20x_pyramid(sample_pyramid: Path, mpp: float) -> None:
    slide = Slide(sample_pyramid)  # 0.499 µm/px, levels /1 /2 /4
    grid = TileGrid(slide, mpp=mpp, size=224)
    expected_level = {0.25: 0, 0.5: 0, 1.0: 1, 2.0: 2}[mpp]
    assert grid.read_level == expected_level and grid.resized == (mpp == 0.25)  # 0.25: upsampled 112 px
    idx = grid.tissue_indices[:6]
    tiles = grid.read_tiles(idx)
    raw = _reference(grid, idx)
    np.testing.assert_array_equal(tiles, resize_batch(raw, 224) if grid.resized else raw)
