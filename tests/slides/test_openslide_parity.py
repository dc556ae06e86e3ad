"""read_region equals OpenSlide's on pyramids whose downsamples are not integers (boxes.tiff)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile

from napari_virchow.slides.region import level_origin, openslide_downsamples
from napari_virchow.slides.slide import Slide
from napari_virchow.slides.tiff import composite_on_white

#: the level sizes of openslide-python's tests/fixtures/boxes.tiff
BOXES = [(300, 250), (150, 125), (75, 62), (37, 31)]


def _boxes(width: int, height: int) -> np.ndarray:
    """Coloured boxes with sharp edges, the pattern that shows any half-pixel shift."""
    y, x = np.mgrid[0:height, 0:width]
    img = np.full((height, width, 3), 255, np.uint8)
    img[((x // 9 + y // 7) % 2) == 0] = (200, 30, 60)
    img[..., 2] = (x * 5 + y * 3) % 256
    return img


@pytest.fixture(scope="module")
def boxes_tiff(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("parity") / "boxes.tiff"
    with tifffile.TiffWriter(path) as tif:
        for i, (w, h) in enumerate(BOXES):
            tif.write(_boxes(w, h), tile=(16, 16), photometric="rgb", compression="zlib",
                      subfiletype=1 if i else 0)  # fmt: skip
    return path


def test_downsamples_follow_openslide(boxes_tiff: Path) -> None:
    osr = openslide.OpenSlide(str(boxes_tiff))
    with Slide(boxes_tiff) as slide:
        assert slide.backend == "tifffile"
        assert slide.level_downsamples[: len(BOXES)] == tuple(osr.level_downsamples)
    with Slide(boxes_tiff, backend="tifffile") as alone:  # no OpenSlide handle at all
        assert alone.level_downsamples[: len(BOXES)] == pytest.approx(osr.level_downsamples, abs=0)
    assert openslide_downsamples(BOXES)[2] == pytest.approx((4 + 250 / 62) / 2)


def test_level_origin_convention() -> None:
    assert level_origin(8, 2.0) == 4
    assert level_origin(5, 2.0) is None  # between level pixels
    assert level_origin(-9, 2.0) == -4  # OpenSlide pads trunc(9 / 2) pixels
    assert level_origin(-9, 8.086) == -1


@pytest.mark.parametrize("backend", ["auto", "openslide"])
def test_randomized_regions_equal_openslide(boxes_tiff: Path, backend: str) -> None:
    rng = np.random.default_rng(18)
    osr = openslide.OpenSlide(str(boxes_tiff))
    with Slide(boxes_tiff, backend=backend) as slide:  # type: ignore[arg-type]
        cases = [((0, 0), lvl, (w, h)) for lvl, (w, h) in enumerate(BOXES)]
        cases += [((-400, -300), 2, (20, 20)), ((290, 245), 3, (40, 40)), ((-7, 120), 3, (50, 9))]
        for _ in range(150):
            level = int(rng.integers(0, len(BOXES)))
            x, y = (int(v) for v in rng.integers(-120, 340, 2))
            w, h = (int(v) for v in rng.integers(1, 90, 2))
            cases.append(((x, y), level, (w, h)))
        integral = 0
        for loc, level, size in cases:
            ours = slide.read_region(loc, level, size)
            theirs = composite_on_white(np.asarray(osr.read_region(loc, level, size)))
            ds = osr.level_downsamples[level]
            integral += level_origin(loc[0], ds) is not None and level_origin(loc[1], ds) is not None
            np.testing.assert_array_equal(ours, theirs, err_msg=f"{loc} level {level} size {size}")
        assert integral > 20  # the direct (tifffile) path is exercised, not only OpenSlide's


def test_integral_positions_read_directly(boxes_tiff: Path) -> None:
    """Where the level coordinate is whole, the pixels are the stored ones (no OpenSlide call)."""
    with Slide(boxes_tiff, backend="tifffile") as slide:
        level2 = _boxes(*BOXES[2])
        np.testing.assert_array_equal(slide.read_region((0, 0), 2, (75, 62)), level2)
        ds = slide.level_downsamples[1]
        region = slide.read_region((int(20 * ds), int(10 * ds)), 1, (30, 30))
        np.testing.assert_array_equal(region, _boxes(*BOXES[1])[10:40, 20:50])


@pytest.mark.parametrize("size", [(24, 24), (40, 17)])
def test_batch_reads_equal_openslide_at_every_level(boxes_tiff: Path, size: tuple[int, int]) -> None:
    """read_regions (the tile reader) blends between level pixels exactly as OpenSlide does (#18)."""
    from napari_virchow.slides.batch_read import read_regions

    rng = np.random.default_rng(16)
    osr = openslide.OpenSlide(str(boxes_tiff))
    with Slide(boxes_tiff) as slide:
        assert slide._tiff is not None  # the direct batch path, not OpenSlide per region throughout
        for level in range(len(BOXES)):
            ds = osr.level_downsamples[level]
            lattice = [(int(x), int(y)) for y in range(0, 250, 36) for x in range(0, 300, 36)]
            random = [(int(x), int(y)) for x, y in rng.integers(-60, 320, (40, 2))]
            locations = lattice + random
            ours = read_regions(slide, locations, level, size)
            theirs = np.stack([composite_on_white(np.asarray(osr.read_region(loc, level, size))) for loc in locations])
            fractional = [(x, y) for x, y in locations if level_origin(x, ds) is None or level_origin(y, ds) is None]
            assert level == 0 or fractional  # levels 1-3 sample between level pixels somewhere
            for k, loc in enumerate(locations):
                np.testing.assert_array_equal(ours[k], theirs[k], err_msg=f"{loc} level {level} size {size}")
