"""Embedding clusters on one slide: k-means on unit vectors, and PCA colours."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from napari_virchow.analysis.similarity import AnalysisError, as_2d, l2_normalize, row_chunks

__all__ = ["ClusterModel", "fit_clusters", "pca_rgb"]


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
        """Number of clusters."""
        return int(self.centers.shape[0])

    def predict(self, embeddings: np.ndarray) -> np.ndarray:
        """Cluster label (1..k, int32) of each embedding: the nearest fitted centre.

        Prediction never refits, so tiles computed later get labels consistent with earlier ones.
        """
        x = as_2d(embeddings)
        if x.shape[1] != self.centers.shape[1]:
            raise AnalysisError(
                f"cluster model expects dim {self.centers.shape[1]}, got embeddings of dim "
                f"{x.shape[1]}; refit the clusters for this encoder"
            )
        labels = np.empty(x.shape[0], dtype=np.int32)
        c_sq = (self.centers**2).sum(axis=1)
        for sl in row_chunks(x.shape[0]):
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

    x = as_2d(embeddings)
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
    x = as_2d(embeddings)
    if fit_on is None:
        ref = x
    else:
        sel = np.asarray(fit_on)
        ref = as_2d(sel, "fit_on") if sel.ndim == 2 else x[sel]
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
    for sl in row_chunks(x.shape[0]):
        proj = (l2_normalize(x[sl]) - mean) @ comps.T
        out[sl, : len(comps)] = np.round(np.clip((proj - lo) / span, 0, 1) * 255).astype(np.uint8)
    return out
