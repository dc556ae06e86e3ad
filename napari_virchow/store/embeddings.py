"""Resumable, crash-safe, verified embedding store: a zarr v3 group per (slide, encoder, weights, mpp, tile).

Layout of a store folder ``<root>/<slide stem>--<encoder>--<digest16>/``::

    zarr.json        group metadata; attrs = provenance (see ``EmbeddingStore.attrs``) + attrs_digest
    embeddings/      float16 (n_tiles, dim), chunks of ``chunk_rows`` rows, zstd (checksum) + crc32c
    done/            bool (n_tiles,), ONE chunk (zstd + crc32c): a batch is flipped to done by one file replace
    coords/          int64 (n_tiles, 2) level-0 px, ONE chunk (zstd + crc32c), written once
    .lock            fcntl.flock'ed exclusively around every write (read-modify-write of chunks)
    .inuse           flock'ed shared while a process has the store open: eviction skips it
    last_used        its mtime is the LRU clock (touching it is one utime, no rewrite)

Crash safety: every file (chunk or metadata) is written to a temporary file, fsync'ed and renamed
over the old one (:mod:`~napari_virchow.store.atomic`), so a chunk file is always either the old or
the new version, never torn. A write puts the rows first and flips ``done`` afterwards, under the
lock, so a kill at any moment leaves at worst rows written but not marked done (recomputed).

Integrity (:mod:`~napari_virchow.store.integrity`): no value is returned unverified. Reads (mode
"r") report damage once, as a :class:`StoreError` naming the store and the fix (``napari-virchow
embed SLIDE``); a writable open repairs it (:meth:`EmbeddingStore.repair`), so ``embed`` recomputes
exactly the damaged tiles. Public: :meth:`~EmbeddingStore.verify`, :meth:`~EmbeddingStore.invalidate`.

Format 1 stores (before checksums on ``done``/``coords``): decision -- they are *migrated*, not
refused, so no computed embedding is lost. Read-only, they are served with every check that
applies (zstd checksums of the embeddings, chunk presence, done rows cross-checked against the rows
present: a flipped done bit shows as a done all-zero row); their first writable open verifies all
chunks, rewrites ``done`` (keeping only verified rows) and ``coords`` with crc32c, and stamps them
format 2 with an attrs digest.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np
import zarr

from napari_virchow.errors import StoreError
from napari_virchow.store.atomic import AtomicLocalStore
from napari_virchow.store.cache import (
    cache_max_bytes,
    default_cache_root,
    enforce_limit,
    open_inuse_shared,
    remove_store,
    resolve_cache_root,
)
from napari_virchow.store.claims import Claims
from napari_virchow.store.integrity import DAMAGE, DamageReport, read_flags, row_chunks
from napari_virchow.store.key import StoreKey
from napari_virchow.store.layout import (
    FORMAT,
    FORMAT_VERSION,
    check_attrs,
    create_store,
    keep_empty,
    write_coords,
)
from napari_virchow.store.messages import damaged, mismatch, os_error
from napari_virchow.store.writing import StoreWriting

__all__ = ["FORMAT", "FORMAT_VERSION", "DamageReport", "EmbeddingStore", "StoreKey", "default_cache_root"]

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_ROWS = 256


# -- the store ---------------------------------------------------------------------------------


class EmbeddingStore(StoreWriting):
    """Per-tile embeddings of one slide under one encoder; see the module docstring for layout.

    Use :meth:`open` (by key) or :meth:`from_path` (by folder); both return an opened store that
    holds a shared "in use" lock until :meth:`close` (or the end of a ``with`` block).

    Reading: :attr:`done`, :meth:`missing`, :meth:`read`, :meth:`read_done` (verified rows only).
    Writing: :meth:`write`. Integrity: :meth:`verify` (a :class:`DamageReport`), :meth:`repair`,
    :meth:`invalidate`. Sharing work between processes: :attr:`claims` (see
    :func:`napari_virchow.store.claims.shared_batches`).
    """

    def __init__(self, path: Path, *, mode: Literal["r", "a"] = "r", touch: bool = True) -> None:
        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' or 'a', got {mode!r}")
        self.path = Path(path)
        self.mode = mode
        self._thread_lock = threading.RLock()
        self._lock_fh: IO[bytes] | None = None
        self._inuse_fh = open_inuse_shared(self.path)
        self._last_updated = 0.0
        self._repaired = False
        self._present: set[int] = set()  # embeddings chunks whose file was seen (never deleted)
        self._flags_memo: tuple[tuple[int, int, int] | None, np.ndarray] | None = None
        self._rows_checked: tuple[int, int, int] | None = None  # done version whose rows were found
        self.claims = Claims(self.path)  # chunks this object computes (shared with other processes)
        try:
            self._open_zarr()
            if mode == "a":
                # Opening the lock file for writing is the cheap up-front writability check.
                try:
                    self._lock_fh = open(self.path / ".lock", "ab")  # noqa: SIM115 - kept open
                except OSError as exc:
                    raise os_error(exc, self.path, "opening") from exc
                with self._locked():
                    self._remove_orphan_temps()
        except BaseException:
            self.close()
            raise
        if touch:
            self._touch()

    def _open_zarr(self) -> None:
        if not (self.path / "zarr.json").is_file():
            raise damaged(self.path, "zarr.json is missing")
        try:
            store = AtomicLocalStore(self.path, read_only=self.mode == "r")
            self._group = zarr.open_group(store=store, mode="r" if self.mode == "r" else "r+")
            attrs = self._group.attrs.asdict()
            emb, done = self._group["embeddings"], self._group["done"]
            if not (isinstance(emb, zarr.Array) and isinstance(done, zarr.Array)):
                raise damaged(self.path, "embeddings or done flags are not arrays")
            self._emb, self._done = emb, keep_empty(done)
            coords = self._group.get("coords")
            self._coords = keep_empty(coords) if isinstance(coords, zarr.Array) else None
        except DAMAGE as exc:
            raise damaged(self.path, exc) from exc
        n, dim, self.key, self._strict = check_attrs(self.path, attrs)
        self._attrs = attrs
        if not isinstance(self._emb, zarr.Array) or self._emb.shape != (n, dim):
            raise damaged(self.path, f"embeddings array is not ({n}, {dim})")
        if not isinstance(self._done, zarr.Array) or self._done.shape != (n,):
            raise damaged(self.path, f"done array is not ({n},)")

    # -- opening ---------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        key: StoreKey,
        *,
        n_tiles: int,
        dim: int,
        root: Path | str | None = None,
        slide_path: str | None = None,
        coords: np.ndarray | None = None,
        tile_size_l0: int | None = None,
        mode: Literal["a", "r", "w"] = "a",
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        extra_attrs: Mapping[str, Any] | None = None,
    ) -> EmbeddingStore:
        """Create or reopen the store for ``key`` under ``root``.

        Parameters
        ----------
        key : StoreKey
            Slide fingerprint, encoder, weights id, mpp and tile size.
        n_tiles, dim : int
            Shape of the embedding table; a store with another shape is refused.
        root : path, optional
            Folder holding stores (``--cache DIR``); default :func:`default_cache_root`.
        slide_path, tile_size_l0 : optional
            Provenance, recorded at creation.
        coords : ndarray, optional
            (n_tiles, 2) level-0 px; written once, and on reopen compared with the stored ones
            (rewritten when the stored ones are damaged and the store is writable).
        mode : {"a", "r", "w"}
            "a" creates or reopens for writing and repairs damage (:meth:`repair`), "r" opens an
            existing store read-only (works in a read-only folder; damage is reported), "w"
            deletes an existing store and starts over.
        chunk_rows : int
            Rows per ``embeddings`` chunk, used at creation only.
        extra_attrs : mapping, optional
            More provenance recorded at creation (e.g. ``EncoderSpec.mpp_provenance``: a
            magnification outside the encoder's trained ones is recorded as an opt-in).

        Returns
        -------
        EmbeddingStore

        Raises
        ------
        StoreError
            Missing (mode "r"), damaged (mode "r"), made for another key/shape/format, not
            writable, disk full.
        """
        if mode not in ("a", "r", "w"):
            raise ValueError(f"mode must be 'a', 'r' or 'w', got {mode!r}")
        n_tiles, dim = int(n_tiles), int(dim)
        if n_tiles < 0 or dim <= 0:
            raise ValueError(f"need n_tiles >= 0 and dim > 0, got {n_tiles}, {dim}")
        if coords is not None:
            coords = np.asarray(coords)
            if coords.shape != (n_tiles, 2):
                raise ValueError(f"coords must have shape ({n_tiles}, 2), got {coords.shape}")
        root = resolve_cache_root(root)
        path = cls.find(key, root=root)
        if path is not None and mode == "w":
            if not remove_store(path):
                raise StoreError(
                    f"cannot overwrite embedding store {path}: another process has "
                    "it open; close it first or use another --cache DIR"
                )
            path = None
        created = False
        if path is None:
            if mode == "r":
                raise StoreError(
                    f"no embeddings cached in {root} for slide "
                    f"{slide_path or key.slide_fingerprint} with encoder {key.encoder}; run "
                    "`napari-virchow embed` first or pick the --cache DIR that holds them"
                )
            limit = cache_max_bytes()  # a bad setting fails before anything is created
            path = create_store(root, key, n_tiles=n_tiles, dim=dim, slide_path=slide_path, coords=coords,
                                tile_size_l0=tile_size_l0, chunk_rows=chunk_rows, extra_attrs=extra_attrs)  # fmt: skip
            created = True
        store = cls(path, mode="r" if mode == "r" else "a")
        try:
            store._check_key(key, n_tiles, dim)
            if store.mode == "a" and not created:
                store.repair(coords=coords)
            store._check_coords(coords)
        except BaseException:
            store.close()
            raise
        if created:
            # Make room for the new store's full size, never evicting it (it is in use).
            enforce_limit(root, limit, keep=[path], reserve_bytes=n_tiles * dim * 2)
        return store

    @classmethod
    def from_path(cls, path: Path | str, *, mode: Literal["r", "a"] = "r") -> EmbeddingStore:
        """Open the store in folder ``path`` (e.g. from ``cache.list_stores``) without its key."""
        path = Path(path)
        if not path.is_dir():
            raise StoreError(f"no embedding store at {path}; check the path or --cache DIR")
        return cls(path, mode=mode)

    @staticmethod
    def find(key: StoreKey, *, root: Path | str | None = None) -> Path | None:
        """Folder of the store for ``key`` under ``root`` if there is one (matched by digest)."""
        root = resolve_cache_root(root)
        # Matched by digest, not by full name, so a renamed/moved slide still finds its store.
        hits = sorted(root.glob(f"*--{key.digest[:16]}")) if root.is_dir() else []
        return next((p for p in hits if p.is_dir()), None)

    def _check_key(self, key: StoreKey, n_tiles: int, dim: int) -> None:
        if self.key.as_dict() != key.as_dict():
            diff = [
                f"{k}: {v!r} != {key.as_dict()[k]!r}" for k, v in self.key.as_dict().items() if key.as_dict()[k] != v
            ]
            raise mismatch(self.path, ", ".join(diff))
        if (self.n_tiles, self.dim) != (n_tiles, dim):
            raise mismatch(self.path, f"{self.n_tiles} tiles x {self.dim} dims, asked {n_tiles} x {dim}")

    def _check_coords(self, coords: np.ndarray | None) -> None:
        if coords is None:
            return
        if self._coords is None and self.mode == "a":
            with self._locked():
                # Re-read under the lock: another process may have written them meanwhile.
                found = self._group.get("coords")
                self._coords = keep_empty(found) if isinstance(found, zarr.Array) else None
                if self._coords is None:
                    self._coords = self._write(lambda: write_coords(self._group, coords), "coordinates")
        stored = self.coords  # verified: damage is reported as damage, not as another grid
        if stored is not None and not np.array_equal(stored, coords):
            # Same shape but other tiles (e.g. another tissue mask): row i would mean another tile.
            raise mismatch(self.path, "tile coordinates differ from the stored grid")

    # -- reading ---------------------------------------------------------------------------

    @property
    def n_tiles(self) -> int:
        """Number of tiles (rows)."""
        return int(self._emb.shape[0])

    @property
    def chunk_rows(self) -> int:
        """Rows per ``embeddings`` chunk (the unit of writes and of work shared between processes)."""
        return row_chunks(self._emb)

    @property
    def dim(self) -> int:
        """Embedding width."""
        return int(self._emb.shape[1])

    @property
    def attrs(self) -> dict[str, Any]:
        """Provenance: key fields, n_tiles, dim, tile_size_l0, slide_path, versions, times."""
        return dict(self._attrs)

    provenance = attrs

    @property
    def done(self) -> np.ndarray:
        """Boolean mask of tiles whose embedding is stored (read fresh from disk, checked)."""
        return self._checked_done()

    @property
    def n_done(self) -> int:
        """Number of tiles done."""
        return int(self.done.sum())

    @property
    def coords(self) -> np.ndarray | None:
        """(n_tiles, 2) int64 level-0 px tile origins, or None if never given."""
        if self._coords is None:
            return None
        values, why = read_flags(self.path, self._coords, must_exist=self._strict)
        if values is None:
            raise self._damage(f"tile coordinates: {why}")
        return values.astype(np.int64, copy=False)

    def missing(self, indices: np.ndarray | None = None) -> np.ndarray:
        """Those of ``indices`` (default: all tiles) not done yet, in the given order."""
        done = self._checked_done()
        idx = np.arange(self.n_tiles) if indices is None else self._indices(indices)
        return idx[~done[idx]]

    def read(self, indices: np.ndarray) -> np.ndarray:
        """Rows ``indices`` as float32 (len, dim); every one must be done (else a StoreError)."""
        idx = self._indices(indices)
        done = self._checked_done()
        if not done[idx].all():
            todo = np.unique(idx[~done[idx]])
            raise StoreError(
                f"{len(todo)} requested tiles (e.g. {todo[:5].tolist()}) are not in the embedding store at "
                f"{self.path}; embed them first (`napari-virchow embed`)"
            )
        self._touch()
        return self._read_rows(idx)

    def read_done(self) -> tuple[np.ndarray, np.ndarray]:
        """All done tiles: (indices int64, embeddings float32 (n_done, dim))."""
        # `done` is read before the rows: a row marked done was written before its flag, so the
        # rows read next are at least that new even while another process is writing.
        idx = np.flatnonzero(self._checked_done())
        self._touch()
        return idx, self._read_rows(idx)

    def _read_rows(self, idx: np.ndarray) -> np.ndarray:
        """Rows of done tiles ``idx``; checksums are checked by zarr, all-zero rows here."""
        if idx.size == 0:
            return np.zeros((0, self.dim), np.float32)
        uniq, inverse = np.unique(idx, return_inverse=True)
        try:
            rows = np.asarray(self._emb.get_orthogonal_selection((uniq, slice(None))))
        except DAMAGE as exc:
            raise self._damage(f"an embeddings chunk fails its checksum ({exc})") from exc
        empty = ~rows.any(axis=1)
        if empty.any():
            some = uniq[empty][:5].tolist()
            raise self._damage(f"{int(empty.sum())} tiles marked done hold no embedding (e.g. {some})")
        return rows.astype(np.float32)[inverse]

    def _indices(self, indices: np.ndarray) -> np.ndarray:
        idx = np.asarray(indices)
        if idx.dtype == bool:
            raise TypeError("indices must be integers, not a boolean mask (use np.flatnonzero)")
        idx = idx.astype(np.int64, copy=False).ravel()
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_tiles):
            raise IndexError(f"tile index out of range 0..{self.n_tiles - 1} for {self.path}")
        return idx

    def _touch(self) -> None:
        # A read-only folder or a missing file only costs LRU accuracy, never a read.
        with contextlib.suppress(OSError):
            os.utime(self.path / "last_used")

    # -- lifetime --------------------------------------------------------------------------

    def close(self) -> None:
        """Release the locks, after any write in flight in another thread has finished.

        The object must not be used afterwards.
        """
        with self._thread_lock:  # a write holds it: the cross-process lock outlives the write
            self._closed = True
            self.claims.release_all()
            for fh in (self._lock_fh, self._inuse_fh):
                if fh is not None:
                    fh.close()
            self._lock_fh = self._inuse_fh = None

    def __enter__(self) -> EmbeddingStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"EmbeddingStore({str(self.path)!r}, mode={self.mode!r})"
