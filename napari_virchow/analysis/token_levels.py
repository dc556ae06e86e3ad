"""Token maps of a session at any level of the pyramid, and its compressed token stores (Qt-free).

What the viewer's token controls call. Every function takes the level ``mpp`` of the view: the
tiles of that level's :class:`~napari_virchow.slides.tiling.TileGrid` are read at that
magnification, the head's probe for it is used (:meth:`MultiScaleHead.nearest`), and the token
cells are ``tile_size_l0 / 16`` level-0 px (7 µm at 0.5 µm/px, 14 µm at 1.0), aligned with the
slide exactly like that level's tile overlays (:mod:`~napari_virchow.analysis.token_rasters`).

Compressed tokens: one :class:`~napari_virchow.analysis.token_store.TokenStore` per embedding
store (slide + encoder + weights + lattice), at ``<cache root>/tokens/<slide>-<mpp>um-<key digest>[-k<k>].zarr`` (the
cache's store listing ignores that folder). It is created when the user enables it, its PCA fitted
on the first tiles whose tokens are computed, and filled with every tile a token view computes and,
while it is enabled, with the tiles "Compute visible" embeds (:func:`~napari_virchow.analysis.token_jobs.fill_tokens`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from napari_virchow.analysis.heads import LinearHead, MultiScaleHead
from napari_virchow.analysis.rasters import Raster
from napari_virchow.analysis.token_maps import ClsAttribution, fit_cls_attribution
from napari_virchow.analysis.token_store import DEFAULT_K, TokenStore
from napari_virchow.analysis.token_views import tile_tokens, token_heatmap, token_similarity_map
from napari_virchow.errors import VirchowError

if TYPE_CHECKING:
    from napari_virchow.session import SlideSession

__all__ = ["StoreSummary", "TokenClusters", "create_token_store", "level_probe", "token_clusters", "token_map",
           "token_similarity_at", "token_store", "token_store_path"]  # fmt: skip


@dataclass(frozen=True)
class StoreSummary:
    """What the token panel shows of a compressed store."""

    path: Path
    k: int
    explained_variance: float
    kb_per_tile: float
    n_stored: int

    def text(self) -> str:
        """One line: k, explained variance, size, tiles stored."""
        return (f"compressed tokens: k = {self.k}, explained variance {self.explained_variance:.3f}, "
                f"{self.kb_per_tile:.1f} KB/tile, {self.n_stored:,} tiles stored")  # fmt: skip


def _batch(session: SlideSession) -> int:
    return int(session.config.batch_size or 16)


def _k(session: SlideSession, k: int) -> int:
    """``k`` as a store of this encoder keeps it (at most the token width)."""
    if int(k) < 1:
        raise VirchowError(f"compressed tokens need k >= 1 PCA dims, got {k}: pick k in the Token resolution panel")
    return min(int(k), session.config.spec.dim // 2)


def token_store_path(session: SlideSession, mpp: float | None = None, k: int = DEFAULT_K) -> Path:
    """Where the compressed tokens of level ``mpp``'s lattice at ``k`` PCA dims live (next to the
    embedding stores; one store per k, so a change of k never discards the tokens of another)."""
    from napari_virchow.store.cache import resolve_cache_root

    key = session.store_key(mpp)
    kk = _k(session, k)
    suffix = "" if kk == min(DEFAULT_K, session.config.spec.dim // 2) else f"-k{kk}"
    name = f"{session.slide.path.stem[:40]}-{key.mpp:g}um-{key.digest[:24]}{suffix}.zarr".replace(":", "_")
    return resolve_cache_root(session.config.cache_root) / "tokens" / name


def token_store(session: SlideSession, mpp: float | None = None, *, sample_tiles: np.ndarray | None = None,
                k: int = DEFAULT_K) -> TokenStore | None:  # fmt: skip
    """The writable token store of level ``mpp`` at ``k`` dims: reopened, or created (PCA fitted on the
    tokens of ``sample_tiles``) when there is none; None when there is none and no sample is given."""
    path = token_store_path(session, mpp, k)
    if path.exists():
        return TokenStore.open(path, mode="r+")
    if sample_tiles is None or not len(sample_tiles):
        return None
    _, tokens = tile_tokens(session.grid_at(mpp), session.encoder(), np.asarray(sample_tiles, np.int64),
                            batch_size=_batch(session))  # fmt: skip
    return create_token_store(session, mpp, tokens, k=k)


def create_token_store(session: SlideSession, mpp: float | None, sample_tokens: np.ndarray, *,
                       k: int = DEFAULT_K) -> TokenStore:  # fmt: skip
    """A new token store of level ``mpp`` at ``k`` dims, its PCA fitted on ``(m, g, g, D)`` tokens."""
    grid = session.grid_at(mpp)
    return TokenStore.create(token_store_path(session, mpp, k), sample_tokens, n_tiles=len(grid), k=_k(session, k),
                             provenance={"encoder": session.config.encoder, "weights_id": session.weights_id,
                                         "mpp": float(grid.mpp), "slide": session.slide.path.name})  # fmt: skip


def summary(store: TokenStore) -> StoreSummary:
    """k, explained variance, KB per tile and tiles stored, read from the store itself."""
    return StoreSummary(store.path, store.k, store.explained_variance, store.kb_per_tile, int(store.done().sum()))


def level_probe(head: LinearHead, mpp: float) -> LinearHead:
    """The probe an overlay of level ``mpp`` uses (a multi-level head's nearest one)."""
    return head.nearest(mpp) if isinstance(head, MultiScaleHead) else head


def _attribution(session: SlideSession, probe: LinearHead, mpp: float) -> ClsAttribution:
    _, emb = session.embedded(mpp=mpp)
    if len(emb) < 2:
        raise VirchowError(f"the CLS-attributed token map needs at least 2 embedded tiles at {mpp:g} µm/px: "
                           "compute the visible tiles first")  # fmt: skip
    return fit_cls_attribution(probe, emb)


def token_map(session: SlideSession, head: LinearHead, indices: np.ndarray, *, mpp: float | None = None,
              store: TokenStore | None = None, attributed: bool = False) -> Raster:  # fmt: skip
    """P(positive) per token of tiles ``indices`` of level ``mpp``, aligned with the slide.

    ``attributed``: the CLS-attributed view (:func:`~napari_virchow.analysis.token_maps.fit_cls_attribution`
    on the level's embedded tiles).
    """
    m = session._mpp(mpp)
    probe = level_probe(head, m)
    att = _attribution(session, probe, m) if attributed else None
    return token_heatmap(session.grid_at(m), session.encoder(), probe, indices, store=store,
                         batch_size=_batch(session), attribution=att)  # fmt: skip


def token_similarity_at(session: SlideSession, query_index: int, indices: np.ndarray, *, mpp: float | None = None,
                        store: TokenStore | None = None) -> Raster:  # fmt: skip
    """Cosine of each token of tiles ``indices`` (level ``mpp``) to the mean token of tile ``query_index``."""
    return token_similarity_map(session.grid_at(mpp), session.encoder(), int(query_index), indices, store=store,
                                batch_size=_batch(session))  # fmt: skip


@dataclass(frozen=True)
class TokenClusters:
    """Token-resolution clusters of the tiles in view: labels 1..k per token, aligned with the slide."""

    raster: Raster
    counts: dict[int, int]
    mpp: float


def token_clusters(session: SlideSession, indices: np.ndarray, k: int, *, mpp: float | None = None,
                   store: TokenStore | None = None) -> TokenClusters:  # fmt: skip
    """K-means (cosine geometry, :func:`~napari_virchow.analysis.clusters.fit_clusters`) of the patch
    tokens of tiles ``indices`` of level ``mpp``.

    Fitted on the tokens themselves, not by projecting them with the tile clusters' model: that model
    lives on CLS ⊕ mean(tokens), and a token has no CLS of its own; pairing it with its tile's CLS
    would make half of every token's features tile-level, drawing the tile lattice back in.
    """
    from napari_virchow.analysis.clusters import fit_clusters
    from napari_virchow.analysis.token_rasters import token_raster
    from napari_virchow.results import tile_counts

    m = session._mpp(mpp)
    grid = session.grid_at(m)
    idx = np.asarray(indices, np.int64)
    if not len(idx):
        raise VirchowError("no tiles in view: pan onto the tissue, then cluster at token resolution")
    _, tokens = tile_tokens(grid, session.encoder(), idx, store=store, batch_size=_batch(session))
    flat = tokens.reshape(-1, tokens.shape[-1])
    model = fit_clusters(flat, k=k)
    labels = model.predict(flat).astype(np.int32).reshape(tokens.shape[:3])
    counts = tile_counts(labels.reshape(-1), model.k)
    raster = token_raster(labels.astype(np.float32), grid.coords[idx], grid.tile_size_l0,
                          mpp=session.slide.require_mpp(), fill=0, slide_l0=session.slide.dimensions)  # fmt: skip
    from dataclasses import replace

    return TokenClusters(replace(raster, data=raster.data.astype(np.int32)), counts, m)
