"""Resumable, crash-safe embedding store: a zarr v3 group per (slide, encoder, weights, mpp, tile).

Layout of a store folder ``<root>/<slide stem>--<encoder>--<digest16>/``::

    zarr.json        group metadata; attrs = provenance (see ``EmbeddingStore.attrs``)
    embeddings/      float16 (n_tiles, dim), chunks of ``chunk_rows`` rows, zstd with checksum
    done/            bool (n_tiles,), ONE chunk: a batch is flipped to done by one file replace
    coords/          int64 (n_tiles, 2) level-0 px, written once (optional)
    .lock            fcntl.flock'ed exclusively around every write (read-modify-write of chunks)
    .inuse           flock'ed shared while a process has the store open: eviction skips it
    last_used        its mtime is the LRU clock (touching it is one utime, no rewrite)

Crash safety: every file (chunk or metadata) is written to a temporary file, fsync'ed and renamed
over the old one, so a chunk file is always either the old or the new version, never torn; zarr
>= 3.1.3 does the same, but 3.0 - 3.1.2 wrote chunk files in place, so the store does not rely on
it. A write puts the rows first and flips ``done`` afterwards, under the lock, so a kill at any
moment leaves at worst rows written but not marked done (recomputed on resume).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np
import zarr
from zarr.codecs import ZstdCodec
from zarr.core.buffer import Buffer
from zarr.storage import LocalStore

from napari_virchow import __version__
from napari_virchow.errors import StoreError
from napari_virchow.io.files import atomic_write_bytes
from napari_virchow.store.cache import (
    STORE_NAME_RE,
    cache_max_bytes,
    default_cache_root,
    enforce_limit,
    open_inuse_shared,
    remove_store,
    resolve_cache_root,
    store_folder_name,
)

try:  # POSIX; without it (Windows) writes in one process are still serialised by a thread lock
    import fcntl
except ImportError:  # pragma: no cover - not on the platforms tested here
    fcntl = None  # type: ignore[assignment]

__all__ = ["FORMAT", "FORMAT_VERSION", "EmbeddingStore", "StoreKey", "default_cache_root"]

logger = logging.getLogger(__name__)

FORMAT = "napari-virchow-embeddings"
FORMAT_VERSION = 1
DEFAULT_CHUNK_ROWS = 256
# How often (s) one store object rewrites the "updated" attr: metadata is rewritten at most this
# often instead of on every batch.
_UPDATED_EVERY_S = 60.0
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}
_READ_ONLY = {errno.EACCES, errno.EPERM, errno.EROFS}
# What zarr raises for a damaged node/chunk: zarr.errors.* are ValueErrors, a bad chunk gives a
# codec RuntimeError, garbled JSON a ValueError, a missing file a FileNotFoundError (OSError).
_DAMAGE = (OSError, ValueError, KeyError, TypeError, RuntimeError)


@dataclasses.dataclass(frozen=True)
class StoreKey:
    """Identity of a store: embeddings are never mixed across any of these fields."""

    slide_fingerprint: str
    encoder: str
    weights_id: str
    mpp: float
    tile_size: int

    def __post_init__(self) -> None:
        for name in ("slide_fingerprint", "encoder", "weights_id"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"StoreKey.{name} must be a non-empty string")
        if not np.isfinite(self.mpp) or self.mpp <= 0:
            raise ValueError(f"StoreKey.mpp must be a positive number, got {self.mpp!r}")
        if int(self.tile_size) != self.tile_size or self.tile_size <= 0:
            raise ValueError(f"StoreKey.tile_size must be a positive int, got {self.tile_size!r}")

    def as_dict(self) -> dict[str, Any]:
        """The key as plain JSON types (mpp rounded to 1e-6 so float noise maps to one store)."""
        return {
            "slide_fingerprint": self.slide_fingerprint,
            "encoder": self.encoder,
            "weights_id": self.weights_id,
            "mpp": round(float(self.mpp), 6),
            "tile_size": int(self.tile_size),
        }

    @property
    def digest(self) -> str:
        """SHA-256 (hex) of the canonical JSON of the key."""
        blob = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


# -- atomic file writes ----------------------------------------------------------------------


def _atomic_put(path: Path, data: bytes, *, exclusive: bool = False) -> None:
    """Write ``data`` to ``path`` so that readers and crashes see the old or the new file only.

    The one atomic write of the package (temp + fsync + rename, :mod:`napari_virchow.io.files`);
    kept as a module function because the zarr store calls it through the module, so tests can
    inject failures (disk full) here.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data, exclusive=exclusive)


