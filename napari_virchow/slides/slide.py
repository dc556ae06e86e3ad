"""Open a whole-slide image and expose its pyramid as lazy dask arrays with a physical scale.

>>> with Slide("sample_data/cmu_small_region.svs") as slide:
...     slide.mpp, slide.dimensions, [lvl.shape for lvl in slide.levels]
(0.499, (2220, 2967), [(2967, 2220, 3), (1483, 1110, 3), (741, 555, 3)])

Every format OpenSlide reads opens through OpenSlide. For the tiled TIFF family (Aperio SVS,
generic pyramidal TIFF) pixels are decoded directly with tifffile/imagecodecs, which gives the
same pixels faster. OME-TIFFs (SubIFD or top-level pyramids, µm/px from the OME-XML) and TIFFs
OpenSlide refuses (stripped, single-level, or tiles in a codec libtiff lacks, such as JPEG 2000,
JPEG XL, WebP or zstd) open through tifffile + imagecodecs alone (:mod:`.tiff_open`).
"""

from __future__ import annotations

import logging
import os
import weakref
from functools import cached_property
from pathlib import Path
from typing import Literal

import dask.array as da
import numpy as np
import openslide
import tifffile

from napari_virchow.errors import SlideError
from napari_virchow.slides import fingerprint as _fingerprint
from napari_virchow.slides.diagnose import (
    SLIDE_SUFFIXES,
    check_complete,
    check_file,
    diagnose,
    dicom_entry,
    warn_missing_mpp,
)
from napari_virchow.slides.levels import LevelArray, Reader, aligned_chunk, coarsen
from napari_virchow.slides.ngff import NgffPyramid, is_ngff, open_ngff
from napari_virchow.slides.region import level_origin, openslide_downsamples
from napari_virchow.slides.tiff import TiffPyramid, composite_on_white
from napari_virchow.slides.tiff_open import is_ome_tiff, open_tiff_pyramid, tiff_fast_path

__all__ = ["SLIDE_SUFFIXES", "Slide", "SlideError", "warn_missing_mpp"]

log = logging.getLogger(__name__)

#: vendors whose levels are plain tiled TIFF pages, decodable without OpenSlide's quirks
TIFF_VENDORS = {"aperio", "generic-tiff"}
#: add lazily coarsened levels until the smallest level fits in this many pixels per side
COARSEST_SIDE = 1024

Backend = Literal["auto", "openslide", "tifffile"]


