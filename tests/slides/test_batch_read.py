"""Batch reads: the same pixels as one read_region per tile, each stored tile decoded once."""

from __future__ import annotations

import gc
import os
import shutil
import threading
import weakref
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_virchow.errors import SlideError
from napari_virchow.slides.batch_read import SegmentCache, read_level_boxes, read_regions, segment_cache
from napari_virchow.slides.slide import Slide
from napari_virchow.slides.synthetic import PlantedSource, Region, write_pyramid
from napari_virchow.slides.tiling import TileGrid


def per_tile_reference(grid: TileGrid, idx: np.ndarray) -> np.ndarray:
    """Today's path before batching: one Slide.read_region per tile, level as chosen by the grid."""
    rs = grid.read_size
    return np.stack([grid.slide.read_region((int(x), int(y)), grid.read_level, (rs, rs)) for x, y in grid.coords[idx]])


def segments_under(grid: TileGrid, idx: np.ndarray) -> set[int]:
    """Stored segments of the read level that the tiles' read boxes overlap (clipped to the level)."""
    lvl = grid.slide._tiff.levels[grid.read_level]
    lay, ds, rs = lvl.layout, grid.slide.level_downsamples[grid.read_level], grid.read_size
    out: set[int] = set()
    for x, y in grid.coords[idx]:
        x0, y0 = int(int(x) // ds), int(int(y) // ds)
        y1, x1 = min(y0 + rs, lay.height), min(x0 + rs, lay.width)
        for r in range(y0 // lay.seg_height, (y1 - 1) // lay.seg_height + 1):
            out.update(r * lay.cols + c for c in range(x0 // lay.seg_width, (x1 - 1) // lay.seg_width + 1))
    return out


@pytest.fixture(scope="module")
def planted20(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1500 × 1300 px at 0.5 µm/px: 224-px tiles straddle the 256-px stored tiles everywhere."""
    regions = [Region((100, 100, 1400, 1200), "tissue"), Region((500, 400, 900, 800), "planted")]
    return write_pyramid(tmp_path_factory.mktemp("batch") / "p20.tif", 1500, 1300, PlantedSource(regions), mpp=0.5)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["svs", "pyramid", "planted"])
def test_batches_equal_per_tile_reads(name: str, sample_svs: Path, sample_pyramid: Path, planted20: Path) -> None:
    path = {"svs": sample_svs, "pyramid": sample_pyramid, "planted": planted20}[name]
    grid = TileGrid(Slide(path))
    assert grid.slide.backend == "tifffile" and not grid.resized
    rng = np.random.default_rng(0)
    every = np.arange(len(grid))
    for idx in [every, every[::-1], rng.permutation(every)[:9], np.array([len(grid) - 1, 0, 0, 5])]:
        np.testing.assert_array_equal(grid.read_tiles(idx), per_tile_reference(grid, idx))
    assert grid.read_tiles([]).shape == (0, 224, 224, 3)


@pytest.mark.timeout(60)
def test_direct_path_equals_openslide(sample_svs: Path, sample_pyramid: Path) -> None:
    for path in (sample_svs, sample_pyramid):
        direct = TileGrid(Slide(path))
        ref = TileGrid(Slide(path, backend="openslide"))  # read_region per tile through OpenSlide
        assert ref.slide.backend == "openslide"
        idx = direct.tissue_indices[:24]
        np.testing.assert_array_equal(direct.read_tiles(idx), ref.read_tiles(idx))


@pytest.mark.timeout(60)
def test_each_stored_tile_is_decoded_once(planted20: Path) -> None:
    grid = TileGrid(Slide(planted20))
    lvl = grid.slide._tiff.levels[0]
    order = np.arange(len(grid))  # row-major, in pipeline-sized batches
    before = lvl.decodes
    for batch in np.array_split(order, -(-len(order) // 8)):
        grid.read_tiles(batch)
    needed = segments_under(grid, order)
    assert lvl.decodes - before == len(needed)
    before = lvl.decodes
    per_tile_reference(grid, order)  # the old way: every tile decodes every stored tile under it
    assert lvl.decodes - before > 2 * len(needed)


@pytest.mark.timeout(60)
def test_threads_share_decodes(planted20: Path) -> None:
    grid = TileGrid(Slide(planted20))
    lvl = grid.slide._tiff.levels[0]
    batches = np.array_split(np.arange(len(grid)), 6)
    results: dict[int, np.ndarray] = {}
    start = threading.Barrier(2)

    def work(which: list[int]) -> None:
        start.wait()
        for b in which:
            results[b] = grid.read_tiles(batches[b])

    before = lvl.decodes
    threads = [threading.Thread(target=work, args=(w,)) for w in ([0, 2, 4], [1, 3, 5])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert lvl.decodes - before == len(segments_under(grid, np.arange(len(grid))))  # none twice
    for b, idx in enumerate(batches):
        np.testing.assert_array_equal(results[b], per_tile_reference(grid, idx))
    # a cache far smaller than the work: buffers are evicted and decoded into again while the
    # other thread copies from its own; every tile must still be exact
    cache = segment_cache(lvl)
    cache.clear()
    cache.capacity = 3 * 256 * 256 * 3
    start = threading.Barrier(2)
    threads = [threading.Thread(target=work, args=(w,)) for w in ([0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert cache.nbytes <= cache.capacity
    for b, idx in enumerate(batches):
        np.testing.assert_array_equal(results[b], per_tile_reference(grid, idx))


@pytest.mark.timeout(60)
def test_union_memory_is_bounded(planted20: Path) -> None:
    grid = TileGrid(Slide(planted20))
    lvl = grid.slide._tiff.levels[0]
    seg = 256 * 256 * 3
    small = SegmentCache(lvl, capacity=3 * seg)  # less than one band of the batch
    idx = np.arange(len(grid))
    origins = grid.coords[idx]  # level 0: level px are level-0 px
    tiles = read_level_boxes(small, origins, 224, 224)
    assert small.nbytes <= 3 * seg
    np.testing.assert_array_equal(tiles, per_tile_reference(grid, idx))
    default = segment_cache(lvl)
    assert default.capacity <= 5 * lvl.layout.cols * seg  # one band across the level
    default.clear()
    assert default.nbytes == 0


@pytest.mark.timeout(60)
def test_sparse_tiles_and_edges_are_white(tmp_path: Path) -> None:
    path = tmp_path / "sparse.tif"

    def tiles():
        for i in range(9):
            yield None if i == 4 else np.full((256, 256, 3), (200, 120, 160), np.uint8)

    tifffile.imwrite(path, tiles(), shape=(700, 700, 3), dtype=np.uint8, tile=(256, 256), photometric="rgb",
                     compression="zlib", resolution=(2e4, 2e4), resolutionunit="CENTIMETER")  # fmt: skip
    slide = Slide(path)
    assert slide.backend == "tifffile" and slide._tiff.levels[0].bytecounts[4] == 0
    locs = [(300, 300), (600, 600), (-50, 10), (0, 0)]
    got = read_regions(slide, locs, 0, (224, 224))
    expected = np.stack([slide.read_region(loc, 0, (224, 224)) for loc in locs])
    np.testing.assert_array_equal(got, expected)
    assert (got[0, 10:200, 10:200] == 255).all()  # the missing centre tile
    assert (got[1, 120:, 120:] == 255).all() and (got[2, :, :50] == 255).all()  # outside the slide


@pytest.mark.timeout(60)
def test_stripped_tiff_batches(tmp_path: Path) -> None:
    path = tmp_path / "strips.tif"
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (900, 1000, 3), dtype=np.uint8)
    tifffile.imwrite(path, rgb, rowsperstrip=40, photometric="rgb", compression="zlib",
                     resolution=(2e4, 2e4), resolutionunit="CENTIMETER")  # fmt: skip
    grid = TileGrid(Slide(path))
    assert not grid.slide._tiff.levels[0].tiled
    idx = np.arange(len(grid))
    tiles = grid.read_tiles(idx)
    for k, (x, y) in zip(idx, grid.coords[idx], strict=True):
        want = np.full((224, 224, 3), 255, np.uint8)  # partial edge tiles: white outside the slide
        part = rgb[y : y + 224, x : x + 224]
        want[: part.shape[0], : part.shape[1]] = part
        np.testing.assert_array_equal(tiles[k], want)


@pytest.mark.timeout(60)
def test_truncated_file_fails_clearly_every_time(planted20: Path, tmp_path: Path) -> None:
    path = tmp_path / "cut.tif"
    shutil.copy(planted20, path)
    slide = Slide(path)
    grid = TileGrid(slide)
    os.truncate(path, int(path.stat().st_size * 0.3))
    for _ in range(2):  # a failed decode leaves nothing pending: the retry fails again, no hang
        with pytest.raises(SlideError, match="cut.tif: reading pixels failed"):
            grid.read_tiles(np.arange(len(grid)))
    slide.close()
    with pytest.raises(SlideError, match="was closed"):
        grid.read_tiles([0])


@pytest.mark.timeout(60)
def test_decoded_pixels_go_with_the_slide(planted20: Path) -> None:
    slide = Slide(planted20)
    grid = TileGrid(slide)
    grid.read_tiles(np.arange(len(grid)))
    level = slide._tiff.levels[0]
    cache = weakref.ref(segment_cache(level))
    assert cache() is not None and cache().nbytes > 0
    slide.close()
    assert level.segment_cache is None
    del grid, slide, level
    gc.collect()
    assert cache() is None  # no reference cycle keeps a closed slide's pixels alive


def test_jpeg_segments_decode_into_buffers_at_the_fast_offset(planted20: Path) -> None:
    """A segment decoded without ``out`` lands in a :func:`segment_buffer` (16 bytes into a 64-byte line,
    where libjpeg-turbo writes 256-px tiles fastest), with the pixels tifffile decodes."""
    from napari_virchow.slides.tiff import DECODE_OFFSET, segment_buffer

    buf = segment_buffer((256, 256, 3))
    assert buf.shape == (256, 256, 3) and buf.dtype == np.uint8 and buf.ctypes.data % 64 == DECODE_OFFSET
    with Slide(planted20) as slide:
        level = slide._tiff.levels[0]
        lay = level.layout
        whole = tifffile.imread(planted20, level=0)
        for index in (0, 7, lay.rows * lay.cols - 1):
            got = level.decode_segment(index)
            assert got is not None and got.ctypes.data % 64 == DECODE_OFFSET
            r, c = divmod(index, lay.cols)
            want = whole[r * lay.seg_height : (r + 1) * lay.seg_height, c * lay.seg_width : (c + 1) * lay.seg_width]
            np.testing.assert_array_equal(got[: want.shape[0], : want.shape[1]], want)
