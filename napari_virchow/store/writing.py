"""The checked side of :class:`~napari_virchow.store.embeddings.EmbeddingStore`: done flags, writes, repairs, locks.

A mixin, so that the store stays one object for callers while each module keeps one job.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, cast

import numpy as np
import zarr

from napari_virchow.errors import StoreError
from napari_virchow.store.claims import Claims
from napari_virchow.store.integrity import DAMAGE, DamageReport, chunk_path, file_version, read_flags, row_chunks, scan
from napari_virchow.store.layout import (
    FORMAT_VERSION,
    attrs_digest,
    create_flag_arrays,
    keep_empty,
    now,
    write_coords,
    writing_empty_chunks,
)
from napari_virchow.store.messages import damaged, os_error

try:  # POSIX; without it (Windows) writes in one process are still serialised by a thread lock
    import fcntl
except ImportError:  # pragma: no cover - not on the platforms tested here
    fcntl = None  # type: ignore[assignment]

__all__ = ["StoreWriting"]

logger = logging.getLogger(__name__)

# How often (s) one store object rewrites the "updated" attr: metadata is rewritten at most this
# often instead of on every batch.
_UPDATED_EVERY_S = 60.0


class StoreWriting:
    """Checked done flags, writing, verifying and repairing of an embedding store (mixed into EmbeddingStore)."""

    path: Path
    _group: zarr.Group
    _emb: zarr.Array
    _done: zarr.Array
    _coords: zarr.Array | None
    _attrs: dict[str, Any]
    _thread_lock: threading.RLock
    _lock_fh: IO[bytes] | None
    _present: set[int]
    claims: Claims
    _flags_memo: tuple[tuple[int, int, int] | None, np.ndarray] | None
    _rows_checked: tuple[int, int, int] | None
    _repaired: bool
    _last_updated: float
    _depth: int = 0
    _closed: bool = False
    _strict: bool
    mode: str
    _indices: Callable[[np.ndarray], np.ndarray]
    _touch: Callable[[], None]

    if TYPE_CHECKING:  # read-only properties of EmbeddingStore

        @property
        def chunk_rows(self) -> int:
            """Rows per embeddings chunk."""

        @property
        def n_tiles(self) -> int:
            """Number of tiles."""

        @property
        def dim(self) -> int:
            """Embedding width."""

        @property
        def coords(self) -> np.ndarray | None:
            """Tile origins in level-0 px."""

    # -- checked done flags ----------------------------------------------------------------

    def _flags(self) -> np.ndarray:
        """The done flags (a copy), checked: a missing or damaged done chunk raises a StoreError.

        Decoded again only when the chunk file changed (every write replaces it: a new inode), so
        the many small reads of a viewer cost one ``stat``.
        """
        version = file_version(chunk_path(self.path, self._done, (0,)))
        memo = self._flags_memo
        if version is not None and memo is not None and memo[0] == version:
            return memo[1].copy()
        flags, why = read_flags(self.path, self._done, must_exist=self._strict)
        if flags is None:
            raise self._damage(f"done flags: {why}")
        flags = flags.astype(bool, copy=False)
        self._flags_memo = (version, flags)
        return flags.copy()

    def _checked_done(self) -> np.ndarray:
        """Done flags whose rows are known to exist (mode "a": after one :meth:`repair`)."""
        if self.mode == "a" and not self._repaired:
            self.repair()
        done = self._flags()
        version = self._flags_memo[0] if self._flags_memo is not None else None
        if version is not None and version == self._rows_checked:
            return done
        step = row_chunks(self._emb)
        marked = np.unique(np.flatnonzero(done) // step)
        for chunk in marked[~np.isin(marked, list(self._present))] if len(self._present) else marked:
            if not chunk_path(self.path, self._emb, (int(chunk), 0)).is_file():
                n = int(done[chunk * step : (chunk + 1) * step].sum())
                raise self._damage(f"embeddings chunk {int(chunk)} is missing ({n} tiles marked done)")
            self._present.add(int(chunk))
        self._rows_checked = version
        return done

    def _damage(self, why: str) -> StoreError:
        return damaged(self.path, why, self._attrs.get("slide_path"), repairable=True)

    # -- verifying and repairing ----------------------------------------------------------

    def verify(self) -> DamageReport:
        """Decode every chunk and cross-check the done flags; changes nothing (works read-only).

        Costs one read of the whole store; reads need not call it (each chunk is checked when
        decoded, and the presence of chunk files once per open).
        """
        with self._locked():
            return scan(self.path, self._emb, self._done, self._coords, strict=self._strict)[0]

    def invalidate(self, indices: np.ndarray) -> None:
        """Mark tiles ``indices`` not done, so the next ``embed`` recomputes exactly those."""
        self._require_writable()
        idx = self._indices(indices)
        with self._locked():
            done = self._flags()
            done[idx] = False
            self._write(lambda: self._done.__setitem__(slice(None), done), "done flags")

    def repair(self, coords: np.ndarray | None = None) -> DamageReport:
        """Verify every chunk (:meth:`verify`) and repair what is damaged, under the write lock.

        Chunk files failing their checksum are deleted, lost done flags are rebuilt from the rows
        present, lost coordinates are rewritten from ``coords`` (when given), and damaged tiles are
        marked not done: the next ``embed`` recomputes exactly those. A format 1 store is upgraded
        to format 2. Runs once per open: :meth:`open` in mode "a" calls it.

        Returns
        -------
        DamageReport
            What was found (and repaired); ``report.ok`` when nothing was damaged.
        """
        self._require_writable()
        with self._locked():
            report, trusted = scan(self.path, self._emb, self._done, self._coords, strict=self._strict)
            if report.coords_lost and coords is None:
                # Without the grid the coordinates cannot be rebuilt: report, never guess.
                raise damaged(self.path, report.summary(), self._attrs.get("slide_path"), repairable=True)
            for rel in report.bad_files:
                with contextlib.suppress(FileNotFoundError):
                    (self.path / rel).unlink()
            if not self._strict:
                self._upgrade(trusted, coords)
            elif not report.ok:
                if report.coords_lost and coords is not None:  # (lost without coords raised above)
                    self._coords = self._write(lambda: write_coords(self._group, coords, overwrite=True), "coordinates")
                self._write(lambda: self._done.__setitem__(slice(None), trusted), "done flags")
            self._present.clear()
            self._flags_memo = self._rows_checked = None
            self._repaired = True
        if not report.ok:
            logger.warning("repaired embedding store %s: %s; %d tiles will be recomputed",
                           self.path, report.summary(), len(report.rows))  # fmt: skip
        return report

    def _upgrade(self, done: np.ndarray, coords: np.ndarray | None) -> None:
        """Format 1 -> 2: done and coords rewritten with crc32c, attrs digested (under the lock)."""
        old = self.coords if self._coords is not None and coords is None else coords

        def rewrite() -> None:
            create_flag_arrays(self._group, self.n_tiles, old, overwrite=True)
            self._done = keep_empty(cast(zarr.Array, self._group["done"]))
            self._done[:] = done
            attrs = {**self._attrs, "format_version": FORMAT_VERSION}
            attrs["attrs_digest"] = attrs_digest(attrs)
            self._group.attrs.update(attrs)
            self._attrs = self._group.attrs.asdict()
            self._strict = True

        self._write(rewrite, "the upgraded store")
        found = self._group.get("coords")
        self._coords = keep_empty(found) if isinstance(found, zarr.Array) else None
        logger.info("upgraded embedding store %s to format %d", self.path, FORMAT_VERSION)

    # -- writing ---------------------------------------------------------------------------

    def write(self, indices: np.ndarray, embeddings: np.ndarray) -> None:
        """Store rows for ``indices`` and mark them done (rows first, then the done flags).

        Raises
        ------
        StoreError
            Store opened read-only, folder not writable, disk full (the batch is then not done,
            rows written before stay valid), damaged store.
        """
        self._require_writable()
        idx = self._indices(indices)
        emb = np.asarray(embeddings)
        if emb.shape != (idx.size, self.dim):
            raise ValueError(f"embeddings must have shape ({idx.size}, {self.dim}), got {emb.shape}")
        if idx.size == 0:
            return
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is caught just below
            rows = emb.astype(np.float16)
        if not np.isfinite(rows).all():
            # A NaN/inf row cached as done would poison every overlay until the cache is cleared.
            raise ValueError("embeddings contain NaN/inf (after float16 conversion); not stored")
        if not rows.any(axis=1).all():
            raise ValueError("an embedding is all zeros (after float16 conversion); not stored")
        # Sorted and de-duplicated (the last row given for an index wins).
        order = np.argsort(idx, kind="stable")
        idx, rows = idx[order], rows[order]
        last = np.append(idx[1:] != idx[:-1], True)
        idx, rows = idx[last], rows[last]
        with self._locked():
            stamp = time.monotonic()
            if stamp - self._last_updated > _UPDATED_EVERY_S:
                self._write(lambda: self._group.attrs.update({"updated": now()}), "metadata")
                self._last_updated = stamp
            self._write(lambda: self._emb.set_orthogonal_selection((idx, slice(None)), rows), "embeddings")
            # Only now that every touched chunk file has been replaced whole: flip done, in
            # one chunk file, so the whole batch becomes done at once or not at all.
            done = self._flags()
            done[idx] = True
            self._write(lambda: self._done.__setitem__(slice(None), done), "done flags")
        self.claims.stored(idx, self.chunk_rows)
        self._touch()

    def _write(self, action: Any, what: str) -> Any:
        """Run ``action()`` (a zarr write), translating OS errors and damage into StoreErrors."""
        try:
            with writing_empty_chunks():
                return action()
        except OSError as exc:
            raise os_error(exc, self.path, f"writing {what} to") from exc
        except DAMAGE as exc:  # e.g. a read-modify-write of a chunk that fails its checksum
            raise self._damage(f"{what}: {exc}") from exc

    def _require_writable(self) -> None:
        if self._lock_fh is None:
            raise StoreError(f"store at {self.path} is open read-only; open it with mode='a'")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # The thread lock covers threads sharing this object (flock is per open file, not per
        # thread); flock covers other processes and other store objects on the same folder.
        # Re-entrant (repair -> _write); flock is taken once, by the outermost holder.
        with self._thread_lock:
            if self._closed:  # e.g. a thread that got here after close(): never write unlocked
                raise StoreError(f"store at {self.path} was closed; open it again")
            self._depth = getattr(self, "_depth", 0) + 1
            outer = self._depth == 1 and fcntl is not None and self._lock_fh is not None
            if outer:
                fcntl.flock(self._lock_fh.fileno(), fcntl.LOCK_EX)  # type: ignore[union-attr]
            try:
                yield
            finally:
                if outer and self._lock_fh is not None:
                    fcntl.flock(self._lock_fh.fileno(), fcntl.LOCK_UN)
                self._depth -= 1

    def _remove_orphan_temps(self) -> None:
        # Called under the write lock: no write is in progress, so any temp file is left over
        # from a killed writer.
        for tmp in self.path.rglob(".*.tmp"):
            with contextlib.suppress(OSError):
                tmp.unlink()
