"""Cross-slide search benchmark: build time, query latency and recall@10 of ``build_index``.

Synthetic 2560-d embeddings shaped like a foundation model's: a shared mean direction, 100
"tissue" clusters, a 16-d latent variation inside each cluster (low intrinsic dimension, as real
embeddings have) and isotropic noise, stored as float16 and upcast like the embedding store.
Queries are 100 fresh draws from the same distribution (not in the index), searched one at a time
as the viewer does. recall@10 is measured against exact inner-product search on the same vectors.

Usage::

    python benchmarks/bench_search.py             # 10^4 and 10^5, kind="auto" (~2 min, 2 cores)
    python benchmarks/bench_search.py --compare   # also flat / hnsw / ivf at every tier
    python benchmarks/bench_search.py --large     # adds 10^6 (~15 GB RAM, long build)

The last printed line is ``{"tiers": [{"n", "index", "build_s", "query_ms", "recall_at_10"}]}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from napari_virchow.analysis.index import IndexEntry, build_index  # noqa: E402
from napari_virchow.analysis.similarity import l2_normalize  # noqa: E402

DIM = 2560
N_CLUSTERS = 100
LATENT = 16
SLIDE_TILES = 20_000  # tiles per synthetic slide: the index holds several "slides"


class Generator:
    """Clustered float16 embeddings; the same seed gives the same clusters."""

    def __init__(self, seed: int = 0, latent: int = LATENT) -> None:
        rng = np.random.default_rng(seed)
        self.latent = latent
        shared = rng.standard_normal(DIM, dtype=np.float32)
        self.centres = shared + 0.8 * rng.standard_normal((N_CLUSTERS, DIM), dtype=np.float32)
        basis = rng.standard_normal((N_CLUSTERS, latent, DIM), dtype=np.float32)
        self.basis = basis * (0.5 / np.sqrt(latent))

    def draw(self, n: int, rng: np.random.Generator) -> np.ndarray:
        out = np.empty((n, DIM), dtype=np.float16)
        for start in range(0, n, 8192):
            m = min(8192, n - start)
            k = rng.integers(0, N_CLUSTERS, m)
            z = rng.standard_normal((m, self.latent), dtype=np.float32)
            x = self.centres[k]
            for c in np.unique(k):  # per cluster: avoids an (m, latent, dim) temporary
                sel = k == c
                x[sel] += z[sel] @ self.basis[c]
            x += 0.25 * rng.standard_normal((m, DIM), dtype=np.float32)
            out[start : start + m] = x
        return out


def entries_for(emb: np.ndarray, tile: int = 448) -> list[IndexEntry]:
    """Split the vectors into slides of SLIDE_TILES tiles on a square grid, as the CLI would."""
    entries = []
    for s, start in enumerate(range(0, emb.shape[0], SLIDE_TILES)):
        part = emb[start : start + SLIDE_TILES]
        side = int(np.ceil(np.sqrt(part.shape[0])))
        i = np.arange(part.shape[0])
        coords = np.stack([(i % side) * tile, (i // side) * tile], axis=1).astype(np.int64)
        entries.append(IndexEntry(f"slide{s:03d}.svs", f"fp{s:03d}", part, coords, tile))
    return entries


def exact_top(index: object, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k rows, using the index's own flat storage so no second copy is needed."""
    import faiss

    inner = index.index  # type: ignore[attr-defined]
    flat = faiss.downcast_index(inner.storage) if hasattr(inner, "storage") else None
    if flat is None:
        if isinstance(inner, faiss.IndexFlat):
            flat = inner
        else:  # IVF: rebuild exact search from reconstructed vectors
            inner.make_direct_map()
            flat = faiss.IndexFlatIP(inner.d)
            flat.add(inner.reconstruct_n(0, inner.ntotal))
    return flat.search(queries, k)[1]


def run_tier(
    n: int, kind: str, gen: Generator, queries: np.ndarray, *, threads: tuple[int, int], k: int = 10
) -> dict:
    import faiss

    emb = gen.draw(n, np.random.default_rng(n))
    faiss.omp_set_num_threads(threads[0])
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        index = build_index(entries_for(emb), tmp, encoder="bench", kind=kind)
        build_s = time.perf_counter() - t0
    del emb
    # A single query gains nothing from a second thread on 2 shared cores, and an OpenMP thread
    # waiting for a busy core made exact search 3x slower and erratic (8 vs 7–26 ms at 10^4).
    faiss.omp_set_num_threads(threads[1])
    times = []
    found = []
    for q in queries:
        t0 = time.perf_counter()
        params, _keep = index._search_params(None, k)
        rows = index.index.search(q[None, :], k, params=params)[1][0]
        times.append(time.perf_counter() - t0)
        found.append(rows)
    truth = exact_top(index, queries, k)
    recall = float(np.mean([len(set(f) & set(t)) / k for f, t in zip(found, truth, strict=True)]))
    t0 = time.perf_counter()
    for q in queries[:20]:
        index.search(q, k)  # full path: selector, per-slide suppression, file checks
    search_ms = (time.perf_counter() - t0) / 20 * 1e3
    return {
        "n": n,
        "index": index.kind,
        "build_s": round(build_s, 2),
        "query_ms": round(float(np.mean(times)) * 1e3, 3),
        "recall_at_10": round(recall, 4),
        "search_nms_ms": round(search_ms, 2),
        "params": {k_: v for k_, v in index.meta.items() if k_ in ("M", "ef_construction",
                                                                   "ef_search", "nlist", "nprobe")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", action="store_true", help="add the 10^6 tier")
    parser.add_argument("--compare", action="store_true", help="also time flat, hnsw and ivf")
    parser.add_argument("--tiers", default="10000,100000", help="comma-separated sizes")
    parser.add_argument("--threads", type=int, default=2, help="faiss threads for building")
    parser.add_argument("--query-threads", type=int, default=1,
                        help="faiss threads for the one-at-a-time queries (see run_tier)")
    parser.add_argument("--latent", type=int, default=LATENT,
                        help="latent dims per cluster (higher = harder neighbours)")
    args = parser.parse_args()
    threads = (args.threads, args.query_threads)
    tiers = [int(float(t)) for t in args.tiers.split(",")] + ([1_000_000] if args.large else [])
    gen = Generator(latent=args.latent)
    queries = l2_normalize(gen.draw(100, np.random.default_rng(12345)))
    results = []
    for n in tiers:
        row = run_tier(n, "auto", gen, queries, threads=threads)
        print(json.dumps(row), flush=True)
        results.append(row)
        if args.compare:
            for kind in ("flat", "hnsw", "ivf"):
                if kind != row["index"]:
                    row_k = run_tier(n, kind, gen, queries, threads=threads)
                    print(json.dumps({"compare": True, **row_k}), flush=True)
    keys = ("n", "index", "build_s", "query_ms", "recall_at_10")
    print(json.dumps({"tiers": [{k: r[k] for k in keys} for r in results]}))


if __name__ == "__main__":
    main()
