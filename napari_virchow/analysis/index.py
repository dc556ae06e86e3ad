"""Cross-slide similarity index (faiss) over cached tile embeddings of a cohort.

On disk: ``INDEX.faiss`` (faiss's own binary format) plus ``INDEX.json`` (encoder, slides,
parameters, provenance, slides with relative paths) and ``INDEX.npz`` (per-row coordinates), never
pickle. Vectors are L2-normalised float32 and searched by inner product, i.e. cosine similarity, as
on a single slide. Small cohorts get an exact index; large ones IVF-PQ codes whose shortlist is
re-ranked by exact cosine from the embedding stores (:mod:`~napari_virchow.analysis.index_ivfpq`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from napari_virchow.analysis import index_ivfpq as _pq
from napari_virchow.analysis import index_vectors as _vec
from napari_virchow.analysis.index_core import IndexEntry, SlideIndex, _entry, _files
from napari_virchow.analysis.index_manifest import index_for_mpp
from napari_virchow.analysis.similarity import AnalysisError, l2_normalize

__all__ = ["AUTO_FLAT_MAX", "IndexEntry", "SlideIndex", "add_slides", "build_index", "load_index", "load_index_for",
           "rebuild_vectors", "remove_slide"]

_FORMAT = "napari-virchow-index"
# 2: provenance, relative paths, stores, ids slide << 32 | row for "ivfpq"; 3: IVF-PQ code size
# (pq_nbits, pq_bytes) and training sample (train_n) recorded. Older formats load (missing fields
# are 0.2's: 8-bit codes); a newer one is refused with one message.
_VERSION = 3
# kind="auto" picks exact search up to this many vectors and, beyond, IVF-PQ re-ranked from the
# stores when every slide has one (else HNSW, all in memory). Measured with
# benchmarks/bench_search.py (2 cores, 2560-d, one query at a time): exact IndexFlatIP scans
# n × 10 kB per query, ~8 ms at 10^4, ~17 ms at 2·10^4, ~35 ms at 6·10^4 and 90–190 ms at 10^5,
# while HNSW answers in ~1 ms at recall@10 ≥ 0.99. HNSW costs ~0.5 ms per vector to build
# (~10 s at 2·10^4, ~50 s at 10^5); below the threshold exact search is fast enough and free.
AUTO_FLAT_MAX = 20_000
# M=32 / efConstruction=80 reached recall@10 0.999 at efSearch 64 on a harder variant of the
# benchmark data (64-d latent structure); M=16 or efConstruction=40 stayed at 0.87–0.97.
# efSearch=128 keeps a margin for real embeddings and still answers in ~1 ms.
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 128
_ADD_CHUNK = 16384


def _make_index(kind: str, dim: int, n: int, sample: Callable[[int], np.ndarray]) -> tuple[Any, dict]:
    import faiss

    if kind == "flat":
        return faiss.IndexFlatIP(dim), {}
    index: Any
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index.hnsw.efSearch = HNSW_EF_SEARCH
        return index, {"M": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION,
                       "ef_search": HNSW_EF_SEARCH}
    if kind == "ivf":
        # ~4 sqrt(n) lists, each trained on ≥ 39 points as faiss asks.
        nlist = max(1, min(int(4 * np.sqrt(n)), n // 39))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(sample(100_000))
        return index, {"nlist": nlist, "nprobe": max(1, nlist // 8)}
    if kind == "ivfpq":
        return _pq.make_ivfpq(dim, n, sample)
    raise AnalysisError(f"unknown index kind {kind!r}; use 'auto', 'flat', 'hnsw', 'ivf' or 'ivfpq'")


def _shapes(items: list[IndexEntry]) -> tuple[int, list[int]]:
    """(dim, rows per slide), every entry checked."""
    # Only .shape and slicing are used, so a zarr array or a store view streams in chunks.
    shapes = [tuple(e.embeddings.shape) for e in items]
    if all(len(sh) == 2 and sh[0] == 0 for sh in shapes):
        names = ", ".join(Path(e.path).name for e in items[:5]) + (" ..." if len(items) > 5 else "")
        raise AnalysisError(f"nothing to index: no embedded tissue tile in {len(items)} slide(s) ({names}); check "
                            "that the slides show tissue (or lower the tissue threshold) and embed them first")
    dims = {sh[1] for sh in shapes if len(sh) == 2 and sh[0] > 0}
    if len(dims) != 1 or any(len(sh) != 2 for sh in shapes):
        raise AnalysisError(f"slides to index need (n, dim) embeddings of one dim, got {shapes}")
    sizes = [int(sh[0]) for sh in shapes]
    for e, n_e in zip(items, sizes, strict=True):
        if np.asarray(e.coords).shape != (n_e, 2):
            raise AnalysisError(f"{e.path}: coords must be ({n_e}, 2) for its {n_e} embeddings")
    return int(dims.pop()), sizes


def _slide_meta(e: IndexEntry, n: int, cache_root: Path | None) -> dict[str, Any]:
    store = None
    if e.store is not None:
        st = Path(e.store).resolve()
        store = str(st.relative_to(cache_root)) if cache_root and st.is_relative_to(cache_root) else str(st)
    return {"path": str(Path(e.path).resolve()), "fingerprint": str(e.fingerprint),
            "tile_size_l0": int(e.tile_size_l0), "n_tiles": n, "store": store}  # fmt: skip


def add_entries(index: Any, kind: str, items: list[IndexEntry], sizes: list[int], first_slide: int,
                writer: _vec.VectorWriter | None = None) -> list[int]:  # fmt: skip
    """Add slide after slide to a trained faiss index, one chunk of rows in memory at a time.

    With ``writer`` (IVF-PQ), the same rows also go, as read (float16), to the re-rank file; returns
    the file row where each slide's rows start (empty without a writer).
    """
    starts = []
    for s, (e, n_e) in enumerate(zip(items, sizes, strict=True), start=first_slide):
        if writer is not None:
            starts.append(writer.rows)
        for start in range(0, n_e, _ADD_CHUNK):
            raw = np.asarray(e.embeddings[start : start + _ADD_CHUNK])
            if writer is not None:
                writer.append(raw)
            if index is None:
                continue
            x = l2_normalize(raw)
            if kind == "ivfpq":
                index.add_with_ids(x, _pq.slide_ids(s, start, start + len(x)))
            else:
                index.add(x)
    return starts


def _vector_writer(out_path: str | os.PathLike[str] | None, chosen: str, stores: bool, dim: int
                   ) -> _vec.VectorWriter | None:  # fmt: skip
    """A writer of a fresh re-rank file beside the index to be saved (IVF-PQ over stores only)."""
    if out_path is None or chosen != "ivfpq" or not stores:
        return None
    index_file = _files(out_path)[0]
    return _vec.VectorWriter(index_file.parent / _vec.new_name(index_file), dim)


def build_index(
    entries: Sequence[IndexEntry | Mapping[str, Any]],
    out_path: str | os.PathLike[str] | None,
    *,
    encoder: str,
    weights_id: str | None = None,
    kind: str = "auto",
    provenance: Mapping[str, Any] | None = None,
    cache_root: str | os.PathLike[str] | None = None,
    client: Any | None = None,
) -> SlideIndex:
    """Index the computed tiles of several slides for cosine search and save it.

    Parameters
    ----------
    entries : one :class:`IndexEntry` (or mapping with its fields) per slide.
    out_path : a folder (gets ``INDEX.faiss/.json/.npz``), an ``x.faiss`` file, or None (no save).
    encoder, weights_id : provenance; :func:`load_index` refuses an index of another encoder.
    kind : ``"auto"`` (exact ``IndexFlatIP`` up to :data:`AUTO_FLAT_MAX` vectors; beyond, IVF-PQ
        when every entry has a ``store``, else HNSW), ``"flat"``, ``"hnsw"``, ``"ivf"`` or
        ``"ivfpq"`` (trained on a sample, filled slide by slide, re-ranked from the stores).
    provenance : recorded as is, e.g. ``weights`` (what loads them), ``mpp``, ``tile_size``.
    cache_root : the cache holding the entries' stores; they are recorded relative to it.
    client : a ``dask.distributed`` client: an IVF-PQ index over store-backed entries is then filled
        in per-worker shards that are merged (the stores must be reachable from the workers).
    """
    items = [_entry(e) for e in entries]
    if not items:
        raise AnalysisError("no slides to index; embed at least one slide first")
    dim, sizes = _shapes(items)
    n = int(sum(sizes))
    row_start = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    stores = all(e.store is not None for e in items)
    chosen = ("flat" if n <= AUTO_FLAT_MAX else "ivfpq" if stores else "hnsw") if kind == "auto" else kind

    def sample(count: int) -> np.ndarray:
        # Training set: an even share of ``count`` vectors from every slide, strided.
        # Memory: the sample once (float32) plus one slide's share while it is read.
        share = max(1, count // len(items))
        out = np.empty((min(count, share * len(items)), dim), np.float32)
        filled = 0
        for e, n_e in zip(items, sizes, strict=True):
            if n_e:
                part = np.asarray(e.embeddings[:: max(1, n_e // share)][:share], np.float32)
                part = part[: len(out) - filled]
                out[filled : filled + len(part)] = part
                filled += len(part)
        out = out[:filled]
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        np.divide(out, norms, out=out, where=norms > 0)  # in place, as l2_normalize does on a copy
        return out

    index, params = _make_index(chosen, dim, n, sample)
    if chosen == "ivfpq" and not stores:
        params["rerank"] = 0  # nothing to re-rank from: scores are the PQ approximations
    jobs = [(s, e.embeddings.store_path, e.embeddings.indices) for s, e in enumerate(items)
            if isinstance(e.embeddings, _pq.StoreRows)]  # fmt: skip
    writer = _vector_writer(out_path, chosen, stores, dim)
    try:
        if client is not None and chosen == "ivfpq" and len(jobs) == len(items):
            _pq.fill_on_cluster(client, index, [(s, str(p), idx) for s, p, idx in jobs])
            # The re-rank file is written here, in one more pass over the stores.
            vec_start = add_entries(None, chosen, items, sizes, 0, writer) if writer is not None else []
        else:
            vec_start = add_entries(index, chosen, items, sizes, 0, writer)
    finally:
        crcs = writer.close() if writer is not None else None
    root = Path(cache_root).resolve() if cache_root is not None else None
    meta = {
        "format": _FORMAT, "version": _VERSION, "encoder": encoder, "weights_id": weights_id,
        **dict(provenance or {}), "cache_root": str(root) if root else None,
        "dim": dim, "kind": chosen, "n": n, **params,
        "slides": [_slide_meta(e, s, root) for e, s in zip(items, sizes, strict=True)],
    }  # fmt: skip
    coords = np.concatenate([np.asarray(e.coords, dtype=np.int64).reshape(-1, 2) for e in items])
    tile_index = np.concatenate([
        np.arange(s, dtype=np.int64) if e.indices is None else np.asarray(e.indices, np.int64)
        for e, s in zip(items, sizes, strict=True)
    ])
    if writer is not None:
        meta["vectors"] = writer.path.name
        for s_meta, start in zip(meta["slides"], vec_start, strict=True):
            s_meta["vec_start"] = int(start)
    result = SlideIndex(index, meta, coords, tile_index, row_start, vector_crc=crcs,
                        vectors_at=writer.path if writer is not None else None)  # fmt: skip
    if out_path is not None:
        result.save(out_path)
    return result


def load_index(
    path: str | os.PathLike[str],
    encoder: str | None = None,
    *,
    weights_id: str | None = None,
    root: str | os.PathLike[str] | None = None,
    cache_root: str | os.PathLike[str] | None = None,
    mmap: bool = False,
) -> SlideIndex:
    """Load an index saved by :func:`build_index`, refusing one built with another encoder.

    ``mmap``: an IVF index's inverted lists stay in the file, paged in as queries touch them
    (RAM: the coarse quantizer only), read-only: for searching an index larger than memory.

    ``root``: the folder a moved archive's slides are in now; ``cache_root``: where the embedding
    stores are now (default: beside the index as built, under ``root``, or the recorded cache).
    """
    import faiss

    index_file, meta_file, arrays_file = _files(path)
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        if meta.get("format") != _FORMAT:
            raise ValueError("no napari-virchow index format marker")
        if int(meta.get("version", 1)) > _VERSION:
            raise AnalysisError(
                f"{index_file}: written by a newer napari-virchow (index format {meta['version']}; this "
                f"version reads formats up to {_VERSION}); upgrade napari-virchow, or rebuild the index with "
                "this one (`napari-virchow index`)"
            )
        with np.load(arrays_file, allow_pickle=False) as z:
            coords, tile_index, row_start = z["coords"], z["tile_index"], z["row_start"]
            vector_crc = z["vector_crc"] if "vector_crc" in z.files else None
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap and meta.get("kind") in ("ivf", "ivfpq") else 0
        index = faiss.read_index(str(index_file), flags)
    except AnalysisError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, AttributeError) as exc:
        raise AnalysisError(
            f"{index_file}: cannot read the similarity index ({type(exc).__name__}: {exc}); "
            "rebuild it with `napari-virchow index`"
        ) from exc
    if encoder is not None and meta.get("encoder") != encoder:
        raise AnalysisError(
            f"{index_file}: index was built from '{meta.get('encoder')}' embeddings but the "
            f"current encoder is '{encoder}'; their similarities are not comparable. Search with "
            f"'{meta.get('encoder')}' or rebuild the index from '{encoder}' embeddings."
        )
    if weights_id is not None and meta.get("weights_id") not in (None, weights_id):
        raise AnalysisError(
            f"{index_file}: index was built with weights '{meta.get('weights_id')}', the current "
            f"weights are '{weights_id}'; rebuild the index with the current weights"
        )
    if index.ntotal != len(coords) or index.d != meta.get("dim") or row_start[-1] != len(coords):
        raise AnalysisError(
            f"{index_file}: index files disagree ({index.ntotal} vectors, {len(coords)} "
            "coordinates); a write was interrupted. Rebuild it with `napari-virchow index`"
        )
    return SlideIndex(index, meta, coords, tile_index, row_start, path=index_file, root=root, cache_root=cache_root,
                      vector_crc=vector_crc)  # fmt: skip


def load_index_for(path: str | os.PathLike[str], query_mpp: float | None, encoder: str | None = None,
                   **kwargs: Any) -> SlideIndex:  # fmt: skip
    """:func:`load_index` of the index to search for a query at ``query_mpp`` µm/px.

    ``path`` is one index (refused unless built at ``query_mpp``) or a folder of several, one per
    magnification (the one at ``query_mpp`` is chosen). ``query_mpp`` None: the index's own.
    """
    try:
        chosen = index_for_mpp(path, query_mpp)
    except ValueError as exc:
        raise AnalysisError(str(exc)) from None
    index = load_index(chosen, encoder, **kwargs)
    index.check_mpp(query_mpp)
    return index


def add_slides(index: SlideIndex, entries: Sequence[IndexEntry | Mapping[str, Any]]) -> list[str]:
    """Add slides to ``index`` in place without rebuilding it (IVF: encoded by the trained quantizer).

    Slides already indexed with the same fingerprint are skipped; their paths are returned.
    Call :meth:`SlideIndex.save` to keep the result.
    """
    items = [_entry(e) for e in entries]
    indexed = {s["fingerprint"] for s in index.slides}
    skipped = [e.path for e in items if str(e.fingerprint) in indexed]
    items = [e for e in items if str(e.fingerprint) not in indexed]
    if not items:
        return skipped
    dim, sizes = _shapes(items)
    if dim != index.dim:
        raise AnalysisError(f"slides to add have {dim}-d embeddings, the index holds {index.dim}-d ones; "
                            "embed them with the index's encoder")  # fmt: skip
    if index.kind == "ivfpq" and index.meta.get("rerank") and any(e.store is None for e in items):
        raise AnalysisError("this IVF-PQ index re-ranks from the embedding stores: give each added slide its store")
    writer = index.vector_writer()
    try:
        vec_start = add_entries(index.index, index.kind, items, sizes, len(index.meta["slides"]), writer)
    finally:
        if writer is not None:
            index.vector_crc = writer.close()
    root = index.cache_root.resolve() if index.cache_root is not None else None
    index.meta["slides"] += [_slide_meta(e, n_e, root) for e, n_e in zip(items, sizes, strict=True)]
    for s in index.meta["slides"][-len(items):]:
        s["built_path"] = s["path"]
    for s, start in zip(index.meta["slides"][-len(items):], vec_start, strict=False):
        s["vec_start"] = int(start)
    index.coords = np.concatenate([index.coords, *(np.asarray(e.coords, np.int64).reshape(-1, 2) for e in items)])
    index.tile_index = np.concatenate([index.tile_index, *(
        np.arange(n_e, dtype=np.int64) if e.indices is None else np.asarray(e.indices, np.int64)
        for e, n_e in zip(items, sizes, strict=True))])  # fmt: skip
    index.row_start = np.concatenate([index.row_start, index.row_start[-1] + np.cumsum(sizes)]).astype(np.int64)
    index.meta["n"] = len(index)
    index._changed = None
    return skipped


def remove_slide(index: SlideIndex, slide: str) -> int:
    """Remove one slide's tiles (by path or fingerprint) from ``index`` in place; the number removed.

    Call :meth:`SlideIndex.save` to keep the result. HNSW graphs cannot drop vectors: rebuild those.
    """
    import faiss

    no = index._slide_no(str(Path(slide).resolve()) if Path(slide).exists() else slide)
    if no is None:
        no = index._slide_no(slide)
    if no is None:
        raise AnalysisError(f"{slide} is not in the index {index.path or ''}; `napari-virchow index --list` "
                            "shows the indexed slides")  # fmt: skip
    if index.kind not in ("flat", "ivfpq"):
        raise AnalysisError(f"a {index.kind} index cannot drop vectors; rebuild it without {Path(slide).name}")
    lo, hi = int(index.row_start[no]), int(index.row_start[no + 1])
    ids = _pq.slide_range(no) if index.kind == "ivfpq" else (lo, hi)  # flat: ids are rows, renumbered
    removed = int(index.index.remove_ids(faiss.IDSelectorRange(*ids)))
    if removed != hi - lo:  # pragma: no cover - the files were checked to agree on load
        raise AnalysisError(f"{index.path}: removed {removed} vectors of {Path(slide).name}, expected {hi - lo}")
    index.coords = np.delete(index.coords, np.s_[lo:hi], axis=0)
    index.tile_index = np.delete(index.tile_index, np.s_[lo:hi])
    index.row_start[no + 1 :] -= hi - lo
    index.meta["slides"][no].update(removed=True, n_tiles=0)
    index.meta["n"] = len(index)
    index._changed = None
    return removed


def rebuild_vectors(index: SlideIndex) -> int:
    """Rewrite the IVF-PQ re-rank file from the embedding stores (verified), dropping removed slides' rows.

    The stores are the source of truth: this repairs a damaged or lost re-rank file, or creates one
    for an index built without it. Call :meth:`SlideIndex.save` to keep the result; the rows written.
    """
    if index.kind != "ivfpq" or not index.meta.get("rerank"):
        raise AnalysisError(f"{index.path}: only an IVF-PQ index re-ranked from the stores has a re-rank file")
    if index.path is None:
        raise AnalysisError("save the index first: its re-rank file is kept beside it")
    index.close()
    writer = _vec.VectorWriter(index.path.parent / _vec.new_name(index.path), index.dim)
    try:
        for no, s in enumerate(index.meta["slides"]):
            if s.get("removed"):
                s.pop("vec_start", None)
                continue
            tiles = index.tile_index[index.row_start[no] : index.row_start[no + 1]]
            s["vec_start"] = add_entries(None, "ivfpq", [_entry(IndexEntry(
                s["path"], s["fingerprint"], _pq.StoreRows(index._store_path(no), tiles), np.zeros((len(tiles), 2)),
                int(s["tile_size_l0"])))], [len(tiles)], no, writer)[0]  # fmt: skip
    finally:
        index.vector_crc = writer.close()
    index.meta["vectors"], index._vectors_at = writer.path.name, writer.path
    index.damaged_rows = 0
    return writer.rows
