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

Tile indices are those of ``TileGrid(slide, mpp=m, size=224)``: both use the one
:class:`~napari_virchow.slides.lattice.Lattice` (from the slide's size and µm/px alone), so they
index the store of level ``m``. Everything here is Qt-free and reads no pixels;
:class:`~napari_virchow.lod_pyramid.LodPyramid` holds one lazily built TileGrid per level and asks
a ``missing(mpp, indices)`` callback (e.g. the stores of a session) what is still to compute.

>>> geo = SlideGeometry(65536, 65536, 0.25)
>>> plan = plan_view(geo, view_box(geo, (32768, 32768), 0.5, (1600, 1000)), (1600, 1000),
...                  (0.25, 0.5, 1.0, 2.0))
>>> plan.mpp, plan.fits, len(plan.tiles) <= plan.budget
(0.5, True, True)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from napari_virchow.errors import SlideError
from napari_virchow.slides.lattice import MIN_TILE_L0, Lattice, SlideGeometry
from napari_virchow.store.key import canonical_mpp

__all__ = ["BUDGET_FACTOR", "Lattice", "SlideGeometry", "ViewPlan", "canvas_tiles", "plan_view", "usable_mpps",
           "view_box"]  # fmt: skip

BBox = tuple[float, float, float, float]
#: default budget: this many times the 224-px tiles that fit the canvas
BUDGET_FACTOR = 2.0
#: a level finer than the slide by more than this (relative) would be upsampled: not offered
UPSAMPLE_TOLERANCE = 0.10


def usable_mpps(geometry: SlideGeometry, mpps: Sequence[float], size: int = 224) -> tuple[float, ...]:
    """Those of ``mpps`` this slide can give without upsampling and with at least one whole tile, finest first."""
    keep = set()
    for m in mpps:
        if not (math.isfinite(m) and m > 0):
            raise ValueError(f"magnifications are positive µm/px, got {m!r}")
        lat = Lattice.at(geometry, m, size)
        if m >= geometry.mpp * (1 - UPSAMPLE_TOLERANCE) and lat.tile_size_l0 >= MIN_TILE_L0 and lat.has_full_tile:
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
