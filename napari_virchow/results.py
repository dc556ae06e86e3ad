"""What a session's slow steps return: a fitted head with its class counts, a clustering."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from napari_virchow.analysis.clusters import ClusterModel
from napari_virchow.analysis.heads import LinearHead

__all__ = ["ClusterResult", "TrainResult", "tile_counts"]


@dataclass(frozen=True)
class TrainResult:
    """A head fitted on annotated tiles, with how many tiles of each class it saw (per level when it has levels)."""

    head: LinearHead
    counts: dict[str, int]
    levels: dict[float, dict[str, int]] = field(default_factory=dict)  # µm/px -> class counts of that probe


@dataclass(frozen=True)
class ClusterResult:
    """Cluster id per lattice tile (0 = not embedded), the model, tiles per cluster, PCA colours."""

    labels: np.ndarray = field(repr=False)
    model: ClusterModel
    counts: dict[int, int]
    rgb: np.ndarray | None = field(default=None, repr=False)  # (n_tiles, 3) float in [0, 1], NaN
    mpp: float | None = None  # the magnification (µm/px) whose tiles ``labels`` index; None: the encoder's


def tile_counts(labels: np.ndarray, k: int) -> dict[int, int]:
    """Tiles per cluster id 1..k of per-tile ``labels`` (0 = not embedded)."""
    return {i + 1: int(c) for i, c in enumerate(np.bincount(labels, minlength=k + 1)[1:])}
