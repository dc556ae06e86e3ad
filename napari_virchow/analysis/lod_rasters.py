"""Overlays of an embedding pyramid: each place drawn from the finest magnification computed there.

Two ways to draw per-tile values computed at several magnifications (µm/px), both aligned to the
slide in µm exactly as :mod:`napari_virchow.analysis.rasters` aligns one level:

- :func:`level_rasters`: one raster per level (coarse to fine), each blank where its level is not
  computed; stacked as napari layers in that order, the finest computed level is on top.
- :func:`finest_raster`: one raster at the finest level's tile resolution whose every cell holds
  the value of the finest level computed at the cell's centre (NaN, or 0 for labels, where none
  is), plus which level each cell came from. One layer, no blending between levels.

A level is given as ``values`` (one row per tile of ``TileGrid(slide, mpp=m, size=size)``;
rows of tiles not done are ignored) and ``done`` (bool mask over the same tiles).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace

import numpy as np

from napari_virchow.analysis.rasters import Raster, labels_raster, tile_raster
from napari_virchow.slides.lattice import Lattice, SlideGeometry

__all__ = ["LevelValues", "cell_at_um", "finest_raster", "level_rasters"]

#: (values (n,) or (n, c), done (n,) bool) of one level's lattice
LevelValues = tuple[np.ndarray, np.ndarray]


def _checked(geometry: SlideGeometry, mpp: float, level: LevelValues,
             size: int) -> tuple[Lattice, np.ndarray, np.ndarray]:  # fmt: skip
    lat = Lattice.at(geometry, mpp, size)
    values, done = np.asarray(level[0]), np.asarray(level[1])
    if values.shape[:1] != (len(lat),) or done.shape != (len(lat),) or done.dtype != bool:
        raise ValueError(
            f"level {mpp:g} µm/px has {len(lat)} tiles: values must be ({len(lat)}, ...) and done a "
            f"({len(lat)},) bool mask, got {values.shape} and {done.shape} {done.dtype}"
        )
    return lat, values, done


def _is_labels(levels: Mapping[float, LevelValues]) -> bool:
    kinds = {np.asarray(v).dtype.kind for v, _ in levels.values()}
    if len(kinds & {"i", "u"}) and len(kinds - {"i", "u"}):
        raise ValueError("levels mix integer labels and float values; draw them separately")
    return bool(kinds & {"i", "u"})


def level_rasters(levels: Mapping[float, LevelValues], geometry: SlideGeometry, *,
                  size: int = 224) -> dict[float, Raster]:  # fmt: skip
    """One raster per level, coarse to fine (napari stacking order), blank where not done.

    Float values give float32 rasters with NaN where not done; integer labels give int32 rasters
    with 0 there (see :func:`~napari_virchow.analysis.rasters.tile_raster`).
    """
    place = labels_raster if _is_labels(levels) else tile_raster
    out: dict[float, Raster] = {}
    for m in sorted(levels, reverse=True):
        lat, values, done = _checked(geometry, m, levels[m], size)
        out[m] = place(values, lat.coords, lat.tile_size_l0, (geometry.width, geometry.height),
                       mpp=geometry.mpp, done=done)  # fmt: skip
    return out


def finest_raster(levels: Mapping[float, LevelValues], geometry: SlideGeometry, *,
                  size: int = 224) -> tuple[Raster, np.ndarray]:  # fmt: skip
    """One raster at the finest level's resolution, each cell from the finest level done there.

    Returns
    -------
    raster : Raster
        float32 (NaN where no level is done) or, for integer labels, int32 (0 there); its
        ``scale``/``translate`` are those of the finest level's own raster.
    source : numpy.ndarray
        (rows, cols) float32: the µm/px each cell was taken from, NaN where none.
    """
    if not levels:
        raise ValueError("no levels to draw")
    labels = _is_labels(levels)
    finest = min(levels)
    lat_f, values_f, _ = _checked(geometry, finest, levels[finest], size)
    place = labels_raster if labels else tile_raster
    # The finest level's own (empty) raster gives the frame: shape, scale and translate.
    frame = place(np.zeros((len(lat_f), *values_f.shape[1:]), values_f.dtype), lat_f.coords, lat_f.tile_size_l0,
                  (geometry.width, geometry.height), mpp=geometry.mpp, done=np.zeros(len(lat_f), bool))  # fmt: skip
    data = frame.data.copy()
    n_rows, n_cols = data.shape[:2]
    t = lat_f.tile_size_l0
    # Cell centres in level-0 px (pixel i spans [i, i + 1)); the frame starts at (0, 0).
    cx, cy = np.arange(n_cols) * t + t / 2, np.arange(n_rows) * t + t / 2
    source = np.full((n_rows, n_cols), np.nan, np.float32)
    for m in sorted(levels, reverse=True):  # coarse first: finer levels overwrite
        lat, values, done = _checked(geometry, m, levels[m], size)
        col = np.floor(cx / lat.tile_size_l0).astype(np.int64)
        row = np.floor(cy / lat.tile_size_l0).astype(np.int64)
        inside = (row[:, None] < lat.rows) & (col[None, :] < lat.cols)
        idx = np.where(inside, row[:, None] * lat.cols + col[None, :], 0)
        take = inside & done[idx]
        data[take] = values[idx[take]]
        source[take] = m
    return replace(frame, data=data), source


def cell_at_um(raster: Raster, y_um: float, x_um: float) -> tuple[int, int] | None:
    """(row, col) of the raster pixel drawn at world point (y, x) µm, or None outside it."""
    ty, tx = raster.translate_um
    r = math.floor((y_um - ty) / raster.scale_um + 0.5)
    c = math.floor((x_um - tx) / raster.scale_um + 0.5)
    rows, cols = raster.data.shape[:2]
    return (r, c) if 0 <= r < rows and 0 <= c < cols else None
