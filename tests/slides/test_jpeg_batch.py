"""Batch JPEG decode through TorchCodec (or torchvision): the same pixels as imagecodecs (CPU here)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_virchow.slides import jpeg_batch
from napari_virchow.slides.batch_read import segment_cache
from napari_virchow.slides.jpeg_batch import (
    BACKENDS,
    JPEG_TOLERANCE,
    TorchJpegDecoder,
    decoder_for,
    decoder_works,
    jpeg_backend,
    jpeg_stream,
)
from napari_virchow.slides.slide import Slide
from napari_virchow.slides.synthetic import PlantedSource, Region, write_pyramid
from napari_virchow.slides.tiling import TileGrid

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
#: what torchvision >= 0.29 says when its decoder stands in for TorchCodec (as these tests make it)
TORCHVISION_DEPRECATED = "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning"


@pytest.fixture(scope="module")
def slide40(tmp_path_factory: pytest.TempPathFactory) -> Path:
    regions = [Region((100, 100, 1700, 1500), "tissue"), Region((600, 600, 1000, 1000), "planted")]
    path = tmp_path_factory.mktemp("jpeg") / "s40.tif"
    return write_pyramid(path, 1800, 1600, PlantedSource(regions), mpp=0.25, levels=2, downsample=4)


def _within(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    diff = int(np.abs(a.astype(np.int16) - b).max())
    assert diff <= JPEG_TOLERANCE
    return diff


@pytest.mark.timeout(60)
@pytest.mark.filterwarnings(TORCHVISION_DEPRECATED)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_decoder_matches_imagecodecs(sample_svs: Path, sample_pyramid: Path, device: str, backend: str) -> None:
    # the SVS is Aperio RGB-coded JPEG with shared tables; the pyramid YCbCr JPEG without them
    decoder = TorchJpegDecoder(device, backends=[backend])
    assert decoder.backend.name == backend  # both are dependencies: each one loads
    for path in (sample_svs, sample_pyramid):
        slide = Slide(path)  # held: the level reads through the slide's descriptor
        level = slide._tiff.levels[0]
        assert decoder.supports(level)
        indices = list(range(min(40, len(level.offsets))))
        before = level.decodes
        got = decoder.decode(level, indices)
        assert level.decodes - before == len(indices)
        diffs = [_within(g, level.decode_segment(i)) for g, i in zip(got, indices, strict=True)]
        if device == "cpu":
            assert max(diffs) == 0  # both are libjpeg-turbo with the same settings


@pytest.mark.timeout(60)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mpp", [0.25, 0.5])  # as is, and 448 px resized per batch
def test_grid_with_decode_device(slide40: Path, sample_svs: Path, device: str, mpp: float) -> None:
    for path in (slide40, sample_svs):
        slide = Slide(path)
        if mpp == 0.25 and path == sample_svs:
            continue  # a 0.5 µm/px slide: covered by the 0.5 case
        plain, batched = TileGrid(slide, mpp=mpp), TileGrid(slide, mpp=mpp, decode_device=device)
        idx = plain.tissue_indices[:20]
        expected = plain.read_tiles(idx)
        segment_cache(slide._tiff.levels[plain.read_level]).clear()  # decode again, batched
        before = slide._tiff.levels[plain.read_level].decodes
        tiles = batched.read_tiles(idx)
        _within(tiles, expected)
        if device == "cpu":
            np.testing.assert_array_equal(tiles, expected)
        decoded = slide._tiff.levels[plain.read_level].decodes - before
        assert decoded <= len(_union(plain, idx)) + 1  # each once (+1: the first tile's check)


def _union(grid: TileGrid, idx: np.ndarray) -> set[int]:
    lay = grid.slide._tiff.levels[grid.read_level].layout
    ds, rs, out = grid.slide.level_downsamples[grid.read_level], grid.read_size, set()
    for x, y in grid.coords[idx]:
        x0, y0 = int(int(x) // ds), int(int(y) // ds)
        for r in range(y0 // lay.seg_height, (min(y0 + rs, lay.height) - 1) // lay.seg_height + 1):
            for c in range(x0 // lay.seg_width, (min(x0 + rs, lay.width) - 1) // lay.seg_width + 1):
                out.add(r * lay.cols + c)
    return out


@pytest.mark.timeout(60)
def test_a_disagreeing_decoder_is_not_used(sample_svs: Path, caplog: pytest.LogCaptureFixture) -> None:
    slide = Slide(sample_svs)
    level = slide._tiff.levels[0]
    # Aperio's RGB-coded data decoded as if it were YCbCr (no Adobe marker): real, wrong colours
    stream = jpeg_stream(level.read_segment_bytes(3), level.jpegtables, rgb_coded=False)
    wrong = jpeg_backend().decode([torch.frombuffer(bytearray(stream), dtype=torch.uint8)], "cpu")[0]
    with caplog.at_level(logging.WARNING):
        assert not decoder_for("cpu").verify(level, 3, np.ascontiguousarray(wrong.permute(1, 2, 0).numpy()))
    assert "differs from imagecodecs" in caplog.text
    grid = TileGrid(slide, decode_device="cpu")
    cache = segment_cache(grid.slide._tiff.levels[0])
    cache.decoder_ok = False  # what prefetch records after such a check: imagecodecs from then on
    cache.clear()
    before = level.decodes
    expected = TileGrid(Slide(sample_svs)).read_tiles(grid.tissue_indices[:8])
    np.testing.assert_array_equal(grid.read_tiles(grid.tissue_indices[:8]), expected)
    assert level.decodes - before == len(_union(grid, grid.tissue_indices[:8]))  # imagecodecs, once each


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_refused_up_front(sample_svs: Path) -> None:
    with pytest.raises(ValueError, match="needs CUDA.*use None"):
        TileGrid(Slide(sample_svs), decode_device="cuda")


def _forget_decoders(monkeypatch: pytest.MonkeyPatch) -> None:
    """Empty jpeg_batch's remembered backends, decoders and probes (restored after the test)."""
    for cached in ("_backends", "_decoders", "_works"):
        monkeypatch.setattr(jpeg_batch, cached, {})


@pytest.mark.filterwarnings(TORCHVISION_DEPRECATED)
def test_torchcodec_is_preferred_and_torchvision_stands_in(sample_svs: Path, monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    """TorchCodec decodes (torchvision's decoders are deprecated); where it does not import, torchvision
    does, with the same pixels; with neither, batch decode is reported unavailable and imagecodecs reads."""
    assert jpeg_backend().name == "torchcodec"
    slide = Slide(sample_svs)
    level = slide._tiff.levels[0]
    expected = decoder_for("cpu").decode(level, [0, 1, 2])
    _forget_decoders(monkeypatch)
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)  # `import` raises ImportError
    with caplog.at_level(logging.INFO, logger=jpeg_batch.__name__):
        assert jpeg_backend().name == "torchvision"
    assert "torchcodec" in caplog.text  # why it stood in
    got = TorchJpegDecoder("cpu").decode(level, [0, 1, 2])
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_array_equal(g, e)
    _forget_decoders(monkeypatch)
    monkeypatch.setitem(sys.modules, "torchvision.io", None)
    with pytest.raises(ImportError, match="no batch JPEG decoder loads here"):
        jpeg_backend()
    assert decoder_works("cpu") is False  # what decode_device="auto" asks: imagecodecs reads
    with pytest.raises(ValueError, match="no batch JPEG decoder loads here.*install torchcodec, or use None"):
        TileGrid(slide, decode_device="cpu")
