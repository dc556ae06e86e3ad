"""Lazy dask levels of a slide: an array-like per file level, and 2 × 2-averaged coarser levels."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import dask.array as da
import numpy as np

__all__ = ["CHUNK_TARGET", "LevelArray", "Reader", "aligned_chunk", "coarsen"]

#: chunk edge: large, so dask's ~0.5 ms per task is noise; reads stay exact thanks to slice fusion
CHUNK_TARGET = 2048

Reader = Callable[[int, int, int, int], np.ndarray]


class LevelArray:
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
        spans: list[tuple[int, int]] = []
        rest: list[Any] = []
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


def aligned_chunk(unit: int, size: int) -> int:
    """The multiple of the stored tile size closest to :data:`CHUNK_TARGET`, within the level."""
    return min(max(unit, round(CHUNK_TARGET / unit) * unit), max(size, 1))


def _halve_block(block: np.ndarray) -> np.ndarray:
    h, w = block.shape[0] // 2 * 2, block.shape[1] // 2 * 2
    pooled = block[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3), dtype=np.float32)
    return (pooled + 0.5).astype(np.uint8)


def coarsen(level: da.Array) -> da.Array:
    """Lazily average 2 × 2 pixels (only chunks napari asks for are ever read)."""
    h, w = level.shape[0] // 2 * 2, level.shape[1] // 2 * 2
    level = level[:h, :w]
    if any(c % 2 for axis in level.chunks[:2] for c in axis):
        level = level.rechunk({0: CHUNK_TARGET, 1: CHUNK_TARGET})
    chunks = tuple(tuple(c // 2 for c in axis) for axis in level.chunks[:2]) + (level.chunks[2],)
    return da.map_blocks(_halve_block, level, chunks=chunks, dtype=np.uint8)
