"""Level-of-detail inference: from the camera to the magnification and the tiles to compute.

A screen shows about one canvas of pixels at any zoom, so a view should cost about one canvas of
tiles. :func:`plan_view` picks the *finest* magnification the encoder was trained on whose tissue
tiles in view fit a budget tied to the canvas (default ``2 ×`` :func:`canvas_tiles`), and lists
them centre-out. Zooming in picks a finer level for the smaller region in view; the coarser levels
stay drawn underneath (``ViewPlan.underneath``; :mod:`napari_virchow.analysis.lod_rasters` draws
the finest level computed at each place).

When even the coarsest usable level has more tiles in view than the budget (a whole-slide view
of a large slide), the plan keeps that level, sets ``fits = False`` and caps ``tiles`` at the
budget, nearest the centre first: following the view never costs more than the budget per view.
Covering the whole tissue at 5× is the explicit overview action (issue 15: one click, ``embed --mpp 2.0``).

Tile indices are those of ``TileGrid(slide, mpp=m, size=224)`` (the same lattice, computed by
:class:`Lattice` from the slide's size and µm/px alone), so they index the store of level ``m``.
Everything here is Qt-free; :class:`LodPyramid` holds one lazily built TileGrid per level and asks
a ``missing(mpp, indices)`` callback (e.g. the stores of a session) what is still to compute.

>>> geo = SlideGeometry(65536, 65536, 0.25)
>>> plan = plan_view(geo, view_box(geo, (32768, 32768), 0.5, (1600, 1000)), (1600, 1000),
...                  (0.25, 0.5, 1.0, 2.0))
>>> plan.mpp, plan.fits, len(plan.tiles) <= plan.budget
(0.5, True, True)
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from napari_virchow.errors import SlideError
from napari_virchow.store.key import canonical_mpp

if TYPE_CHECKING:
    from napari_virchow.models.specs import EncoderSpec
    from napari_virchow.slides.slide import Slide
    from napari_virchow.slides.tiling import TileGrid

__all__ = ["BUDGET_FACTOR", "Lattice", "LodPyramid", "MissingFn", "SlideGeometry", "ViewPlan", "canvas_tiles",
           "missing_from_done", "missing_from_stores", "plan_view", "usable_mpps", "view_box"]  # fmt: skip

BBox = tuple[float, float, float, float]
#: ``missing(mpp, indices)`` → those of ``indices`` (tiles of level ``mpp``) not computed yet
MissingFn = Callable[[float, np.ndarray], np.ndarray]
#: default budget: this many times the 224-px tiles that fit the canvas
BUDGET_FACTOR = 2.0
#: a level finer than the slide by more than this (relative) would be upsampled: not offered
UPSAMPLE_TOLERANCE = 0.10
#: fewest level-0 px a tile may span (as TileGrid requires)
MIN_TILE_L0 = 16


@dataclass(frozen=True)
class SlideGeometry:
    """Level-0 ``width`` × ``height`` px at ``mpp`` µm/px: all the planner needs of a slide."""

    width: int
    height: int
    mpp: float

    def __post_init__(self) -> None:
        if int(self.width) != self.width or int(self.height) != self.height or min(self.width, self.height) < 1:
            raise ValueError(f"slide size must be positive integers, got {self.width!r} × {self.height!r}")
        if not (math.isfinite(self.mpp) and self.mpp > 0):
            raise ValueError(f"slide µm/px must be a positive number, got {self.mpp!r}")

    @classmethod
    def of(cls, slide: Slide) -> SlideGeometry:
        """Geometry of an open slide (which must know its µm/px, else a SlideError)."""
        w, h = slide.dimensions
        return cls(int(w), int(h), float(slide.require_mpp()))


@dataclass(frozen=True)
class Lattice:
    """The tile lattice of ``TileGrid(slide, mpp=mpp, size=size)``, without pixels or tissue.

    Non-overlapping ``tile_size_l0`` squares from (0, 0), partial edge tiles dropped, row-major.
    """

    mpp: float
    size: int
    tile_size_l0: int
    rows: int
    cols: int

    @classmethod
    def at(cls, geometry: SlideGeometry, mpp: float, size: int = 224) -> Lattice:
        """The lattice of ``size``-px tiles at ``mpp`` µm/px (the formula TileGrid uses)."""
        t = max(1, round(size * mpp / geometry.mpp))
        return cls(canonical_mpp(mpp), int(size), t, geometry.height // t, geometry.width // t)

    @classmethod
    def of_grid(cls, grid: TileGrid) -> Lattice:
        """The lattice of an existing TileGrid."""
        rows, cols = grid.grid_shape
        return cls(canonical_mpp(grid.mpp), grid.size, grid.tile_size_l0, rows, cols)

    def __len__(self) -> int:
        return self.rows * self.cols

    @property
    def coords(self) -> np.ndarray:
        """(n, 2) int64 level-0 (x, y) of every tile's top-left corner, row-major."""
        r, c = np.divmod(np.arange(len(self), dtype=np.int64), self.cols)
        return np.stack([c, r], axis=1) * self.tile_size_l0

    def tiles_in(self, bbox: Sequence[float], tissue: np.ndarray | None = None) -> np.ndarray:
        """Indices of tiles intersecting ``bbox`` (level-0 px), nearest its centre first.

        Same set and order as ``TileGrid.tiles_in`` (``tissue``: the grid's tissue flags; None
        keeps every lattice tile).
        """
        x0, y0, x1, y1 = (float(v) for v in bbox)
        t = self.tile_size_l0
        c = np.arange(max(math.floor(x0 / t), 0), min(math.ceil(x1 / t), self.cols))
        r = np.arange(max(math.floor(y0 / t), 0), min(math.ceil(y1 / t), self.rows))
        if x1 <= x0 or y1 <= y0 or not c.size or not r.size:
            return np.zeros(0, np.int64)
        idx = (r[:, None] * self.cols + c[None, :]).ravel().astype(np.int64)
        if tissue is not None:
            idx = idx[np.asarray(tissue, dtype=bool)[idx]]
        cx = (idx % self.cols) * t + t / 2
        cy = (idx // self.cols) * t + t / 2
        dist = np.hypot(cx - (x0 + x1) / 2, cy - (y0 + y1) / 2)
        return idx[np.argsort(dist, kind="stable")]


def usable_mpps(geometry: SlideGeometry, mpps: Sequence[float], size: int = 224) -> tuple[float, ...]:
    """Those of ``mpps`` this slide can give without upsampling and with at least one tile, finest first."""
    keep = set()
    for m in mpps:
        if not (math.isfinite(m) and m > 0):
            raise ValueError(f"magnifications are positive µm/px, got {m!r}")
        lat = Lattice.at(geometry, m, size)
        if m >= geometry.mpp * (1 - UPSAMPLE_TOLERANCE) and lat.tile_size_l0 >= MIN_TILE_L0 and len(lat):
            keep.add(canonical_mpp(m))
    return tuple(sorted(keep))


def canvas_tiles(canvas_px: tuple[int, int], tile_px: int = 224) -> int:
    """How many ``tile_px``-px tiles fit a canvas of ``(width, height)`` screen px (at least 1)."""
    w, h = canvas_px
    if not (w > 0 and h > 0):
        raise ValueError(f"canvas size must be positive (width, height) px, got {canvas_px!r}")
    return max(1, int(w // tile_px)) * max(1, int(h // tile_px))


def view_box(geometry: SlideGeometry, centre_l0: tuple[float, float], um_per_screen_px: float,
             canvas_px: tuple[int, int]) -> BBox:  # fmt: skip
    """The level-0 box a camera centred at ``centre_l0`` (x, y) shows, clipped to the slide.

    The Qt-free twin of ``_qt.viewport.visible_box_level0`` (napari's ``zoom`` is screen px per
    µm: ``um_per_screen_px = 1 / zoom``), for tests and benchmarks.
    """
    half_w = canvas_px[0] * um_per_screen_px / geometry.mpp / 2
    half_h = canvas_px[1] * um_per_screen_px / geometry.mpp / 2
    cx, cy = centre_l0
    return (max(cx - half_w, 0.0), max(cy - half_h, 0.0),
            min(cx + half_w, float(geometry.width)), min(cy + half_h, float(geometry.height)))  # fmt: skip


@dataclass(frozen=True, eq=False)
class ViewPlan:
    """What a view needs: the chosen level, its tiles in view, and the coarser levels under it.

    Attributes
    ----------
    mpp : float
        The chosen magnification (µm/px); ``pinned`` when the user fixed it.
    in_view : numpy.ndarray
        Tissue tiles of level ``mpp`` intersecting ``bbox``, centre-out (TileGrid indices).
    tiles : numpy.ndarray
        ``in_view[:budget]``: what following this view computes at most (``truncated`` if cut).
    budget, canvas_tiles : int
        The tile budget of one view and the 224-px tiles that fit the canvas.
    fits : bool
        ``len(in_view) <= budget``; False only when no usable level fits (or a pinned one does not).
    counts : dict
        Tissue tiles in view per level examined, µm/px → count (finest first).
    underneath : dict
        Each usable level coarser than ``mpp`` → its tissue tiles in view, centre-out: what is
        drawn under the chosen level (coarse to fine) until the chosen level is computed.
    bbox : tuple
        The view in level-0 px, clipped to the slide.
    """

    mpp: float
    in_view: np.ndarray
    budget: int
    canvas_tiles: int
    fits: bool
    pinned: bool
    bbox: BBox
    counts: dict[float, int] = field(default_factory=dict)
    underneath: dict[float, np.ndarray] = field(default_factory=dict)

    @property
    def tiles(self) -> np.ndarray:
        """The tiles this view computes at most: the ``budget`` nearest the centre."""
        return self.in_view[: self.budget]

    @property
    def truncated(self) -> bool:
        """Whether ``tiles`` leaves part of the view uncomputed (see the module docstring)."""
        return len(self.in_view) > self.budget

    @property
    def levels(self) -> tuple[float, ...]:
        """The levels drawn for this view, coarse to fine (stacking order), ending at ``mpp``."""
        return (*sorted(self.underneath, reverse=True), self.mpp)


TissueFn = Callable[[float], "np.ndarray | None"]


def plan_view(
    geometry: SlideGeometry,
    bbox: Sequence[float],
    canvas_px: tuple[int, int],
    mpps: Sequence[float],
    *,
    pinned: float | None = None,
    budget: int | None = None,
    size: int = 224,
    tissue: TissueFn | None = None,
) -> ViewPlan:
    """Choose the finest of ``mpps`` whose tissue tiles in ``bbox`` fit the budget.

    Parameters
    ----------
    geometry
        The slide's level-0 size and µm/px (:meth:`SlideGeometry.of`).
    bbox
        ``(x0, y0, x1, y1)`` level-0 px in view (``_qt.viewport.visible_box_level0``).
    canvas_px
        Canvas ``(width, height)`` in screen px (napari's ``canvas.size`` is ``(height, width)``).
    mpps
        The encoder's trained magnifications (``spec.trained_mpps``); levels the slide cannot
        give without upsampling are skipped.
    pinned
        A magnification the user fixed (check it first with ``spec.check_mpp``): always chosen.
    budget
        Most tiles one view computes; default ``BUDGET_FACTOR × canvas_tiles(canvas_px)``.
    size
        Tile side in px (``spec.input_size``).
    tissue
        ``tissue(mpp)`` → bool flags of that level's lattice (``TileGrid.tissue``), or None to
        count every lattice tile. Called only for levels it needs (finest first).

    Raises
    ------
    SlideError
        The slide is coarser than every magnification (nothing can be computed without upsampling).
    """
    n_canvas = canvas_tiles(canvas_px)
    budget = int(budget) if budget is not None else int(BUDGET_FACTOR * n_canvas)
    if budget < 1:
        raise ValueError(f"the tile budget must be >= 1, got {budget}")
    levels = list(usable_mpps(geometry, mpps, size))
    if pinned is not None:
        pinned = canonical_mpp(pinned)
        if pinned not in usable_mpps(geometry, [pinned], size):
            raise SlideError(
                f"cannot compute at {pinned:g} µm/px on a slide scanned at {geometry.mpp:g} µm/px (it would be "
                "upsampled or give no tile); unpin it or pick a coarser magnification"
            )
    elif not levels:
        raise SlideError(
            f"the slide is scanned at {geometry.mpp:g} µm/px, coarser than every magnification the encoder "
            f"was trained on ({', '.join(f'{m:g}' for m in sorted(mpps))} µm/px); use a slide scanned at "
            "higher magnification, or correct its µm/px if the file's is wrong"
        )
    x0, y0, x1, y1 = (float(v) for v in bbox)
    box = (max(x0, 0.0), max(y0, 0.0), min(x1, float(geometry.width)), min(y1, float(geometry.height)))

    def in_view(m: float) -> np.ndarray:
        return Lattice.at(geometry, m, size).tiles_in(box, None if tissue is None else tissue(m))

    counts: dict[float, int] = {}
    candidates = [pinned] if pinned is not None else levels
    for m in candidates:  # finest first: stop at the first that fits (else the coarsest)
        chosen, chosen_tiles = m, in_view(m)
        counts[m] = len(chosen_tiles)
        if len(chosen_tiles) <= budget:
            break
    under = {m: in_view(m) for m in levels if m > chosen}
    return ViewPlan(chosen, chosen_tiles, budget, n_canvas, len(chosen_tiles) <= budget, pinned is not None,
                    box, counts, under)  # fmt: skip


# -- refinement --------------------------------------------------------------------------------


class _HasMissing(Protocol):
    def missing(self, indices: np.ndarray | None = None) -> np.ndarray: ...


def missing_from_stores(stores: Mapping[float, _HasMissing]) -> MissingFn:
    """A ``missing`` callback over one store per level (e.g. ``EmbeddingStore``), keyed by µm/px;
    a level without a store has everything missing."""
    by_mpp = {canonical_mpp(m): s for m, s in stores.items()}

    def missing(mpp: float, indices: np.ndarray) -> np.ndarray:
        store = by_mpp.get(canonical_mpp(mpp))
        return np.asarray(indices, np.int64) if store is None else store.missing(np.asarray(indices, np.int64))

    return missing


def missing_from_done(done: Mapping[float, np.ndarray]) -> MissingFn:
    """A ``missing`` callback over plain per-level done masks, keyed by µm/px."""
    masks = {canonical_mpp(m): np.asarray(d, dtype=bool) for m, d in done.items()}

    def missing(mpp: float, indices: np.ndarray) -> np.ndarray:
        idx = np.asarray(indices, np.int64)
        mask = masks.get(canonical_mpp(mpp))
        return idx if mask is None else idx[~mask[idx]]

    return missing


def _still_missing(missing: MissingFn, mpp: float, idx: np.ndarray) -> np.ndarray:
    if not len(idx):
        return idx
    # Keep the plan's (centre-out) order whatever order the callback answers in.
    return idx[np.isin(idx, np.asarray(missing(mpp, idx), np.int64))]


class LodPyramid:
    """One :class:`TileGrid` per magnification of a slide, built on first use; plans views.

    Parameters
    ----------
    slide
        An open slide with µm/px.
    mpps
        Magnifications to offer (``spec.trained_mpps``); those the slide cannot give without
        upsampling are dropped (:attr:`mpps` holds the rest, finest first).
    size, tissue_threshold, min_tissue
        Passed to every TileGrid.

    Grids are built lazily (a thumbnail read each), under a lock: safe from worker threads. Call
    :meth:`grid` for each level in a worker before planning from the UI thread.
    """

    def __init__(self, slide: Slide, mpps: Sequence[float], *, size: int = 224,
                 tissue_threshold: float | None = None, min_tissue: float = 0.1) -> None:  # fmt: skip
        self.slide, self.size = slide, int(size)
        self.geometry = SlideGeometry.of(slide)
        self.mpps = usable_mpps(self.geometry, mpps, self.size)
        self._grid_kw = {"tissue_threshold": tissue_threshold, "min_tissue": min_tissue}
        self._grids: dict[float, TileGrid] = {}
        self._lock = threading.Lock()

    @classmethod
    def for_spec(cls, slide: Slide, spec: EncoderSpec, **kwargs: float | None) -> LodPyramid:
        """The pyramid of ``spec``'s trained magnifications at its input size."""
        return cls(slide, spec.trained_mpps, size=spec.input_size, **kwargs)  # type: ignore[arg-type]

    def grid(self, mpp: float) -> TileGrid:
        """The TileGrid of level ``mpp`` (any positive µm/px: a pinned level need not be trained)."""
        from napari_virchow.slides.tiling import TileGrid

        key = canonical_mpp(mpp)
        with self._lock:
            if key not in self._grids:
                self._grids[key] = TileGrid(self.slide, mpp=key, size=self.size, **self._grid_kw)  # type: ignore[arg-type]
            return self._grids[key]

    def adopt(self, grid: TileGrid) -> None:
        """Use an existing TileGrid (same slide and tile size) as the grid of its level."""
        if grid.slide is not self.slide or grid.size != self.size:
            raise ValueError("adopt a grid of this pyramid's slide and tile size")
        with self._lock:
            self._grids[canonical_mpp(grid.mpp)] = grid

    @property
    def built(self) -> frozenset[float]:
        """The levels whose grid is built (planning from the UI thread needs them all)."""
        with self._lock:
            return frozenset(self._grids)

    def retissue(self, *, tissue_threshold: float | None, keep: TileGrid | None = None) -> None:
        """Re-flag tissue in every built grid with another saturation threshold (``keep``: adopted as is)."""
        self._grid_kw["tissue_threshold"] = tissue_threshold
        with self._lock:
            self._grids = {m: g.with_tissue(tissue_threshold=tissue_threshold) for m, g in self._grids.items()}
        if keep is not None:
            self.adopt(keep)

    def lattice(self, mpp: float) -> Lattice:
        """The lattice of level ``mpp`` (no pixels read)."""
        return Lattice.at(self.geometry, mpp, self.size)

    def plan_view(self, bbox: Sequence[float], canvas_px: tuple[int, int], *, pinned: float | None = None,
                  budget: int | None = None) -> ViewPlan:  # fmt: skip
        """:func:`plan_view` over this slide's levels, counting tissue tiles only."""
        return plan_view(self.geometry, bbox, canvas_px, self.mpps, pinned=pinned, budget=budget,
                         size=self.size, tissue=lambda m: self.grid(m).tissue)  # fmt: skip

    def todo(self, plan: ViewPlan, missing: MissingFn) -> np.ndarray:
        """Tiles of ``plan.mpp`` in view not computed yet, centre-out, at most ``plan.budget``.

        Never lists a tile ``missing`` reports as stored; called again after they are computed
        it continues outward, so a view too large for one budget still fills in, one budget at a time.
        """
        return _still_missing(missing, plan.mpp, plan.in_view)[: plan.budget]

    def missing_in_view(self, plan: ViewPlan, missing: MissingFn) -> dict[float, np.ndarray]:
        """Per level drawn for ``plan`` (coarse to fine), its tiles in view not computed yet."""
        out = {m: _still_missing(missing, m, idx) for m, idx in sorted(plan.underneath.items(), reverse=True)}
        out[plan.mpp] = _still_missing(missing, plan.mpp, plan.in_view)
        return out
