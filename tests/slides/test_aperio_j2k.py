"""Aperio's own JPEG 2000 (TIFF compression 33003 = YCbCr, 33005 = RGB) keeps OpenSlide's colours.

No real Aperio JPEG 2000 slide can be downloaded here, so the slides are **synthetic, written in
Aperio's layout** from real H&E pixels (a crop of the CMU sample SVS): an SVS whose first page is the
tiled baseline with Aperio's ImageDescription (``Aperio Image Library ... |AppMag = 20|MPP = 0.499``),
the second a stripped thumbnail, then a tiled 4× pyramid level, every tiled page 240 × 240 px with
each tile a raw JPEG 2000 codestream (J2K, no JP2 boxes). For 33003 the codestream's three components
are Y, Cb, Cr (JPEG's full-range BT.601, no JPEG 2000 colour transform), which OpenSlide converts to
RGB itself (``openslide-decode-jp2k.c``: ``OPENSLIDE_JP2K_YCBCR``); for 33005 they are R, G, B (with
the codec's reversible colour transform, which the decoder undoes). Aperio also writes 4:2:2
chroma-subsampled 33003 codestreams, which imagecodecs cannot encode: not covered here.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import imagecodecs
import numpy as np
import openslide
import pytest
import tifffile

from napari_virchow.errors import SlideError
from napari_virchow.slides.batch_read import read_regions
from napari_virchow.slides.slide import Slide
from napari_virchow.slides.tiling import TileGrid

TILE = 240
YCBCR, RGB = 33003, 33005


def to_ycbcr(rgb: np.ndarray) -> np.ndarray:
    """JPEG's full-range BT.601 YCbCr, the inverse of the table OpenSlide applies to 33003 tiles."""
    r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = 128 - 0.168736 * r - 0.331264 * g + 0.5 * b
    cr = 128 + 0.5 * r - 0.418688 * g - 0.081312 * b
    return np.clip(np.rint(np.stack([y, cb, cr], -1)), 0, 255).astype(np.uint8)


def j2k_tiles(img: np.ndarray, compression: int) -> Iterator[bytes]:
    """The page's tiles, row-major, each a lossy (quality 70) J2K codestream as Aperio writes them."""
    h, w = img.shape[:2]
    for y in range(0, h, TILE):
        for x in range(0, w, TILE):
            tile = np.full((TILE, TILE, 3), 255, np.uint8)
            part = img[y : y + TILE, x : x + TILE]
            tile[: part.shape[0], : part.shape[1]] = part
            if compression == YCBCR:
                yield imagecodecs.jpeg2k_encode(to_ycbcr(tile), level=70, codecformat="J2K", mct=False)
            else:
                yield imagecodecs.jpeg2k_encode(tile, level=70, codecformat="J2K", mct=True)


def write_aperio_j2k(path: Path, src: np.ndarray, compression: int) -> Path:
    """An SVS in Aperio's layout (baseline, thumbnail, 4× level) with J2K tiles of ``compression``."""
    h, w = src.shape[:2]
    head, tail = "Aperio Image Library v12.0.15 \r\n", "|AppMag = 20|MPP = 0.499"
    kind = "J2K/YUV16" if compression == YCBCR else "J2K/RGB"
    small = np.ascontiguousarray(src[::4, ::4])
    tiled = {"dtype": np.uint8, "tile": (TILE, TILE), "photometric": "rgb", "compression": compression,
             "metadata": None}  # fmt: skip
    with tifffile.TiffWriter(path) as tif:  # pre-encoded tiles are written as they are
        tif.write(j2k_tiles(src, compression), shape=src.shape, **tiled,
                  description=f"{head}{w}x{h} [0,0 {w}x{h}] ({TILE}x{TILE}) {kind} Q=70{tail}")  # fmt: skip
        tif.write(np.ascontiguousarray(src[::8, ::8]), photometric="rgb", metadata=None,
                  description=f"{head[:-2]}\n{w}x{h} -> {w // 8}x{h // 8} - {tail}")  # fmt: skip
        level1 = f"{head}{w}x{h} [0,0 {w}x{h}] ({TILE}x{TILE}) -> {w // 4}x{h // 4} {kind} Q=70{tail}"
        tif.write(j2k_tiles(small, compression), shape=small.shape, **tiled, description=level1)
    return path


@pytest.fixture(scope="module")
def he_pixels(sample_svs: Path) -> np.ndarray:
    """Real H&E colours: 1000 × 760 px of the CMU sample (240-px tiles straddle its right and bottom)."""
    with Slide(sample_svs) as slide:
        return slide.read_region((400, 600), 0, (1000, 760))


