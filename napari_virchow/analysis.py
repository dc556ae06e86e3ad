"""Embedding analysis on one slide: clusters, PCA colours, cosine similarity, top-k regions.

The cross-slide faiss index lives in ``_search_index.py`` and is re-exported here.
All functions take float16 or float32 ``(n, dim)`` embeddings and do their math in float32.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .errors import VirchowError

if TYPE_CHECKING:
    from ._search_index import IndexEntry, SlideIndex, build_index, load_index

__all__ = [
    "AnalysisError",
    "ClusterModel",
    "Hit",
    "IndexEntry",
    "SlideIndex",
    "build_index",
    "cosine_similarity",
    "fit_clusters",
    "l2_normalize",
    "load_index",
    "pca_rgb",
    "top_k_hits",
]

_CHUNK = 65536  # rows converted to float32 at a time: bounds memory on 10^5-tile slides


class AnalysisError(VirchowError, ValueError):
    """Bad input to an analysis step (too few tiles, wrong dimension, foreign index...)."""


def _chunks(n: int) -> Iterator[slice]:
    for start in range(0, n, _CHUNK):
        yield slice(start, min(start + _CHUNK, n))


def _as_2d(embeddings: np.ndarray, what: str = "embeddings") -> np.ndarray:
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
    """One region found by a similarity search; ``x, y`` are the tile's level-0 top-left px."""

    index: int
    x: int
    y: int
    score: float
    slide: str | None = None
    exists: bool = True


@dataclass
class ClusterModel:
    """k-means centres on L2-normalised embeddings; labels run 1..k (0 is left for background).

    Label 1 is the largest cluster of the fitting sample, so colours stay put between runs.
    """

    centers: np.ndarray
    counts: np.ndarray
    seed: int = 0

    @property
    def k(self) -> int:
        return int(self.centers.shape[0])

    def predict(self, embeddings: np.ndarray) -> np.ndarray:
        """Cluster label (1..k, int32) of each embedding: the nearest fitted centre.

        Prediction never refits, so tiles computed later get labels consistent with earlier ones.
        """
        x = _as_2d(embeddings)
        if x.shape[1] != self.centers.shape[1]:
            raise AnalysisError(
                f"cluster model expects dim {self.centers.shape[1]}, got embeddings of dim "
                f"{x.shape[1]}; refit the clusters for this encoder"
            )
        labels = np.empty(x.shape[0], dtype=np.int32)
        c_sq = (self.centers**2).sum(axis=1)
        for sl in _chunks(x.shape[0]):
            # argmin |x - c|^2 = argmin (|c|^2 - 2 x·c) since |x| is fixed per row
            d = c_sq[None, :] - 2.0 * (l2_normalize(x[sl]) @ self.centers.T)
            labels[sl] = d.argmin(axis=1) + 1
        return labels


def fit_clusters(
    embeddings: np.ndarray, k: int = 8, *, sample: int = 20000, seed: int = 0
) -> ClusterModel:
    """Fit MiniBatchKMeans on a random sample of at most ``sample`` L2-normalised embeddings.

    Normalising first makes Euclidean k-means follow cosine similarity, the geometry the
    similarity map uses. Asking for more clusters than there are tiles raises
    :class:`AnalysisError` rather than silently clamping ``k``: a clamped map would show fewer
    colours than the user asked for with no explanation.

    Returns
    -------
    ClusterModel
        ``counts[i]`` is the number of given embeddings in cluster ``i + 1``.
    """
    from sklearn.cluster import MiniBatchKMeans

    x = _as_2d(embeddings)
    n = x.shape[0]
    if k < 1:
        raise AnalysisError(f"number of clusters must be at least 1, got {k}")
    if k > n:
        raise AnalysisError(
            f"cannot make {k} clusters from {n} computed tiles; compute more tiles "
            f"(embed a larger region) or lower the number of clusters to at most {n}"
        )
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, size=sample, replace=False)) if n > sample else np.arange(n)
    xs = l2_normalize(x[rows])
    km = MiniBatchKMeans(
        n_clusters=k, batch_size=min(4096, len(rows)), n_init=3, random_state=seed
    ).fit(xs)
    centers = km.cluster_centers_.astype(np.float32)
    sizes = np.bincount(km.labels_, minlength=k)
    centers = centers[np.argsort(-sizes, kind="stable")]
    model = ClusterModel(centers=centers, counts=np.zeros(k, dtype=np.int64), seed=seed)
    model.counts = np.bincount(model.predict(x) - 1, minlength=k).astype(np.int64)
    return model


