"""Tiled TIFFs in any codec tifffile + imagecodecs decode open, even where OpenSlide refuses them."""

from __future__ import annotations

from pathlib import Path

import imagecodecs
import numpy as np
import openslide
import pytest
import tifffile

from napari_virchow.slides.slide import Slide

#: (tifffile compression, imagecodecs codec, compressionargs, lossless)
CODECS = [
    ("jpeg2000", "JPEG2K", {"level": 100}, False),
    ("jpegxl", "JPEGXL", {"lossless": True}, True),
    ("webp", "WEBP", {"lossless": True}, True),
    ("zstd", "ZSTD", {}, True),
    ("lzw", "LZW", {}, True),
    ("jpegxr", "JPEGXR", {}, False),
]


def _source(h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(7)
    img = rng.integers(0, 256, (h // 16, w // 16, 3), np.uint8)
    return np.ascontiguousarray(np.repeat(np.repeat(img, 16, 0), 16, 1))


@pytest.mark.parametrize(("compression", "codec", "args", "lossless"), CODECS, ids=[c[0] for c in CODECS])
def test_codec_pyramid_opens_with_tifffiles_pixels(tmp_path: Path, compression: str, codec: str,
                                                   args: dict[str, object], lossless: bool) -> None:  # fmt: skip
    if not getattr(imagecodecs, codec).available:
        pytest.skip(f"imagecodecs here lacks {codec}")
    img = _source(512, 640)
    path = tmp_path / f"{compression}.tif"
    opts = {"tile": (128, 128), "photometric": "rgb", "compression": compression, "compressionargs": args,
            "resolution": (1e4 / 0.25, 1e4 / 0.25), "resolutionunit": "CENTIMETER"}  # fmt: skip
    with tifffile.TiffWriter(path) as tif:
        tif.write(img, **opts)
        tif.write(img[::2, ::2], subfiletype=1, **opts)
    try:
        openslide.OpenSlide(str(path))
        refused = False
    except openslide.OpenSlideError:
        refused = True
    with Slide(path) as slide, tifffile.TiffFile(path) as tif:
        assert slide.mpp == pytest.approx(0.25)
        assert slide.file_level_dimensions == ((640, 512), (320, 256))
        assert slide.backend == "tifffile" or not refused
        for level, lvl in enumerate(tif.series[0].levels):
            np.testing.assert_array_equal(slide.levels[level].compute(), lvl.asarray())
        if lossless:
            np.testing.assert_array_equal(slide.read_region((0, 0), 0, (640, 512)), img)
    if compression == "jpeg2000":
        assert refused  # the case of issue 18: libtiff lacks JPEG 2000, tifffile decodes it
