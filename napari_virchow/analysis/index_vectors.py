"""The re-rank file of an IVF-PQ index: every indexed row as float16, memory-mapped, one checksum per row.

Re-ranking a shortlist from the embedding stores decodes one zarr chunk (256 rows, zstd) per
candidate, ~3 ms each: 300 candidates took ~1 s a query. This file keeps the same float16 rows,
copied from the (verified) stores while the index is filled slide by slide, in one flat file beside
the index (``INDEX.<token>.f16``), so a candidate costs one 5 kB read of a memory-mapped page.

The stores stay the source of truth: the file is filled from them, can be rebuilt from them
(:func:`rebuild`), and a row whose crc32 differs from the one recorded when it was written is never
used: it is re-read from its store (verified there) and reported (:attr:`Vectors.damaged`).

Layout: slide ``s``'s rows are the file rows ``vec_start[s] .. vec_start[s] + n_s`` (grid order of
the index's block for that slide), so IVF-PQ ids ``s << 32 | j`` map to file row ``vec_start[s] + j``.
Adding slides appends to the file; removing one leaves its rows unused until :func:`rebuild`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_virchow.analysis import index_ivfpq as _pq
from napari_virchow.analysis.similarity import AnalysisError, l2_normalize

__all__ = ["RerankFile", "Vectors", "VectorWriter", "copy_rows", "drop_others", "new_name", "row_crcs"]


def row_crcs(rows: np.ndarray) -> np.ndarray:
    """crc32 of each row's bytes (uint32)."""
    rows = np.ascontiguousarray(rows)
    flat = rows.view(np.uint8).reshape(len(rows), -1)
    return np.fromiter((zlib.crc32(r.data) for r in flat), np.uint32, len(rows))


def new_name(index_file: Path) -> str:
    """A fresh re-rank file name beside ``index_file`` (a new build never overwrites the old file)."""
    return f"{index_file.stem}.{secrets.token_hex(4)}.f16"


class VectorWriter:
    """Appends float16 rows (and their checksums) to a re-rank file; ``rows`` is the count written."""

    def __init__(self, path: Path, dim: int, rows: int = 0, crcs: np.ndarray | None = None) -> None:
        self.path, self.dim, self.rows = Path(path), int(dim), int(rows)
        self._crcs: list[np.ndarray] = [np.asarray(crcs if crcs is not None else [], np.uint32)[:rows]]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "r+b" if self.path.exists() and rows else "wb")  # noqa: SIM115 - closed in close()
        self._fh.truncate(self.rows * self.dim * 2)  # a torn append after the last save is dropped
        self._fh.seek(self.rows * self.dim * 2)

    def append(self, x: np.ndarray) -> int:
        """Write ``x`` (n, dim) as float16 at the end; the file row of its first row."""
        x16 = np.ascontiguousarray(x, np.float16)
        if x16.ndim != 2 or x16.shape[1] != self.dim:
            raise ValueError(f"re-rank rows must be (n, {self.dim}), got {x16.shape}")
        self._fh.write(x16.tobytes())
        self._crcs.append(row_crcs(x16))
        first, self.rows = self.rows, self.rows + len(x16)
        return first

    def close(self) -> np.ndarray:
        """Flush to disk (fsync) and close; the checksums of every row written."""
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        return np.concatenate(self._crcs).astype(np.uint32)


READ_THREADS = 8  # parallel reads of one query's candidates (an NVMe disk serves many at once)
_POOL: list[ThreadPoolExecutor] = []


def _readers() -> ThreadPoolExecutor:
    """The threads reading re-rank rows (os.preadv releases the GIL), started on first use."""
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(READ_THREADS, thread_name_prefix="rerank-read"))
    return _POOL[0]


