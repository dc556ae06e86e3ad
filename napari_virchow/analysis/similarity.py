"""Similarity on one slide: unit vectors, cosine similarity to a query, top-k distinct regions.

The cross-slide faiss index lives in :mod:`napari_virchow.analysis.index`.
All functions take float16 or float32 ``(n, dim)`` embeddings and do their math in float32.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from napari_virchow.errors import VirchowError

__all__ = [
    "AnalysisError",
    "Hit",
    "cosine_similarity",
    "as_2d",
    "l2_normalize",
    "query_vector",
    "row_chunks",
    "spatially_distinct",
    "top_k_hits",
]

_CHUNK = 65536  # rows converted to float32 at a time: bounds memory on 10^5-tile slides


class AnalysisError(VirchowError, ValueError):
    """Bad input to an analysis step (too few tiles, wrong dimension, foreign index...)."""


def row_chunks(n: int) -> Iterator[slice]:
    """Slices of at most 65,536 rows: bounds the float32 copy of a float16 array."""
    for start in range(0, n, _CHUNK):
        yield slice(start, min(start + _CHUNK, n))


def as_2d(embeddings: np.ndarray, what: str = "embeddings") -> np.ndarray:
    """``embeddings`` as an array, refused unless it is ``(n, dim)``."""
    x = np.asarray(embeddings)
    if x.ndim != 2:
        raise AnalysisError(f"{what} must be an (n, dim) array, got shape {x.shape}")
    return x


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, float32; all-zero rows stay zero instead of becoming NaN."""
    out = np.array(x, dtype=np.float32, copy=True)
    norms = np.linalg.norm(out, axis=-1, keepdims=True)
    np.divide(out, norms, out=out, where=norms > 0)
    return out


@dataclass(frozen=True)
class Hit:
    """One region found by a similarity search; ``x, y`` are the tile's level-0 top-left px and
    ``tile_size_l0`` its side in level-0 px of its own slide (slides of a cohort differ)."""

    index: int
    x: int
    y: int
    score: float
    slide: str | None = None
    exists: bool = True
    tile_size_l0: int | None = None


def query_vector(query: np.ndarray, dim: int) -> np.ndarray:
    """Unit vector from one query embedding, or the mean direction of several."""
    q = np.asarray(query, dtype=np.float32)
    q = q[None, :] if q.ndim == 1 else q
    if q.ndim != 2 or q.shape[1] != dim or q.shape[0] == 0:
        raise AnalysisError(f"query must be (dim,) or (m, dim) with dim={dim}, got {q.shape}")
    return l2_normalize(l2_normalize(q).mean(axis=0))


def cosine_similarity(query: np.ndarray, embeddings: np.ndarray) -> np.ndarray:
    """Cosine similarity of every embedding to ``query``, ``(n,)`` float32 in [-1, 1].

    A ``(m, dim)`` query (e.g. the tiles under a drawn region) is averaged after normalisation.
    """
    x = as_2d(embeddings)
    q = query_vector(query, x.shape[1])
    out = np.empty(x.shape[0], dtype=np.float32)
    for sl in row_chunks(x.shape[0]):
        out[sl] = l2_normalize(x[sl]) @ q
    return out


def top_k_hits(
    scores: np.ndarray,
    coords: np.ndarray,
    tile_size_l0: int,
    k: int = 20,
    *,
    min_distance_tiles: int = 2,
    exclude: np.ndarray | None = None,
    slide: str | None = None,
    exists: bool = True,
) -> list[Hit]:
    """Best-scoring, spatially distinct tiles (greedy non-maximum suppression).

    Take the best tile, drop every tile within ``min_distance_tiles`` tile widths of it
    (Chebyshev distance: 2 drops the 5 × 5 block around it), repeat. ``0`` disables suppression.
    NaN scores (tiles not computed) and ``exclude`` (indices or boolean mask, e.g. the query
    tiles) are skipped. Returns fewer than ``k`` hits when fewer remain.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    xy = np.asarray(coords, dtype=np.int64)
    if xy.shape != (s.shape[0], 2):
        raise AnalysisError(f"coords must be ({s.shape[0]}, 2) to match scores, got {xy.shape}")
    valid = ~np.isnan(s)
    if exclude is not None:
        ex = np.asarray(exclude)
        if ex.dtype == bool:
            valid &= ~ex
        else:
            valid[ex.astype(np.int64)] = False
    cand = np.flatnonzero(valid)
    cand = cand[np.argsort(-s[cand], kind="stable")]
    picked = cand[spatially_distinct(xy[cand], min_distance_tiles * tile_size_l0, k)]
    return [Hit(index=int(i), x=int(xy[i, 0]), y=int(xy[i, 1]), score=float(s[i]), slide=slide, exists=exists,
                tile_size_l0=int(tile_size_l0)) for i in picked]  # fmt: skip


def spatially_distinct(xy: np.ndarray, reach: int | np.ndarray, k: int, groups: np.ndarray | None = None) -> np.ndarray:
    """Greedy non-maximum suppression: the one spatial suppression step of the package.

    ``xy`` are candidates' level-0 positions, best first. Walk them in order and keep one unless
    an earlier kept candidate of the same group (slide) lies within ``reach`` level-0 px of it
    (Chebyshev distance); stop at ``k``. ``reach`` is one number or one per candidate (slides
    with other tile sizes); ``<= 0`` keeps everything. Returns the kept positions into ``xy``.
    """
    pts = np.asarray(xy, dtype=np.int64).reshape(-1, 2)
    reaches = np.broadcast_to(np.asarray(reach, dtype=np.int64), (len(pts),))
    group = np.zeros(len(pts), np.int64) if groups is None else np.asarray(groups, np.int64)
    kept: list[int] = []
    kept_by_group: dict[int, list[int]] = {}
    for i in range(len(pts)):
        if len(kept) >= k:
            break
        mine = kept_by_group.setdefault(int(group[i]), [])
        if mine and reaches[i] > 0 and (np.abs(pts[mine] - pts[i]).max(axis=1) <= reaches[i]).any():
            continue
        mine.append(i)
        kept.append(i)
    return np.asarray(kept, dtype=np.int64)
