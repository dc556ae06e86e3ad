"""Open a TIFF pyramid with tifffile alone: OME-TIFF, and any codec imagecodecs decodes.

Used for TIFFs OpenSlide refuses (stripped, single-level, JPEG 2000 / JPEG XL / WebP / zstd
tiles libtiff lacks) and for every OME-TIFF (OpenSlide reads neither its SubIFD pyramid nor
its OME-XML µm/px). Pixels are tifffile's own.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import tifffile

from napari_virchow.errors import SlideError
from napari_virchow.slides.diagnose import SLIDE_SUFFIXES, TifffileProblems
from napari_virchow.slides.tiff import TiffPyramid, match_levels, mpp_from_resolution

__all__ = ["OME_UNITS_UM", "is_ome_tiff", "ome_mpp", "open_tiff_pyramid", "tiff_fast_path"]

log = logging.getLogger(__name__)

#: µm per OME-XML length unit
OME_UNITS_UM = {"µm": 1.0, "um": 1.0, "\u03bcm": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4,
                "m": 1e6, "pm": 1e-6, "Å": 1e-4}  # fmt: skip


def is_ome_tiff(path: Path) -> bool:
    """Whether ``path`` is an OME-TIFF (OME-XML in its first page), without reading pixels."""
    if path.suffix.lower() not in (".tif", ".tiff", ".btf", ".tf8", ".tf2"):
        return False
    try:
        with tifffile.TiffFile(path) as tif:
            return bool(tif.is_ome)
    except (tifffile.TiffFileError, ValueError, OSError, IndexError, KeyError):
        return False


def ome_mpp(xml: str, name: str = "") -> float | None:
    """µm/px of the first image from OME-XML ``PhysicalSizeX/Y`` with their units (default µm)."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    pixels = next((el for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None or pixels.get("PhysicalSizeX") is None:
        return None
    sizes = []
    for axis in ("X", "Y"):
        value = pixels.get(f"PhysicalSize{axis}")
        if value is None:
            continue
        unit = pixels.get(f"PhysicalSize{axis}Unit", "µm")
        if unit not in OME_UNITS_UM:
            raise SlideError(f"{name}: OME-XML PhysicalSize{axis}Unit {unit!r} is not a length unit "
                             "this plugin knows; pass µm/px explicitly (`--mpp-override`).")  # fmt: skip
        sizes.append(float(value) * OME_UNITS_UM[unit])
    mpp = sizes[0]
    return mpp if np.isfinite(mpp) and mpp > 0 else None


def _levels(tif: tifffile.TiffFile) -> list[tifffile.TiffPage]:
    """The main image's pages, largest first: its SubIFDs, or (OME) smaller top-level images."""
    series = tif.series[0]
    pages = [lvl.keyframe for lvl in series.levels]
    if len(pages) == 1 and tif.is_ome and len(tif.series) > 1:
        h0, w0 = int(pages[0].imagelength), int(pages[0].imagewidth)
        for other in tif.series[1:]:
            page = other.keyframe
            h, w = int(page.imagelength), int(page.imagewidth)
            smaller = h < int(pages[-1].imagelength) and w < int(pages[-1].imagewidth)
            if smaller and abs((w0 / w) / (h0 / h) - 1) < 0.05 and page.samplesperpixel == pages[0].samplesperpixel:
                pages.append(page)
    return pages


def _check_brightfield(name: str, tif: tifffile.TiffFile, pages: list[tifffile.TiffPage]) -> None:
    series = tif.series[0]
    p = pages[0]
    axes = series.axes
    extra = {a: n for a, n in zip(axes, series.shape, strict=True) if a not in "YXS" and n > 1}
    rgb = p.dtype == np.uint8 and int(p.samplesperpixel) in (1, 3, 4) and int(p.planarconfig) == 1
    if tif.is_ome and int(p.samplesperpixel) not in (3, 4):
        rgb = False
    if extra or not rgb or int(p.imagedepth) != 1:
        dims = ", ".join(f"{n} {a}" for a, n in extra.items()) or f"{p.samplesperpixel} samples"
        kind = "an OME-TIFF" if tif.is_ome else "a TIFF"
        raise SlideError(
            f"{name}: {kind} with {p.dtype} pixels ({dims}, axes {axes}) is not a brightfield RGB "
            "slide (fluorescence, multiplex, z-stacks and time series are not supported); convert "
            "it to an 8-bit RGB pyramidal TIFF."
        )


