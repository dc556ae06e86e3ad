"""Which tiles to label next: uncertain for the probe, and far from the tiles already labelled.

The rule (active learning by uncertainty sampling, spread out in space):

- **uncertainty** of a tile is ``1 - |2 p - 1|`` for a probe's positive-class probability ``p``
  (1 at ``p = 0.5``, 0 at 0 or 1); with one column per class it is ``1 - (p_first - p_second)``,
  one minus the margin between the two most likely classes (the same number for two classes);
- **distance factor** ``1 - exp(-d / scale)``, ``d`` the distance in tile widths from the tile's
  centre to the nearest labelled tile (Euclidean), ``scale`` = ``distance_scale_tiles``: a tile next
  to a labelled one adds little, one ``3 × scale`` tiles away counts almost fully; 1 when nothing is
  labelled yet;
- **score** = uncertainty × distance factor; tiles are taken best first, and the one spatial
  suppression step of the package (:func:`~napari_virchow.analysis.similarity.spatially_distinct`)
  drops any tile within ``min_distance_tiles`` of a better suggestion, so the suggestions are spread
  over the slide instead of crowding one uncertain border.

Labelled tiles, tiles without a probability (NaN: not embedded) and tiles outside ``candidates``
(e.g. glass) are never suggested.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from napari_virchow.analysis.similarity import AnalysisError, spatially_distinct

__all__ = ["Suggestion", "distance_factor", "suggest_tiles", "uncertainty"]


@dataclass(frozen=True)
class Suggestion:
    """A tile worth labelling; ``x, y`` its level-0 top-left px, ``probability`` the probe's P(positive)."""

    index: int
    x: int
    y: int
    probability: float
    uncertainty: float
    distance_tiles: float  # to the nearest labelled tile (inf when none is labelled)
    score: float


def uncertainty(probabilities: np.ndarray) -> np.ndarray:
    """``1 - |2p - 1|`` for ``(n,)`` probabilities; ``1 - margin`` of the two best for ``(n, classes)``."""
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim == 1:
        return 1.0 - np.abs(2.0 * p - 1.0)
    if p.ndim != 2 or p.shape[1] < 2:
        raise AnalysisError(f"probabilities must be (n,) or (n, classes ≥ 2), got shape {p.shape}")
    top2 = -np.sort(-p, axis=1)[:, :2]
    return 1.0 - (top2[:, 0] - top2[:, 1])


def distance_factor(coords: np.ndarray, tile_size_l0: int, labelled: np.ndarray, *,
                    scale_tiles: float = 2.0) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Per tile: the distance (tile widths) to the nearest labelled tile, and ``1 - exp(-d / scale)``."""
    xy = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    lab = np.asarray(labelled, dtype=np.int64).reshape(-1)
    if not len(lab):
        return np.full(len(xy), np.inf), np.ones(len(xy))
    from scipy.spatial import cKDTree

    d, _ = cKDTree(xy[lab]).query(xy, k=1)
    d = np.asarray(d, dtype=np.float64) / float(tile_size_l0)
    return d, 1.0 - np.exp(-d / float(scale_tiles))


def suggest_tiles(probabilities: np.ndarray, coords: np.ndarray, tile_size_l0: int, labelled: np.ndarray,
                  k: int = 10, *, min_distance_tiles: int = 2, distance_scale_tiles: float = 2.0,
                  candidates: np.ndarray | None = None, positive: int = -1) -> list[Suggestion]:  # fmt: skip
    """The ``k`` tiles most worth labelling next, best first (the rule is in the module docstring).

    Parameters
    ----------
    probabilities
        ``(n,)`` positive-class probability per tile, or ``(n, classes)``; NaN = not embedded.
    coords
        ``(n, 2)`` level-0 top-left ``(x, y)`` px of each tile.
    tile_size_l0
        Tile width in level-0 px.
    labelled
        Indices of the tiles already labelled (never suggested; suggestions keep away from them).
    k
        How many suggestions at most (fewer when fewer tiles qualify).
    min_distance_tiles
        Suggestions closer than this many tile widths (Chebyshev) to a better one are dropped; 0 keeps all.
    distance_scale_tiles
        ``scale`` of the distance factor, in tile widths.
    candidates
        Boolean mask of tiles that may be suggested (e.g. the tissue mask); all when None.
    positive
        With ``(n, classes)`` probabilities, the column reported as ``probability``.
    """
    p = np.asarray(probabilities, dtype=np.float64)
    xy = np.asarray(coords, dtype=np.int64)
    if xy.shape != (p.shape[0], 2):
        raise AnalysisError(f"coords must be ({p.shape[0]}, 2) to match the probabilities, got {xy.shape}")
    if tile_size_l0 <= 0 or distance_scale_tiles <= 0:
        raise AnalysisError(f"tile size ({tile_size_l0}) and distance scale ({distance_scale_tiles}) must be > 0")
    lab = np.unique(np.asarray(labelled, dtype=np.int64).reshape(-1))
    if len(lab) and (lab.min() < 0 or lab.max() >= len(p)):
        raise AnalysisError(f"labelled tile indices must be in 0..{len(p) - 1}, got {lab.min()}..{lab.max()}")
    finite = np.isfinite(p) if p.ndim == 1 else np.isfinite(p).all(axis=1)
    valid = np.array(finite, dtype=bool)
    if candidates is not None:
        mask = np.asarray(candidates, dtype=bool).reshape(-1)
        if mask.shape != valid.shape:
            raise AnalysisError(f"candidates must be a mask of {len(p)} tiles, got {mask.shape}")
        valid &= mask
    valid[lab] = False
    unc = np.zeros(len(p))
    unc[finite] = uncertainty(p[finite])
    dist, factor = distance_factor(xy, tile_size_l0, lab, scale_tiles=distance_scale_tiles)
    score = unc * factor
    cand = np.flatnonzero(valid)
    cand = cand[np.argsort(-score[cand], kind="stable")]
    picked = cand[spatially_distinct(xy[cand], min_distance_tiles * tile_size_l0, k)]
    shown = p if p.ndim == 1 else p[:, positive]
    return [Suggestion(index=int(i), x=int(xy[i, 0]), y=int(xy[i, 1]), probability=float(shown[i]),
                       uncertainty=float(unc[i]), distance_tiles=float(dist[i]), score=float(score[i]))
            for i in picked]  # fmt: skip
