"""The viewer's token-resolution work as plain generators yielding events (Qt-free, like :mod:`napari_virchow.jobs`).

Each takes the tiles in view of one level (``mpp``) and, with ``compressed``, reads and fills that
level's compressed token store at ``k`` PCA dims (created on first use, its PCA fitted on the tiles
of that view). :func:`view_tokens_job` is "Compute visible" when token work is on: the view is
embedded (:func:`napari_virchow.jobs.view_job`), then the tokens of its embedded tiles are stored
(compressed storage on: the tokens of tiles the view embeds come from that same forward pass; tiles
embedded before get a pass of their own) and the token map of the view drawn (token resolution on).
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

__all__ = ["TOKEN_VIEW_TILES", "TokenClustersReady", "TokenFiller", "TokenMapReady", "TokenSimilarityReady",
           "TokensStored", "fill_tokens", "query_tokens_job", "token_clusters_job", "token_map_job",
           "view_tokens_job"]  # fmt: skip

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
    summary once created; the first tiles' tokens are its PCA sample, written when it is).
    ``with_embeddings``: they came from the forward pass that embedded the tiles (no pass of their own)."""

    n_done: int
    n_total: int
    store: StoreSummary | None
    mpp: float
    with_embeddings: bool = False


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


class TokenFiller:
    """Writes tiles' compressed tokens into the store of level ``mpp`` at ``k`` PCA dims.

    A store not there yet is created once :data:`TOKEN_VIEW_TILES` tiles' tokens are in hand (or at
    :meth:`finish`, with fewer), its PCA fitted on them: they need no second forward pass. Tokens come
    from :func:`fill_tokens` (a forward pass of tiles embedded before) or straight from the pass that
    embeds tiles (:meth:`add` as ``iter_embed``'s ``token_sink``).
    """

    def __init__(self, session: SlideSession, mpp: float, k: int = DEFAULT_K) -> None:
        self.session, self.mpp, self.k = session, mpp, k
        self.store: TokenStore | None = token_store(session, mpp, k=k)
        self.n_added = 0
        self._held: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # before the store exists

    def missing(self, indices: np.ndarray) -> np.ndarray:
        """Those of ``indices`` whose tokens are neither stored nor held."""
        idx = np.asarray(indices, np.int64)
        if self.store is not None:
            return self.store.missing(idx)
        held = np.concatenate([h[0] for h in self._held]) if self._held else np.empty(0, np.int64)
        return idx[~np.isin(idx, held)]

    def add(self, indices: np.ndarray, cls: np.ndarray, tokens: np.ndarray) -> None:
        """Store (or, before the store exists, hold) the tokens of tiles ``indices``."""
        self.n_added += len(indices)
        if self.store is not None:
            self.store.write(np.asarray(indices, np.int64), cls, tokens)
            return
        self._held.append((np.asarray(indices, np.int64), cls, tokens))
        if sum(len(h[0]) for h in self._held) >= TOKEN_VIEW_TILES:
            self.finish()

    def finish(self) -> None:
        """Create the store from the tokens held, if any (a cancel keeps what was computed)."""
        if self.store is not None or not self._held:
            return
        made = create_token_store(self.session, self.mpp, np.concatenate([h[2] for h in self._held]), k=self.k)
        for rows, c, t in self._held:
            made.write(rows, c, t)
        self._held.clear()
        self.store = made

    def event(self, n_done: int, n_total: int, *, with_embeddings: bool = False) -> TokensStored:
        """Progress as a :class:`TokensStored` (the store's summary once it exists)."""
        return TokensStored(n_done, n_total, summary(self.store) if self.store is not None else None, self.mpp,
                            with_embeddings)  # fmt: skip


def fill_tokens(session: SlideSession, indices: np.ndarray, *, mpp: float, k: int = DEFAULT_K,
                cancel: threading.Event | None = None,
                filler: TokenFiller | None = None) -> Iterator[object]:  # fmt: skip
    """Store the compressed tokens of tiles ``indices`` of level ``mpp`` that the store (or ``filler``)
    lacks, a forward pass per batch (:class:`TokensStored` after each; a cancel between batches keeps
    every token computed). See :class:`TokenFiller` for when the store is created."""
    from napari_virchow.models.tokens import encode_tokens

    filler = filler if filler is not None else TokenFiller(session, mpp, k)
    todo = filler.missing(np.asarray(indices, np.int64))
    if not len(todo):
        filler.finish()
        return
    grid, encoder = session.grid_at(mpp), session.encoder()
    yield _jobs.Stage(f"compressed tokens: {len(todo)} tiles in view at {mpp:g} µm/px …")
    step = int(session.config.batch_size or 16)
    n_done = 0
    try:
        for start in range(0, len(todo), step):
            _stop(cancel)
            chunk = todo[start : start + step]
            cls, tok = encode_tokens(encoder, grid.read_tiles(chunk), batch_size=step)
            filler.add(chunk, cls, tok)
            n_done += len(chunk)
            if n_done == len(todo):
                filler.finish()  # the last batch: the store exists when its event says so
            yield filler.event(n_done, len(todo))
    finally:
        filler.finish()  # what was computed is kept, also when cancelled


@_jobs.cancellable
def view_tokens_job(session: SlideSession, box: Sequence[float], canvas_px: tuple[int, int], *,
                    pinned: float | None = None, limit: int = 2000, force: bool = False, compressed: bool = False,
                    k: int = DEFAULT_K, token_map: bool = False, attributed: bool = False,
                    cancel: threading.Event | None = None) -> Iterator[object]:  # fmt: skip
    """:func:`napari_virchow.jobs.view_job`, then (``compressed``) the compressed tokens of the view's
    embedded tissue tiles (those the view embeds from the same forward pass) and (``token_map``, with a
    head) the token map of the view, at the view's level."""
    planned: _jobs.Planned | None = None
    asked = False
    fillers: dict[float, TokenFiller] = {}

    def sink(level: float, indices: np.ndarray, cls: np.ndarray, tokens: np.ndarray) -> None:
        if level not in fillers:
            fillers[level] = TokenFiller(session, level, k)
        fillers[level].add(indices, cls, tokens)

    try:
        for ev in _jobs.view_job(session, box, canvas_px, pinned=pinned, limit=limit, force=force, cancel=cancel,
                                 token_sink=sink if compressed else None):  # fmt: skip
            planned = ev if isinstance(ev, _jobs.Planned) else planned
            asked = asked or isinstance(ev, _jobs.TooMany)
            yield ev
    finally:
        for filler in fillers.values():
            filler.finish()  # the tokens of every tile embedded are kept, also when cancelled
    _stop(cancel)  # view_job ends quietly when cancelled: so must the rest
    if planned is None or asked:
        return
    m, grid = planned.mpp, session.grid_at(planned.mpp)
    if compressed:
        in_view = grid.tiles_in(box)
        embedded = in_view[session.done_at(m)[in_view]]
        filler = fillers.get(m) or TokenFiller(session, m, k)
        if filler.n_added:
            yield filler.event(filler.n_added, filler.n_added, with_embeddings=True)
        yield from fill_tokens(session, embedded, mpp=m, k=k, cancel=cancel, filler=filler)
        _stop(cancel)
    if token_map and session.head is not None:
        indices = grid.tiles_in(box, tissue_only=False)[:TOKEN_VIEW_TILES]
        yield from token_map_job(session, session.head, indices, mpp=m, compressed=compressed, attributed=attributed,
                                 k=k, cancel=cancel)  # fmt: skip