class Slide:
    """A whole-slide image.

    Parameters
    ----------
    path
        Slide file (SVS, NDPI, MRXS, SCN, BIF, tiled or stripped TIFF, ...).
    mpp
        µm per level-0 pixel, overriding (or supplying) the file's value.
    backend
        ``"auto"`` (default) decodes TIFF-family pyramids directly and everything else through
        OpenSlide; ``"openslide"`` / ``"tifffile"`` force one (for benchmarks and tests).

    Raises
    ------
    SlideError
        When the file is missing, empty, unreadable, truncated or not a slide; the message
        names the file and the likely fix.
    """

    def __init__(self, path: str | os.PathLike[str], *, mpp: float | None = None,
                 backend: Backend = "auto") -> None:  # fmt: skip
        self.path = dicom_entry(Path(path))  # a DICOM WSI folder opens through one of its files
        check_file(self.path)
        if mpp is not None and not (np.isfinite(mpp) and mpp > 0):
            raise SlideError(f"{self.path.name}: mpp override must be a positive number, got {mpp!r}")
        self._osr: openslide.OpenSlide | None = None
        self._tiff: TiffPyramid | None = None
        self._ngff: NgffPyramid | None = None  # an OME-Zarr folder (slides/ngff.py)
        self._closed = False
        try:
            self._open(backend)
        except SlideError:
            _release(self._tiff, self._osr)
            raise
        # file handles go when the slide does, even if nobody calls close() (e.g. a napari
        # layer holding the dask levels is deleted)
        self._finalizer = weakref.finalize(self, _release, self._tiff, self._osr)
        file_mpp = self._file_mpp()
        self._file_downsamples  # noqa: B018 - computed while the handles are open
        self.mpp_source: str | None = "override" if mpp is not None else ("file" if file_mpp else None)
        self.mpp: float | None = float(mpp) if mpp is not None else file_mpp
        if mpp is not None:
            log.info("%s: using µm/px override %.4g (file says %s)", self.path.name, mpp, file_mpp)

    # --- opening -------------------------------------------------------------------------
    def _open(self, backend: Backend) -> None:
        name = self.path.name
        fmt = None
        if is_ngff(self.path):
            self._ngff = open_ngff(self.path)
            return
        if backend != "openslide" and is_ome_tiff(self.path):
            self._tiff = open_tiff_pyramid(self.path)  # OpenSlide reads neither its pyramid nor its µm/px
        elif backend != "tifffile":
            try:
                fmt = openslide.OpenSlide.detect_format(str(self.path))
            except openslide.OpenSlideError as exc:  # pragma: no cover - detect rarely raises
                raise SlideError(f"{name}: OpenSlide cannot inspect the file ({exc})") from exc
        if self._tiff is not None:
            pass
        elif fmt is not None:
            try:
                self._osr = openslide.OpenSlide(str(self.path))
            except (openslide.OpenSlideError, OSError) as exc:
                if backend == "auto" and fmt == "generic-tiff":  # e.g. JPEG 2000 tiles libtiff lacks
                    try:
                        self._tiff = open_tiff_pyramid(self.path)
                        check_complete(self.path, self._tiff, self._osr)  # cut short: fail at open
                        return
                    except SlideError:
                        pass
                raise SlideError(
                    f"{name}: OpenSlide recognised a {fmt} slide but could not read it ({exc}). "
                    "The file is probably truncated or corrupt: copy it again from the scanner."
                ) from exc
            vendor = self._osr.properties.get(openslide.PROPERTY_NAME_VENDOR, fmt)
            if backend == "auto" and vendor in TIFF_VENDORS:
                self._tiff = tiff_fast_path(self.path, list(self._osr.level_dimensions))
        elif backend == "openslide":
            raise SlideError(f"{name}: OpenSlide does not recognise this file.")
        elif self.path.suffix.lower() not in (".tif", ".tiff"):
            # a vendor file (.svs, .ndpi, ...) OpenSlide cannot parse is broken, not a plain TIFF
            raise SlideError(diagnose(self.path))
        else:
            self._tiff = open_tiff_pyramid(self.path)
        check_complete(self.path, self._tiff, self._osr)  # cut short: fail at open

    def _file_mpp(self) -> float | None:
        if self._osr is not None:
            value = self._osr.properties.get(openslide.PROPERTY_NAME_MPP_X)
            try:
                mpp = float(value) if value is not None else None
            except ValueError:
                mpp = None
            if mpp and mpp > 0:
                return mpp
        direct = self._tiff or self._ngff
        return direct.mpp if direct is not None else None

    # --- metadata ------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        """``"tifffile"`` when pixels are decoded directly, ``"zarr"`` for OME-Zarr, else ``"openslide"``."""
        return "zarr" if self._ngff is not None else "tifffile" if self._tiff is not None else "openslide"

    @cached_property
    def properties(self) -> dict[str, str]:
        """Vendor metadata (OpenSlide's property map, or the TIFF description)."""
        if self._osr is not None:
            return dict(self._osr.properties)
        direct = self._tiff or self._ngff
        assert direct is not None
        props = {openslide.PROPERTY_NAME_VENDOR: direct.vendor}
        if self._tiff is not None:
            with tifffile.TiffFile(self.path) as tif:
                props["tiff.ImageDescription"] = tif.pages.first.description or ""
        if direct.mpp is not None:
            props[openslide.PROPERTY_NAME_MPP_X] = props[openslide.PROPERTY_NAME_MPP_Y] = str(direct.mpp)
        return props

    @property
    def vendor(self) -> str:
        """OpenSlide's vendor name (``aperio``, ``hamamatsu``, ...) or ``tiff``."""
        return self.properties.get(openslide.PROPERTY_NAME_VENDOR, "tiff")

    @property
    def objective_power(self) -> float | None:
        """Scanning magnification (e.g. 20.0), when the file records it."""
        value = self.properties.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER)
        try:
            return float(value) if value else None
        except ValueError:
            return None

    @cached_property
    def file_level_dimensions(self) -> tuple[tuple[int, int], ...]:
        """(width, height) of each level stored in the file."""
        direct = self._tiff or self._ngff
        if direct is not None:
            return tuple((lvl.shape[1], lvl.shape[0]) for lvl in direct.levels)
        assert self._osr is not None
        return tuple(self._osr.level_dimensions)

    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) of level 0 in pixels."""
        return self.file_level_dimensions[0]

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        """(width, height) of every level in :attr:`levels`, including coarsened ones."""
        return tuple((int(a.shape[1]), int(a.shape[0])) for a in self.levels)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        """Downsample of every level in :attr:`levels`: OpenSlide's (mean of the width and height
        ratios) for file levels, exact powers of 2 beyond them for the 2 × 2-averaged ones."""
        native = self._file_downsamples
        extra = tuple(native[-1] * 2.0**k for k in range(1, len(self.levels) - len(native) + 1))
        return native + extra

    @cached_property
    def _file_downsamples(self) -> tuple[float, ...]:
        # read at open (see __init__): a closed OpenSlide handle can no longer be asked
        if self._osr is not None:
            return tuple(float(d) for d in self._osr.level_downsamples)
        return openslide_downsamples(self.file_level_dimensions)

    def require_mpp(self) -> float:
        """µm/px for analysis; raises a :class:`SlideError` that says how to supply it."""
        if self.mpp is None:
            raise SlideError(
                f"{self.path.name} does not record its resolution (µm per pixel), which analysis "
                "needs to tile at the model's magnification. Pass it explicitly: `--mpp-override 0.25` "
                "(CLI), the µm/px field in the widget, or `Slide(path, mpp=0.25)`."
            )
        return self.mpp

    @cached_property
    def fingerprint(self) -> str:
        """Content hash of every byte of the slide's files (every level's pixels), for cache keys.

        Computed once per file version and remembered (see :mod:`~napari_virchow.slides.fingerprint`):
        reopening an unchanged, touched or moved slide does not re-hash it.
        """
        try:
            return _fingerprint.fingerprint(self.path)
        except OSError as exc:
            raise SlideError(f"{self.path.name}: reading the file to fingerprint it failed ({exc}).") from exc

    @cached_property
    def _token(self) -> str:
        # dask graph names: unique per file version, without hashing the content
        return _fingerprint.file_token([self.path])

    # --- pixels --------------------------------------------------------------------------
    def _level_reader(self, level: int) -> tuple[Reader, tuple[int, int]]:
        """Reader of file level ``level`` and the stored tile size its chunks align to."""
        direct = self._tiff or self._ngff
        if direct is not None:
            lvl = direct.levels[level]
            return self._guard(lvl.read), lvl.chunk_unit
        assert self._osr is not None
        osr, ds = self._osr, self._osr.level_downsamples[level]
        props = osr.properties
        unit = (
            int(props.get(f"openslide.level[{level}].tile-height", 256)),
            int(props.get(f"openslide.level[{level}].tile-width", 256)),
        )

        def read(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
            region = osr.read_region((int(round(x0 * ds)), int(round(y0 * ds))), level, (x1 - x0, y1 - y0))
            return composite_on_white(np.asarray(region))

        return self._guard(read), unit

    def _guard(self, read: Reader) -> Reader:
        name = self.path.name

        def guarded(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
            if self._closed:
                raise SlideError(f"{name} was closed; open the slide again to read pixels.")
            if y1 <= y0 or x1 <= x0:
                return np.full((max(y1 - y0, 0), max(x1 - x0, 0), 3), 255, np.uint8)
            try:
                return read(y0, y1, x0, x1)
            except (openslide.OpenSlideError, OSError, ValueError, RuntimeError) as exc:
                raise SlideError(f"{name}: reading pixels failed ({exc}); the file may be corrupt.") from exc

        return guarded

    @cached_property
    def levels(self) -> list[da.Array]:
        """The pyramid as dask arrays (height, width, 3) uint8, largest first.

        Chunks are whole multiples of the file's tiles. When the file's smallest level is still
        large (e.g. a single-level SVS), 2 × 2-averaged levels are added lazily.
        """
        arrays: list[da.Array] = []
        for level, (w, h) in enumerate(self.file_level_dimensions):
            read, (uh, uw) = self._level_reader(level)
            chunks = (aligned_chunk(uh, h), aligned_chunk(uw, w), 3)
            arrays.append(
                da.from_array(
                    LevelArray((h, w), read), chunks=chunks, name=f"slide-{self._token}-{level}",
                    asarray=False, fancy=True, lock=False, meta=np.empty((0, 0, 0), np.uint8),
                )
            )  # fmt: skip
        while max(arrays[-1].shape[:2]) > COARSEST_SIDE and min(arrays[-1].shape[:2]) >= 2:
            arrays.append(coarsen(arrays[-1]))
        return arrays

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 pixels, like OpenSlide's ``read_region`` but composited on white.

        Parameters
        ----------
        location
            (x, y) of the top-left corner in level-0 pixels.
        level
            Index into :attr:`levels`.
        size
            (width, height) in pixels of ``level``; areas outside the slide are white.

        File levels follow OpenSlide's coordinates exactly (see :mod:`~napari_virchow.slides.region`),
        so the pixels equal OpenSlide's for every level, position and size.
        """
        if not 0 <= level < len(self.levels):
            raise SlideError(f"{self.path.name}: level {level} does not exist (0–{len(self.levels) - 1})")
        ds = self.level_downsamples[level]
        w, h = int(size[0]), int(size[1])
        if level < len(self.file_level_dimensions):
            x0, y0 = level_origin(location[0], ds), level_origin(location[1], ds)
            if self._osr is not None and (x0 is None or y0 is None or self._tiff is None):
                return self._openslide_region(location, level, (w, h))
            if x0 is None or y0 is None:  # no OpenSlide to interpolate: the nearest level pixel
                x0, y0 = round(location[0] / ds), round(location[1] / ds)
            return self._level_reader(level)[0](y0, y0 + h, x0, x0 + w)
        x0, y0 = int(location[0] // ds), int(location[1] // ds)
        arr = self.levels[level]
        out = np.full((h, w, 3), 255, np.uint8)
        cy0, cy1 = max(y0, 0), min(y0 + h, arr.shape[0])
        cx0, cx1 = max(x0, 0), min(x0 + w, arr.shape[1])
        if cy0 < cy1 and cx0 < cx1:
            out[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] = arr[cy0:cy1, cx0:cx1].compute(scheduler="threads")
        return out

    def _openslide_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """OpenSlide's own read, for positions between level pixels (its sub-pixel filter)."""
        assert self._osr is not None
        osr = self._osr

        def read(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
            region = osr.read_region((int(location[0]), int(location[1])), level, (x1 - x0, y1 - y0))
            return composite_on_white(np.asarray(region))

        return self._guard(read)(0, size[1], 0, size[0])

    def best_level_for_downsample(self, downsample: float) -> int:
        """Index of the coarsest level whose downsample does not exceed ``downsample`` (+1 %)."""
        candidates = [i for i, d in enumerate(self.level_downsamples) if d <= downsample * 1.01]
        return max(candidates) if candidates else 0

    def thumbnail(self, max_size: int = 1024) -> np.ndarray:
        """A small RGB overview whose longer side is at most ``max_size`` pixels."""
        from PIL import Image

        w0, h0 = self.dimensions
        target = max(w0, h0) / max_size
        level = self.best_level_for_downsample(max(target, 1.0))
        # threads, not the default scheduler: inside a dask.distributed worker (or with a default
        # Client) the default would ship this graph, file handles included, to the cluster
        pixels = np.asarray(self.levels[level].compute(scheduler="threads"))
        if max(pixels.shape[:2]) > max_size:
            img = Image.fromarray(pixels)
            img.thumbnail((max_size, max_size), Image.Resampling.BOX)
            pixels = np.asarray(img)
        return pixels

    # --- lifetime ------------------------------------------------------------------------
    def close(self) -> None:
        """Release the file handles (the dask levels stop working)."""
        self._closed = True
        self._finalizer()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        w, h = self.dimensions
        return (
            f"Slide({self.path.name!r}, {w}×{h} px, mpp={self.mpp}, "
            f"vendor={self.vendor!r}, backend={self.backend!r})"
        )


def _release(tiff: TiffPyramid | None, osr: openslide.OpenSlide | None) -> None:
    if tiff is not None:
        tiff.close()
    if osr is not None:
        osr.close()
