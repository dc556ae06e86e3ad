"""TileGrid on real Slides over synthetic pyramids with known tissue, and on the real sample."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from napari_virchow.errors import SlideError
from napari_virchow.slides.resample import resize_batch
from napari_virchow.slides.slide import Slide
from napari_virchow.slides.synthetic import PlantedSource, Region, write_pyramid
from napari_virchow.slides.tiling import SATURATION_CLIP, TileGrid, detect_tissue

#: 2300 × 1850 px at 0.5 µm/px: 10 × 8 whole tiles of 224 plus a partial last column and row, non-square
WIDTH, HEIGHT = 2300, 1850
TISSUE = Region((300, 500, 1500, 1400), "tissue")
PATCH = Region((1800, 200, 2100, 420), "planted")


def _write(path: Path, w: int, h: int, regions: list[Region], **kw: object) -> Path:
    return write_pyramid(path, w, h, PlantedSource(regions), **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("tiling")
    full = [Region((0, 0, 1024, 1024), "tissue")]
    return {
        "planted": _write(d / "planted.tif", WIDTH, HEIGHT, [TISSUE, PATCH], mpp=0.5, levels=3),
        "mpp025": _write(d / "mpp025.tif", 1792, 1344, full, mpp=0.25, levels=3),
        "mpp030": _write(d / "mpp030.tif", 1024, 1024, full, mpp=0.3, levels=2),
        "mpp046": _write(d / "mpp046.tif", 1024, 1024, full, mpp=0.46, levels=2),
        "no_mpp": _write(d / "no_mpp.tif", 1024, 1024, full, mpp=None, levels=1),
        "tiny": _write(d / "tiny.tif", 200, 150, full, mpp=0.5, levels=1),
        "blank": _write(d / "blank.tif", 1024, 1024, [], mpp=0.5, levels=2),
    }


@pytest.fixture(scope="module")
def planted(slides: dict[str, Path]) -> TileGrid:
    return TileGrid(Slide(slides["planted"]))


def _tiles_touching(grid: TileGrid, box: tuple[int, int, int, int], *, inside: bool) -> set[int]:
    """Tiles fully inside ``box`` (inside=True) or intersecting it (inside=False)."""
    t = grid.tile_size_l0
    x0, y0, x1, y1 = box
    x, y = grid.coords[:, 0], grid.coords[:, 1]
    if inside:
        hit = (x >= x0) & (x + t <= x1) & (y >= y0) & (y + t <= y1)
    else:
        hit = (x < x1) & (x + t > x0) & (y < y1) & (y + t > y0)
    return set(np.flatnonzero(hit).tolist())


@pytest.mark.timeout(30)
def test_grid_geometry(planted: TileGrid) -> None:
    assert planted.tile_size_l0 == 224 and planted.size == 224 and planted.mpp == 0.5
    assert planted.grid_shape == (-(-HEIGHT // 224), -(-WIDTH // 224)) == (9, 11)  # edge strips kept
    assert len(planted) == 99 and planted.coords.dtype == np.int64
    np.testing.assert_array_equal(planted.coords[[0, 1, 11, 98]], [[0, 0], [224, 0], [0, 224], [2240, 1792]])
    assert planted.read_level == 0 and planted.read_size == 224 and not planted.resized
    assert planted.index_at(230, 5) == 1 and planted.index_at(5, 230) == 11
    assert planted.index_at(-1, 0) is None and planted.index_at(WIDTH, 0) is None
    assert planted.index_at(WIDTH - 1, HEIGHT - 1) == 98  # the bottom-right corner is in a (partial) tile
    partial = planted.lattice.partial.reshape(9, 11)
    assert partial[:, -1].all() and partial[-1, :].all() and not partial[:-1, :-1].any()


@pytest.mark.timeout(30)
def test_tissue_matches_planted_rectangles(planted: TileGrid) -> None:
    tissue = set(planted.tissue_indices.tolist())
    inside = _tiles_touching(planted, TISSUE.box, inside=True) | _tiles_touching(planted, PATCH.box, inside=True)
    touching = _tiles_touching(planted, TISSUE.box, inside=False) | _tiles_touching(planted, PATCH.box, inside=False)
    assert inside <= tissue <= touching  # exact up to one tile at the borders
    assert planted.tissue_mask.dtype == bool and planted.tissue_mask.ndim == 2
    assert SATURATION_CLIP[0] <= planted.tissue_threshold <= SATURATION_CLIP[1]
    np.testing.assert_array_equal(planted.tissue_indices, np.flatnonzero(planted.tissue))


@pytest.mark.timeout(30)
def test_grid_is_deterministic(slides: dict[str, Path], planted: TileGrid) -> None:
    again = TileGrid(Slide(slides["planted"]))
    np.testing.assert_array_equal(again.coords, planted.coords)
    np.testing.assert_array_equal(again.tissue, planted.tissue)


@pytest.mark.timeout(30)
def test_threshold_override_keeps_the_lattice(planted: TileGrid) -> None:
    none = planted.with_tissue(tissue_threshold=0.99)
    assert none.n_tissue == 0 and none.tissue_threshold == 0.99
    np.testing.assert_array_equal(none.coords, planted.coords)  # store rows keep their meaning
    with pytest.raises(SlideError, match="no tissue found"):
        none.require_tissue()
    back = none.with_tissue()
    np.testing.assert_array_equal(back.tissue, planted.tissue)
    strict = planted.with_tissue(min_tissue=1.0)
    assert set(strict.tissue_indices.tolist()) < set(planted.tissue_indices.tolist())
    with pytest.raises(ValueError, match="saturation"):
        planted.with_tissue(tissue_threshold=2.0)


@pytest.mark.timeout(30)
def test_tiles_in_is_centre_out(planted: TileGrid) -> None:
    box = (400, 600, 1300, 1300)
    idx = planted.tiles_in(box, tissue_only=False)
    assert set(idx.tolist()) == _tiles_touching(planted, box, inside=False)
    centres = planted.coords[idx] + 112
    dist = np.hypot(centres[:, 0] - 850, centres[:, 1] - 950)
    assert np.all(np.diff(dist) >= 0)
    assert planted.index_at(850, 950) == idx[0]
    tissue_only = planted.tiles_in(box)
    assert planted.tissue[tissue_only].all()
    np.testing.assert_array_equal(tissue_only, idx[planted.tissue[idx]])  # same order
    assert planted.tiles_in((5000, 5000, 6000, 6000)).size == 0
    assert planted.tiles_in((500, 500, 500, 900)).size == 0  # empty box
    assert planted.tiles_in((-1e6, -1e6, 1e6, 1e6), tissue_only=False).size == len(planted)


@pytest.mark.timeout(30)
def test_read_tile_is_the_slide_region(planted: TileGrid) -> None:
    i = int(planted.tissue_indices[3])
    x, y = planted.coords[i]
    expected = planted.slide.read_region((int(x), int(y)), 0, (224, 224))
    np.testing.assert_array_equal(planted.read_tile(i), expected)
    batch = planted.read_tiles([i, 0])
    assert batch.shape == (2, 224, 224, 3) and batch.dtype == np.uint8
    np.testing.assert_array_equal(batch[0], expected)
    assert (batch[1] == 255).all()  # background corner is white
    with pytest.raises(IndexError):
        planted.read_tile(len(planted))


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("name", "tile_l0", "level", "read_size"),
    [
        ("mpp025", 448, 1, 224),  # level 1 is exactly 0.5 µm/px: read as is
        ("mpp046", 243, 0, 224),  # 0.46 is within 10 %: read 224 px as is
        ("mpp030", 373, 0, 373),  # levels at 0.3 and 0.6: resample level 0
    ],
)
def test_read_level_choice(slides: dict[str, Path], name: str, tile_l0: int, level: int, read_size: int) -> None:
    grid = TileGrid(Slide(slides[name]))
    assert (grid.tile_size_l0, grid.read_level, grid.read_size) == (tile_l0, level, read_size)
    assert grid.resized == (read_size != 224)
    last = len(grid) - 1  # bottom-right: the read reaches the lattice's far corner
    tile = grid.read_tile(last)
    assert tile.shape == (224, 224, 3)
    x, y = (int(v) for v in grid.coords[last])
    region = grid.slide.read_region((x, y), level, (read_size, read_size))
    if grid.resized:
        pil = np.asarray(Image.fromarray(region).resize((224, 224), Image.Resampling.BICUBIC))
        assert np.abs(tile.astype(int) - pil).max() <= 1  # the same filter as PIL's bicubic
        region = resize_batch(region[None], 224)[0]
    np.testing.assert_array_equal(tile, region)


@pytest.mark.timeout(30)
def test_sample_is_read_as_is(sample_svs: Path) -> None:
    grid = TileGrid(Slide(sample_svs))  # 0.499 µm/px
    assert (grid.tile_size_l0, grid.read_level, grid.resized) == (224, 0, False)
    assert 0.3 * len(grid) < grid.n_tissue < 0.8 * len(grid)  # the sample is about half tissue


@pytest.mark.timeout(30)
def test_missing_mpp_asks_for_override(slides: dict[str, Path]) -> None:
    with pytest.raises(SlideError, match="mpp"):
        TileGrid(Slide(slides["no_mpp"]))
    assert TileGrid(Slide(slides["no_mpp"], mpp=0.5)).tile_size_l0 == 224


@pytest.mark.timeout(30)
def test_slide_smaller_than_a_tile(slides: dict[str, Path]) -> None:
    with pytest.raises(SlideError, match=r"nothing to tile: tiny.tif is 200×150 px, smaller than one 224-px tile"):
        TileGrid(Slide(slides["tiny"]))


@pytest.mark.timeout(30)
def test_blank_slide_has_no_tissue(slides: dict[str, Path]) -> None:
    grid = TileGrid(Slide(slides["blank"]))
    assert len(grid) == 25 and grid.n_tissue == 0 and not grid.tissue_mask.any()  # 1024 px: 5 × 5 with edges
    with pytest.raises(SlideError, match="lower the tissue threshold"):
        grid.require_tissue()


def test_detect_tissue_excludes_glass_and_black() -> None:
    rgb = np.full((40, 40, 3), 255, np.uint8)
    rgb[:20] = (225, 150, 185)  # eosin
    rgb[30:, :10] = (10, 0, 30)  # pen / border: saturated but black
    rgb[30:, 10:20] = (235, 232, 240)  # faintly tinted glass
    mask, t = detect_tissue(rgb)
    assert mask[:20].all() and not mask[20:].any()
    assert SATURATION_CLIP[0] <= t <= SATURATION_CLIP[1]
    assert not detect_tissue(rgb, threshold=0.9)[0].any()