class _AtomicLocalStore(LocalStore):
    """zarr LocalStore whose every ``set`` is temp file + fsync + rename, whatever zarr version."""

    async def set(self, key: str, value: Buffer) -> None:  # noqa: D102 - zarr's docstring
        await self._put(key, value, exclusive=False)

    async def set_if_not_exists(self, key: str, value: Buffer) -> None:  # noqa: D102
        with contextlib.suppress(FileExistsError):
            await self._put(key, value, exclusive=True)

    def set_sync(self, key: str, value: Buffer) -> None:  # noqa: D102
        self._ensure_open_sync()
        self._check_writable()
        _atomic_put(self.root / key, value.to_bytes())

    async def _put(self, key: str, value: Buffer, *, exclusive: bool) -> None:
        if not self._is_open:
            await self._open()
        self._check_writable()
        # Looked up through the module at call time so tests can inject failures (disk full).
        await asyncio.to_thread(_atomic_put, self.root / key, value.to_bytes(), exclusive=exclusive)


# -- errors ----------------------------------------------------------------------------------


def _os_error(exc: OSError, path: Path, action: str) -> StoreError:
    """Translate an OSError into a StoreError that names the folder and the fix."""
    if exc.errno in _DISK_FULL:
        return StoreError(f"disk full while {action} {path}; free space or use --cache DIR")
    if exc.errno in _READ_ONLY or isinstance(exc, PermissionError):
        return StoreError(
            f"cannot write to the embedding cache folder {path} ({exc.strerror}); "
            "use --cache DIR with a writable folder (or set NAPARI_VIRCHOW_CACHE)"
        )
    return StoreError(f"{action} {path} failed: {exc}; check the folder or use --cache DIR")


def _fix_hint(path: Path) -> str:
    stem = STORE_NAME_RE.match(path.name)
    slide = stem.group("slide") if stem else path.name
    return f"clear it with `napari-virchow cache clear --slide {slide}` (or delete {path}) or use another --cache DIR"


def _damaged(path: Path, why: object) -> StoreError:
    return StoreError(f"embedding store at {path} is damaged ({why}); {_fix_hint(path)}")


def _mismatch(path: Path, what: str) -> StoreError:
    return StoreError(
        f"store at {path} was made by another encoder/version ({what}); it is never mixed: {_fix_hint(path)}"
    )


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# -- the store ---------------------------------------------------------------------------------


