"""Open a whole-slide image and expose its pyramid as lazy dask arrays with a physical scale.

>>> with Slide("sample_data/cmu_small_region.svs") as slide:
...     slide.mpp, slide.dimensions, [lvl.shape for lvl in slide.levels]
(0.499, (2220, 2967), [(2967, 2220, 3), (1483, 1110, 3), (741, 555, 3)])

Every format OpenSlide reads opens through OpenSlide. For the tiled TIFF family (Aperio SVS,
generic pyramidal TIFF) pixels are decoded directly with tifffile/imagecodecs, which gives the
same pixels faster; TIFFs OpenSlide refuses (stripped or single-level) open through tifffile alone.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import warnings
import weakref
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import dask.array as da
import numpy as np
import openslide
import tifffile

from napari_virchow.errors import SlideError
from napari_virchow.slides.tiff import (
    TiffPyramid,
    composite_on_white,
    match_levels,
    mpp_from_resolution,
    page_supported,
    pyramid_pages,
)

__all__ = ["SLIDE_SUFFIXES", "Slide", "SlideError"]

log = logging.getLogger(__name__)

SLIDE_SUFFIXES = (
    ".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide",
)  # fmt: skip

#: vendors whose levels are plain tiled TIFF pages, decodable without OpenSlide's quirks
TIFF_VENDORS = {"aperio", "generic-tiff"}
#: chunk edge: large, so dask's ~0.5 ms per task is noise; reads stay exact thanks to slice fusion
CHUNK_TARGET = 2048
#: add lazily coarsened levels until the smallest level fits in this many pixels per side
COARSEST_SIDE = 1024

Backend = Literal["auto", "openslide", "tifffile"]
Reader = Callable[[int, int, int, int], np.ndarray]


class _LevelArray:
    """Array-like over one level for :func:`dask.array.from_array` (reads only what is asked)."""

    def __init__(self, shape: tuple[int, int], read: Reader) -> None:
        self.shape = (shape[0], shape[1], 3)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 3
        self._read = read

    def __getitem__(self, key: Any) -> np.ndarray:
        # dask fuses napari's view slice into this call (from_array(fancy=True)), so only the
        # stored tiles under the view are decoded, however large the chunks are
        key = key if isinstance(key, tuple) else (key,)
        key = key + (slice(None),) * (3 - len(key))
        spans, rest = [], []
        for axis, k in enumerate(key[:2]):
            if isinstance(k, slice):
                start, stop, step = k.indices(self.shape[axis])
                spans.append((start, max(stop, start)))
                rest.append(slice(None, None, step))
            else:  # an integer or fancy index: read the span it touches, then index it
                idx = np.asarray(k)
                idx = np.where(idx < 0, idx + self.shape[axis], idx)
                lo = int(idx.min()) if idx.size else 0
                spans.append((lo, int(idx.max()) + 1 if idx.size else 0))
                rest.append(idx - lo)
        (y0, y1), (x0, x1) = spans
        block = self._read(y0, y1, x0, x1)[:, :, key[2]]
        return block[:, rest[1]][rest[0]]  # columns first: an integer row index drops axis 0


def _aligned_chunk(unit: int, size: int) -> int:
    """The multiple of the stored tile size closest to :data:`CHUNK_TARGET`, within the level."""
    return min(max(unit, round(CHUNK_TARGET / unit) * unit), max(size, 1))


def _halve_block(block: np.ndarray) -> np.ndarray:
    h, w = block.shape[0] // 2 * 2, block.shape[1] // 2 * 2
    pooled = block[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3), dtype=np.float32)
    return (pooled + 0.5).astype(np.uint8)


def _coarsen(level: da.Array) -> da.Array:
    """Lazily average 2 × 2 pixels (only chunks napari asks for are ever read)."""
    h, w = level.shape[0] // 2 * 2, level.shape[1] // 2 * 2
    level = level[:h, :w]
    if any(c % 2 for axis in level.chunks[:2] for c in axis):
        level = level.rechunk({0: CHUNK_TARGET, 1: CHUNK_TARGET})
    chunks = tuple(tuple(c // 2 for c in axis) for axis in level.chunks[:2]) + (level.chunks[2],)
    return level.map_blocks(_halve_block, chunks=chunks, dtype=np.uint8)


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
        self.path = Path(path)
        _check_file(self.path)
        if mpp is not None and not (np.isfinite(mpp) and mpp > 0):
            raise SlideError(f"{self.path.name}: mpp override must be a positive number, got {mpp!r}")
        self._osr: openslide.OpenSlide | None = None
        self._tiff: TiffPyramid | None = None
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
        self.mpp_source: str | None = "override" if mpp is not None else ("file" if file_mpp else None)
        self.mpp: float | None = float(mpp) if mpp is not None else file_mpp
        if mpp is not None:
            log.info("%s: using µm/px override %.4g (file says %s)", self.path.name, mpp, file_mpp)

    # --- opening -------------------------------------------------------------------------
    def _open(self, backend: Backend) -> None:
        name = self.path.name
        fmt = None
        if backend != "tifffile":
            try:
                fmt = openslide.OpenSlide.detect_format(str(self.path))
            except openslide.OpenSlideError as exc:  # pragma: no cover - detect rarely raises
                raise SlideError(f"{name}: OpenSlide cannot inspect the file ({exc})") from exc
        if fmt is not None:
            try:
                self._osr = openslide.OpenSlide(str(self.path))
            except (openslide.OpenSlideError, OSError) as exc:
                raise SlideError(
                    f"{name}: OpenSlide recognised a {fmt} slide but could not read it ({exc}). "
                    "The file is probably truncated or corrupt: copy it again from the scanner."
                ) from exc
            vendor = self._osr.properties.get(openslide.PROPERTY_NAME_VENDOR, fmt)
            if backend == "auto" and vendor in TIFF_VENDORS:
                self._tiff = self._try_tiff_fast_path()
        elif backend == "openslide":
            raise SlideError(f"{name}: OpenSlide does not recognise this file.")
        elif self.path.suffix.lower() not in (".tif", ".tiff"):
            # a vendor file (.svs, .ndpi, ...) OpenSlide cannot parse is broken, not a plain TIFF
            raise SlideError(_diagnose(self.path))
        else:
            self._tiff = self._open_plain_tiff()
        self._check_complete()

    def _try_tiff_fast_path(self) -> TiffPyramid | None:
        assert self._osr is not None
        try:
            with tifffile.TiffFile(self.path) as tif:
                pages = match_levels(tif, list(self._osr.level_dimensions))
                return TiffPyramid(self.path, pages) if pages else None
        except (tifffile.TiffFileError, ValueError, OSError) as exc:
            log.debug("%s: tifffile fast path unavailable (%s); using OpenSlide", self.path.name, exc)
            return None

    def _open_plain_tiff(self) -> TiffPyramid:
        name = self.path.name
        try:
            with _tifffile_problems() as problems, tifffile.TiffFile(self.path) as tif:
                tif.pages.useframes = False
                len(tif.pages)  # walks every IFD: a cut-off chain shows up as a logged problem
                if problems:
                    raise SlideError(
                        f"{name} is truncated or corrupt ({problems[0]}). Copy the slide again."
                    )
                pages = pyramid_pages(tif)
                if not all(page_supported(p) for p in pages):
                    p = pages[0]
                    raise SlideError(
                        f"{name}: a TIFF with {p.dtype} pixels, {p.samplesperpixel} samples and "
                        f"compression {p.compression!s} is not a brightfield RGB slide this plugin "
                        "can read; convert it to an 8-bit RGB pyramidal TIFF."
                    )
                return TiffPyramid(self.path, pages)
        except (tifffile.TiffFileError, ValueError, IndexError, KeyError) as exc:
            raise SlideError(
                f"{name} is not a whole-slide image OpenSlide or tifffile can read ({exc}). "
                f"Supported: {', '.join(SLIDE_SUFFIXES)}; other formats can be converted to a "
                "pyramidal TIFF (e.g. `vips tiffsave IN OUT.tif --tile --pyramid --compression jpeg`)."
            ) from exc

    def _check_complete(self) -> None:
        """Fail at open, not mid-analysis, when the file is cut short."""
        name = self.path.name
        if self._tiff is not None:
            size = self.path.stat().st_size
            end = max(level.data_end() for level in self._tiff.levels)
            if end > size:
                raise SlideError(
                    f"{name} is truncated: its tiles reach byte {end:,} but the file has "
                    f"{size:,}. Copy the slide again (the transfer was incomplete)."
                )
            return
        assert self._osr is not None
        try:  # reading the last tile of the first and last level touches the far end of the data
            for level in (0, self._osr.level_count - 1):
                w, h = self._osr.level_dimensions[level]
                ds = self._osr.level_downsamples[level]
                x, y = max(w - 256, 0), max(h - 256, 0)
                self._osr.read_region((int(x * ds), int(y * ds)), level, (min(w, 256), min(h, 256)))
        except openslide.OpenSlideError as exc:
            raise SlideError(
                f"{name}: reading tiles failed ({exc}); the file is probably truncated or corrupt. "
                "Copy it again from the scanner."
            ) from exc

    def _file_mpp(self) -> float | None:
        if self._osr is not None:
            value = self._osr.properties.get(openslide.PROPERTY_NAME_MPP_X)
            try:
                mpp = float(value) if value is not None else None
            except ValueError:
                mpp = None
            if mpp and mpp > 0:
                return mpp
        if self._tiff is not None:
            with tifffile.TiffFile(self.path) as tif:
                return mpp_from_resolution(tif.pages[0])
        return None

    # --- metadata ------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        """``"tifffile"`` when pixels are decoded directly, else ``"openslide"``."""
        return "tifffile" if self._tiff is not None else "openslide"

    @cached_property
    def properties(self) -> dict[str, str]:
        """Vendor metadata (OpenSlide's property map, or the TIFF description)."""
        if self._osr is not None:
            return dict(self._osr.properties)
        with tifffile.TiffFile(self.path) as tif:
            desc = tif.pages[0].description or ""
        return {"tiff.ImageDescription": desc}

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
        if self._tiff is not None:
            return tuple((lvl.shape[1], lvl.shape[0]) for lvl in self._tiff.levels)
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
        """Downsample of every level in :attr:`levels` relative to level 0."""
        w0 = self.dimensions[0]
        if self._osr is not None and self._tiff is None:
            native = tuple(float(d) for d in self._osr.level_downsamples)
        else:
            native = tuple(w0 / w for w, _ in self.file_level_dimensions)
        extra = tuple(w0 / w for w, _ in self.level_dimensions[len(native):])
        return native + extra

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
        """A cheap content hash (OpenSlide quickhash, or file head/tail bytes) for cache keys."""
        h = hashlib.blake2b(digest_size=16)
        quick = self.properties.get("openslide.quickhash-1")
        if quick:
            h.update(quick.encode())
        else:
            size = self.path.stat().st_size
            h.update(str(size).encode())
            with open(self.path, "rb") as f:
                h.update(f.read(1 << 20))
                f.seek(max(size - (1 << 20), 0))
                h.update(f.read(1 << 20))
        h.update(repr(self.file_level_dimensions).encode())
        return h.hexdigest()

    # --- pixels --------------------------------------------------------------------------
    def _level_reader(self, level: int) -> tuple[Reader, tuple[int, int]]:
        """Reader of file level ``level`` and the stored tile size its chunks align to."""
        if self._tiff is not None:
            lvl = self._tiff.levels[level]
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
            chunks = (_aligned_chunk(uh, h), _aligned_chunk(uw, w), 3)
            arrays.append(
                da.from_array(
                    _LevelArray((h, w), read), chunks=chunks, name=f"slide-{self.fingerprint}-{level}",
                    asarray=False, fancy=True, lock=False, meta=np.empty((0, 0, 0), np.uint8),
                )
            )  # fmt: skip
        while max(arrays[-1].shape[:2]) > COARSEST_SIDE and min(arrays[-1].shape[:2]) >= 2:
            arrays.append(_coarsen(arrays[-1]))
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
        """
        if not 0 <= level < len(self.levels):
            raise SlideError(f"{self.path.name}: level {level} does not exist (0–{len(self.levels) - 1})")
        ds = self.level_downsamples[level]
        x0, y0 = int(location[0] // ds), int(location[1] // ds)
        w, h = int(size[0]), int(size[1])
        if level < len(self.file_level_dimensions):
            return self._level_reader(level)[0](y0, y0 + h, x0, x0 + w)
        arr = self.levels[level]
        out = np.full((h, w, 3), 255, np.uint8)
        cy0, cy1 = max(y0, 0), min(y0 + h, arr.shape[0])
        cx0, cx1 = max(x0, 0), min(x0 + w, arr.shape[1])
        if cy0 < cy1 and cx0 < cx1:
            out[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] = arr[cy0:cy1, cx0:cx1].compute(scheduler="threads")
        return out

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


class _ProblemLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        # drop tifffile's "<tifffile.TiffPages @8>" prefix: users need the problem, not the object
        self.messages.append(re.sub(r"<[^>]*>\s*", "", record.getMessage()))


class _tifffile_problems:
    """Collect what tifffile logs (it logs, rather than raises, on broken IFD chains)."""

    def __enter__(self) -> list[str]:
        self._handler = _ProblemLog()
        self._logger = logging.getLogger("tifffile")
        self._logger.addHandler(self._handler)
        self._propagate, self._logger.propagate = self._logger.propagate, False
        return self._handler.messages

    def __exit__(self, *exc: object) -> None:
        self._logger.removeHandler(self._handler)
        self._logger.propagate = self._propagate


def _diagnose(path: Path) -> str:
    """Why OpenSlide refused a vendor-format file, in one sentence with the fix."""
    name, suffix = path.name, path.suffix.lower()
    if suffix not in SLIDE_SUFFIXES:
        # a .png, .jpg, .czi ... OpenSlide did not recognise: not damaged, just not a slide format
        kind = f"a {suffix} file" if suffix else "a file without a suffix"
        return (
            f"{name} is {kind}, not a whole-slide format this plugin reads (supported: "
            f"{', '.join(SLIDE_SUFFIXES)}). Convert it to a pyramidal TIFF "
            "(e.g. `vips tiffsave IN OUT.tif --tile --pyramid --compression jpeg`)."
        )
    try:
        with _tifffile_problems() as problems, tifffile.TiffFile(path) as tif:
            len(tif.pages)
    except (tifffile.TiffFileError, ValueError, OSError) as exc:
        if "not a TIFF" in str(exc) and suffix in (".svs", ".ndpi", ".scn", ".bif", ".svslide"):
            with open(path, "rb") as f:
                head = f.read(8)
            return (
                f"{name} is not a slide: a {suffix} file is a TIFF, but this one starts with "
                f"{head!r}. Check that you picked the right file."
            )
        problems = [str(exc)]
    detail = f" ({problems[0]})" if problems else ""
    return (
        f"OpenSlide cannot read {name}{detail}: the file is truncated, corrupt, or not a "
        f"{suffix} slide. Copy it again from the scanner, or convert it to a pyramidal TIFF."
    )


def _release(tiff: TiffPyramid | None, osr: openslide.OpenSlide | None) -> None:
    if tiff is not None:
        tiff.close()
    if osr is not None:
        osr.close()


def _check_file(path: Path) -> None:
    """Refuse what cannot be a slide before any library sees it, with a message that helps."""
    name = path.name or str(path)
    if not path.exists():
        raise SlideError(f"{path}: no such file. Check the path (and that the drive is mounted).")
    if path.is_dir():
        raise SlideError(
            f"{name} is a folder, not a slide file. Open the slide file itself "
            "(for MIRAX, the .mrxs file that sits next to this folder)."
        )
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except PermissionError as exc:
        raise SlideError(
            f"{name}: permission denied reading the file. Ask for read access or copy it somewhere you own."
        ) from exc
    except OSError as exc:
        raise SlideError(f"{name}: cannot be read ({exc.strerror}).") from exc
    if not head:
        raise SlideError(f"{name} is empty (0 bytes): the copy is incomplete. Copy the slide again.")


def warn_missing_mpp(slide: Slide) -> None:
    """Warn (once per open) that analysis needs an µm/px override for this slide."""
    if slide.mpp is None:
        warnings.warn(
            f"{slide.path.name} has no µm/px in its metadata: it is shown at scale 1 (pixels), and "
            "analysis needs an override (µm/px field in the widget, or --mpp-override).",
            UserWarning,
            stacklevel=2,
        )
