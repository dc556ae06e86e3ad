"""Read many same-sized regions of one pyramid level, decoding each stored tile once.

A 224-px tile on a 256-px stored grid overlaps up to four stored tiles, and its neighbours
overlap the same ones: reading tiles one at a time decodes every stored tile up to four times
(nine at 40×, where a tile reads 448 px). :func:`read_regions` reads a batch as the union of the
stored tiles it covers instead, each decoded once, and slices the regions out of them.

Decoded stored tiles are kept in a :class:`SegmentCache` per file level (bounded by bytes, least
recently used out), shared by every batch and reader thread: the next batch of a row-major or
centre-out run reuses the stored tiles on its border instead of decoding them again, and two
threads that need the same stored tile at once decode it once (the second waits). The cache
holds about one band of stored tiles across the level (at most :data:`CACHE_MAX_BYTES`), so the
memory of a union is bounded whatever the batch: regions are assembled in row-major order and a
band that no longer fits is dropped, never held.

Pixels are those of :meth:`TiffLevel.read <napari_virchow.slides.tiff.TiffLevel.read>`
(the same segments, the same conversion to RGB on white); other backends read per region.
"""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import openslide

from napari_virchow.errors import SlideError
from napari_virchow.slides.jpeg_batch import TorchJpegDecoder, decoder_for
from napari_virchow.slides.region import level_origin
from napari_virchow.slides.tiff import WHITE, SegmentLayout, TiffLevel, to_rgb

if TYPE_CHECKING:
    from napari_virchow.slides.slide import Slide

__all__ = ["CACHE_MAX_BYTES", "SegmentCache", "read_regions"]

#: the most decoded pixels one level's cache holds (a band of 40× stored tiles across a 100k-px slide)
CACHE_MAX_BYTES = 192 * 2**20
#: rows of stored tiles a cache is sized for: what concurrent readers working on nearby rows of
#: tiles (up to 1024 px of the level tall) share, plus one
BAND_PX = 1024
#: evicted buffers kept for the next decodes
SPARE_SEGMENTS = 8


