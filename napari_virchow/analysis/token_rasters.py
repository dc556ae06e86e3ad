"""Per-token values → a raster over the slide in µm, each token cell exactly under its patch.

Same convention as :mod:`napari_virchow.analysis.rasters` (napari places pixel centres at
``index * scale + translate``; level-0 pixel ``y`` spans ``(y ± 0.5) mpp`` µm). A tile of side ``T``
level-0 px holds ``g × g`` tokens, so a token cell is ``c = T / g`` level-0 px (14 at 0.5 µm/px
on a 0.5 µm/px slide, 28 on a 0.25 µm/px one, or at the 1.0 µm/px level of the pyramid). Cell
``(r, k)`` of the raster starting at level-0 ``(ox, oy)`` covers ``oy + r c .. oy + (r + 1) c`` (rows), so
``scale = c mpp`` and ``translate = (oy + (c - 1) / 2) mpp``: exactly :func:`upsample` of the tile
raster by ``g``, which is why the two overlays line up cell for cell.
"""

from __future__ import annotations

import numpy as np

from napari_virchow.analysis.rasters import Raster, grid_indices

__all__ = ["token_raster"]


def token_raster(
    values: np.ndarray,
    coords: np.ndarray,
    tile_size_l0: int,
    *,
    mpp: float,
    fill: float = np.nan,
    slide_l0: tuple[int, int] | None = None,
) -> Raster:
    """``(n, g, g)`` token values of ``n`` tiles → one float32 raster covering just those tiles.

    Parameters
    ----------
    values : (n, g, g) array
        Per-token values (token ``[r, c]`` is the patch at row ``r``, column ``c`` of its tile).
    coords : (n, 2) array
        Level-0 ``(x, y)`` top-left of each tile, on one lattice of step ``tile_size_l0``.
    tile_size_l0 : int
        Tile side in level-0 px.
    mpp : float
        Level-0 µm/px of the slide.
    fill : float
        Value of cells of tiles not given (NaN: transparent in napari).
    slide_l0 : (width, height), optional
        Level-0 size of the slide, recorded for :func:`~napari_virchow.analysis.rasters.clip_to_slide`.

    Returns
    -------
    Raster
        ``data`` of ``(rows·g, cols·g)`` over the bounding box of the tiles; ``origin_l0`` its
        top-left corner and ``tile_size_l0`` the cell side ``T / g`` in level-0 px.
    """
    vals = np.asarray(values)
    xy = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    if vals.ndim != 3 or vals.shape[1] != vals.shape[2] or vals.shape[0] != len(xy):
        raise ValueError(f"values must be (n, g, g) with n = {len(xy)} tiles, got {vals.shape}")
    if not mpp > 0:
        raise ValueError(f"mpp must be positive, got {mpp}")
    t, g = int(tile_size_l0), int(vals.shape[1])
    if not len(xy):
        return Raster(np.zeros((0, 0), np.float32), t / max(g, 1) * mpp, (0.0, 0.0), (0, 0),
                      t / max(g, 1), float(mpp), slide_l0)  # fmt: skip
    rows, cols, _ = grid_indices(xy, t)
    r0, c0 = int(rows.min()), int(cols.min())
    rows, cols = rows - r0, cols - c0
    data = np.full(((int(rows.max()) + 1) * g, (int(cols.max()) + 1) * g), fill, np.float32)
    blocks = data.reshape(int(rows.max()) + 1, g, int(cols.max()) + 1, g)
    blocks[rows, :, cols, :] = vals  # fancy indices first: (n, g, g)
    ox, oy = int(xy[:, 0].min()), int(xy[:, 1].min())
    cell = t / g
    return Raster(data=data, scale_um=cell * mpp,
                  translate_um=((oy + (cell - 1) / 2) * mpp, (ox + (cell - 1) / 2) * mpp),
                  origin_l0=(ox, oy), tile_size_l0=cell, mpp=float(mpp), slide_l0=slide_l0)  # fmt: skip
