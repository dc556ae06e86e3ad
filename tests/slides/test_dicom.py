"""DICOM WSI (VL Whole Slide Microscopy): a folder or one of its .dcm files opens through OpenSlide 4."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_virchow.slides.slide import Slide

wsidicomizer = pytest.importorskip("wsidicomizer", reason="wsidicomizer builds the test DICOM WSI")


@pytest.fixture(scope="module")
def dicom_wsi(sample_pyramid: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample pyramid converted to DICOM WSI by wsidicomizer (one .dcm per level)."""
    out = tmp_path_factory.mktemp("dicom") / "cmu_small_region"
    out.mkdir()
    files = wsidicomizer.WsiDicomizer.convert(str(sample_pyramid), str(out), include_label=False,
                                              include_overview=False)  # fmt: skip
    assert len(files) == 3
    return out


def test_folder_and_file_open_with_the_sources_geometry_and_scale(dicom_wsi: Path, sample_pyramid: Path) -> None:
    with Slide(sample_pyramid) as source, Slide(dicom_wsi) as folder:
        assert folder.vendor == "dicom" and folder.backend == "openslide"
        assert folder.file_level_dimensions == source.file_level_dimensions
        assert folder.mpp == pytest.approx(source.mpp) and folder.mpp_source == "file"
        one = next(iter(sorted(dicom_wsi.glob("*.dcm"))))
        with Slide(one) as file:
            assert file.file_level_dimensions == source.file_level_dimensions
            assert file.fingerprint == folder.fingerprint  # every instance hashed, whichever is named


def test_pixels_match_the_source_and_wsidicom(dicom_wsi: Path, sample_pyramid: Path) -> None:
    from wsidicom import WsiDicom

    with tifffile.TiffFile(sample_pyramid) as tif:
        src = tif.pages[0].asarray().astype(np.int16)
    with Slide(dicom_wsi) as slide, WsiDicom.open(dicom_wsi) as wsi:
        ours = slide.read_region((0, 0), 0, slide.dimensions)
        theirs = np.asarray(wsi.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
        np.testing.assert_array_equal(ours, theirs)  # two independent DICOM decoders agree exactly
        diff = np.abs(ours.astype(np.int16) - src)
        assert diff.mean() < 3 and np.percentile(diff, 99) <= 16  # the source's JPEG, re-encoded once
        level2 = slide.read_region((0, 0), 2, slide.file_level_dimensions[2])
        np.testing.assert_array_equal(level2, np.asarray(wsi.read_region((0, 0), 2, slide.file_level_dimensions[2])
                                                         .convert("RGB")))  # fmt: skip


def test_napari_reader_claims_the_dicom_folder(dicom_wsi: Path) -> None:
    from napari_virchow._reader import napari_get_reader, read_slides

    assert napari_get_reader(str(dicom_wsi)) is not None
    _, kwargs, _ = read_slides(str(dicom_wsi))[0]
    assert tuple(kwargs["scale"])[-2:] == pytest.approx((0.499, 0.499))
