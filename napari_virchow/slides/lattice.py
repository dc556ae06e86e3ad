"""The tile lattice of a slide at one magnification: geometry only, no pixels, no tissue.

The one definition of which tile index means which square of the slide, used by
:class:`~napari_virchow.slides.tiling.TileGrid` (which adds pixels and tissue), by the level-of-detail
planner (:mod:`napari_virchow.lod`, which needs no pixels) and by the overlays. Tiles are
non-overlapping ``tile_size_l0`` squares anchored at (0, 0), row-major, ``tile_size_l0 =
round(size * mpp / slide_mpp)``. The lattice covers the *whole* slide: the last row and column
are partial tiles when the slide is not a multiple of the tile (``rows = ceil(height / t)``), read
padded with white outside the slide (what OpenSlide's transparent background composited on white
gives) and flagged by :attr:`Lattice.partial`. Lattice version 1 (napari-virchow ≤ 0.2) dropped
them (``rows = height // t``); stores of that lattice are keyed apart (see
:func:`napari_virchow.store.cache.lattice_fingerprint`) and never read as this one.

>>> lat = Lattice.at(SlideGeometry(2220, 2967, 0.499), 0.5)   # the sample slide
>>> lat.tile_size_l0, (lat.rows, lat.cols), int(lat.partial.sum())
(224, (14, 10), 23)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_virchow.store.key import canonical_mpp

if TYPE_CHECKING:
    from napari_virchow.slides.slide import Slide

__all__ = ["EDGES", "LATTICE_VERSION", "MIN_TILE_L0", "Lattice", "SlideGeometry"]

#: 1: partial edge tiles dropped (≤ 0.2); 2: partial edge tiles kept, padded with white
LATTICE_VERSION = 2
#: how pixels outside the slide are filled in a partial edge tile
EDGES = "padded-white"
#: fewest level-0 px a tile may span: below this the slide is far coarser than the model's
#: magnification (or its resolution tag is wrong) and the lattice would explode to ~1 tile per px
MIN_TILE_L0 = 16


@dataclass(frozen=True)
class SlideGeometry:
    """Level-0 ``width`` × ``height`` px at ``mpp`` µm/px: all a lattice needs of a slide."""

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
    """The tiles of ``size`` px at ``mpp`` µm/px over a ``width`` × ``height`` px slide.

    Attributes
    ----------
    mpp, size
        Target µm/px (canonical, as store keys hold it) and tile side in px.
    tile_size_l0
        Tile side and stride in level-0 px.
    rows, cols
        Lattice shape, partial edge tiles included.
    width, height
        The slide's level-0 size (what makes a tile partial).
    """

    mpp: float
    size: int
    tile_size_l0: int
    rows: int
    cols: int
    width: int
    height: int

    @classmethod
    def at(cls, geometry: SlideGeometry, mpp: float, size: int = 224) -> Lattice:
        """The lattice of ``size``-px tiles at ``mpp`` µm/px over ``geometry``."""
        t = max(1, round(size * mpp / geometry.mpp))
        w, h = int(geometry.width), int(geometry.height)
        return cls(canonical_mpp(mpp), int(size), t, -(-h // t), -(-w // t), w, h)

    def __len__(self) -> int:
        return self.rows * self.cols

    @property
    def has_full_tile(self) -> bool:
        """Whether the slide holds at least one whole tile (else nothing is tiled at this level)."""
        return self.width >= self.tile_size_l0 and self.height >= self.tile_size_l0

    @functools.cached_property
    def coords(self) -> np.ndarray:
        """(n, 2) int64 level-0 (x, y) of every tile's top-left corner, row-major (read-only)."""
        r, c = np.divmod(np.arange(len(self), dtype=np.int64), self.cols)
        xy = np.stack([c, r], axis=1) * self.tile_size_l0
        xy.flags.writeable = False
        return xy

    @functools.cached_property
    def partial(self) -> np.ndarray:
        """(n,) bool: tiles reaching past the slide's right or bottom edge (padded with white)."""
        t = self.tile_size_l0
        xy = self.coords
        out = (xy[:, 0] + t > self.width) | (xy[:, 1] + t > self.height)
        out.flags.writeable = False
        return out

    @property
    def inside_fraction(self) -> np.ndarray:
        """(n,) float: the fraction of each tile's footprint that lies on the slide (1 unless partial)."""
        t = self.tile_size_l0
        xy = self.coords
        return (np.minimum(self.width - xy[:, 0], t) * np.minimum(self.height - xy[:, 1], t)) / float(t * t)

    def tiles_in(self, bbox: Sequence[float], tissue: np.ndarray | None = None) -> np.ndarray:
        """Indices of tiles intersecting ``bbox`` (level-0 px), nearest its centre first.

        ``tissue``: bool flags per tile (``TileGrid.tissue``) to keep; None keeps every tile. Ties
        in distance keep index order, so the order is deterministic.
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

    def index_at(self, x: float, y: float) -> int | None:
        """Index of the tile containing level-0 point (x, y), or None off the slide."""
        if not (0 <= x < self.width and 0 <= y < self.height):
            return None
        return math.floor(y / self.tile_size_l0) * self.cols + math.floor(x / self.tile_size_l0)

    def as_attrs(self) -> dict[str, Any]:
        """The lattice as plain JSON (a store's ``lattice`` provenance attr)."""
        return {"version": LATTICE_VERSION, "edges": EDGES, "rows": self.rows, "cols": self.cols,
                "tile_size_l0": self.tile_size_l0, "slide_size": [self.width, self.height]}  # fmt: skip
