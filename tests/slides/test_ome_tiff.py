"""OME-TIFF pyramids (SubIFDs and top-level pages): µm/px from the OME-XML, tifffile's pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_virchow.errors import SlideError
from napari_virchow.slides.slide import Slide
from napari_virchow.slides.tiff_open import ome_mpp


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h // 8, w // 8, 3), np.uint8)
    return np.ascontiguousarray(np.repeat(np.repeat(img, 8, 0), 8, 1)[:h, :w])


def _write_subifds(path: Path, img: np.ndarray, size: float, unit: str) -> Path:
    meta = {"PhysicalSizeX": size, "PhysicalSizeXUnit": unit, "PhysicalSizeY": size, "PhysicalSizeYUnit": unit}
    opts = {"tile": (128, 128), "photometric": "rgb", "compression": "zlib"}
    with tifffile.TiffWriter(path, ome=True) as tif:  # the layout bfconvert and QuPath write
        tif.write(img, subifds=2, metadata=meta, **opts)
        tif.write(img[::2, ::2], subfiletype=1, **opts)
        tif.write(img[::4, ::4], subfiletype=1, **opts)
    return path


@pytest.mark.parametrize(("size", "unit", "mpp"), [(0.25, "µm", 0.25), (250, "nm", 0.25),
                                                   (0.0005, "mm", 0.5), (0.000025, "cm", 0.25)])  # fmt: skip
def test_subifd_pyramid_with_units(tmp_path: Path, size: float, unit: str, mpp: float) -> None:
    img = _rgb(600, 704)
    path = _write_subifds(tmp_path / "s.ome.tif", img, size, unit)
    with Slide(path) as slide:
        assert slide.mpp == pytest.approx(mpp) and slide.mpp_source == "file"
        assert slide.vendor == "ome-tiff" and slide.backend == "tifffile"
        assert slide.file_level_dimensions == ((704, 600), (352, 300), (176, 150))
        with tifffile.TiffFile(path) as tif:
            for level, lvl in enumerate(tif.series[0].levels):
                np.testing.assert_array_equal(slide.levels[level].compute(), lvl.asarray())
        np.testing.assert_array_equal(slide.read_region((64, 32), 0, (100, 50)), img[32:82, 64:164])


def test_top_level_page_pyramid(tmp_path: Path) -> None:
    img = _rgb(512, 768, seed=3)
    path = tmp_path / "pages.ome.tiff"
    meta = {"PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5}  # no unit: OME's default, µm
    with tifffile.TiffWriter(path, ome=True) as tif:
        for k, level in enumerate((img, img[::2, ::2], img[::4, ::4])):
            tif.write(level, tile=(64, 64), photometric="rgb", compression="zlib", metadata=meta if k == 0 else None)
    with tifffile.TiffFile(path) as tif:
        assert len(tif.series) == 3  # each level its own top-level image
    with Slide(path) as slide:
        assert slide.mpp == pytest.approx(0.5)
        assert slide.file_level_dimensions == ((768, 512), (384, 256), (192, 128))
        np.testing.assert_array_equal(slide.levels[2].compute(), img[::4, ::4])


def test_fluorescence_ome_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "if.ome.tif"
    data = np.zeros((4, 256, 256), np.uint16)
    tifffile.imwrite(path, data, ome=True, tile=(128, 128), metadata={"axes": "CYX", "PhysicalSizeX": 0.3})
    with pytest.raises(SlideError, match=r"if\.ome\.tif.*not a brightfield RGB slide.*convert"):
        Slide(path)


def test_ome_mpp_units_and_missing() -> None:
    xml = '<OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06"><Image><Pixels {}/></Image></OME>'
    assert ome_mpp(xml.format('PhysicalSizeX="0.2425"')) == pytest.approx(0.2425)
    assert ome_mpp(xml.format('PhysicalSizeX="242.5" PhysicalSizeXUnit="nm"')) == pytest.approx(0.2425)
    assert ome_mpp(xml.format('SizeX="5"')) is None
    with pytest.raises(SlideError, match="PhysicalSizeXUnit 'pixel'.*mpp-override"):
        ome_mpp(xml.format('PhysicalSizeX="1" PhysicalSizeXUnit="pixel"'), "x.ome.tif")