#: Aperio's JPEG 2000 with YCbCr components: OpenSlide converts them to RGB, tifffile would not
APERIO_J2K_YCBCR = 33003


def _check_colours(name: str, pages: list[tifffile.TiffPage]) -> None:
    """Refuse tiles whose colours only OpenSlide gets right (tifffile would return YCbCr as RGB)."""
    if any(int(p.compression) == APERIO_J2K_YCBCR for p in pages):
        raise SlideError(
            f"{name}: its tiles are Aperio YCbCr JPEG 2000 (TIFF compression 33003), whose colours "
            "only OpenSlide converts; open it with the default backend (OpenSlide reads it), or "
            "convert it (e.g. `vips tiffsave IN OUT.tif --tile --pyramid --compression jpeg`)."
        )


def _check_decodable(name: str, pyramid: TiffPyramid, pages: list[tifffile.TiffPage]) -> None:
    """Decode one stored segment per level now, so a missing codec fails at open, not mid-analysis."""
    for level, page in zip(pyramid.levels, pages, strict=True):
        index = next((i for i, n in enumerate(level.bytecounts) if n), None)
        if index is None:
            continue
        try:
            level.decode_segment(index)
        except Exception as exc:  # codecs raise their own types; all mean "cannot decode"
            pyramid.close()
            raise SlideError(
                f"{name}: its tiles use TIFF compression {page.compression!s}, which this installation "
                f"cannot decode ({exc}). Install imagecodecs with that codec, or convert the slide "
                "(e.g. `vips tiffsave IN OUT.tif --tile --pyramid --compression jpeg`)."
            ) from exc
        level.count_decodes(-1)  # the check is not a read of the slide


def open_tiff_pyramid(path: Path) -> TiffPyramid:
    """A :class:`TiffPyramid` of ``path`` read by tifffile alone, with its µm/px (OME-XML or tags).

    Raises
    ------
    SlideError
        A truncated file, a non-RGB image (fluorescence OME-TIFF, ...), a codec imagecodecs lacks,
        or a file that is no TIFF; the message names the file and the fix.
    """
    name = path.name
    try:
        with TifffileProblems() as problems, tifffile.TiffFile(path) as tif:
            tif.pages.useframes = False
            len(tif.pages)  # walks every IFD: a cut-off chain shows up as a logged problem
            if problems:
                raise SlideError(f"{name} is truncated or corrupt ({problems[0]}). Copy the slide again.")
            pages = _levels(tif)
            _check_brightfield(name, tif, pages)
            _check_colours(name, pages)
            mpp = ome_mpp(tif.ome_metadata or "", name) if tif.is_ome else None
            pyramid = TiffPyramid(path, pages)
            _check_decodable(name, pyramid, pages)
            pyramid.mpp = mpp if mpp is not None else mpp_from_resolution(pages[0])
            pyramid.vendor = "ome-tiff" if tif.is_ome else "tiff"
            return pyramid
    except (tifffile.TiffFileError, ValueError, IndexError, KeyError) as exc:
        raise SlideError(
            f"{name} is not a whole-slide image OpenSlide or tifffile can read ({exc}). "
            f"Supported: {', '.join(SLIDE_SUFFIXES)}; other formats can be converted to a "
            "pyramidal TIFF (e.g. `vips tiffsave IN OUT.tif --tile --pyramid --compression jpeg`)."
        ) from exc


def tiff_fast_path(path: Path, dimensions: list[tuple[int, int]]) -> TiffPyramid | None:
    """Direct decoding of the levels OpenSlide found (``(width, height)`` each), when every one is a
    tiled page in a codec that gives OpenSlide's pixels; else ``None`` (OpenSlide reads them)."""
    try:
        with tifffile.TiffFile(path) as tif:
            pages = match_levels(tif, dimensions)
            if not pages:
                return None
            pyramid = TiffPyramid(path, pages)
            pyramid.mpp = mpp_from_resolution(pages[0])
            return pyramid
    except (tifffile.TiffFileError, ValueError, OSError) as exc:
        log.debug("%s: tifffile fast path unavailable (%s); using OpenSlide", path.name, exc)
        return None