class EmbeddingStore:
    """Per-tile embeddings of one slide under one encoder; see the module docstring for layout.

    Use :meth:`open` (by key) or :meth:`from_path` (by folder); both return an opened store that
    holds a shared "in use" lock until :meth:`close` (or the end of a ``with`` block).
    """

    def __init__(self, path: Path, *, mode: Literal["r", "a"] = "r", touch: bool = True) -> None:
        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' or 'a', got {mode!r}")
        self.path = Path(path)
        self.mode = mode
        self._thread_lock = threading.Lock()
        self._lock_fh: IO[bytes] | None = None
        self._inuse_fh = open_inuse_shared(self.path)
        self._last_updated = 0.0
        try:
            self._open_zarr()
            if mode == "a":
                # Opening the lock file for writing is the cheap up-front writability check.
                try:
                    self._lock_fh = open(self.path / ".lock", "ab")  # noqa: SIM115 - kept open
                except OSError as exc:
                    raise _os_error(exc, self.path, "opening") from exc
                with self._locked():
                    self._remove_orphan_temps()
        except BaseException:
            self.close()
            raise
        if touch:
            self._touch()

    def _open_zarr(self) -> None:
        if not (self.path / "zarr.json").is_file():
            raise _damaged(self.path, "zarr.json is missing")
        try:
            store = _AtomicLocalStore(self.path, read_only=self.mode == "r")
            self._group = zarr.open_group(store=store, mode="r" if self.mode == "r" else "r+")
            attrs = self._group.attrs.asdict()
            self._emb = self._group["embeddings"]
            self._done = self._group["done"]
            self._coords = self._group.get("coords")
        except _DAMAGE as exc:
            raise _damaged(self.path, exc) from exc
        if attrs.get("format") != FORMAT:
            raise _damaged(self.path, "not a napari-virchow embedding store")
        if attrs.get("format_version") != FORMAT_VERSION:
            raise _mismatch(
                self.path,
                f"store format {attrs.get('format_version')} written by napari-virchow "
                f"{attrs.get('package_version')}, this version reads format {FORMAT_VERSION}",
            )
        self._attrs = attrs
        try:
            n, dim = int(attrs["n_tiles"]), int(attrs["dim"])
            self.key = StoreKey(**{f: attrs[f] for f in StoreKey.__dataclass_fields__})
        except (KeyError, TypeError, ValueError) as exc:
            raise _damaged(self.path, f"provenance attrs incomplete: {exc}") from exc
        if not isinstance(self._emb, zarr.Array) or self._emb.shape != (n, dim):
            raise _damaged(self.path, f"embeddings array is not ({n}, {dim})")
        if not isinstance(self._done, zarr.Array) or self._done.shape != (n,):
            raise _damaged(self.path, f"done array is not ({n},)")

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
            (n_tiles, 2) level-0 px; written once, and on reopen compared with the stored ones.
        mode : {"a", "r", "w"}
            "a" creates or reopens for writing, "r" opens an existing store read-only (works in
            a read-only folder), "w" deletes an existing store and starts over.
        chunk_rows : int
            Rows per ``embeddings`` chunk, used at creation only.

        Returns
        -------
        EmbeddingStore

        Raises
        ------
        StoreError
            Missing (mode "r"), damaged, made for another key/shape/format, not writable, disk full.
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
            path = _create(
                root,
                key,
                n_tiles=n_tiles,
                dim=dim,
                slide_path=slide_path,
                coords=coords,
                tile_size_l0=tile_size_l0,
                chunk_rows=chunk_rows,
            )
            created = True
        store = cls(path, mode="r" if mode == "r" else "a")
        try:
            store._check_matches(key, n_tiles, dim, coords)
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

    def _check_matches(self, key: StoreKey, n_tiles: int, dim: int, coords: np.ndarray | None) -> None:
        if self.key.as_dict() != key.as_dict():
            diff = [
                f"{k}: {v!r} != {key.as_dict()[k]!r}" for k, v in self.key.as_dict().items() if key.as_dict()[k] != v
            ]
            raise _mismatch(self.path, ", ".join(diff))
        if (self.n_tiles, self.dim) != (n_tiles, dim):
            raise _mismatch(self.path, f"{self.n_tiles} tiles x {self.dim} dims, asked {n_tiles} x {dim}")
        if coords is None:
            return
        if self._coords is None and self.mode == "a":
            with self._locked():
                # Re-read under the lock: another process may have written them meanwhile.
                self._coords = self._group.get("coords")
                if self._coords is None:
                    self._write_coords(coords)
        stored = self.coords
        if stored is not None and not np.array_equal(stored, coords):
            # Same shape but other tiles (e.g. another tissue mask): row i would mean another tile.
            raise _mismatch(self.path, "tile coordinates differ from the stored grid")

    # -- reading ---------------------------------------------------------------------------

    @property
    def n_tiles(self) -> int:
        """Number of tiles (rows)."""
        return int(self._emb.shape[0])

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
        """Boolean mask of tiles whose embedding is stored (read fresh from disk)."""
        try:
            return np.asarray(self._done[:], dtype=bool)
        except _DAMAGE as exc:
            raise _damaged(self.path, exc) from exc

    @property
    def n_done(self) -> int:
        """Number of tiles done."""
        return int(self.done.sum())

    @property
    def coords(self) -> np.ndarray | None:
        """(n_tiles, 2) int64 level-0 px tile origins, or None if never given."""
        if self._coords is None:
            return None
        try:
            return np.asarray(self._coords[:], dtype=np.int64)
        except _DAMAGE as exc:
            raise _damaged(self.path, exc) from exc

    def missing(self, indices: np.ndarray | None = None) -> np.ndarray:
        """Those of ``indices`` (default: all tiles) not done yet, in the given order."""
        done = self.done
        idx = np.arange(self.n_tiles) if indices is None else self._indices(indices)
        return idx[~done[idx]]

    def read(self, indices: np.ndarray) -> np.ndarray:
        """Rows ``indices`` as float32 (len, dim); rows not done read as zeros or stale values."""
        idx = self._indices(indices)
        self._touch()
        return self._read_rows(idx)

    def read_done(self) -> tuple[np.ndarray, np.ndarray]:
        """All done tiles: (indices int64, embeddings float32 (n_done, dim))."""
        # `done` is read before the rows: a row marked done was written before its flag, so the
        # rows read next are at least that new even while another process is writing.
        idx = np.flatnonzero(self.done)
        self._touch()
        return idx, self._read_rows(idx)

    def _read_rows(self, idx: np.ndarray) -> np.ndarray:
        if idx.size == 0:
            return np.zeros((0, self.dim), np.float32)
        uniq, inverse = np.unique(idx, return_inverse=True)
        try:
            rows = self._emb.get_orthogonal_selection((uniq, slice(None)))
        except _DAMAGE as exc:
            raise _damaged(self.path, exc) from exc
        return np.asarray(rows, dtype=np.float32)[inverse]

    def _indices(self, indices: np.ndarray) -> np.ndarray:
        idx = np.asarray(indices)
        if idx.dtype == bool:
            raise TypeError("indices must be integers, not a boolean mask (use np.flatnonzero)")
        idx = idx.astype(np.int64, copy=False).ravel()
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_tiles):
            raise IndexError(f"tile index out of range 0..{self.n_tiles - 1} for {self.path}")
        return idx

    # -- writing ---------------------------------------------------------------------------

    def write(self, indices: np.ndarray, embeddings: np.ndarray) -> None:
        """Store rows for ``indices`` and mark them done (rows first, then the done flags).

        Raises
        ------
        StoreError
            Store opened read-only, folder not writable, disk full (the batch is then not done,
            rows written before stay valid).
        """
        if self._lock_fh is None:
            raise StoreError(f"store at {self.path} is open read-only; open it with mode='a'")
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
        # Sorted and de-duplicated (the last row given for an index wins).
        order = np.argsort(idx, kind="stable")
        idx, rows = idx[order], rows[order]
        last = np.append(idx[1:] != idx[:-1], True)
        idx, rows = idx[last], rows[last]
        with self._locked():
            try:
                now = time.monotonic()
                if now - self._last_updated > _UPDATED_EVERY_S:
                    self._group.attrs.update({"updated": _now()})
                    self._last_updated = now
                self._emb.set_orthogonal_selection((idx, slice(None)), rows)
                # Only now that every touched chunk file has been replaced whole: flip done, in
                # one chunk file, so the whole batch becomes done at once or not at all.
                done = np.asarray(self._done[:], dtype=bool)
                done[idx] = True
                self._done[:] = done
            except OSError as exc:
                raise _os_error(exc, self.path, "writing embeddings to") from exc
        self._touch()

    def _write_coords(self, coords: np.ndarray) -> None:
        try:
            arr = self._group.create_array("coords", shape=coords.shape, chunks=(max(len(coords), 1), 2), dtype="int64")
            arr[:] = coords.astype(np.int64)
        except OSError as exc:
            raise _os_error(exc, self.path, "writing coordinates to") from exc
        self._coords = arr

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # The thread lock covers threads sharing this object (flock is per open file, not per
        # thread); flock covers other processes and other store objects on the same folder.
        with self._thread_lock:
            if fcntl is not None and self._lock_fh is not None:
                fcntl.flock(self._lock_fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                if fcntl is not None and self._lock_fh is not None:
                    fcntl.flock(self._lock_fh.fileno(), fcntl.LOCK_UN)

    def _remove_orphan_temps(self) -> None:
        # Called under the write lock: no write is in progress, so any temp file is left over
        # from a killed writer.
        for tmp in self.path.rglob(".*.tmp"):
            with contextlib.suppress(OSError):
                tmp.unlink()

    def _touch(self) -> None:
        # A read-only folder or a missing file only costs LRU accuracy, never a read.
        with contextlib.suppress(OSError):
            os.utime(self.path / "last_used")

    # -- lifetime --------------------------------------------------------------------------

    def close(self) -> None:
        """Release the locks; the object must not be used afterwards."""
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


def _create(
    root: Path,
    key: StoreKey,
    *,
    n_tiles: int,
    dim: int,
    slide_path: str | None,
    coords: np.ndarray | None,
    tile_size_l0: int | None,
    chunk_rows: int,
) -> Path:
    """Build a new store in a hidden temp folder and rename it into place (all or nothing)."""
    path = root / store_folder_name(key, slide_path)
    tmp = root / f".creating-{key.digest[:16]}-{uuid.uuid4().hex[:8]}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        group = zarr.open_group(store=_AtomicLocalStore(tmp), mode="w", zarr_format=3)
        now = _now()
        group.attrs.update(
            {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                **key.as_dict(),
                "key_digest": key.digest,
                "n_tiles": n_tiles,
                "dim": dim,
                "tile_size_l0": None if tile_size_l0 is None else int(tile_size_l0),
                "slide_path": None if slide_path is None else str(slide_path),
                "package_version": __version__,
                "created": now,
                "updated": now,
            }
        )
        group.create_array(
            "embeddings",
            shape=(n_tiles, dim),
            dtype="float16",
            fill_value=0,
            chunks=(max(1, min(chunk_rows, n_tiles)), dim),
            compressors=ZstdCodec(level=1, checksum=True),  # checksum: bad chunks are detected
        )
        group.create_array("done", shape=(n_tiles,), dtype="bool", fill_value=False, chunks=(max(1, n_tiles),))
        if coords is not None:
            arr = group.create_array("coords", shape=coords.shape, dtype="int64", chunks=(max(1, n_tiles), 2))
            arr[:] = coords.astype(np.int64)
        for name in (".lock", ".inuse", "last_used"):
            (tmp / name).touch()
        try:
            os.rename(tmp, path)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            # Another process created the same store meanwhile: use theirs.
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _os_error(exc, root, "creating an embedding store in") from exc
    logger.debug("created embedding store %s", path)
    return path
