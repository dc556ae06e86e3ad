"""Cross-slide similarity index (faiss) over cached tile embeddings of a cohort.

On disk: ``INDEX.faiss`` (faiss's own binary format) plus ``INDEX.json`` (encoder, slides,
parameters) and ``INDEX.npz`` (per-row coordinates), never pickle. Vectors are L2-normalised
float32 and searched by inner product, i.e. cosine similarity, as on a single slide.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from napari_virchow.analysis.similarity import AnalysisError, Hit, l2_normalize, query_vector, spatially_distinct
from napari_virchow.io.files import atomic_write_set

__all__ = ["AUTO_FLAT_MAX", "IndexEntry", "SlideIndex", "build_index", "load_index"]

_FORMAT = "napari-virchow-index"
_VERSION = 1
# kind="auto" picks exact search up to this many vectors and HNSW beyond. Measured with
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


@dataclass
class IndexEntry:
    """One slide's computed tiles: ``indices`` are tile ids in its grid (default ``arange(n)``).

    ``embeddings`` may be any ``(n, dim)`` array supporting ``.shape`` and row slices (numpy,
    zarr): it is read in chunks of 16384 rows.
    """

    path: str
    fingerprint: str
    embeddings: np.ndarray
    coords: np.ndarray
    tile_size_l0: int
    indices: np.ndarray | None = None


def _entry(obj: IndexEntry | Mapping[str, Any]) -> IndexEntry:
    e = obj if isinstance(obj, IndexEntry) else IndexEntry(**dict(obj))
    if not hasattr(e.embeddings, "shape"):  # lists and the like
        e = replace(e, embeddings=np.asarray(e.embeddings))
    return e


def _files(path: str | os.PathLike[str]) -> tuple[Path, Path, Path]:
    """``x.faiss`` → (x.faiss, x.json, x.npz); a folder → its INDEX.* files."""
    p = Path(path)
    if p.suffix != ".faiss":
        p = p / "INDEX.faiss"
    return p, p.with_suffix(".json"), p.with_suffix(".npz")


class SlideIndex:
    """A loaded or freshly built cross-slide index; see :func:`build_index`."""

    def __init__(
        self,
        index: Any,
        meta: dict[str, Any],
        coords: np.ndarray,
        tile_index: np.ndarray,
        row_start: np.ndarray,
        path: Path | None = None,
    ) -> None:
        self.index = index
        self.meta = meta
        self.coords = coords
        self.tile_index = tile_index
        self.row_start = row_start
        self.path = path

    @property
    def encoder(self) -> str:
        return str(self.meta["encoder"])

    @property
    def weights_id(self) -> str | None:
        return self.meta.get("weights_id")

    @property
    def kind(self) -> str:
        return str(self.meta["kind"])

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def slides(self) -> list[dict[str, Any]]:
        """Per slide: ``path``, ``fingerprint``, ``tile_size_l0``, ``n_tiles``."""
        return list(self.meta["slides"])

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def missing_slides(self) -> list[str]:
        """Paths of indexed slides whose files no longer exist."""
        return [s["path"] for s in self.meta["slides"] if not Path(s["path"]).exists()]

    def check_slides(self) -> str | None:
        """A message about moved or deleted slide files, or None when all are present."""
        missing = self.missing_slides()
        if not missing:
            return None
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        shown = ", ".join(missing[:5]) + more
        return (
            f"{len(missing)} of {len(self.meta['slides'])} slides in the index were moved or "
            f"deleted: {shown}. Their hits are still listed (marked missing) but cannot be "
            "opened; restore the files or rebuild the index with the new paths."
        )

    def _search_params(self, exclude_rows: tuple[int, int] | None, k: int) -> tuple[Any, list]:
        """faiss search parameters, plus the selector objects they point to.

        faiss keeps raw pointers to selectors: the caller must hold the returned list until the
        search is done, or Python may free them mid-search.
        """
        import faiss

        keep: list[Any] = []
        kw: dict[str, Any] = {}
        if exclude_rows is not None:
            keep.append(faiss.IDSelectorRange(*exclude_rows))
            keep.append(faiss.IDSelectorNot(keep[0]))
            kw["sel"] = keep[1]
        if self.kind == "hnsw":
            params = faiss.SearchParametersHNSW(efSearch=max(k, self.meta["ef_search"]), **kw)
        elif self.kind == "ivf":
            params = faiss.SearchParametersIVF(nprobe=self.meta["nprobe"], **kw)
        else:
            params = faiss.SearchParameters(**kw) if kw else None
        return params, keep

    def search(
        self,
        query: np.ndarray,
        k: int = 20,
        *,
        exclude_slide: str | None = None,
        min_distance_tiles: int = 2,
    ) -> list[Hit]:
        """Top ``k`` distinct regions across slides, best first.

        ``query`` is one embedding or several (averaged). Hits within ``min_distance_tiles`` tile
        widths of a better hit on the same slide are suppressed. ``exclude_slide`` (a path or
        fingerprint) leaves one slide out, usually the one the query comes from. Hits on slides
        whose files are gone come back with ``exists=False``.
        """
        q = query_vector(query, self.dim)[None, :]
        slides = self.meta["slides"]
        excluded = None
        for i, s in enumerate(slides):
            if exclude_slide is not None and exclude_slide in (s["path"], s["fingerprint"]):
                excluded = (int(self.row_start[i]), int(self.row_start[i + 1]))
        available = len(self) - (excluded[1] - excluded[0] if excluded else 0)
        if k <= 0 or available <= 0:
            return []
        # Suppression throws candidates away; fetch more until k survive or nothing is left.
        fetch = min(available, 4 * k + 32)
        while True:
            params, _keep = self._search_params(excluded, fetch)
            scores, rows = self.index.search(q, fetch, params=params)
            hits = self._suppress(scores[0], rows[0], k, min_distance_tiles)
            if len(hits) >= k or fetch >= available:
                return hits
            fetch = min(available, fetch * 4)

    def _suppress(self, scores: np.ndarray, rows: np.ndarray, k: int, min_dist: int) -> list[Hit]:
        slides = self.meta["slides"]
        found = rows >= 0  # faiss pads with -1 when fewer vectors match
        rows, scores = rows[found], scores[found]
        slide_of = np.searchsorted(self.row_start, rows, side="right") - 1
        tile_l0 = np.array([int(s["tile_size_l0"]) for s in slides], np.int64)
        kept = spatially_distinct(self.coords[rows], min_dist * tile_l0[slide_of], k, groups=slide_of)
        exists = {int(s): Path(slides[s]["path"]).exists() for s in set(slide_of[kept].tolist())}
        return [
            Hit(index=int(self.tile_index[rows[j]]), x=int(self.coords[rows[j]][0]), y=int(self.coords[rows[j]][1]),
                score=float(scores[j]), slide=slides[slide_of[j]]["path"], exists=exists[int(slide_of[j])])
            for j in kept
        ]  # fmt: skip

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``INDEX.faiss`` + ``INDEX.json`` + ``INDEX.npz`` (or ``x.faiss`` + siblings), all or none.

        Raises OSError (e.g. ENOSPC) when the files cannot be written; the previous index, if
        any, is then left as it was and no partial file is left behind.
        """
        index_file, meta_file, arrays_file = _files(path)
        index_file.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"coords": self.coords, "tile_index": self.tile_index, "row_start": self.row_start}

        def write_arrays(tmp: str) -> None:
            with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
                np.savez(f, **arrays)

        text = json.dumps(self.meta, indent=1)
        # The JSON goes last; load_index cross-checks row counts in case files were mixed.
        atomic_write_set([
            (arrays_file, write_arrays),
            (index_file, lambda tmp: _write_faiss(self.index, tmp)),
            (meta_file, lambda tmp: Path(tmp).write_text(text, encoding="utf-8")),
        ])  # fmt: skip
        self.path = index_file
        return index_file