def pca_rgb(
    embeddings: np.ndarray,
    fit_on: np.ndarray | None = None,
    *,
    percentiles: tuple[float, float] = (1.0, 99.0),
    max_fit: int = 20000,
    seed: int = 0,
) -> np.ndarray:
    """Colour each embedding by its first three principal components, ``(n, 3)`` uint8.

    Parameters
    ----------
    fit_on : rows (index or boolean mask into ``embeddings``) or a separate ``(m, dim)`` array to
        fit the PCA and the colour range on; pass the same set on every call to keep colours stable
        as tiles are added. Default: all embeddings (subsampled to ``max_fit``).
    percentiles : robust range per component; values outside it saturate instead of letting a few
        outlier tiles wash out the rest.
    """
    x = _as_2d(embeddings)
    if fit_on is None:
        ref = x
    else:
        sel = np.asarray(fit_on)
        ref = _as_2d(sel, "fit_on") if sel.ndim == 2 else x[sel]
    if ref.shape[0] > max_fit:
        ref = ref[np.sort(np.random.default_rng(seed).choice(ref.shape[0], max_fit, False))]
    ref = l2_normalize(ref)
    out = np.full((x.shape[0], 3), 128, dtype=np.uint8)
    if ref.shape[0] < 2 or x.shape[0] == 0:
        return out
    mean = ref.mean(axis=0)
    # Thin SVD of the (≤ max_fit, dim) reference: exact, and fast enough at 20000 × 2560.
    _, _, vt = np.linalg.svd(ref - mean, full_matrices=False)
    comps = vt[:3]
    # Deterministic signs: the largest loading of each component is positive.
    comps *= np.sign(comps[np.arange(len(comps)), np.abs(comps).argmax(axis=1)])[:, None]
    ref_proj = (ref - mean) @ comps.T
    lo, hi = np.percentile(ref_proj, percentiles, axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    for sl in _chunks(x.shape[0]):
        proj = (l2_normalize(x[sl]) - mean) @ comps.T
        out[sl, : len(comps)] = np.round(np.clip((proj - lo) / span, 0, 1) * 255).astype(np.uint8)
    return out


def _query_vector(query: np.ndarray, dim: int) -> np.ndarray:
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
    x = _as_2d(embeddings)
    q = _query_vector(query, x.shape[1])
    out = np.empty(x.shape[0], dtype=np.float32)
    for sl in _chunks(x.shape[0]):
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
    reach = min_distance_tiles * tile_size_l0
    picked: list[int] = []
    for i in cand:
        if len(picked) >= k:
            break
        if picked and reach > 0:
            d = np.abs(xy[picked] - xy[i]).max(axis=1)
            if (d <= reach).any():
                continue
        picked.append(int(i))
    return [
        Hit(index=i, x=int(xy[i, 0]), y=int(xy[i, 1]), score=float(s[i]), slide=slide,
            exists=exists)
        for i in picked
    ]


_INDEX_NAMES = frozenset({"IndexEntry", "SlideIndex", "build_index", "load_index"})


def __getattr__(name: str) -> object:
    # The faiss index module imports this one; loading it lazily avoids an import cycle and keeps
    # faiss out of processes that only cluster or draw similarity maps.
    if name in _INDEX_NAMES:
        from . import _search_index

        return getattr(_search_index, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