@pytest.fixture(scope="module", params=[YCBCR, RGB], ids=["33003-ycbcr", "33005-rgb"])
def aperio_j2k(request: pytest.FixtureRequest, he_pixels: np.ndarray,
               tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:  # fmt: skip
    path = tmp_path_factory.mktemp("aperio_j2k") / f"j2k{request.param}.svs"
    return write_aperio_j2k(path, he_pixels, request.param), request.param


def test_the_file_is_aperio_j2k_as_openslide_reads_it(aperio_j2k: tuple[Path, int], he_pixels: np.ndarray) -> None:
    path, compression = aperio_j2k
    with tifffile.TiffFile(path) as tif:
        assert [int(p.compression) for p in tif.pages] == [compression, 1, compression]
        assert [p.is_tiled for p in tif.pages] == [True, False, True]
        raw = tif.pages[0].asarray().astype(int)  # the codestream's components, no colour conversion
    osr = openslide.OpenSlide(str(path))
    try:
        assert osr.properties[openslide.PROPERTY_NAME_VENDOR] == "aperio"
        assert osr.level_dimensions == ((1000, 760), (250, 190))
        assert float(osr.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.499)
        assert "thumbnail" in osr.associated_images
        rgb = np.asarray(osr.read_region((0, 0), 0, (1000, 760)))[..., :3].astype(int)
    finally:
        osr.close()
    # OpenSlide's colours are the source's within JPEG 2000's loss ...
    assert np.abs(rgb - he_pixels).mean() < 1.5 and np.abs(rgb - he_pixels).max() <= 16
    # ... and for 33003 only because it converts YCbCr: read as RGB the components are far off
    far = np.abs(raw - he_pixels).mean()
    assert far > 30 if compression == YCBCR else far < 1.5


def test_slide_gives_openslides_pixels_at_every_level(aperio_j2k: tuple[Path, int]) -> None:
    path, _ = aperio_j2k
    osr = openslide.OpenSlide(str(path))
    try:
        with Slide(path) as slide:
            assert slide.mpp == pytest.approx(0.499) and slide.vendor == "aperio"
            assert slide.file_level_dimensions == tuple(osr.level_dimensions)
            for level, (w, h) in enumerate(osr.level_dimensions):
                ref = np.asarray(osr.read_region((0, 0), level, (w, h)))[..., :3]
                np.testing.assert_array_equal(np.asarray(slide.levels[level].compute()), ref)
                ds = osr.level_downsamples[level]
                for x, y, rw, rh in [(0, 0, 100, 80), (244, 236, 300, 250), (-40, -30, 90, 70), (900, 700, 200, 120)]:
                    loc = (int(x * ds), int(y * ds))
                    want = np.asarray(osr.read_region(loc, level, (rw, rh))).copy()
                    want[want[..., 3] == 0, :3] = 255  # outside the slide: white, as Slide composites
                    np.testing.assert_array_equal(slide.read_region(loc, level, (rw, rh)), want[..., :3])
    finally:
        osr.close()


def test_batch_tile_reader_gives_openslides_pixels(aperio_j2k: tuple[Path, int]) -> None:
    path, _ = aperio_j2k
    osr = openslide.OpenSlide(str(path))
    try:
        with Slide(path) as slide:
            for level in range(len(osr.level_dimensions)):
                ds = int(round(osr.level_downsamples[level]))
                locs = [(x * ds, y * ds) for x, y in [(0, 0), (224, 0), (224, 224), (10, 130), (200, 150)]]
                batch = read_regions(slide, locs, level, (224, 224))
                for k, loc in enumerate(locs):
                    want = np.asarray(osr.read_region(loc, level, (224, 224))).copy()
                    want[want[..., 3] == 0, :3] = 255
                    np.testing.assert_array_equal(batch[k], want[..., :3])
            grid = TileGrid(slide)  # the pipeline's reader: 224-px tiles at 0.5 µm/px
            idx = np.arange(len(grid))
            rs = grid.read_size
            reference = np.stack([slide.read_region((int(x), int(y)), grid.read_level, (rs, rs))
                                  for x, y in grid.coords[idx]])  # fmt: skip
            assert not grid.resized
            np.testing.assert_array_equal(grid.read_tiles(idx), reference)
    finally:
        osr.close()


def test_tifffile_alone_refuses_ycbcr_j2k_rather_than_miscolour(aperio_j2k: tuple[Path, int],
                                                                tmp_path: Path) -> None:  # fmt: skip
    path, compression = aperio_j2k
    tif = tmp_path / "aperio.tif"  # Aperio also writes .tif; a .svs OpenSlide is not asked about is refused
    shutil.copyfile(path, tif)
    if compression == YCBCR:
        with pytest.raises(SlideError, match=r"33003.*only OpenSlide converts"):
            Slide(tif, backend="tifffile")
    else:  # RGB codestreams decode to the same colours without OpenSlide
        with Slide(tif, backend="tifffile") as alone, Slide(path) as slide:
            a = np.asarray(alone.levels[0].compute()).astype(int)
            b = np.asarray(slide.levels[0].compute()).astype(int)
            assert np.abs(a - b).max() <= 1