def _write_faiss(index: Any, path: str) -> None:
    """``faiss.write_index`` through Python's file I/O, so a full disk raises OSError, not faiss's RuntimeError."""
    import faiss

    with open(path, "wb") as fh:
        failed: list[OSError] = []

        def write(data: bytes) -> int:
            try:
                return fh.write(data)
            except OSError as exc:
                failed.append(exc)
                raise

        writer = faiss.PyCallbackIOWriter(write)  # type: ignore[attr-defined]  # not in faiss's stubs
        try:
            faiss.write_index(index, writer)
            del writer  # flushes what the writer buffers, while the file is still open
        except RuntimeError:
            if failed:
                raise failed[0] from None
            raise


def _make_index(kind: str, dim: int, n: int, sample: Callable[[], np.ndarray]) -> tuple[Any, dict]:
    import faiss

    if kind == "flat":
        return faiss.IndexFlatIP(dim), {}
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
        index.train(sample())
        return index, {"nlist": nlist, "nprobe": max(1, nlist // 8)}
    raise AnalysisError(f"unknown index kind {kind!r}; use 'auto', 'flat', 'hnsw' or 'ivf'")


def build_index(
    entries: Sequence[IndexEntry | Mapping[str, Any]],
    out_path: str | os.PathLike[str] | None,
    *,
    encoder: str,
    weights_id: str | None = None,
    kind: str = "auto",
) -> SlideIndex:
    """Index the computed tiles of several slides for cosine search and save it.

    Parameters
    ----------
    entries : one :class:`IndexEntry` (or mapping with its fields) per slide.
    out_path : a folder (gets ``INDEX.faiss/.json/.npz``), an ``x.faiss`` file, or None (no save).
    encoder, weights_id : provenance; :func:`load_index` refuses an index of another encoder.
    kind : ``"auto"`` (exact ``IndexFlatIP`` up to :data:`AUTO_FLAT_MAX` vectors, HNSW beyond),
        ``"flat"``, ``"hnsw"`` or ``"ivf"``.
    """
    items = [_entry(e) for e in entries]
    if not items:
        raise AnalysisError("no slides to index; embed at least one slide first")
    # Only .shape and slicing are used, so a zarr array from the embedding store streams in
    # chunks instead of being loaded whole.
    shapes = [tuple(e.embeddings.shape) for e in items]
    if all(len(sh) == 2 and sh[0] == 0 for sh in shapes):
        names = ", ".join(Path(e.path).name for e in items[:5]) + (" ..." if len(items) > 5 else "")
        raise AnalysisError(f"nothing to index: no embedded tissue tile in {len(items)} slide(s) ({names}); check "
                            "that the slides show tissue (or lower the tissue threshold) and embed them first")
    dims = {sh[1] for sh in shapes if len(sh) == 2 and sh[0] > 0}
    if len(dims) != 1 or any(len(sh) != 2 for sh in shapes):
        raise AnalysisError(f"slides to index need (n, dim) embeddings of one dim, got {shapes}")
    dim = int(dims.pop())
    sizes = [int(sh[0]) for sh in shapes]
    for e, n_e in zip(items, sizes, strict=True):
        if np.asarray(e.coords).shape != (n_e, 2):
            raise AnalysisError(f"{e.path}: coords must be ({n_e}, 2) for its {n_e} embeddings")
    n = int(sum(sizes))
    row_start = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    chosen = ("flat" if n <= AUTO_FLAT_MAX else "hnsw") if kind == "auto" else kind

    def sample() -> np.ndarray:
        # IVF training set: an even share of up to 10^5 vectors from every slide.
        share = max(1, 100_000 // len(items))
        parts = [np.asarray(e.embeddings[:: max(1, n_e // share)]) for e, n_e in
                 zip(items, sizes, strict=True) if n_e]
        return l2_normalize(np.concatenate(parts))

    index, params = _make_index(chosen, dim, n, sample)
    for e, n_e in zip(items, sizes, strict=True):
        for start in range(0, n_e, _ADD_CHUNK):
            index.add(l2_normalize(np.asarray(e.embeddings[start : start + _ADD_CHUNK])))
    meta = {
        "format": _FORMAT, "version": _VERSION, "encoder": encoder, "weights_id": weights_id,
        "dim": dim, "kind": chosen, "n": n, **params,
        "slides": [
            {"path": str(Path(e.path).resolve()), "fingerprint": str(e.fingerprint),
             "tile_size_l0": int(e.tile_size_l0), "n_tiles": s}
            for e, s in zip(items, sizes, strict=True)
        ],
    }
    coords = np.concatenate([np.asarray(e.coords, dtype=np.int64).reshape(-1, 2) for e in items])
    tile_index = np.concatenate([
        np.arange(s, dtype=np.int64) if e.indices is None else np.asarray(e.indices, np.int64)
        for e, s in zip(items, sizes, strict=True)
    ])
    result = SlideIndex(index, meta, coords, tile_index, row_start)
    if out_path is not None:
        result.save(out_path)
    return result


def load_index(
    path: str | os.PathLike[str], encoder: str | None = None, *, weights_id: str | None = None
) -> SlideIndex:
    """Load an index saved by :func:`build_index`, refusing one built with another encoder."""
    import faiss

    index_file, meta_file, arrays_file = _files(path)
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        if meta.get("format") != _FORMAT:
            raise ValueError("no napari-virchow index format marker")
        with np.load(arrays_file, allow_pickle=False) as z:
            coords, tile_index, row_start = z["coords"], z["tile_index"], z["row_start"]
        index = faiss.read_index(str(index_file))
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
    return SlideIndex(index, meta, coords, tile_index, row_start, path=index_file)
