"""The loaded cross-slide index: :class:`SlideIndex` (search, save) and :class:`IndexEntry`.

Built and loaded through :mod:`napari_virchow.analysis.index`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from napari_virchow.analysis import index_ivfpq as _pq
from napari_virchow.analysis import index_vectors as _vec
from napari_virchow.analysis.index_manifest import changed_slides, locate_cache, locate_slide, relative_fields
from napari_virchow.analysis.similarity import AnalysisError, Hit, query_vector, spatially_distinct
from napari_virchow.io.files import atomic_write_set
from napari_virchow.store.key import mag_name

__all__ = ["IndexEntry", "SlideIndex"]


@dataclass
class IndexEntry:
    """One slide's computed tiles: ``indices`` are tile ids in its grid (default ``arange(n)``).

    ``embeddings`` may be any ``(n, dim)`` array supporting ``.shape`` and row slices (numpy,
    zarr, :class:`~napari_virchow.analysis.index_ivfpq.StoreRows`): it is read in chunks of 16384
    rows. ``store`` (the slide's embedding store folder) lets IVF-PQ re-rank by exact cosine.
    """

    path: str
    fingerprint: str
    embeddings: Any  # (n, dim): numpy, zarr, StoreRows: anything with .shape and row slices
    coords: np.ndarray
    tile_size_l0: int
    indices: np.ndarray | None = None
    store: str | None = None


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


class SlideIndex(_vec.RerankFile):
    """A loaded or freshly built cross-slide index; see :func:`build_index`.

    ``root`` (a moved archive's new folder) and ``cache_root`` (where the embedding stores are
    now) override the locations recorded at build time.
    """

    def __init__(
        self,
        index: Any,
        meta: dict[str, Any],
        coords: np.ndarray,
        tile_index: np.ndarray,
        row_start: np.ndarray,
        path: Path | None = None,
        *,
        root: str | os.PathLike[str] | None = None,
        cache_root: str | os.PathLike[str] | None = None,
        vector_crc: np.ndarray | None = None,
        vectors_at: Path | None = None,
    ) -> None:
        self.index = index
        self.meta = meta
        self.coords = coords
        self.tile_index = tile_index
        self.row_start = row_start
        self.path = path
        self.root = Path(root) if root is not None else None
        self._cache_override = Path(cache_root) if cache_root is not None else None
        self._changed: list[str] | None = None
        self._reader: _pq.StoreReader | None = None
        self.vector_crc = vector_crc  # crc32 per row of the re-rank file (IVF-PQ with a file), else None
        self._vectors_at = vectors_at  # where the re-rank file is before the index is saved
        self._vectors: _vec.Vectors | None = None
        self.damaged_rows = 0  # re-rank rows that failed their checksum (re-read from the stores instead)
        here = path.parent if path is not None else None
        for s in meta["slides"]:
            s.setdefault("built_path", s["path"])
            s["path"] = str(locate_slide(s, here, self.root))

    @property
    def encoder(self) -> str:
        """The encoder whose embeddings are indexed."""
        return str(self.meta["encoder"])

    @property
    def weights_id(self) -> str | None:
        """Digest of the weights the embeddings came from."""
        return self.meta.get("weights_id")

    @property
    def kind(self) -> str:
        """The index type: flat, hnsw, ivf or ivfpq."""
        return str(self.meta["kind"])

    @property
    def mpp(self) -> float | None:
        """The magnification (µm/px) of the indexed tiles; None for an index that did not record it."""
        m = self.meta.get("mpp")
        return None if m is None else float(m)

    def check_mpp(self, query_mpp: float | None) -> None:
        """Refuse a query embedded at another magnification than the indexed tiles (not comparable)."""
        if query_mpp is None or self.mpp is None or abs(query_mpp - self.mpp) <= 1e-6 * self.mpp:
            return
        raise AnalysisError(
            f"{self.path or 'the index'}: holds tiles at {mag_name(self.mpp)} but the query "
            f"is at {mag_name(query_mpp)}; embeddings of different magnifications are not "
            f"comparable. Pick the query at {10 / self.mpp:.3g}×, or search an index built at {query_mpp:g} µm/px "
            f"(`napari-virchow index --mpp {query_mpp:g} --out ...`)"
        )

    @property
    def dim(self) -> int:
        """Embedding width."""
        return int(self.meta["dim"])

    @property
    def slides(self) -> list[dict[str, Any]]:
        """Per slide: ``path``, ``fingerprint``, ``tile_size_l0``, ``n_tiles`` (removed ones left out)."""
        return [s for s in self.meta["slides"] if not s.get("removed")]

    @property
    def cache_root(self) -> Path | None:
        """The embedding cache the stores are read from (re-ranking), as located now."""
        here = self.path.parent if self.path is not None else None
        return locate_cache(self.meta, here, self.root, self._cache_override)

    def nbytes(self) -> int:
        """Bytes the index file takes (codes, ids, quantizer; without the coordinates)."""
        if self.path is not None and self.path.exists():
            return self.path.stat().st_size
        import faiss

        return int(faiss.serialize_index(self.index).size)

    def describe(self) -> str:
        """One line: size, kind, encoder and magnification, for the viewer and the CLI."""
        at = f" at {mag_name(self.mpp)}" if self.mpp else ""
        n, size = len(self.slides), self.nbytes()
        shown = f"{size / 1e6:.1f} MB" if size >= 1e5 else f"{size / 1e3:.1f} kB"
        return f"{len(self):,} tiles of {n} slide{'' if n == 1 else 's'}, {self.kind}, {self.encoder}{at} ({shown})"

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def missing_slides(self) -> list[str]:
        """Paths of indexed slides whose files no longer exist."""
        return [s["path"] for s in self.slides if not Path(s["path"]).exists()]

    def changed_slides(self) -> list[str]:
        """Paths of indexed slides whose file content changed since indexing (fingerprint differs)."""
        if self._changed is None:
            self._changed = changed_slides(self.slides)
        return list(self._changed)

    def check_slides(self) -> str | None:
        """A message about moved, deleted or changed slide files, or None when all are as indexed."""
        missing, changed = self.missing_slides(), self.changed_slides()
        parts = []
        for paths, what, consequence in (
            (missing, "were moved or deleted", "Their hits are still listed (marked missing) but cannot be "
             "opened; restore the files, give the archive's new folder (--root), or rebuild the index"),
            (changed, "changed since they were indexed (their content fingerprint differs)",
             "Their hits are left out; re-embed them and add them again (`napari-virchow index --add`)"),
        ):  # fmt: skip
            if paths:
                more = f" and {len(paths) - 5} more" if len(paths) > 5 else ""
                shown = ", ".join(paths[:5]) + more
                parts.append(f"{len(paths)} of {len(self.slides)} slides in the index {what}: {shown}. {consequence}.")
        return " ".join(parts) or None

    def _slide_no(self, key: str) -> int | None:
        for i, s in enumerate(self.meta["slides"]):
            if not s.get("removed") and key in (s["path"], s["built_path"], s["fingerprint"]):
                return i
        return None

    def _search_params(self, exclude_rows: tuple[int, int] | None, k: int,
                       nprobe: int | None = None) -> tuple[Any, list]:  # fmt: skip
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
        params: Any
        if self.kind == "hnsw":
            params = faiss.SearchParametersHNSW(  # type: ignore[attr-defined]  # not in faiss's stubs
                efSearch=max(k, self.meta["ef_search"]), **kw)
        elif self.kind in ("ivf", "ivfpq"):
            params = faiss.SearchParametersIVF(nprobe=nprobe or self.meta["nprobe"], **kw)  # type: ignore[call-arg]
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
        nprobe: int | None = None,
        rerank: int | None = None,
        query_mpp: float | None = None,
    ) -> list[Hit]:
        """Top ``k`` distinct regions across slides, best first.

        ``query`` is one embedding or several (averaged). Hits within ``min_distance_tiles`` tile
        widths of a better hit on the same slide are suppressed. ``exclude_slide`` (a path or
        fingerprint) leaves one slide out, usually the one the query comes from. Hits on slides
        whose files are gone come back with ``exists=False``; slides whose files changed are left
        out (see :meth:`check_slides`). IVF-PQ scores are exact cosines of the ``rerank`` best
        candidates (default: the manifest's, at least 30 per hit asked) of ``nprobe`` inverted lists
        (default: the manifest's),
        read from the re-rank file (each row checksummed) or, without one, from the stores.
        ``query_mpp``: the query's magnification; another than the index's is refused.
        """
        self.check_mpp(query_mpp)
        q = query_vector(query, self.dim)[None, :]
        excluded_no = self._slide_no(exclude_slide) if exclude_slide is not None else None
        excluded = None
        if excluded_no is not None:
            lo, hi = int(self.row_start[excluded_no]), int(self.row_start[excluded_no + 1])
            excluded = _pq.slide_range(excluded_no) if self.kind == "ivfpq" else (lo, hi)
        n_excluded = 0 if excluded_no is None else int(self.row_start[excluded_no + 1] - self.row_start[excluded_no])
        changed = set(self.changed_slides())
        n_changed = sum(int(s["n_tiles"]) for s in self.slides if s["path"] in changed)
        available = len(self) - n_excluded - n_changed
        if k <= 0 or available <= 0:
            return []
        # Suppression throws candidates away; fetch more until k survive or nothing is left.
        fetch = min(len(self), 4 * k + 32 + n_changed)
        if self.kind == "ivfpq":
            depth = rerank or max(int(self.meta.get("rerank", _pq.RERANK)), _pq.RERANK_PER_HIT * k)
            fetch = min(len(self), max(fetch, int(depth)))
        while True:
            params, _keep = self._search_params(excluded, fetch, nprobe)
            scores, ids = self.index.search(q, fetch, params=params)
            rows, scores = self._rows(ids[0], scores[0], q[0], changed)
            hits = self._suppress(scores, rows, k, min_distance_tiles)
            if len(hits) >= k or fetch >= len(self):
                return hits
            fetch = min(len(self), fetch * 4)

    def _rows(self, ids: np.ndarray, scores: np.ndarray, q: np.ndarray,
              changed: set[str]) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """Index rows of faiss results, best first (IVF-PQ: exact cosine re-ranked), changed slides dropped."""
        found = ids >= 0  # faiss pads with -1 when fewer vectors match
        ids, scores = ids[found], scores[found]
        if self.kind == "ivfpq":
            slide_no, j = _pq.split_ids(ids)
            rows = self.row_start[slide_no] + j
        else:
            rows = ids
            slide_no = np.searchsorted(self.row_start, rows, side="right") - 1
        if changed:
            keep = ~np.isin(slide_no, [i for i, s in enumerate(self.meta["slides"]) if s["path"] in changed])
            rows, scores, slide_no = rows[keep], scores[keep], slide_no[keep]
        if self.kind == "ivfpq" and self.meta.get("rerank") and len(rows):
            scores = self._exact(q, slide_no, rows - self.row_start[slide_no], self.tile_index[rows])
            order = np.argsort(-scores, kind="stable")
            rows, scores = rows[order], scores[order]
        return rows, scores

    def _store_reader(self) -> _pq.StoreReader:
        if self._reader is None:
            self._reader = _pq.StoreReader(self._store_path)
        return self._reader

    def _store_path(self, slide_no: int) -> Path:
        s = self.meta["slides"][slide_no]
        root = self.cache_root
        where = Path(s["store"]) if root is None or Path(s["store"]).is_absolute() else root / s["store"]
        if not where.is_dir():
            raise AnalysisError(
                f"{self.path}: the embedding store of {Path(s['path']).name} is not at {where}, so its "
                "hits cannot be re-ranked; give the cache folder it was built from (--cache) or the "
                "archive's new folder (--root)"
            )
        return where

    def close(self) -> None:
        """Close the stores opened for re-ranking (reopened on the next search)."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        self.drop_vectors()

    def _suppress(self, scores: np.ndarray, rows: np.ndarray, k: int, min_dist: int) -> list[Hit]:
        slides = self.meta["slides"]
        slide_of = np.searchsorted(self.row_start, rows, side="right") - 1
        tile_l0 = np.array([int(s["tile_size_l0"]) for s in slides], np.int64)
        kept = spatially_distinct(self.coords[rows], min_dist * tile_l0[slide_of], k, groups=slide_of)
        exists = {int(s): Path(slides[s]["path"]).exists() for s in set(slide_of[kept].tolist())}
        return [
            Hit(index=int(self.tile_index[rows[j]]), x=int(self.coords[rows[j]][0]), y=int(self.coords[rows[j]][1]),
                score=float(scores[j]), slide=slides[slide_of[j]]["path"], exists=exists[int(slide_of[j])],
                tile_size_l0=int(tile_l0[slide_of[j]]))
            for j in kept
        ]  # fmt: skip

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``INDEX.faiss`` + ``INDEX.json`` + ``INDEX.npz`` (or ``x.faiss`` + siblings), all or none.

        Raises OSError (e.g. ENOSPC) when the files cannot be written; the previous index, if
        any, is then left as it was and no partial file is left behind.
        """
        index_file, meta_file, arrays_file = _files(path)
        index_file.parent.mkdir(parents=True, exist_ok=True)

        vectors = self._place_vectors(index_file)
        arrays: dict[str, np.ndarray] = {"coords": self.coords, "tile_index": self.tile_index,
                                         "row_start": self.row_start}  # fmt: skip
        if self.vector_crc is not None:
            arrays["vector_crc"] = self.vector_crc

        def write_arrays(tmp: str) -> None:
            with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
                np.savez(f, allow_pickle=False, **arrays)

        relative_fields(self.meta, index_file.parent.resolve(), self.cache_root)
        text = json.dumps(self.meta, indent=1)
        # The JSON goes last; load_index cross-checks row counts in case files were mixed.
        atomic_write_set([
            (arrays_file, write_arrays),
            (index_file, lambda tmp: _write_faiss(self.index, tmp)),
            (meta_file, lambda tmp: Path(tmp).write_text(text, encoding="utf-8")),
        ])  # fmt: skip
        self.path, self._vectors_at = index_file, None
        if vectors is not None:
            _vec.drop_others(index_file, vectors)
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
