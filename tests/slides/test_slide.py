"""Slide: metadata, lazy dask levels, same pixels as OpenSlide, thread safety, errors."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile

from napari_virchow import SlideError
from napari_virchow.slides.slide import Slide
from napari_virchow.slides.synthetic import SampleSource, write_pyramid
from tests.conftest import run_as_nobody


def test_sample_svs_metadata(sample_svs: Path) -> None:
    with Slide(sample_svs) as slide:
        assert slide.dimensions == (2220, 2967)
        assert slide.mpp == pytest.approx(0.499)
        assert slide.mpp_source == "file"
        assert slide.vendor == "aperio"
        assert slide.objective_power == 20.0


def test_single_level_gets_lazy_coarser_levels(sample_svs: Path) -> None:
    with Slide(sample_svs) as slide:
        assert [lvl.shape for lvl in slide.levels] == [(2967, 2220, 3), (1483, 1110, 3), (741, 555, 3)]
        assert slide.level_downsamples[:2] == (1.0, 2.0)
        full = slide.levels[0].compute()
        coarse = slide.levels[1][:100, :100].compute()  # reads only the chunks it needs
        expected = full[:200, :200].reshape(100, 2, 100, 2, 3).mean(axis=(1, 3))
        assert np.abs(coarse.astype(float) - expected).max() <= 1


def test_pyramid_levels_match_file(sample_pyramid: Path) -> None:
    with Slide(sample_pyramid) as slide:
        assert slide.level_dimensions == ((2220, 2967), (1110, 1483), (555, 741))
        assert slide.vendor == "generic-tiff"
        assert slide.mpp == pytest.approx(0.499)


def test_chunks_align_to_file_tiles(sample_svs: Path, sample_pyramid: Path) -> None:
    for path, tile in ((sample_svs, 240), (sample_pyramid, 256)):
        with Slide(path) as slide:
            level0 = slide.levels[0]
            assert all(c % tile == 0 for c in level0.chunks[0][:-1] + level0.chunks[1][:-1])


@pytest.mark.parametrize("name", ["cmu_small_region.svs", "cmu_small_region_pyramid.tif"])
def test_same_pixels_as_openslide(name: str, sample_svs: Path) -> None:
    path = sample_svs.parent / name
    osr = openslide.OpenSlide(str(path))
    with Slide(path) as slide:
        assert slide.backend == "tifffile"  # the fast path is the one under test
        for level, (w, h) in enumerate(osr.level_dimensions):
            ours = slide.levels[level].compute()
            theirs = np.asarray(osr.read_region((0, 0), level, (w, h)))[..., :3]
            np.testing.assert_array_equal(ours, theirs)


def test_openslide_backend_gives_same_pixels(sample_pyramid: Path) -> None:
    with Slide(sample_pyramid) as fast, Slide(sample_pyramid, backend="openslide") as slow:
        assert slow.backend == "openslide"
        np.testing.assert_array_equal(fast.levels[0][500:900, 300:800].compute(),
                                      slow.levels[0][500:900, 300:800].compute())  # fmt: skip


def test_read_region_pads_outside_with_white(sample_pyramid: Path) -> None:
    with Slide(sample_pyramid) as slide:
        region = slide.read_region((2100, 2900), 0, (200, 100))
        assert region.shape == (100, 200, 3)
        assert (region[:, 120:] == 255).all() and (region[67:] == 255).all()
        np.testing.assert_array_equal(region[:67, :120], slide.levels[0][2900:, 2100:].compute())


def test_read_region_on_coarsened_level(sample_svs: Path) -> None:
    with Slide(sample_svs) as slide:
        region = slide.read_region((400, 800), 2, (64, 32))
        np.testing.assert_array_equal(region, slide.levels[2][200:232, 100:164].compute())


def test_threaded_dask_reads_are_consistent(sample_pyramid: Path) -> None:
    with Slide(sample_pyramid) as slide:
        expected = slide.levels[0].compute(scheduler="sync")
        boxes = [(y, x) for y in range(0, 2700, 300) for x in range(0, 2000, 300)]
        with ThreadPoolExecutor(8) as pool:
            blocks = list(pool.map(lambda b: slide.levels[0][b[0] : b[0] + 256, b[1] : b[1] + 256].compute(), boxes))
        for (y, x), block in zip(boxes, blocks, strict=True):
            np.testing.assert_array_equal(block, expected[y : y + 256, x : x + 256])


def test_fingerprint_is_stable_and_content_based(sample_pyramid: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.tif"
    shutil.copy(sample_pyramid, copy)
    with Slide(sample_pyramid) as a, Slide(copy) as b, Slide(sample_pyramid.parent / "cmu_small_region.svs") as c:
        assert a.fingerprint == b.fingerprint  # content, not path
        assert a.fingerprint != c.fingerprint


def test_transparent_areas_composited_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((512, 512, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:256, :, 3] = 255  # top half opaque red-ish, bottom half fully transparent
    path = tmp_path / "rgba.tif"
    tifffile.imwrite(path, rgba, tile=(256, 256), photometric="rgb", extrasamples=[2])
    with Slide(path, mpp=0.5) as slide:
        pixels = slide.levels[0].compute()
    assert (pixels[:256, :, 0] == 200).all() and (pixels[:256, :, 1] == 0).all()
    assert (pixels[256:] == 255).all()


def test_missing_mpp_opens_and_asks_for_override(tmp_path: Path) -> None:
    path = write_pyramid(tmp_path / "nompp.tif", 600, 500, SampleSource(np.full((10, 10, 3), 128, np.uint8)),
                         mpp=None, levels=1)  # fmt: skip
    with Slide(path) as slide:
        assert slide.mpp is None and slide.mpp_source is None
        with pytest.raises(SlideError, match="override"):
            slide.require_mpp()
    with Slide(path, mpp=0.25) as slide:
        assert slide.require_mpp() == 0.25 and slide.mpp_source == "override"


def test_stripped_single_level_tiff_opens_lazily(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 255, (3000, 2500, 3), dtype=np.uint8)
    path = tmp_path / "stripped.tif"
    tifffile.imwrite(path, rgb, rowsperstrip=64, compression="zlib", resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    with Slide(path) as slide:
        assert slide.backend == "tifffile" and slide.mpp == pytest.approx(0.5)
        assert len(slide.levels) == 3
        np.testing.assert_array_equal(slide.read_region((1000, 2000), 0, (300, 200)), rgb[2000:2200, 1000:1300])


# --- bad input: each one SlideError naming the file ----------------------------------------


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _truncated(src: Path, dst: Path, fraction: float) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda d, s: _write(d / "notes.svs", b"not a slide\n" * 50), "not a slide"),
        (lambda d, s: _write(d / "empty.svs", b""), "empty"),
        (lambda d, s: _truncated(s / "cmu_small_region.svs", d / "cut.svs", 0.9), "truncated"),
        (lambda d, s: _truncated(s / "cmu_small_region.svs", d / "cut2.svs", 0.4), "truncated"),
        (lambda d, s: _truncated(s / "cmu_small_region_pyramid.tif", d / "cut.tif", 0.6), "truncated"),
        (lambda d, s: (d / "folder.mrxs").mkdir() or d / "folder.mrxs", "folder"),
        (lambda d, s: d / "missing.svs", "no such file"),
        (lambda d, s: tifffile.imwrite(d / "float.tif", np.zeros((64, 64), np.float32)) or d / "float.tif",
         "not a brightfield RGB"),
        (lambda d, s: _write(d / "img.ndpi", b"\x89PNG\r\n\x1a\n" + bytes(100)), "not a slide"),
    ],
    ids=["text-renamed", "zero-bytes", "truncated-svs-90", "truncated-svs-40", "truncated-tiff", "directory",
         "missing", "float-tiff", "png-renamed"],
)  # fmt: skip
def test_bad_files_raise_slide_error_naming_the_file(tmp_path: Path, sample_svs: Path, make, match: str) -> None:
    path = make(tmp_path, sample_svs.parent)
    with pytest.raises(SlideError, match=match) as info:
        Slide(path)
    assert path.name in str(info.value)


def test_unreadable_file_permission_denied(tmp_path: Path, sample_svs: Path) -> None:
    locked = tmp_path / "locked.svs"
    shutil.copy(sample_svs, locked)
    locked.chmod(0o000)
    for parent in (tmp_path, *tmp_path.parents):
        parent.chmod(parent.stat().st_mode | 0o005)  # let "nobody" reach the file itself

    def attempt() -> str:
        try:
            Slide(locked)
        except SlideError as exc:
            return f"SlideError: {exc}"
        return "opened"

    assert run_as_nobody(attempt).startswith("SlideError: locked.svs: permission denied")


def test_closed_slide_refuses_reads(sample_pyramid: Path) -> None:
    slide = Slide(sample_pyramid)
    level = slide.levels[0]
    slide.close()
    with pytest.raises(SlideError, match="closed"):
        level[:10, :10].compute()


def test_invalid_mpp_override(sample_pyramid: Path) -> None:
    with pytest.raises(SlideError, match="positive"):
        Slide(sample_pyramid, mpp=-1)


def test_view_reads_decode_only_tiles_under_the_view(sample_pyramid: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # napari asks for a view-sized block; dask must not decode whole 2048² chunks around it
    from napari_virchow.slides import tiff as _tiff

    decoded: list[tuple[int, int]] = []
    real = _tiff.TiffLevel._segment
    monkeypatch.setattr(_tiff.TiffLevel, "_segment", lambda self, r, c: decoded.append((r, c)) or real(self, r, c))
    with Slide(sample_pyramid) as slide:
        block = np.asarray(slide.levels[0][300:600, 700:1000])
    assert block.shape == (300, 300, 3)
    assert sorted(decoded) == [(r, c) for r in (1, 2) for c in (2, 3)]  # 256-px tiles under the view