class SegmentCache:
    """Decoded stored tiles (segments) of one :class:`TiffLevel`, RGB, least recently used out.

    Parameters
    ----------
    level
        The level whose segments are decoded.
    capacity
        Bytes of decoded pixels kept; default: the segments across the level in a band
        :data:`BAND_PX` tall (plus one row), at most :data:`CACHE_MAX_BYTES`.
    """

    def __init__(self, level: TiffLevel, capacity: int | None = None) -> None:
        lay = level.layout
        seg_bytes = lay.seg_height * lay.seg_width * 3
        if capacity is None:
            band_rows = -(-BAND_PX // lay.seg_height) + 1
            capacity = min(CACHE_MAX_BYTES, band_rows * lay.cols * seg_bytes)
        self.level = level
        self.capacity = max(int(capacity), seg_bytes)
        self._lock = threading.Lock()
        self._items: OrderedDict[int, np.ndarray | None] = OrderedDict()
        self._pending: dict[int, threading.Event] = {}
        self._bytes = 0
        # evicted segment buffers decoded into again: fresh memory per decode costs page faults
        self._spare: list[np.ndarray] = []
        self._shape = (lay.seg_height, lay.seg_width, 3)
        #: whether a batch decoder's pixels matched imagecodecs' on this level (None: not tried)
        self.decoder_ok: bool | None = None

    def get(self, index: int) -> np.ndarray | None:
        """Segment ``index`` as (h, w, 3) uint8 RGB on white, ``None`` where the file has none."""
        while True:
            with self._lock:
                if index in self._items:
                    self._items.move_to_end(index)
                    return self._items[index]
                waiting = self._pending.get(index)
                if waiting is None:
                    self._pending[index] = threading.Event()
                    break
            waiting.wait()  # another thread decodes it; if that failed, try ourselves
        with self._lock:
            spare = self._spare.pop() if self._spare else None
        try:
            seg = self.level.decode_segment(index, out=spare)
            rgb = None if seg is None else np.ascontiguousarray(to_rgb(seg))
        except BaseException:
            self._release([index])
            raise
        with self._lock:
            if spare is not None and rgb is not spare:
                self._spare.append(spare)  # not used (a sparse tile): keep it for the next decode
            self._insert(index, rgb)
        return rgb

    def prefetch(self, indices: Sequence[int], decoder: TorchJpegDecoder) -> None:
        """Decode the segments of ``indices`` not held yet in one ``decoder`` batch."""
        with self._lock:
            todo = [i for i in dict.fromkeys(int(i) for i in indices)
                    if i not in self._items and i not in self._pending]  # fmt: skip
            for i in todo:
                self._pending[i] = threading.Event()
        if not todo:
            return
        try:
            pixels = decoder.decode(self.level, todo)
            first = next((k for k, p in enumerate(pixels) if p is not None), None)
            if self.decoder_ok is None and first is not None:
                sample = pixels[first]
                assert sample is not None  # `first` is the index of a decoded segment
                self.decoder_ok = decoder.verify(self.level, todo[first], sample)
        except BaseException:
            self._release(todo)
            raise
        if not self.decoder_ok:
            self._release(todo)  # get() decodes them with imagecodecs
            return
        with self._lock:
            for i, rgb in zip(todo, pixels, strict=True):
                self._insert(i, rgb)

    def _release(self, indices: Sequence[int]) -> None:
        with self._lock:
            for i in indices:
                self._pending.pop(i).set()

    def _insert(self, index: int, rgb: np.ndarray | None) -> None:
        # under self._lock
        self._items[index] = rgb
        self._bytes += 0 if rgb is None else rgb.nbytes
        while self._bytes > self.capacity and len(self._items) > 1:
            _, old = self._items.popitem(last=False)
            if old is None:
                continue
            self._bytes -= old.nbytes
            # Recycle the buffer only if nobody else holds it: popped, its references are `old`
            # and getrefcount's argument (a reader copying from it, or a view, adds one).
            if len(self._spare) < SPARE_SEGMENTS and old.shape == self._shape and sys.getrefcount(old) <= 2:
                self._spare.append(old)
        self._pending.pop(index).set()

    def clear(self) -> None:
        """Drop every decoded segment (memory back; the next reads decode again)."""
        with self._lock:
            self._items.clear()
            self._spare.clear()
            self._bytes = 0

    @property
    def nbytes(self) -> int:
        """Bytes of decoded pixels held now."""
        return self._bytes


_caches_lock = threading.Lock()


def segment_cache(level: TiffLevel) -> SegmentCache:
    """The shared cache of ``level`` (made on first use; dropped when the slide is closed)."""
    with _caches_lock:
        cache = level.segment_cache
        if not isinstance(cache, SegmentCache):
            cache = level.segment_cache = SegmentCache(level)
        return cache


def _segments_of(lay: SegmentLayout, x0: int, y0: int, height: int, width: int) -> list[int]:
    cy0, cy1 = max(y0, 0), min(y0 + height, lay.height)
    cx0, cx1 = max(x0, 0), min(x0 + width, lay.width)
    if cy0 >= cy1 or cx0 >= cx1:
        return []
    cols = range(cx0 // lay.seg_width, (cx1 - 1) // lay.seg_width + 1)
    return [r * lay.cols + c for r in range(cy0 // lay.seg_height, (cy1 - 1) // lay.seg_height + 1) for c in cols]


def _assemble(cache: SegmentCache, tile: np.ndarray, x0: int, y0: int) -> None:
    lay = cache.level.layout
    sh, sw = lay.seg_height, lay.seg_width
    height, width = tile.shape[:2]
    cy0, cy1 = max(y0, 0), min(y0 + height, lay.height)
    cx0, cx1 = max(x0, 0), min(x0 + width, lay.width)
    if (cy0, cy1, cx0, cx1) != (y0, y0 + height, x0, x0 + width):
        tile[:] = WHITE  # partly outside the level: background
    if cy0 >= cy1 or cx0 >= cx1:
        return
    for row in range(cy0 // sh, (cy1 - 1) // sh + 1):
        iy0, iy1 = max(row * sh, cy0), min(row * sh + sh, cy1)
        for col in range(cx0 // sw, (cx1 - 1) // sw + 1):
            ix0, ix1 = max(col * sw, cx0), min(col * sw + sw, cx1)
            seg = cache.get(row * lay.cols + col)
            dst = tile[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0]
            if seg is None:  # a sparse file: the scanner skipped this tile
                dst[:] = WHITE
            else:
                dst[:] = seg[iy0 - row * sh : iy1 - row * sh, ix0 - col * sw : ix1 - col * sw]


def read_level_boxes(cache: SegmentCache, origins: np.ndarray, height: int, width: int,
                     out: np.ndarray | None = None, decoder: TorchJpegDecoder | None = None) -> np.ndarray:  # fmt: skip
    """Regions ``[y:y+height, x:x+width]`` of the cache's level for each (x, y) of ``origins``.

    Returns (n, height, width, 3) uint8 (``out`` when given); outside the level and absent
    segments are white. With a ``decoder`` (and a level it supports), the stored tiles of each
    group of regions are decoded in one batch first, groups holding at most half the cache.
    """
    lay = cache.level.layout
    n = len(origins)
    if out is None:
        out = np.empty((n, height, width, 3), np.uint8)
    elif out.shape != (n, height, width, 3) or out.dtype != np.uint8:
        raise ValueError(f"out must be ({n}, {height}, {width}, 3) uint8, got {out.shape} {out.dtype}")
    # row-major: a band of segments is finished before the next one is decoded
    order = [int(k) for k in np.lexsort((origins[:, 0], origins[:, 1]))] if n > 1 else list(range(n))
    if decoder is None or cache.decoder_ok is False or not decoder.supports(cache.level):
        for k in order:
            _assemble(cache, out[k], int(origins[k, 0]), int(origins[k, 1]))
        return out
    budget = max(1, cache.capacity // (2 * lay.seg_height * lay.seg_width * 3))
    group: list[int] = []
    union: dict[int, None] = {}
    for pos, k in enumerate(order):
        group.append(k)
        union.update(dict.fromkeys(_segments_of(lay, int(origins[k, 0]), int(origins[k, 1]), height, width)))
        nxt = order[pos + 1] if pos + 1 < len(order) else None
        if nxt is None or len(union) >= budget:
            cache.prefetch(list(union), decoder)
            for j in group:
                _assemble(cache, out[j], int(origins[j, 0]), int(origins[j, 1]))
            group, union = [], {}
    return out


def read_regions(slide: Slide, locations: Sequence[tuple[int, int]] | np.ndarray, level: int,
                 size: tuple[int, int], *, out: np.ndarray | None = None,
                 decode_device: str | None = None, blend: bool = True) -> np.ndarray:  # fmt: skip
    """Many :meth:`Slide.read_region` calls as one batch: (n, height, width, 3) uint8.

    Parameters
    ----------
    slide
        An open slide.
    locations
        (x, y) top-left corners in level-0 px, as for :meth:`Slide.read_region`.
    level
        A level stored in the file (not a lazily coarsened one).
    size
        (width, height) in px of ``level``, the same for every region.
    out
        An (n, height, width, 3) uint8 array to fill (e.g. a reused scratch buffer).
    decode_device
        Decode JPEG stored tiles in batches (TorchCodec's ``decode_jpeg``) on this torch
        device (``"cuda"``; ``"cpu"`` runs the same API on the CPU); default imagecodecs.
    blend
        ``False`` reads every region on the batch path from the nearest level pixel, even where
        OpenSlide would blend between level pixels: at most half a level pixel off (≤ 1 µm at 5×
        on a /4.0003 level) and about 12× faster there. The tile lattice reads this way
        (:meth:`TileGrid.read_tiles`, whose tiles are resampled anyway); ``True`` (default) gives
        OpenSlide's pixels.

    With ``blend=True``, pixel-identical to one ``slide.read_region(loc, level, size)`` per location, at every level
    and position. Where the level coordinate is whole (level 0, exact downsamples) the regions of
    TIFF-family slides read directly come from one batch that decodes each stored tile under it
    once (and reused by the next batch while it stays in the level's :class:`SegmentCache`).
    Where OpenSlide would sample between level pixels (a fractional level coordinate: non-integer
    downsamples), the region is read by :meth:`Slide.read_region` itself, which blends as
    OpenSlide does (the nearest level pixel when the slide has no OpenSlide handle, as there).
    Other slides are read region by region through OpenSlide, whose own tile cache serves shared tiles.
    """
    locs = np.asarray(locations, dtype=np.int64).reshape(-1, 2)
    w, h = int(size[0]), int(size[1])
    tiff = slide._tiff
    if tiff is None or not 0 <= level < len(tiff.levels):
        out = np.empty((len(locs), h, w, 3), np.uint8) if out is None else out
        for k, (x, y) in enumerate(locs):
            out[k] = slide.read_region((int(x), int(y)), level, (w, h))
        return out
    if slide._closed:
        raise SlideError(f"{slide.path.name} was closed; open the slide again to read pixels.")
    ds = slide.level_downsamples[level]
    # OpenSlide's level coordinates (Slide.read_region); None between level pixels
    exact = [(level_origin(int(x), ds), level_origin(int(y), ds)) for x, y in locs]
    between = [k for k, (ox, oy) in enumerate(exact) if ox is None or oy is None]
    blended = between if blend and slide._osr is not None else []
    if out is None:
        out = np.empty((len(locs), h, w, 3), np.uint8)
    for k in blended:  # OpenSlide's sub-pixel blend, through the one read_region that does it
        out[k] = slide.read_region((int(locs[k, 0]), int(locs[k, 1])), level, (w, h))
    direct = np.setdiff1d(np.arange(len(locs)), blended) if blended else None
    pairs = zip(exact, locs, strict=True)
    origins = np.array([(_nearest(ox, x, ds), _nearest(oy, y, ds)) for (ox, oy), (x, y) in pairs], np.int64)
    origins = origins.reshape(-1, 2)
    try:
        decoder = decoder_for(decode_device) if decode_device is not None else None
        cache = segment_cache(tiff.levels[level])
        if direct is None:
            return read_level_boxes(cache, origins, h, w, out, decoder)
        if len(direct):
            out[direct] = read_level_boxes(cache, origins[direct], h, w, None, decoder)
        return out
    except (openslide.OpenSlideError, OSError, ValueError, RuntimeError) as exc:
        raise SlideError(f"{slide.path.name}: reading pixels failed ({exc}); the file may be corrupt.") from exc


def _nearest(origin: int | None, position: int, downsample: float) -> int:
    """The level pixel at ``origin``, or between level pixels the nearest one (as read_region without OpenSlide)."""
    return round(int(position) / downsample) if origin is None else origin
