"""Per-tile values → 2-D arrays with the scale/translate that put them over the slide in napari.

Alignment (napari places pixel *centres* at ``index * scale + translate``): with the slide layer
at scale ``(mpp, mpp)`` and translate 0, level-0 pixel row ``y`` spans ``(y ± 0.5) * mpp`` µm.
A tile of side ``T`` starting at row ``y0`` covers pixels ``y0 .. y0+T-1``, i.e. world
``[(y0 - 0.5) mpp, (y0 + T - 0.5) mpp]`` with centre ``(y0 + (T - 1) / 2) mpp``. Raster row ``r``
of a grid starting at ``oy`` is the tile at ``y0 = oy + r T``, so the raster needs
``scale = T mpp`` and ``translate = (oy + (T - 1) / 2) mpp`` (same for x).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

__all__ = [
    "Raster",
    "clip_to_slide",
    "colormap",
    "grid_indices",
    "labels_raster",
    "mask_below",
    "probability_rgba",
    "rasterize_annotations",
    "tile_raster",
    "upsample",
]


@dataclass(frozen=True)
class Raster:
    """A per-tile image and where it sits in world µm (napari's ``scale`` / ``translate``)."""

    data: np.ndarray
    scale_um: float
    translate_um: tuple[float, float]  # (y, x)
    origin_l0: tuple[int, int]  # (x, y) level-0 px of the grid's top-left tile corner
    tile_size_l0: float  # level-0 px per raster pixel (fractional after upsample)
    mpp: float
    #: level-0 (width, height) of the slide under it, where known: :func:`clip_to_slide` uses it
    slide_l0: tuple[int, int] | None = None

    def layer_kwargs(self) -> dict[str, tuple[float, float]]:
        """``scale`` and ``translate`` for ``viewer.add_image`` / ``add_labels``."""
        return {"scale": (self.scale_um, self.scale_um), "translate": self.translate_um}


def grid_indices(
    coords: np.ndarray, tile_size_l0: int
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Row and column of each tile on its grid, and the grid origin ``(x0, y0)`` in level-0 px.

    The origin is the grid offset modulo the tile size, so a raster covers the slide from its
    top-left corner even when the tiles start further in.
    """
    xy = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    t = int(tile_size_l0)
    if t <= 0:
        raise ValueError(f"tile_size_l0 must be positive, got {tile_size_l0}")
    origin = xy.min(axis=0) % t if len(xy) else np.zeros(2, dtype=np.int64)
    rel = xy - origin
    if (rel % t).any():
        raise ValueError(f"tile coords are not on one grid of step {t} level-0 px")
    return rel[:, 1] // t, rel[:, 0] // t, (int(origin[0]), int(origin[1]))


def _place(
    values: np.ndarray, coords: np.ndarray, tile_size_l0: int, slide_dims: tuple[int, int],
    *, mpp: float, fill: float | int, dtype: type, done: np.ndarray | None,
) -> Raster:
    vals = np.asarray(values)
    xy = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    if vals.shape[0] != xy.shape[0] or vals.ndim not in (1, 2):
        raise ValueError(f"values must be (n,) or (n, c) with n = {xy.shape[0]} tiles, "
                         f"got {vals.shape}")
    if not mpp > 0:
        raise ValueError(f"mpp must be positive, got {mpp}")
    if done is not None:
        keep = np.asarray(done)
        keep = keep if keep.dtype == bool else np.isin(np.arange(len(xy)), keep)
        vals, xy = vals[keep], xy[keep]
    t = int(tile_size_l0)
    rows, cols, (ox, oy) = grid_indices(xy, t)
    w, h = slide_dims
    n_rows = max(-(-(int(h) - oy) // t), int(rows.max()) + 1 if len(rows) else 0)
    n_cols = max(-(-(int(w) - ox) // t), int(cols.max()) + 1 if len(cols) else 0)
    data = np.full((n_rows, n_cols, *vals.shape[1:]), fill, dtype=dtype)
    data[rows, cols] = vals
    s = t * mpp
    return Raster(data=data, scale_um=s,
                  translate_um=((oy + (t - 1) / 2) * mpp, (ox + (t - 1) / 2) * mpp),
                  origin_l0=(ox, oy), tile_size_l0=float(t), mpp=float(mpp), slide_l0=(int(w), int(h)))


def tile_raster(
    values: np.ndarray,
    coords: np.ndarray,
    tile_size_l0: int,
    slide_dims: tuple[int, int],
    *,
    mpp: float,
    fill: float = np.nan,
    done: np.ndarray | None = None,
) -> Raster:
    """One float32 pixel per tile (``(rows, cols)`` or ``(rows, cols, c)``), ``fill`` elsewhere.

    ``slide_dims`` is the level-0 ``(width, height)``; ``done`` (mask or indices) limits the
    tiles drawn, the rest stay ``fill`` (NaN: transparent in napari).
    """
    return _place(values, coords, tile_size_l0, slide_dims, mpp=mpp, fill=fill,
                  dtype=np.float32, done=done)


def labels_raster(
    labels: np.ndarray,
    coords: np.ndarray,
    tile_size_l0: int,
    slide_dims: tuple[int, int],
    *,
    mpp: float,
    done: np.ndarray | None = None,
) -> Raster:
    """Cluster ids (1..k) per tile as an int32 raster; 0 = background / not computed."""
    return _place(labels, coords, tile_size_l0, slide_dims, mpp=mpp, fill=0,
                  dtype=np.int32, done=done)


def _interp_axis(a: np.ndarray, axis: int, factor: int) -> np.ndarray:
    """Linear interpolation between tile centres along ``axis``, edges held constant."""
    n = a.shape[axis]
    u = (np.arange(n * factor) + 0.5) / factor - 0.5  # output pixel centres in tile units
    f0 = np.floor(u)
    w = (u - f0).astype(np.float32)
    i0 = np.clip(f0, 0, n - 1).astype(np.intp)
    i1 = np.clip(f0 + 1, 0, n - 1).astype(np.intp)
    shape = [1] * a.ndim
    shape[axis] = -1
    w = w.reshape(shape)
    return np.take(a, i0, axis=axis) * (1 - w) + np.take(a, i1, axis=axis) * w


def upsample(
    raster: Raster, factor: int, smooth: str | None = "bilinear", *, sigma_tiles: float = 0.5
) -> Raster:
    """``factor`` × finer raster, optionally smoothed, with scale/translate adjusted to match.

    Smoothing is NaN-aware (normalised convolution): values never spread into tiles that were
    not computed, which stay NaN. Integer rasters (labels) only allow ``smooth=None``.
    """
    f = int(factor)
    if f < 1:
        raise ValueError(f"upsample factor must be a positive integer, got {factor}")
    if smooth not in (None, "bilinear", "gaussian"):
        raise ValueError(f"smooth must be None, 'bilinear' or 'gaussian', got {smooth!r}")
    data = raster.data
    nearest = np.repeat(np.repeat(data, f, axis=0), f, axis=1)
    if smooth is not None:
        if data.dtype.kind != "f":
            raise ValueError("integer (labels) rasters can only be upsampled with smooth=None")
        valid = np.isfinite(data)
        if data.ndim == 3:
            valid = valid.all(axis=2, keepdims=True)
        num = np.where(valid, data, 0).astype(np.float32)
        den = valid.astype(np.float32)
        if smooth == "bilinear":
            num, den = (_interp_axis(_interp_axis(a, 0, f), 1, f) for a in (num, den))
        else:
            from scipy.ndimage import gaussian_filter

            sigma = (sigma_tiles * f, sigma_tiles * f) + (0,) * (data.ndim - 2)
            num, den = (gaussian_filter(np.repeat(np.repeat(a, f, 0), f, 1), sigma, mode="nearest")
                        for a in (num, den))
        inside = np.repeat(np.repeat(valid, f, axis=0), f, axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            smoothed = num / den
        nearest = np.where(inside & (den > 0), smoothed, np.nan).astype(np.float32)
    s = raster.scale_um
    # Tile r spans [t + (r - 1/2) s, t + (r + 1/2) s]; its first sub-pixel centre is s/(2f) in.
    shift = -s / 2 + s / (2 * f)
    ty, tx = raster.translate_um
    return replace(raster, data=nearest, scale_um=s / f, translate_um=(ty + shift, tx + shift),
                   tile_size_l0=raster.tile_size_l0 / f)


#: most sub-cells one raster cell is split into along each axis where a slide edge cuts it
CLIP_SPLIT = 8
#: sub-cells this small (µm) are fine enough: an edge is then drawn within half of one (7 µm, a token)
CLIP_CELL_UM = 14.0
#: pixels a clipped raster may hold (fewer splits on larger rasters: 40,000 tiles split 5×, in ~2 ms;
#: 4 M would take ~30 ms of the UI thread per update)
CLIP_MAX_PIXELS = 1_000_000


def _edge_fraction(origin: int, cell: float, n: int, extent: int) -> float | None:
    """Where the slide edge cuts the raster along one axis, in cells from the origin (None: it does not)."""
    inside = (extent - origin) / cell
    return inside if inside < n - 1e-9 else None


def clip_to_slide(raster: Raster, *, split: int = CLIP_SPLIT, max_pixels: int = CLIP_MAX_PIXELS) -> Raster:
    """``raster`` with nothing drawn past the slide's right and bottom edges.

    A partial edge tile is one raster cell that reaches up to a tile past the slide. Cells are
    split into ``f`` × ``f`` sub-cells, ``f`` the smallest on whose boundaries both edges fall or
    whose sub-cells are at most :data:`CLIP_CELL_UM` (at most ``split``, and fewer where more would
    exceed ``max_pixels``; 1 for cells already that fine, such as token cells), and the sub-cells
    whose centre lies past an edge become transparent: NaN for float rasters, 0 (background) for
    labels, alpha 0 for RGBA. Rasters within the slide, or with no ``slide_l0``, come back as is.
    """
    if raster.slide_l0 is None or raster.data.ndim < 2:
        return raster
    (ox, oy), c = raster.origin_l0, raster.tile_size_l0
    rows, cols = raster.data.shape[:2]
    width, height = raster.slide_l0
    cuts = [_edge_fraction(oy, c, rows, height), _edge_fraction(ox, c, cols, width)]
    if cuts == [None, None]:
        return raster
    f = 1
    for f in range(1, max(int(split), 1) + 1):  # the coarsest split that is exact, or fine enough
        exact = all(cut is None or abs(cut * f - round(cut * f)) < 1e-6 for cut in cuts)
        if exact or c * raster.mpp / f <= CLIP_CELL_UM + 1e-9:
            break
    while f > 1 and rows * cols * f * f > max_pixels:
        f -= 1
    out = upsample(raster, f, smooth=None) if f > 1 else replace(raster, data=raster.data.copy())
    data = out.data
    hidden = np.nan if data.dtype.kind == "f" and data.ndim == 2 else 0
    for axis, cut in enumerate(cuts):
        if cut is None:
            continue
        n = data.shape[axis]
        past = (np.arange(n) + 0.5) / f >= cut  # sub-cell centres past the edge
        index = (slice(None),) * axis + (past,)
        data[index] = hidden
    return out


# Control points of matplotlib's perceptually uniform maps (0, 1/8, ..., 1), linearly interpolated.
_LUTS = {
    "inferno": [(0.001, 0.000, 0.014), (0.087, 0.045, 0.225), (0.258, 0.039, 0.406),
                (0.416, 0.090, 0.433), (0.578, 0.148, 0.404), (0.736, 0.216, 0.330),
                (0.865, 0.317, 0.226), (0.955, 0.469, 0.100), (0.988, 0.998, 0.645)],
    "magma": [(0.001, 0.000, 0.014), (0.079, 0.054, 0.212), (0.232, 0.060, 0.438),
              (0.390, 0.100, 0.502), (0.550, 0.161, 0.506), (0.716, 0.215, 0.475),
              (0.869, 0.288, 0.409), (0.968, 0.440, 0.360), (0.987, 0.991, 0.750)],
    "viridis": [(0.267, 0.005, 0.329), (0.283, 0.141, 0.458), (0.254, 0.265, 0.530),
                (0.207, 0.372, 0.553), (0.164, 0.471, 0.558), (0.128, 0.567, 0.551),
                (0.135, 0.659, 0.518), (0.267, 0.749, 0.441), (0.993, 0.906, 0.144)],
}


def colormap(name: str = "inferno", n: int = 256) -> np.ndarray:
    """``(n, 4)`` float32 RGBA lookup table (``inferno``, ``magma`` or ``viridis``)."""
    if name not in _LUTS:
        raise ValueError(f"unknown colormap {name!r}; choose from {sorted(_LUTS)}")
    pts = np.asarray(_LUTS[name], dtype=np.float32)
    x = np.linspace(0, 1, len(pts))
    u = np.linspace(0, 1, n)
    rgb = np.stack([np.interp(u, x, pts[:, i]) for i in range(3)], axis=1)
    return np.concatenate([rgb, np.ones((n, 1))], axis=1).astype(np.float32)


def mask_below(data: np.ndarray, threshold: float) -> np.ndarray:
    """float32 copy with NaN wherever ``data < threshold`` (napari draws NaN transparent)."""
    out = np.array(data, dtype=np.float32, copy=True)
    with np.errstate(invalid="ignore"):
        out[out < threshold] = np.nan
    return out


def probability_rgba(
    data: np.ndarray, threshold: float = 0.5, *, cmap: str = "inferno", opacity: float = 1.0
) -> np.ndarray:
    """RGBA float32 ``(..., 4)``: probabilities in [0, 1] coloured by ``cmap``; alpha 0 below
    ``threshold`` and where not computed (NaN)."""
    p = np.asarray(data, dtype=np.float32)
    lut = colormap(cmap)
    shown = np.isfinite(p) & (p >= threshold)
    idx = np.clip(np.rint(np.nan_to_num(p) * (len(lut) - 1)), 0, len(lut) - 1).astype(np.intp)
    rgba = lut[idx]
    rgba[..., 3] = np.where(shown, opacity, 0.0)
    return rgba


def rasterize_annotations(
    polygons: Sequence[np.ndarray],
    classes: Sequence[str | None],
    coords: np.ndarray,
    tile_size_l0: int,
    *,
    min_overlap: float = 0.5,
    holes: Sequence[Sequence[np.ndarray]] | None = None,
    samples: int = 4,
) -> tuple[np.ndarray, list[str]]:
    """Training labels from drawn regions: the class covering ≥ ``min_overlap`` of each tile.

    Coverage is sampled on a ``samples × samples`` grid of points per tile (exact to 1/samples²),
    with point-in-polygon tests (no shapely needed). Polygons are ``(m, 2)`` level-0 ``(x, y)``;
    ``holes[i]`` lists the holes of polygon ``i``. Polygons of one class are united; a tile
    covered enough by several classes takes the one covering most. Unclassified polygons
    (``None`` / ``""``) are skipped.

    Returns
    -------
    labels : (n,) int64 index into ``class_names``, -1 for tiles left unlabelled.
    class_names : classes in order of first appearance.
    """
    from skimage.measure import points_in_poly

    if len(classes) != len(polygons) or (holes is not None and len(holes) != len(polygons)):
        raise ValueError("polygons, classes (and holes) must have one entry per polygon")
    xy = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    t = float(tile_size_l0)
    offs = (np.arange(samples) + 0.5) * t / samples
    sub = np.stack(np.meshgrid(offs, offs), axis=-1).reshape(-1, 2)  # (s², 2) x, y offsets
    names = [c for c in dict.fromkeys(classes) if c]
    cover = np.zeros((len(names), len(xy), len(sub)), dtype=bool)
    for i, (poly, cls) in enumerate(zip(polygons, classes, strict=True)):
        if not cls:
            continue
        verts = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
        if len(verts) < 3:
            continue
        lo, hi = verts.min(axis=0), verts.max(axis=0)
        near = np.flatnonzero(((xy + t) > lo).all(axis=1) & (xy < hi).all(axis=1))
        if not len(near):
            continue
        pts = (xy[near, None, :] + sub[None]).reshape(-1, 2)
        inside = points_in_poly(pts, verts)
        for hole in (holes[i] if holes is not None else ()):
            if len(hole) >= 3:
                inside &= ~points_in_poly(pts, np.asarray(hole, dtype=np.float64))
        cover[names.index(cls), near] |= inside.reshape(len(near), len(sub))
    labels = np.full(len(xy), -1, dtype=np.int64)
    if names:
        frac = cover.mean(axis=2)
        best = frac.argmax(axis=0)
        ok = frac.max(axis=0) >= min_overlap
        labels[ok] = best[ok]
    return labels, names
