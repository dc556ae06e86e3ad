"""What the viewer draws at token resolution for the tiles in view (Qt-free; the widget calls these).

- :func:`token_heatmap`: P(positive class) per 14-px token for a linear head, on the same [0, 1]
  scale as the tile heatmap (draw it with the same colormap and ``mask_below(threshold)``).
- :func:`token_similarity_map`: cosine of each token to the query's mean token.

Tokens come from the encoder's forward on the tiles in view (recomputed on demand) or, when a
:class:`~napari_virchow.analysis.token_store.TokenStore` is given, from its compressed codes; tiles
the store lacks are recomputed and, if it is writable, added to it. Works on any grid of the
level-of-detail pyramid (a 1.0 µm/px grid's token cells are 28 level-0 px of a 0.5 µm/px slide).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from napari_virchow.analysis.heads import LinearHead
from napari_virchow.analysis.rasters import Raster
from napari_virchow.analysis.token_maps import ClsAttribution, token_logits, token_probability
from napari_virchow.analysis.token_rasters import token_raster

if TYPE_CHECKING:
    from napari_virchow.analysis.token_store import TokenStore
    from napari_virchow.models.encoder import Encoder
    from napari_virchow.slides.tiling import TileGrid

__all__ = ["query_token", "tile_tokens", "token_heatmap", "token_similarity", "token_similarity_map"]


def _indices(tile_indices: np.ndarray | list[int], grid: TileGrid) -> np.ndarray:
    idx = np.asarray(tile_indices, np.int64).reshape(-1)
    if len(idx) and (idx.min() < 0 or idx.max() >= len(grid)):
        raise IndexError(f"tile indices must be in 0..{len(grid) - 1} for {grid.slide.path.name}")
    return idx


def tile_tokens(
    grid: TileGrid, encoder: Encoder, tile_indices: np.ndarray | list[int], *,
    store: TokenStore | None = None, batch_size: int = 16,
) -> tuple[np.ndarray, np.ndarray]:
    """``(cls (n, D), tokens (n, g, g, D))`` of the tiles: from ``store`` where held, else recomputed."""  # fmt: skip
    from napari_virchow.models.tokens import encode_tokens

    idx = _indices(tile_indices, grid)
    missing = idx if store is None else store.missing(idx)
    fresh: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    if len(missing):
        cls, tok = encode_tokens(encoder, grid.read_tiles(missing), batch_size=batch_size)
        if store is not None and store.writable:
            store.write(missing, cls, tok)
        fresh = {int(i): (cls[k], tok[k]) for k, i in enumerate(missing)}
    held = np.asarray([i for i in idx if int(i) not in fresh], np.int64)
    stored = {}
    if len(held) and store is not None:
        c, t = store.tokens(held)
        stored = {int(i): (c[k], t[k]) for k, i in enumerate(held)}
    rows = [fresh.get(int(i)) or stored[int(i)] for i in idx]
    if not rows:
        return np.zeros((0, encoder.spec.dim // 2), np.float32), np.zeros((0, 0, 0, encoder.spec.dim // 2), np.float32)
    return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])


def token_heatmap(
    grid: TileGrid, encoder: Encoder, head: LinearHead, tile_indices: np.ndarray | list[int], *,
    store: TokenStore | None = None, batch_size: int = 16, attribution: ClsAttribution | None = None,
) -> Raster:
    """P(``head.positive_class``) per token of the tiles, as a raster aligned with the slide in µm.

    With ``store``: stored tiles are scored from their compressed codes (no forward pass), the
    others recomputed (and stored when the store is writable). With ``attribution`` (from
    :func:`~napari_virchow.analysis.token_maps.fit_cls_attribution`): the CLS-attributed view.
    """  # fmt: skip
    from napari_virchow.models.tokens import encode_tokens

    idx = _indices(tile_indices, grid)
    if store is None:
        logits = token_logits(head, *encode_tokens(encoder, grid.read_tiles(idx), batch_size=batch_size),
                              attribution=attribution)
    else:
        missing = store.missing(idx)
        logits_by: dict[int, np.ndarray] = {}
        if len(missing):
            cls, tok = encode_tokens(encoder, grid.read_tiles(missing), batch_size=batch_size)
            if store.writable:
                store.write(missing, cls, tok)
            logits_by.update(zip(missing.tolist(), token_logits(head, cls, tok, attribution=attribution), strict=True))
        held = np.asarray([i for i in idx.tolist() if i not in logits_by], np.int64)
        if len(held):
            logits_by.update(zip(held.tolist(), store.token_logits(head, held, attribution=attribution), strict=True))
        logits = np.stack([logits_by[i] for i in idx.tolist()]) if len(idx) else np.zeros((0, 1, 1, 1), np.float32)
    return token_raster(token_probability(head, logits), grid.coords[idx], grid.tile_size_l0,
                        mpp=grid.slide.require_mpp(), slide_l0=grid.slide.dimensions)  # fmt: skip


def query_token(tokens: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """The query's mean token ``(D,)``: the mean of ``(…, D)`` tokens (those where ``mask`` is true)."""
    t = np.asarray(tokens, np.float32)
    flat = t.reshape(-1, t.shape[-1])
    if mask is not None:
        flat = flat[np.asarray(mask, bool).reshape(-1)]
    if not len(flat):
        raise ValueError("the query holds no tokens: click inside a computed tile")
    return flat.mean(axis=0)


def token_similarity(tokens: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Cosine similarity of every token ``(…, D)`` to the ``(D,)`` query token, float32 ``(…)``."""
    from napari_virchow.analysis.similarity import l2_normalize

    t = np.asarray(tokens, np.float32)
    q = l2_normalize(np.asarray(query, np.float32).reshape(1, -1))[0]
    return (l2_normalize(t.reshape(-1, t.shape[-1])) @ q).reshape(t.shape[:-1]).astype(np.float32)


def token_similarity_map(
    grid: TileGrid, encoder: Encoder, query_index: int, tile_indices: np.ndarray | list[int], *,
    query_mask: np.ndarray | None = None, store: TokenStore | None = None, batch_size: int = 16,
) -> Raster:
    """Cosine of each token of the tiles to the mean token of tile ``query_index`` (the clicked
    one; only its tokens where the ``(g, g)`` ``query_mask`` is true, e.g. those under a drawn
    region), as a raster aligned with the slide: a click on a gland lights glands, not tiles."""  # fmt: skip
    idx = _indices(tile_indices, grid)
    _, q_tokens = tile_tokens(grid, encoder, [int(query_index)], store=store, batch_size=batch_size)
    _, tokens = tile_tokens(grid, encoder, idx, store=store, batch_size=batch_size)
    sim = token_similarity(tokens, query_token(q_tokens, query_mask)) if len(idx) else np.zeros((0, 1, 1), np.float32)
    return token_raster(sim, grid.coords[idx], grid.tile_size_l0, mpp=grid.slide.require_mpp(),
                        slide_l0=grid.slide.dimensions)