class Vectors:
    """Read side: rows of a re-rank file by file row, each checked against its crc32 before use.

    Rows are read with ``os.preadv`` in ascending file order, consecutive rows in one call, with
    kernel readahead off (``POSIX_FADV_RANDOM``): a candidate costs its own 5 kB, not the 128 kB a
    page fault of a memory map reads around it (what made 3,000 candidates cost ~0.5 s cold).
    """

    def __init__(self, path: Path, dim: int, crcs: np.ndarray) -> None:
        self.path, self.dim, self.crcs = Path(path), int(dim), np.asarray(crcs, np.uint32)
        size = self.path.stat().st_size if self.path.exists() else -1
        if size < len(self.crcs) * self.dim * 2:
            raise OSError(f"{self.path}: {size} bytes, expected {len(self.crcs) * self.dim * 2} (truncated or missing)")
        self._fd: int | None = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0)) if len(self.crcs) else None
        if self._fd is not None and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_RANDOM)
        self.damaged = 0  # rows found damaged so far (never used; re-read from the stores)

    def read(self, file_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(float16 rows, ok mask): rows whose checksum fails (or that are not in the file) are zeroed
        and flagged, never returned as data."""
        file_rows = np.asarray(file_rows, np.int64)
        out = np.zeros((len(file_rows), self.dim), np.float16)
        ok = (file_rows >= 0) & (file_rows < len(self.crcs))
        if self._fd is None or not ok.any():
            return out, np.zeros(len(file_rows), bool)
        order = np.flatnonzero(ok)[np.argsort(file_rows[ok], kind="stable")]  # ascending offsets
        rows = file_rows[order]
        buf = np.empty((len(rows), self.dim), np.float16)  # the rows in file order
        good = np.ones(len(rows), bool)
        # Runs of consecutive file rows: one read each, straight into their place in ``buf``; groups
        # of runs read in parallel, so a disk that does not hold the rows in the page cache serves
        # several random reads at once (one at a time, each costs a full device round trip).
        ends = [*(np.flatnonzero(np.diff(rows) != 1) + 1).tolist(), len(rows)]
        starts = [0, *ends[:-1]]
        first, fd = rows.tolist(), self._fd
        groups = max(1, min(READ_THREADS, len(ends) // 16))
        spans = [(starts[i], ends[i]) for i in range(len(ends))]
        parts = [spans[g::groups] for g in range(groups)]

        def read_part(part: list[tuple[int, int]]) -> None:
            for a, b in part:
                view, done = buf[a:b].reshape(-1).view(np.uint8), 0
                while done < len(view):  # a read may return less than asked (over 2 GB, signals)
                    got = os.preadv(fd, [view[done : done + (1 << 30)].data], first[a] * row_bytes + done)
                    if got <= 0:
                        break
                    done += got
                good[a + done // row_bytes : b] = False  # rows not read whole (the file shrank) are not data

        row_bytes = self.dim * 2
        if groups == 1:
            read_part(parts[0])
        else:
            list(_readers().map(read_part, parts))
        good[good] = row_crcs(buf[good]) == self.crcs[rows[good]]
        buf[~good] = 0
        out[order] = buf
        ok[order] = good
        self.damaged += int((~ok).sum())
        return out, ok

    def close(self) -> None:
        """Close the file."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def copy_rows(src: Path, dst: Path, nbytes: int) -> None:
    """Copy the first ``nbytes`` of a re-rank file (an index saved to another folder), fsync'ed."""
    import shutil

    with open(src, "rb") as fi, open(dst, "wb") as fo:
        shutil.copyfileobj(_Limited(fi, nbytes), fo, 1 << 22)
        fo.flush()
        os.fsync(fo.fileno())


class _Limited:
    def __init__(self, fh: Any, left: int) -> None:
        self.fh, self.left = fh, left

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data = self.fh.read(n)
        self.left -= len(data)
        return data


def drop_others(index_file: Path, keep: Path) -> None:
    """Delete re-rank files of earlier builds of this index (``<stem>.<token>.f16`` other than ``keep``)."""
    for old in index_file.parent.glob(f"{index_file.stem}.*.f16"):
        token = old.name[len(index_file.stem) + 1 : -4]
        if old.name != keep.name and len(token) == 8 and all(c in "0123456789abcdef" for c in token):
            with contextlib.suppress(OSError):
                old.unlink()


class RerankFile:
    """The re-rank file side of :class:`~napari_virchow.analysis.index_core.SlideIndex` (a mixin)."""

    meta: dict[str, Any]
    path: Path | None
    vector_crc: np.ndarray | None
    damaged_rows: int
    _vectors_at: Path | None
    _vectors: Vectors | None

    if TYPE_CHECKING:
        @property
        def dim(self) -> int: ...  # noqa: D102

        def _store_reader(self) -> _pq.StoreReader: ...

    def _exact(self, q: np.ndarray, slide_no: np.ndarray, j: np.ndarray, tiles: np.ndarray) -> np.ndarray:
        """Exact cosines from the re-rank file; rows failing their checksum are re-read from the stores."""
        vectors = self._vector_file()
        if vectors is None:
            return _pq.rerank(q, slide_no, tiles, self._store_reader())
        start = np.array([s.get("vec_start", -1) for s in self.meta["slides"]], np.int64)
        x, ok = vectors.read(start[slide_no] + j)
        scores = l2_normalize(x) @ q
        if not ok.all():  # never used: re-read, verified, from the source of truth, and reported
            bad = np.flatnonzero(~ok)
            self.damaged_rows += len(bad)
            scores[bad] = _pq.rerank(q, slide_no[bad], tiles[bad], self._store_reader())
        return scores

    def vectors_path(self) -> Path | None:
        """The re-rank file (float16 rows beside the index), or None when re-ranking reads the stores."""
        if self.vector_crc is None or not self.meta.get("vectors"):
            return None
        if self._vectors_at is not None:
            return self._vectors_at
        return self.path.parent / self.meta["vectors"] if self.path is not None else None

    def _vector_file(self) -> Vectors | None:
        if self._vectors is None:
            where = self.vectors_path()
            if where is None or self.vector_crc is None:
                return None
            try:
                self._vectors = Vectors(where, self.dim, self.vector_crc)
            except OSError as exc:
                raise AnalysisError(
                    f"{self.path}: its re-rank file cannot be read ({exc}); keep {where.name} beside the index "
                    f"or rebuild it from the stores: `napari-virchow index --out {self.path} --rebuild-vectors`"
                ) from exc
        return self._vectors

    def vector_writer(self) -> VectorWriter | None:
        """An appender to this index's re-rank file (after its last saved row), or None without one."""
        where = self.vectors_path()
        if where is None or self.vector_crc is None:
            return None
        self.drop_vectors()  # reopened with the new checksums on the next search
        return VectorWriter(where, self.dim, len(self.vector_crc), self.vector_crc)

    def drop_vectors(self) -> None:
        """Close the re-rank file (reopened on the next search)."""
        if self._vectors is not None:
            self._vectors.close()
            self._vectors = None

    def damage_report(self) -> str | None:
        """A message when re-rank rows failed their checksum during searches (they were not used)."""
        if not self.damaged_rows:
            return None
        return (f"{self.damaged_rows} rows of the re-rank file {self.vectors_path()} failed their checksum; they "
                "were not used (re-read from the embedding stores instead). Rebuild the file from the stores: "
                f"`napari-virchow index --out {self.path} --rebuild-vectors`")  # fmt: skip

    def _place_vectors(self, index_file: Path) -> Path | None:
        """The re-rank file beside ``index_file`` (copied there when saved elsewhere); its name in the meta."""
        where = self.vectors_path()
        if where is None:
            return None
        if where.parent.resolve() != index_file.parent.resolve():
            target = index_file.parent / new_name(index_file)
            copy_rows(where, target, len(self.vector_crc) * self.dim * 2)  # type: ignore[arg-type]
            where = target
        self.meta["vectors"] = where.name
        return where

