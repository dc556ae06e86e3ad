"""The viewer's token-resolution work as plain generators yielding events (Qt-free, like :mod:`napari_virchow.jobs`).

Each takes the tiles in view of one level (``mpp``) and, with ``compressed``, reads and fills that
level's compressed token store (created on first use, its PCA fitted on the tiles of that view).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from napari_virchow import jobs as _jobs
from napari_virchow.analysis.rasters import Raster
from napari_virchow.analysis.token_levels import (
    StoreSummary,
    TokenClusters,
    summary,
    token_clusters,
    token_map,
    token_similarity_at,
    token_store,
)

if TYPE_CHECKING:
    from napari_virchow.analysis.heads import LinearHead
    from napari_virchow.analysis.token_store import TokenStore
    from napari_virchow.session import SlideSession

__all__ = ["TOKEN_VIEW_TILES", "TokenClustersReady", "TokenMapReady", "TokenSimilarityReady", "query_tokens_job",
           "token_clusters_job", "token_map_job"]  # fmt: skip

#: tiles whose tokens one token view computes: about two canvases of 224-px tiles, centre-out
TOKEN_VIEW_TILES = 64


@dataclass(frozen=True)
class TokenMapReady:
    """The token-resolution heatmap of the tiles in view, and the compressed store it used (if any)."""

    raster: Raster
    store: StoreSummary | None
    mpp: float
    attributed: bool = False


@dataclass(frozen=True)
class TokenClustersReady:
    """Token-resolution clusters of the tiles in view."""

    clusters: TokenClusters
    store: StoreSummary | None


@dataclass(frozen=True)
class TokenSimilarityReady:
    """Cosine of each token in view to the query tile's mean token."""

    raster: Raster
    query_index: int
    mpp: float


def _store(session: SlideSession, mpp: float, indices: np.ndarray, compressed: bool) -> TokenStore | None:
    return token_store(session, mpp, sample_tiles=indices) if compressed else None


def _stop(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise _jobs.Cancelled


@_jobs.cancellable
def token_map_job(session: SlideSession, head: LinearHead, indices: np.ndarray, *, mpp: float | None = None,
                  compressed: bool = False, attributed: bool = False,
                  cancel: threading.Event | None = None) -> Iterator[object]:  # fmt: skip
    """P(positive) per token of ``indices`` (tiles of level ``mpp``)."""
    m = session._mpp(mpp)
    how = "compressed tokens" if compressed else "patch tokens"
    yield _jobs.Stage(f"token map: {how} of {len(indices)} tiles in view at {m:g} µm/px …")
    store = _store(session, m, indices, compressed)
    _stop(cancel)
    raster = token_map(session, head, indices, mpp=m, store=store, attributed=attributed)
    yield TokenMapReady(raster, summary(store) if store is not None else None, m, attributed)
    yield _jobs.Stage("token map drawn", final=True)


@_jobs.cancellable
def token_clusters_job(session: SlideSession, indices: np.ndarray, k: int, *, mpp: float | None = None,
                       compressed: bool = False,
                       cancel: threading.Event | None = None) -> Iterator[object]:  # fmt: skip
    """K-means of the patch tokens of ``indices`` (tiles of level ``mpp``)."""
    m = session._mpp(mpp)
    yield _jobs.Stage(f"token clusters: {k} clusters of the tokens of {len(indices)} tiles in view …")
    store = _store(session, m, indices, compressed)
    _stop(cancel)
    result = token_clusters(session, indices, k, mpp=m, store=store)
    yield TokenClustersReady(result, summary(store) if store is not None else None)
    yield _jobs.Stage(f"{len(result.counts)} token clusters drawn", final=True)


@_jobs.cancellable
def query_tokens_job(session: SlideSession, x: float, y: float, view: Sequence[float], *, k: int = 20,
                     box: Sequence[float] | None = None, mpp: float | None = None,
                     cancel: threading.Event | None = None) -> Iterator[object]:  # fmt: skip
    """:func:`napari_virchow.jobs.query_job`, then the cosine of each token of the tiles in ``view``
    (level-0 x0, y0, x1, y1) to the mean token of the query's first tile."""
    query: np.ndarray | None = None
    for ev in _jobs.query_job(session, x, y, k=k, box=box, mpp=mpp, cancel=cancel):
        if isinstance(ev, _jobs.Queried):
            query = np.asarray(ev.query_indices, np.int64)
        yield ev
    if query is None or not len(query):
        return
    _stop(cancel)
    m = session._mpp(mpp)
    indices = session.grid_at(m).tiles_in(view, tissue_only=False)[:TOKEN_VIEW_TILES]
    yield _jobs.Stage(f"token similarity: tokens of {len(indices)} tiles in view …")
    raster = token_similarity_at(session, int(query[0]), indices, mpp=m)
    yield TokenSimilarityReady(raster, int(query[0]), m)
    yield _jobs.Stage("token similarity drawn", final=True)
