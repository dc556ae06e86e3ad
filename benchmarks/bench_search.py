"""Cross-slide search benchmark: build time, query latency and recall@10 of ``build_index``.

Synthetic 2560-d embeddings shaped like a foundation model's: a shared mean direction, 100
"tissue" clusters, a 16-d latent variation inside each cluster (low intrinsic dimension, as real
embeddings have) and isotropic noise, stored as float16 and upcast like the embedding store.
Queries are 100 fresh draws from the same distribution (not in the index), searched one at a time
as the viewer does. recall@10 is measured against exact inner-product search on the same vectors.

Usage::

    python benchmarks/bench_search.py             # 10^4 and 10^5, kind="auto" (~2 min, 2 cores)
    python benchmarks/bench_search.py --compare   # also flat / hnsw / ivf at every tier
    python benchmarks/bench_search.py --large     # adds the 10^6 tier on disk (IVF-PQ, below)
    python benchmarks/bench_search.py --large --large-n 200000   # a smaller on-disk tier

The large tier writes its synthetic cohort (``--large-n`` tiles in slides of 20,000) as real
embedding stores (float16, zstd, checksums) under ``benchmarks/_data/`` (deleted after the run
unless ``--keep-data``, when a rerun reuses them; 4.7 GB at 10^6, plus the 5.1 GB re-rank file) in a child
process,
then builds an IVF-PQ index from the stores slide by slide in this process (``peak_rss_mb`` is this
process's peak, i.e. of building and searching), and searches it through ``SlideIndex.search``:
PQ shortlist, exact cosine re-ranking read from the index's re-rank file (checksummed float16 rows
copied from the stores while filling), per-slide suppression off; ``sweep`` varies nprobe x candidates,
``cold_page_cache`` times 20 queries with the re-rank file dropped from the page cache before each
(as at 10^8 tiles, where it does not fit in RAM), ``rerank_from_stores`` times the same re-ranking
read from the zarr stores instead (10 queries).
``recall_at_10`` is against exact search over the same float16 rows (streamed from the stores).

The last printed line is ``{"tiers": [{"n", "index", "build_s", "query_ms", "recall_at_10"}]}``
(the large tier's entry has ``p50_ms``, ``p95_ms``, ``peak_rss_mb``, ``index_bytes_per_tile``...).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from napari_virchow.analysis.index import IndexEntry, build_index
from napari_virchow.analysis.similarity import l2_normalize

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


DATA = Path(__file__).resolve().parent / "_data"


def _large_dir(n: int) -> Path:
    return DATA / f"search-{n}"


def generate_large(n: int) -> None:
    """Write the synthetic cohort as embedding stores under benchmarks/_data/ (skipped when complete)."""
    from napari_virchow.slides.fingerprint import fingerprint
    from napari_virchow.store.embeddings import EmbeddingStore
    from napari_virchow.store.key import StoreKey

    root = _large_dir(n)
    done_marker = root / "COMPLETE"
    if done_marker.exists():
        return
    gen, rng = Generator(), np.random.default_rng(n)
    side = int(np.ceil(np.sqrt(SLIDE_TILES)))
    for s, start in enumerate(range(0, n, SLIDE_TILES)):
        m = min(SLIDE_TILES, n - start)
        slide = root / "slides" / f"slide{s:04d}.svs"
        slide.parent.mkdir(parents=True, exist_ok=True)
        slide.write_bytes(f"synthetic slide {s}".encode())
        i = np.arange(m)
        coords = np.stack([(i % side) * 448, (i // side) * 448], axis=1).astype(np.int64)
        key = StoreKey(fingerprint(slide), "bench", "synthetic", 0.5, 224)
        with EmbeddingStore.open(key, n_tiles=m, dim=DIM, root=root / "cache", coords=coords, tile_size_l0=448,
                                 slide_path=str(slide), mode="w") as store:  # fmt: skip
            for a in range(0, m, 4096):
                store.write(np.arange(a, min(m, a + 4096)), gen.draw(min(4096, m - a), rng))
        print(f"generated slide {s + 1}/{-(-n // SLIDE_TILES)}", file=sys.stderr, flush=True)
    done_marker.write_text("ok")


def large_entries(n: int) -> list[IndexEntry]:
    """One IndexEntry per synthetic slide, embeddings read lazily from its store."""
    from napari_virchow.analysis.index_ivfpq import StoreRows
    from napari_virchow.slides.fingerprint import fingerprint
    from napari_virchow.store.embeddings import EmbeddingStore

    entries = []
    for path in sorted((_large_dir(n) / "cache").iterdir()):
        if not (path / "zarr.json").exists():
            continue
        with EmbeddingStore.from_path(path) as store:
            slide, coords, m = Path(store.attrs["slide_path"]), np.asarray(store.coords), store.n_tiles
        idx = np.arange(m)
        entries.append(IndexEntry(str(slide), fingerprint(slide), StoreRows(path, idx), coords, 448, idx, str(path)))
    return sorted(entries, key=lambda e: e.path)


def exact_from_stores(entries: list[IndexEntry], queries: np.ndarray, k: int) -> list[set[tuple[int, int]]]:
    """Exact top-k (slide no, tile) per query, streaming the stores one slide at a time."""
    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_id = np.zeros((len(queries), k, 2), np.int64)
    for s, e in enumerate(entries):
        x = l2_normalize(np.asarray(e.embeddings[:]))
        sc = queries @ x.T
        top = np.argpartition(-sc, k, axis=1)[:, :k]
        cand_s = np.concatenate([best_s, np.take_along_axis(sc, top, 1)], axis=1)
        cand_id = np.concatenate([best_id, np.stack([np.full_like(top, s), top], axis=2)], axis=1)
        keep = np.argsort(-cand_s, axis=1)[:, :k]
        best_s = np.take_along_axis(cand_s, keep, 1)
        best_id = np.take_along_axis(cand_id, keep[:, :, None], 1)
    return [{(int(a), int(b)) for a, b in row} for row in best_id]


def run_large(n: int, queries: np.ndarray, *, threads: tuple[int, int], k: int = 10) -> dict:
    """The on-disk tier: IVF-PQ built from the stores, searched with re-ranking; see the module docstring."""
    import faiss

    t0 = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--generate", str(n)], check=True)
    gen_s = time.perf_counter() - t0
    entries = large_entries(n)
    faiss.omp_set_num_threads(threads[0])
    out = _large_dir(n) / "index"
    t0 = time.perf_counter()
    index = build_index(entries, out, encoder="bench", weights_id="synthetic", kind="ivfpq",
                        cache_root=_large_dir(n) / "cache")  # fmt: skip
    build_s = time.perf_counter() - t0
    rss_build = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    faiss.omp_set_num_threads(threads[1])
    by_path = {e.path: s for s, e in enumerate(entries)}
    times, found = [], []
    index.search(queries[0], k, min_distance_tiles=0)  # maps the re-rank file once, as a viewer session would
    for q in queries:
        t0 = time.perf_counter()
        hits = index.search(q, k, min_distance_tiles=0)
        times.append(time.perf_counter() - t0)
        found.append({(by_path[str(h.slide)], h.index) for h in hits})
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    truth = exact_from_stores(entries, queries, k)
    recall = float(np.mean([len(f & t) / k for f, t in zip(found, truth, strict=True)]))
    ms = np.array(times) * 1e3
    params = {k_: index.meta[k_] for k_ in ("nlist", "nprobe", "pq_m", "pq_nbits", "pq_bytes", "train_n", "rerank")}

    def measure(qs: np.ndarray, ts: list, **kw: int) -> dict:
        t_d, r_d = [], []
        for q, t in zip(qs, ts, strict=True):
            t0 = time.perf_counter()
            hits = index.search(q, k, min_distance_tiles=0, **kw)
            t_d.append((time.perf_counter() - t0) * 1e3)
            r_d.append(len({(by_path[str(h.slide)], h.index) for h in hits} & t) / k)
        return {**kw, "p50_ms": round(float(np.median(t_d)), 1), "p95_ms": round(float(np.percentile(t_d, 95)), 1),
                "recall_at_10": round(float(np.mean(r_d)), 4)}  # fmt: skip

    # Lists probed x candidates re-ranked vs latency and recall, on the same index (50 queries each).
    sweep = [measure(queries[:50], truth[:50], nprobe=p, rerank=r)
             for p in (16, 32, 64) for r in (100, 300, 1000)]  # fmt: skip
    # Cold: the re-rank file dropped from the page cache before each query (as at 10^8 tiles, where
    # it does not fit in RAM): every candidate is a random read from the disk.
    vec_path = index.vectors_path()

    def evict() -> None:
        fd = os.open(vec_path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)

    t_c, r_c = [], []
    for q, t in zip(queries[50:70], truth[50:70], strict=True):
        evict()
        t0 = time.perf_counter()
        hits = index.search(q, k, min_distance_tiles=0)
        t_c.append((time.perf_counter() - t0) * 1e3)
        r_c.append(len({(by_path[str(h.slide)], h.index) for h in hits} & t) / k)
    cold = {"p50_ms": round(float(np.median(t_c)), 1), "p95_ms": round(float(np.percentile(t_c, 95)), 1),
            "recall_at_10": round(float(np.mean(r_c)), 4), "queries": len(t_c)}  # fmt: skip
    # The same search re-ranked from the zarr stores instead of the re-rank file (10 queries): the ratio.
    crc, index.vector_crc = index.vector_crc, None
    index.close()
    from_stores = measure(queries[:10], truth[:10], rerank=int(params["rerank"]))
    index.vector_crc = crc
    index.close()
    vec_bytes = index.vectors_path().stat().st_size if index.vectors_path() else 0
    return {
        "n": n, "index": index.kind, "build_s": round(build_s, 1), "generate_s": round(gen_s, 1),
        "query_ms": round(float(ms.mean()), 2), "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p95_ms": round(float(np.percentile(ms, 95)), 2), "recall_at_10": round(recall, 4),
        "peak_rss_mb": round(rss_build, 1), "peak_rss_mb_with_search": round(rss, 1),
        "index_bytes_per_tile": round(index.nbytes() / n, 1), "slides": len(entries),
        "store_bytes_per_tile": round(sum(f.stat().st_size for f in (_large_dir(n) / "cache").rglob("*")
                                          if f.is_file()) / n, 1),  # fmt: skip
        "rerank_file_bytes_per_tile": round(vec_bytes / n, 1), "params": params,
        "threads": {"build": threads[0], "query": threads[1]}, "sweep": sweep, "cold_page_cache": cold,
        "rerank_from_stores": from_stores,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", action="store_true", help="add the on-disk IVF-PQ tier (10^6 tiles)")
    parser.add_argument("--large-n", type=int, default=1_000_000, help="tiles in the large tier")
    parser.add_argument("--large-only", action="store_true", help="run only the large tier")
    parser.add_argument("--keep-data", action="store_true",
                        help="keep the large tier's stores and index under benchmarks/_data (default: deleted)")
    parser.add_argument("--generate", type=int, help=argparse.SUPPRESS)  # the child that writes the data
    parser.add_argument("--compare", action="store_true", help="also time flat, hnsw and ivf")
    parser.add_argument("--tiers", default="10000,100000", help="comma-separated sizes")
    parser.add_argument("--threads", type=int, default=2, help="faiss threads for building")
    parser.add_argument("--query-threads", type=int, default=1,
                        help="faiss threads for the one-at-a-time queries (see run_tier)")
    parser.add_argument("--latent", type=int, default=LATENT,
                        help="latent dims per cluster (higher = harder neighbours)")
    args = parser.parse_args()
    if args.generate:
        generate_large(args.generate)
        return
    threads = (args.threads, args.query_threads)
    tiers = [] if args.large_only else [int(float(t)) for t in args.tiers.split(",")]
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
    if args.large or args.large_only:
        try:
            row = run_large(args.large_n, queries, threads=threads)
        finally:
            if not args.keep_data:
                import shutil

                shutil.rmtree(_large_dir(args.large_n), ignore_errors=True)
        print(json.dumps(row), flush=True)
        results.append(row)
    keys = ("n", "index", "build_s", "query_ms", "recall_at_10")
    extra = ("p50_ms", "p95_ms", "peak_rss_mb", "index_bytes_per_tile")
    print(json.dumps({"tiers": [{k: r[k] for k in (*keys, *extra) if k in r} for r in results]}))


if __name__ == "__main__":
    main()
