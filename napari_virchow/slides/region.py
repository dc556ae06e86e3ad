"""OpenSlide's level coordinate convention, shared by every backend.

OpenSlide gives each level one downsample, the mean of the width and height ratios to level 0,
and maps a level-0 position ``x`` to the level coordinate ``x / downsample``. A negative
position first pads ``trunc(-x / downsample)`` level pixels and then reads from 0. When the
level coordinate is fractional, OpenSlide shifts the pixels by a sub-pixel amount (cairo's
bilinear filter); :func:`level_origin` says when that happens so the caller can ask OpenSlide.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["level_origin", "openslide_downsamples"]


def openslide_downsamples(dimensions: Sequence[tuple[int, int]]) -> tuple[float, ...]:
    """OpenSlide's downsample of every ``(width, height)`` level: mean of both ratios to level 0."""
    w0, h0 = dimensions[0]
    return tuple(((w0 / w) + (h0 / h)) / 2.0 if (w, h) != (w0, h0) else 1.0 for w, h in dimensions)


def level_origin(position: int, downsample: float) -> int | None:
    """Level pixel that OpenSlide puts at output pixel 0 for level-0 ``position`` on one axis.

    ``None`` when OpenSlide would sample between level pixels (a fractional level coordinate),
    where only OpenSlide's own interpolation gives its pixels.
    """
    position = int(position)
    if position < 0:
        return -int(-position / downsample)  # pad, then read from level coordinate 0
    coord = position / downsample
    return int(coord) if coord == math.floor(coord) else None
