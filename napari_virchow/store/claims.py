"""Sharing one store's work between processes: per-chunk claims that die with their process.

Two ``embed`` runs of one slide used to compute nearly every tile twice. Now a process claims an
``embeddings`` chunk before computing tiles of it: the claim is an exclusive ``flock`` on
``<store>/.claims/<chunk>``, held while it has tiles of that chunk pending and released by
:meth:`EmbeddingStore.write` once they are stored. Another process skips the tiles of chunks it
cannot claim, computes the rest, then waits for those chunks and computes only what is still
missing. The kernel drops the flock of a process that dies (kill -9 included), so a stale claim
is simply taken over; no pid files, no clocks. A single process sees its tiles in their order.

Where claims cannot be made (read-only folder, Windows without ``fcntl``, or more than
:data:`MAX_HELD` chunks pending at once) tiles are computed unannounced: work may then be
duplicated, never lost or wrong (writes are serialised by the store's lock).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Generator
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from napari_virchow.store.embeddings import EmbeddingStore

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no sharing, each process computes all
    fcntl = None  # type: ignore[assignment]

__all__ = ["MAX_HELD", "Claims", "shared_batches"]

#: most chunk claims (open files) one store object holds at a time
MAX_HELD = 64
#: seconds between looks at a chunk another process is computing
POLL_S = 0.2


class Claims:
    """The chunk claims one store object holds, and the tiles pending under each."""

    def __init__(self, store_path: Path) -> None:
        self.folder = store_path / ".claims"
        self._held: dict[int, IO[bytes]] = {}
        self._pending: dict[int, set[int]] = {}
        self._lock = threading.Lock()

    def take(self, chunk: int, tiles: np.ndarray) -> bool:
        """Claim ``chunk`` for computing ``tiles`` of it; False when a live process holds it."""
        with self._lock:
            if chunk in self._held:
                self._pending[chunk].update(tiles.tolist())
                return True
            if fcntl is None or len(self._held) >= MAX_HELD:
                return True  # unannounced (see the module docstring)
            try:
                self.folder.mkdir(exist_ok=True)
                fh = open(self.folder / str(chunk), "ab")  # noqa: SIM115 - held until released
            except OSError:
                return True
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # BlockingIOError: another process (or store object) holds it
                fh.close()
                return False
            self._held[chunk] = fh
            self._pending[chunk] = set(tiles.tolist())
            return True

    def stored(self, tiles: np.ndarray, rows_per_chunk: int) -> None:
        """``tiles`` are written: release the claims that have nothing pending any more."""
        with self._lock:
            for chunk in np.unique(tiles // rows_per_chunk).tolist():
                pending = self._pending.get(chunk)
                if pending is None:
                    continue
                pending.difference_update(tiles.tolist())
                if not pending:
                    self._release(chunk)

    def release_all(self) -> None:
        """Drop every claim (end of a run, cancel, close)."""
        with self._lock:
            for chunk in list(self._held):
                self._release(chunk)

    def _release(self, chunk: int) -> None:
        self._pending.pop(chunk, None)
        fh = self._held.pop(chunk, None)
        if fh is not None:
            fh.close()  # closing drops the flock


def _claim(store: EmbeddingStore, chunk: int, tiles: np.ndarray) -> np.ndarray | None:
    """The tiles of ``chunk`` still missing once this process holds its claim; None if another does.

    Missing tiles are checked again after the claim is taken: another process may have stored some
    between the first check and its release of the claim, and those must not be computed twice.
    """
    left = store.missing(tiles)
    if not left.size:
        return left
    if not store.claims.take(chunk, left):
        return None
    fresh = store.missing(left)
    if len(fresh) < len(left):
        store.claims.stored(np.setdiff1d(left, fresh), store.chunk_rows)  # releases when nothing is left
    return fresh


def shared_batches(
    store: EmbeddingStore, todo: np.ndarray, size: int, cancel: threading.Event | None = None
) -> Generator[np.ndarray, None, None]:
    """Batches of ``todo`` for this process, skipping chunks another live process is computing.

    Tiles come in ``todo``'s order, each chunk claimed when its first tile is reached (lazily: two
    processes leapfrog through the chunks); tiles stored meanwhile by another process are dropped.
    Deferred chunks are then polled until they are done, or claimable (their process finished or
    died), and what is still missing is yielded. Claims left at the end (cancel, error, generator
    closed) are released.
    """
    if not len(todo):
        return
    chunks = todo // store.chunk_rows
    order = np.argsort(chunks, kind="stable")
    starts = np.flatnonzero(np.diff(chunks[order], prepend=-1))
    members = dict(zip(chunks[order][starts].tolist(), np.split(todo[order], starts[1:]), strict=True))
    wanted: dict[int, set[int] | None] = {}  # chunk -> tiles this process computes; None: deferred
    deferred: dict[int, list[int]] = {}
    batch: list[int] = []
    try:
        for tile, chunk in zip(todo.tolist(), chunks.tolist(), strict=True):
            if chunk not in wanted:
                left = _claim(store, chunk, members[chunk])
                wanted[chunk] = None if left is None else set(left.tolist())
            mine = wanted[chunk]
            if mine is None:
                deferred.setdefault(chunk, []).append(tile)
            elif tile in mine:
                batch.append(tile)
                if len(batch) == size:
                    yield np.asarray(batch, np.int64)
                    batch = []
        if batch:
            yield np.asarray(batch, np.int64)
        while deferred:
            for chunk in list(deferred):
                if cancel is not None and cancel.is_set():
                    return
                left = _claim(store, chunk, np.asarray(deferred[chunk], np.int64))
                if left is not None:  # stored by the other process, or ours now
                    del deferred[chunk]
                    for i in range(0, len(left), size):
                        yield left[i : i + size]
            if deferred:
                time.sleep(POLL_S)
    finally:
        store.claims.release_all()
