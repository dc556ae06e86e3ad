"""IVF-PQ for cohorts past RAM: compressed codes in the index, exact cosine re-ranking from the stores.

Ids are ``slide_no << 32 | j`` (``j``: the tile's row within its slide's block of the index), so
one slide's tiles are one id range: removing a slide is one ``remove_ids`` with an
``IDSelectorRange``, and adding a slide never renumbers the others.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from napari_virchow.analysis.similarity import AnalysisError, l2_normalize

__all__ = ["IVFPQ_NPROBE", "RERANK", "RERANK_PER_HIT", "StoreReader", "StoreRows", "make_ivfpq", "slide_ids",
           "split_ids"]

SLIDE_SHIFT = 32
# Bytes of PQ code per tile: 256 sub-quantizers of 8 bits (10 dims each at 2560-d). The codes only
# shortlist candidates (the order returned is exact cosine on the float16 rows), but the shortlist a
# recall needs, and so the rows read per query, shrinks with finer codes. At 10^6 synthetic tiles
# (bench_search --large, exact re-rank, nprobe 32), recall@10 by candidates re-ranked:
#   64 B codes:  0.79 at 300, 0.94 at 1,000, 1.0 at 3,000
#   256 B codes: 0.96 at 100, 0.99 at 200, 0.997 at 300, 1.0 at 1,000
# so 256 B codes with 300 candidates read 10x fewer rows than 64 B with 3,000, at 4x the code bytes.
PQ_BYTES = 256
PQ_NBITS = 8  # bits per sub-quantizer code (256 centroids each)
# Inverted lists probed per query. At 10^6 synthetic tiles (nlist 1,280) every true top-10 tile was in
# the 16 lists nearest the query; 32 keeps a margin for real embeddings (the PQ scan: ~7 ms).
IVFPQ_NPROBE = 32
# Candidates re-ranked by exact cosine per query (at least; 30 per hit asked when more, and more when
# suppression needs more), read from the re-rank file: see PQ_BYTES for the recall they give.
RERANK = 300
RERANK_PER_HIT = 30
TRAIN_MAX = 50_000  # training vectors (k-means and PQ): 0.5 GB at 2560-d; ~39 per list is what faiss asks for


def ivfpq_nlist(n: int) -> int:
    """Inverted lists for ``n`` vectors: ~2·sqrt(n), each trained on ≥ 39 sample points."""
    return int(max(1, min(2 * np.sqrt(max(n, 1)), n // 39, TRAIN_MAX // 39)))


def _pq_m(dim: int) -> int:
    m = min(PQ_BYTES, max(1, dim // 8))  # sub-vectors of >= 8 dims (2560-d: 256 of 10)
    while dim % m:
        m -= 1
    return m


def make_ivfpq(dim: int, n: int, sample: Callable[[int], np.ndarray]) -> tuple[Any, dict[str, Any]]:
    """An IVF-PQ index (inner product on unit vectors) trained on ``sample(count)``; (index, meta params)."""
    import faiss

    nlist = ivfpq_nlist(n)
    m = _pq_m(dim)
    train = np.ascontiguousarray(sample(min(n, max(256 * 39, 39 * nlist), TRAIN_MAX)), np.float32)
    if len(train) < 256:  # 2^8 centroids per PQ sub-quantizer
        raise AnalysisError(f"too few tiles ({len(train)}) to train an IVF-PQ index (needs 256); use kind='flat'")
    nlist = min(nlist, max(1, len(train) // 39))
    index = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, nlist, m, PQ_NBITS, faiss.METRIC_INNER_PRODUCT)
    index.cp.min_points_per_centroid = 5  # fewer warnings on small cohorts; quality is re-ranked anyway
    index.pq.cp.min_points_per_centroid = 5
    index.train(train)
    return index, {"nlist": nlist, "nprobe": min(nlist, IVFPQ_NPROBE), "pq_m": m, "pq_nbits": PQ_NBITS,
                   "pq_bytes": int(index.code_size), "train_n": len(train), "rerank": RERANK}


def slide_ids(slide_no: int, start: int, stop: int) -> np.ndarray:
    """Ids of rows ``start..stop`` of slide ``slide_no``."""
    return (np.int64(slide_no) << SLIDE_SHIFT) | np.arange(start, stop, dtype=np.int64)


def split_ids(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(slide numbers, row within the slide) of faiss ids."""
    ids = np.asarray(ids, np.int64)
    return ids >> SLIDE_SHIFT, ids & ((1 << SLIDE_SHIFT) - 1)


