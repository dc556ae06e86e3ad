"""Direct tile access to TIFF-family pyramids (tifffile + imagecodecs).

OpenSlide's ``read_region`` decodes one region at a time behind a global cache; for the tiled
TIFF family (Aperio SVS, generic pyramidal TIFF) reading the raw segments with ``os.pread`` and
decoding them with imagecodecs gives the same pixels at a fraction of the cost (see
``benchmarks/bench_reader.py``). ``pread`` does not move a shared file offset, so one descriptor
serves every dask thread without a lock.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import imagecodecs
import numpy as np
import tifffile

# Codecs whose decoded pixels match OpenSlide's (JPEG via libjpeg-turbo, lossless codecs).
# Aperio's JPEG 2000 variants (33003/33005) use colour transforms OpenSlide handles itself.
FAST_COMPRESSIONS = {1, 5, 7, 8, 32946, 50000}

WHITE = 255

#: where in a 64-byte line a JPEG segment buffer starts: libjpeg-turbo writes a 256-px RGB tile
#: into a buffer at a multiple of 32 bytes ~1.4× slower than one at 16 (measured; NumPy aligns to 64)
DECODE_OFFSET = 16


def segment_buffer(shape: tuple[int, ...]) -> np.ndarray:
    """An uninitialised uint8 array of ``shape`` starting :data:`DECODE_OFFSET` bytes into a 64-byte line."""
    n = int(np.prod(shape))
    raw = np.empty(n + 64, np.uint8)
    start = (DECODE_OFFSET - raw.ctypes.data) % 64
    return raw[start : start + n].reshape(shape)


@dataclass(frozen=True)
class SegmentLayout:
    """Geometry of a page's tiles or strips."""

    height: int
    width: int
    seg_height: int
    seg_width: int

    @property
    def rows(self) -> int:
        """Segments down the page."""
        return -(-self.height // self.seg_height)

    @property
    def cols(self) -> int:
        """Segments across the page."""
        return -(-self.width // self.seg_width)


class TiffLevel:
    """One resolution level stored as a single TIFF page (tiled or stripped).

    Parameters
    ----------
    path
        The TIFF file.
    page
        The tifffile page of this level.
    fd
        An open read-only descriptor of ``path``, shared by all levels of the file.
    """

    def __init__(self, path: Path, page: tifffile.TiffPage, fd: int) -> None:
        self.path = path
        self._fd = fd
        self._decode = page.decode
        self._jpegtables = page.jpegtables
        self.samples = int(page.samplesperpixel)
        h, w = int(page.imagelength), int(page.imagewidth)
        if page.is_tiled:
            self.layout = SegmentLayout(h, w, int(page.tilelength), int(page.tilewidth))
        else:
            rows_per_strip = min(int(page.rowsperstrip or h), h)
            self.layout = SegmentLayout(h, w, rows_per_strip, w)
        self.offsets = np.asarray(page.dataoffsets, dtype=np.int64)
        self.bytecounts = np.asarray(page.databytecounts, dtype=np.int64)
        self.tiled = bool(page.is_tiled)
        self._count_lock = threading.Lock()
        self._decodes = 0
        self._jpeg_into = _jpeg_colorspaces(page) if self.tiled else None
        #: decoded segments kept for batch reads (a batch_read.SegmentCache, made on first use)
        self.segment_cache: object | None = None

    @property
    def decodes(self) -> int:
        """Stored segments decoded so far (every path: views, tiles, thumbnails); a real counter."""
        return self._decodes

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) in pixels."""
        return self.layout.height, self.layout.width

    @property
    def chunk_unit(self) -> tuple[int, int]:
        """Size of one stored segment (tile or strip), the unit chunks must align to."""
        return self.layout.seg_height, self.layout.seg_width

    def data_end(self) -> int:
        """Largest byte offset any segment of this level reaches."""
        if self.offsets.size == 0:
            return 0
        return int((self.offsets + self.bytecounts).max())

    def _segment(self, row: int, col: int) -> np.ndarray | None:
        return self.decode_segment(row * self.layout.cols + col)

    @property
    def jpegtables(self) -> bytes | None:
        """The page's JPEGTables (shared quantisation/Huffman tables), if any."""
        return self._jpegtables

    @property
    def jpeg_colorspaces(self) -> tuple[int | None, int] | None:
        """(JPEG, output) colour spaces of an 8-bit 3-sample tiled JPEG level, else ``None``."""
        return self._jpeg_into

    def count_decodes(self, n: int) -> None:
        """Add ``n`` segments decoded elsewhere (a batch decoder) to :attr:`decodes`."""
        with self._count_lock:
            self._decodes += n

    def read_segment_bytes(self, index: int) -> bytes | None:
        """The stored bytes of segment ``index``; ``None`` for a segment the file does not have."""
        count = int(self.bytecounts[index])
        if count == 0:
            return None  # a sparse file: the scanner skipped this tile, show it as background
        data = os.pread(self._fd, count, int(self.offsets[index]))
        if len(data) != count:
            raise OSError(f"{self.path}: segment {index} is cut short (the file is truncated)")
        return data

    def decode_segment(self, index: int, out: np.ndarray | None = None) -> np.ndarray | None:
        """Stored segment ``index`` (row-major) decoded, (length, width, samples); ``None`` if absent.

        ``out``, a (tile length, tile width, 3) uint8 array, receives the pixels of an RGB JPEG
        tile (no fresh memory per decode; :func:`segment_buffer` makes one libjpeg-turbo fills
        fastest, and is used when there is none); other segments ignore it.
        """
        data = self.read_segment_bytes(index)
        if data is None:
            return None
        if out is None and self._jpeg_into is not None:
            out = segment_buffer((*self.chunk_unit, 3))
        if out is not None and self._jpeg_into is not None and out.shape == (*self.chunk_unit, 3):
            # the call tifffile's decode makes, into a buffer the caller recycles
            colorspace, outcolorspace = self._jpeg_into
            pixels = imagecodecs.jpeg_decode(data, tables=self._jpegtables, colorspace=colorspace,
                                             outcolorspace=outcolorspace, shape=self.chunk_unit,
                                             bitspersample=8, out=out)  # fmt: skip
            if pixels is not out:  # the contract callers recycle buffers by: the pixels are in `out`
                out[...] = pixels.reshape(out.shape)
                pixels = out
        else:  # any codec tifffile + imagecodecs decode (LZW, JPEG 2000, JPEG XL, WebP, zstd, ...)
            decoded = np.asarray(self._decode(data, index, jpegtables=self._jpegtables)[0])
            # tifffile returns (separate sample, depth, length, width, samples); keep (length, width, s)
            pixels = decoded.reshape(decoded.shape[-3:])
        self.count_decodes(1)
        return pixels

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Pixels ``[y0:y1, x0:x1]`` as RGB uint8, composited on white, clipped to the level."""
        lay = self.layout
        out = np.full((y1 - y0, x1 - x0, 3), WHITE, dtype=np.uint8)
        cy0, cy1 = max(y0, 0), min(y1, lay.height)
        cx0, cx1 = max(x0, 0), min(x1, lay.width)
        if cy0 >= cy1 or cx0 >= cx1:
            return out
        for row in range(cy0 // lay.seg_height, (cy1 - 1) // lay.seg_height + 1):
            sy = row * lay.seg_height
            for col in range(cx0 // lay.seg_width, (cx1 - 1) // lay.seg_width + 1):
                sx = col * lay.seg_width
                seg = self._segment(row, col)
                if seg is None:
                    continue
                # intersection of the segment with the request, in image coordinates
                iy0, iy1 = max(sy, cy0), min(sy + seg.shape[0], cy1)
                ix0, ix1 = max(sx, cx0), min(sx + seg.shape[1], cx1)
                if iy0 >= iy1 or ix0 >= ix1:
                    continue
                patch = seg[iy0 - sy : iy1 - sy, ix0 - sx : ix1 - sx]
                out[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0] = to_rgb(patch)
        return out


def _jpeg_colorspaces(page: tifffile.TiffPage) -> tuple[int | None, int] | None:
    """(colorspace, outcolorspace) tifffile decodes an 8-bit 3-sample JPEG page with, else None."""
    if int(page.compression) != 7 or int(page.samplesperpixel) != 3 or int(page.bitspersample) != 8:
        return None
    if page.extrasamples or int(page.planarconfig) != 1:
        return None
    photometric = int(page.photometric)
    if photometric == 6:  # YCbCr → RGB
        return None, 2
    if photometric == 2:  # RGB; without a JFIF marker (Aperio) the data is RGB, not YCbCr
        return (None if page.is_jfif else 2), 2
    return None


def to_rgb(pixels: np.ndarray) -> np.ndarray:
    """Grey, RGB or RGBA uint8 pixels → RGB, alpha composited on white."""
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    channels = pixels.shape[-1]
    if channels == 3:
        return pixels
    if channels == 1:
        return np.repeat(pixels, 3, axis=-1)
    if channels == 4:
        return composite_on_white(pixels)
    return pixels[..., :3]


def composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """Blend straight (non-premultiplied) RGBA over a white background."""
    alpha = rgba[..., 3:4].astype(np.uint16)
    if alpha.min() == 255:
        return np.ascontiguousarray(rgba[..., :3])
    rgb = rgba[..., :3].astype(np.uint16)
    blended = (rgb * alpha + WHITE * (255 - alpha) + 127) // 255
    return blended.astype(np.uint8)


class TiffPyramid:
    """The tifffile side of a slide: an open descriptor and one :class:`TiffLevel` per level."""

    def __init__(self, path: Path, pages: list[tifffile.TiffPage]) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDONLY)
        self._closed = threading.Event()
        self.levels = [TiffLevel(path, page, self._fd) for page in pages]
        #: µm/px the file records (OME-XML or resolution tags), set by the opener; None if unknown
        self.mpp: float | None = None
        #: what the file is, for :attr:`Slide.vendor` when OpenSlide is not involved
        self.vendor = "tiff"

    def close(self) -> None:
        """Close the descriptor (idempotent)."""
        if not self._closed.is_set():
            self._closed.set()
            os.close(self._fd)
            for level in self.levels:
                level.segment_cache = None  # decoded pixels go with the file


def page_supported(page: tifffile.TiffPage) -> bool:
    """Whether this package decodes the page itself with the same pixels OpenSlide gives."""
    return (
        page.dtype == np.uint8
        and int(page.samplesperpixel) in (1, 3, 4)
        and int(page.planarconfig) == 1
        and int(page.compression) in FAST_COMPRESSIONS
        and (int(page.photometric) != 6 or int(page.compression) == 7)  # YCbCr only inside JPEG
        and int(page.imagedepth) == 1
    )


def pyramid_pages(tif: tifffile.TiffFile) -> list[tifffile.TiffPage]:
    """The main image pages of a TIFF, largest first (separate pages or SubIFDs)."""
    series = tif.series[0]
    return [lvl.keyframe for lvl in series.levels]


def match_levels(
    tif: tifffile.TiffFile, dimensions: list[tuple[int, int]]
) -> list[tifffile.TiffPage] | None:
    """Find, for each ``(width, height)``, a decodable page of exactly that size, else ``None``."""
    found: list[tifffile.TiffPage] = []
    pages = [p for p in tif.pages if isinstance(p, tifffile.TiffPage)]
    for width, height in dimensions:
        match = next(
            (
                p
                for p in pages
                if p.is_tiled
                and int(p.imagewidth) == width
                and int(p.imagelength) == height
                and page_supported(p)
            ),
            None,
        )
        if match is None:
            return None
        found.append(match)
    return found


def mpp_from_resolution(page: tifffile.TiffPage) -> float | None:
    """µm/px from the TIFF resolution tags, when the unit is a physical one."""
    unit = page.tags.valueof("ResolutionUnit")
    xres = page.tags.valueof("XResolution")
    if unit is None or xres is None:
        return None
    num, den = xres if isinstance(xres, tuple) else (xres, 1)
    if not num or not den:
        return None
    per_unit = num / den  # pixels per unit
    unit = int(unit)
    if unit == 3:  # centimetre
        return 1e4 / per_unit
    if unit == 2:  # inch: only trusted when it is clearly a microscope resolution, not 72 dpi
        mpp = 25400 / per_unit
        return mpp if mpp < 50 else None
    return None
