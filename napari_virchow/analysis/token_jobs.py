"""The viewer's token-resolution work as plain generators yielding events (Qt-free, like :mod:`napari_virchow.jobs`).

Each takes the tiles in view of one level (``mpp``) and, with ``compressed``, reads and fills that
level's compressed token store at ``k`` PCA dims (created on first use, its PCA fitted on the tiles
of that view). :func:`view_tokens_job` is "Compute visible" when token work is on: the view is
embedded (:func:`napari_virchow.jobs.view_job`), then the tokens of its embedded tiles are stored
(compressed storage on) and the token map of the view drawn (token resolution on).
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
    create_token_store,
    summary,
    token_clusters,
    token_map,
    token_similarity_at,
    token_store,
)
from napari_virchow.analysis.token_store import DEFAULT_K

if TYPE_CHECKING:
    from napari_virchow.analysis.heads import LinearHead
    from napari_virchow.analysis.token_store import TokenStore
    from napari_virchow.session import SlideSession

__all__ = ["TOKEN_VIEW_TILES", "TokenClustersReady", "TokenMapReady", "TokenSimilarityReady", "TokensStored",
           "fill_tokens", "query_tokens_job", "token_clusters_job", "token_map_job", "view_tokens_job"]  # fmt: skip

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


@dataclass(frozen=True)
class TokensStored:
    """``n_done`` of ``n_total`` tiles' tokens are computed for the compressed store (``store``: its
    summary once created; the first tiles' tokens are its PCA sample, written when it is)."""

    n_done: int
    n_total: int
    store: StoreSummary | None
    mpp: float


def _store(session: SlideSession, mpp: float, indices: np.ndarray, compressed: bool, k: int) -> TokenStore | None:
    return token_store(session, mpp, sample_tiles=indices, k=k) if compressed else None


def _stop(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise _jobs.Cancelled


@_jobs.cancellable
def token_map_job(session: SlideSession, head: LinearHead, indices: np.ndarray, *, mpp: float | None = None,
                  compressed: bool = False, attributed: bool = False, k: int = DEFAULT_K,
                  cancel: threading.Event | None = None) -> Iterator[object]:  # fmt: skip
    """P(positive) per token of ``indices`` (tiles of level ``mpp``)."""
    m = session._mpp(mpp)
    how = "compressed tokens" if compressed else "patch tokens"
    yield _jobs.Stage(f"token map: {how} of {len(indices)} tiles in view at {m:g} µm/px …")
    store = _store(session, m, indices, compressed, k)
    _stop(cancel)
    raster = token_map(session, head, indices, mpp=m, store=store, attributed=attributed)
    yield TokenMapReady(raster, summary(store) if store is not None else None, m, attributed)
    yield _jobs.Stage("token map drawn", final=True)


@_jobs.cancellable
def token_clusters_job(session: SlideSession, indices: np.ndarray, k: int, *, mpp: float | None = None,
                       compressed: bool = False, token_k: int = DEFAULT_K,
                       cancel: threading.Event | None = None) -> Iterator[object]:  # fmt: skip
    """K-means of the patch tokens of ``indices`` (tiles of level ``mpp``); ``token_k``: the store's PCA dims."""
    m = session._mpp(mpp)
    yield _jobs.Stage(f"token clusters: {k} clusters of the tokens of {len(indices)} tiles in view …")
    store = _store(session, m, indices, compressed, token_k)
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


def fill_tokens(session: SlideSession, indices: np.ndarray, *, mpp: float, k: int = DEFAULT_K,
                cancel: threading.Event | None = None) -> Iterator[object]:  # fmt: skip
    """Store the compressed tokens of tiles ``indices`` of level ``mpp`` that the store lacks, a
    batch at a time (:class:`TokensStored` after each; a cancel between batches keeps every token computed).

    A store not yet there is created once :data:`TOKEN_VIEW_TILES` tiles' tokens (or all, or those
    computed when cancelled) are in hand, its PCA fitted on them, so they need no second forward pass.
    """
    from napari_virchow.models.tokens import encode_tokens

    grid, encoder = session.grid_at(mpp), session.encoder()
    store = token_store(session, mpp, k=k)
    idx = np.asarray(indices, np.int64)
    todo = idx if store is None else store.missing(idx)
    if not len(todo):
        return
    yield _jobs.Stage(f"compressed tokens: {len(todo)} tiles in view at {mpp:g} µm/px …")
    step = int(session.config.batch_size or 16)
    held: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # before the store exists: its PCA sample

    def flush() -> TokenStore:
        made = create_token_store(session, mpp, np.concatenate([h[2] for h in held]), k=k)
        for rows, c, t in held:
            made.write(rows, c, t)
        held.clear()
        return made

    n_done = 0
    for start in range(0, len(todo), step):
        if cancel is not None and cancel.is_set() and held:
            flush()  # what was computed is kept
        _stop(cancel)
        chunk = todo[start : start + step]
        cls, tok = encode_tokens(encoder, grid.read_tiles(chunk), batch_size=step)
        n_done += len(chunk)
        if store is None:
            held.append((chunk, cls, tok))
            if n_done < min(TOKEN_VIEW_TILES, len(todo)):
                yield TokensStored(n_done, len(todo), None, mpp)
                continue
            store = flush()
        else:
            store.write(chunk, cls, tok)
        yield TokensStored(n_done, len(todo), summary(store), mpp)


@_jobs.cancellable
def view_tokens_job(session: SlideSession, box: Sequence[float], canvas_px: tuple[int, int], *,
                    pinned: float | None = None, limit: int = 2000, force: bool = False, compressed: bool = False,
                    k: int = DEFAULT_K, token_map: bool = False, attributed: bool = False,
                    cancel: threading.Event | None = None) -> Iterator[object]:  # fmt: skip
    """:func:`napari_virchow.jobs.view_job`, then (``compressed``) the compressed tokens of the view's
    embedded tissue tiles and (``token_map``, with a head) the token map of the view, at the view's level."""
    planned: _jobs.Planned | None = None
    asked = False
    for ev in _jobs.view_job(session, box, canvas_px, pinned=pinned, limit=limit, force=force, cancel=cancel):
        planned = ev if isinstance(ev, _jobs.Planned) else planned
        asked = asked or isinstance(ev, _jobs.TooMany)
        yield ev
    _stop(cancel)  # view_job ends quietly when cancelled: so must the rest
    if planned is None or asked:
        return
    m, grid = planned.mpp, session.grid_at(planned.mpp)
    if compressed:
        in_view = grid.tiles_in(box)
        embedded = in_view[session.done_at(m)[in_view]]
        yield from fill_tokens(session, embedded, mpp=m, k=k, cancel=cancel)
        _stop(cancel)
    if token_map and session.head is not None:
        indices = grid.tiles_in(box, tissue_only=False)[:TOKEN_VIEW_TILES]
        yield from token_map_job(session, session.head, indices, mpp=m, compressed=compressed, attributed=attributed,
                                 k=k, cancel=cancel)  # fmt: skip
