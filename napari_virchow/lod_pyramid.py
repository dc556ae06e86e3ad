"""Refinement over an embedding pyramid: one TileGrid per magnification, and what is left to compute.

:class:`LodPyramid` holds one lazily built :class:`~napari_virchow.slides.tiling.TileGrid` per level of
a slide, plans views with :func:`napari_virchow.lod.plan_view` over their tissue, and asks a
``missing(mpp, indices)`` callback (:func:`missing_from_stores`, :func:`missing_from_done`, or a
session's stores) which tiles of a plan are still to compute, never listing a stored one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np

from napari_virchow.lod import SlideGeometry, ViewPlan, plan_view, usable_mpps
from napari_virchow.slides.lattice import Lattice
from napari_virchow.store.key import canonical_mpp

if TYPE_CHECKING:
    from napari_virchow.models.specs import EncoderSpec
    from napari_virchow.slides.slide import Slide
    from napari_virchow.slides.tiling import TileGrid

__all__ = ["LodPyramid", "MissingFn", "missing_from_done", "missing_from_stores"]

#: ``missing(mpp, indices)`` → those of ``indices`` (tiles of level ``mpp``) not computed yet
MissingFn = Callable[[float, np.ndarray], np.ndarray]


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