def slide_range(slide_no: int) -> tuple[int, int]:
    """The id range [lo, hi) holding every tile of slide ``slide_no``."""
    return slide_no << SLIDE_SHIFT, (slide_no + 1) << SLIDE_SHIFT


class StoreRows:
    """Rows ``indices`` of an embedding store as a lazy ``(n, dim)`` array (``.shape`` + row slices).

    Reads go through :meth:`EmbeddingStore.read`, which checks checksums and done flags: a damaged
    or missing row raises instead of being indexed as zeros.
    """

    def __init__(self, store_path: str | Path, indices: np.ndarray) -> None:
        from napari_virchow.store.embeddings import EmbeddingStore

        self.store_path = Path(store_path)
        self.indices = np.asarray(indices, np.int64)
        with EmbeddingStore.from_path(self.store_path, mode="r") as store:
            self.shape = (len(self.indices), store.dim)

    def __getitem__(self, rows: slice) -> np.ndarray:
        from napari_virchow.store.embeddings import EmbeddingStore

        with EmbeddingStore.from_path(self.store_path, mode="r") as store:
            return store.read(self.indices[rows])

    def __len__(self) -> int:
        return self.shape[0]


class StoreReader:
    """Exact rows for re-ranking: stores opened once, on first use, read-only."""

    def __init__(self, locate: Callable[[int], Path]) -> None:
        self._locate = locate
        self._open: dict[int, Any] = {}

    def rows(self, slide_no: int, tiles: np.ndarray) -> np.ndarray:
        """float32 rows of tiles ``tiles`` (grid ids) of slide ``slide_no``, L2-normalised."""
        from napari_virchow.store.embeddings import EmbeddingStore

        store = self._open.get(slide_no)
        if store is None:
            store = self._open[slide_no] = EmbeddingStore.from_path(self._locate(slide_no), mode="r")
        return l2_normalize(store.read(tiles))

    def close(self) -> None:
        """Close the stores opened so far."""
        for store in self._open.values():
            store.close()
        self._open.clear()


def rerank(q: np.ndarray, slide_of: np.ndarray, tiles: np.ndarray, reader: StoreReader) -> np.ndarray:
    """Exact cosine of unit query ``q`` with each candidate (slide ``slide_of[i]``, grid tile ``tiles[i]``)."""
    scores = np.empty(len(tiles), np.float32)
    for s in np.unique(slide_of):
        sel = np.flatnonzero(slide_of == s)
        scores[sel] = reader.rows(int(s), tiles[sel]) @ q
    return scores


def fill_shard(trained: bytes, slides: list[tuple[int, str, np.ndarray]]) -> bytes:
    """On a dask worker: the trained, empty index filled with these slides' rows, read from their stores."""
    import faiss

    index = faiss.deserialize_index(np.frombuffer(trained, np.uint8))
    for slide_no, store, tiles in slides:
        rows = StoreRows(store, tiles)
        for start in range(0, len(rows), 16384):
            x = l2_normalize(rows[start : start + 16384])
            index.add_with_ids(x, slide_ids(slide_no, start, start + len(x)))
    return bytes(faiss.serialize_index(index))


def fill_on_cluster(client: Any, index: Any, slides: list[tuple[int, str, np.ndarray]]) -> None:
    """Fill ``index`` (trained, empty) from per-worker shards built on the cluster, merged in with ``merge_from``.

    Every shard starts from the same trained quantizer and PQ codebooks, which is what faiss's
    IVF ``merge_from`` needs; ids (``slide << 32 | row``) are kept, so the result equals a local fill.
    """
    import faiss

    trained = bytes(faiss.serialize_index(index))
    n_shards = max(1, min(len(slides), len(client.nthreads())))
    groups = [slides[i::n_shards] for i in range(n_shards)]
    blob = client.scatter(trained, broadcast=True)
    futures = client.map(fill_shard, [blob] * n_shards, groups, pure=False)
    for future in futures:
        shard = faiss.deserialize_index(np.frombuffer(future.result(), np.uint8))
        index.merge_from(shard, 0)
