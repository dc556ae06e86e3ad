"""Token rasters: each token cell lies exactly under its 14-px patch of the slide (planted slide)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_virchow.analysis.heads import fit_head
from napari_virchow.analysis.rasters import probability_rgba, tile_raster, upsample
from napari_virchow.analysis.token_maps import token_logits
from napari_virchow.analysis.token_rasters import token_raster
from napari_virchow.analysis.token_views import token_heatmap
from napari_virchow.models.encoder import load_encoder
from napari_virchow.models.tokens import encode_tokens
from napari_virchow.slides.slide import Slide
from napari_virchow.slides.synthetic import PlantedSource, Region, write_pyramid
from napari_virchow.slides.tiling import TileGrid

SIZE = 1344  # 6 × 6 tiles of 224 px at 0.5 µm/px
#: sharp-edged planted block whose edges are multiples of 28 px (so of 14) but not of 224 or 448
BOX = (308, 280, 924, 756)


@pytest.fixture(scope="module")
def edged_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("slides") / "edged.tif"
    source = PlantedSource([Region((0, 0, SIZE, SIZE), "tissue"), Region(BOX, "planted")])
    return write_pyramid(path, SIZE, SIZE, source, mpp=0.5, levels=2, quality=95)


def _planted_fraction(tiles: np.ndarray, g: int) -> np.ndarray:
    """(n, g, g): fraction of each patch's pixels that are planted (B - R is -40 on tissue, >= 10 planted)."""
    n, s = tiles.shape[:2]
    planted = tiles[..., 2].astype(int) - tiles[..., 0].astype(int) > -15
    p = s // g
    return planted.reshape(n, g, p, g, p).mean(axis=(2, 4))


def _truth(raster, shape: tuple[int, int]) -> np.ndarray:
    """Whether each raster cell's centre (from scale/translate alone) is inside BOX, in level-0 px."""
    ty, tx = raster.translate_um
    yc = (ty + np.arange(shape[0]) * raster.scale_um) / raster.mpp  # pixel-centre convention
    xc = (tx + np.arange(shape[1]) * raster.scale_um) / raster.mpp
    x0, y0, x1, y1 = BOX
    return ((yc >= y0) & (yc < y1))[:, None] & ((xc >= x0) & (xc < x1))[None, :]


@pytest.mark.parametrize("mpp", [0.5, 1.0])
def test_each_token_cell_is_under_its_patch(edged_slide: Path, mpp: float) -> None:
    """At 0.5 µm/px a cell is 14 level-0 px; at the pyramid's 1.0 µm/px level, 28."""
    with Slide(edged_slide) as slide:
        grid = TileGrid(slide, mpp=mpp, size=224)
        idx = np.arange(len(grid))[1:]  # not all tiles: the raster covers just those given
        frac = _planted_fraction(grid.read_tiles(idx), 16)
        raster = token_raster(frac, grid.coords[idx], grid.tile_size_l0, mpp=slide.require_mpp())
    assert raster.tile_size_l0 == 14 * mpp / 0.5
    truth = _truth(raster, raster.data.shape)
    shown = np.isfinite(raster.data)
    assert truth[shown].sum() > 100 and (~truth[shown]).sum() > 100
    # every cell is wholly inside or outside the box: JPEG leaves at most a sliver of the other side
    assert (raster.data[shown & truth] > 0.8).all()
    assert (raster.data[shown & ~truth] < 0.2).all()


def test_token_raster_refines_the_tile_raster_cell_for_cell(edged_slide: Path) -> None:
    """Same geometry as the tile heatmap upsampled 16× (nearest): the overlays line up."""
    with Slide(edged_slide) as slide:
        grid = TileGrid(slide, mpp=0.5, size=224)
        mpp = slide.require_mpp()
        values = np.arange(len(grid), dtype=np.float32)
        tile = upsample(tile_raster(values, grid.coords, grid.tile_size_l0, slide.dimensions, mpp=mpp), 16, None)
        idx = np.asarray([7, 8, 13, 14, 15])  # rows 1-2, columns 1-3 of the 6 × 6 lattice (one missing)
        tok = token_raster(np.repeat(values[idx], 256).reshape(-1, 16, 16), grid.coords[idx], grid.tile_size_l0,
                           mpp=mpp)  # fmt: skip
    assert tok.scale_um == pytest.approx(tile.scale_um)
    r0 = (tok.translate_um[0] - tile.translate_um[0]) / tile.scale_um
    c0 = (tok.translate_um[1] - tile.translate_um[1]) / tile.scale_um
    assert (r0, c0) == (pytest.approx(16), pytest.approx(16))
    window = tile.data[16 : 16 + tok.data.shape[0], 16 : 16 + tok.data.shape[1]]
    shown = np.isfinite(tok.data)
    np.testing.assert_array_equal(tok.data[shown], window[shown])
    assert (~shown).sum() == 256  # tile 9 (row 1, column 3) was not given: transparent


def test_bad_values_refused() -> None:
    with pytest.raises(ValueError, match="n, g, g"):
        token_raster(np.zeros((2, 16)), np.zeros((2, 2)), 224, mpp=0.5)


def test_token_heatmap_probability_and_threshold(edged_slide: Path) -> None:
    """The widget's call: P(positive) per token in [0, 1]; the same threshold/colormap as tiles."""
    enc = load_encoder("virchow2-tiny", weights="random", device="cpu", dtype="fp32")
    with Slide(edged_slide) as slide:
        grid = TileGrid(slide, mpp=0.5, size=224)
        tiles = grid.read_tiles(np.arange(len(grid)))
        labels = (_planted_fraction(tiles, 1)[:, 0, 0] > 0.5).astype(int)
        head = fit_head(enc.embed(tiles), labels, ["stroma", "tumour"], encoder=enc.spec.name)
        idx = np.asarray([7, 8, 14])
        raster = token_heatmap(grid, enc, head, idx)
        z = token_logits(head, *encode_tokens(enc, tiles[idx]))
    assert raster.data.shape == (32, 32)
    p = raster.data[np.isfinite(raster.data)]
    assert ((p >= 0) & (p <= 1)).all()
    # tile 7's block of the raster is the sigmoid of its token logits, row-major
    np.testing.assert_allclose(raster.data[:16, :16], 1 / (1 + np.exp(-z[0, 0])), atol=1e-6)
    rgba = probability_rgba(raster.data, 0.5)
    np.testing.assert_array_equal(rgba[..., 3] > 0, np.nan_to_num(raster.data, nan=-1) >= 0.5)
