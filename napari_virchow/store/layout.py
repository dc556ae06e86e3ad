"""On-disk layout of an embedding store: format version, codecs, provenance digest, creation.

Format 2 (this version writes it) puts a ``crc32c`` checksum after the compressor of every
chunk of every array, writes the ``done`` and ``coords`` chunks even when they hold only the fill
value (so a missing chunk file is damage, never "nothing done yet"), and records a SHA-256 digest
of the provenance attrs (``attrs_digest``), so metadata edited by a bit flip is detected too.
Format 1 stores (no crc32c on ``done``/``coords``, no attrs digest) are read, and upgraded on
their first writable open; see :mod:`napari_virchow.store.embeddings`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from napari_virchow import __version__
from napari_virchow.store.atomic import AtomicLocalStore
from napari_virchow.store.cache import store_folder_name
from napari_virchow.store.key import StoreKey
from napari_virchow.store.messages import damaged, mismatch, os_error

__all__ = ["FORMAT", "FORMAT_VERSION", "READABLE_VERSIONS", "attrs_digest", "check_attrs", "create_store"]

logger = logging.getLogger(__name__)

FORMAT = "napari-virchow-embeddings"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
#: attrs left out of the digest: rewritten while the store is in use
_UNDIGESTED = ("updated", "attrs_digest")


def attrs_digest(attrs: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of the provenance attrs, ``updated`` excluded."""
    body = {k: v for k, v in attrs.items() if k not in _UNDIGESTED}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def check_attrs(path: Path, attrs: Mapping[str, Any]) -> tuple[int, int, StoreKey, bool]:
    """Validate a store's provenance attrs: (n_tiles, dim, key, strict) or a StoreError.

    ``strict``: format 2, whose every chunk carries a checksum and whose done/coords chunks exist.
    """
    if attrs.get("format") != FORMAT:
        raise damaged(path, "not a napari-virchow embedding store")
    version = attrs.get("format_version")
    if version not in READABLE_VERSIONS:
        raise mismatch(
            path,
            f"store format {version} written by napari-virchow {attrs.get('package_version')}, "
            f"this version reads formats {READABLE_VERSIONS}",
        )
    strict = version == FORMAT_VERSION
    if strict and attrs.get("attrs_digest") != attrs_digest(attrs):
        raise damaged(path, "its provenance metadata (zarr.json) fails its checksum")
    try:
        n, dim = int(attrs["n_tiles"]), int(attrs["dim"])
        key = StoreKey(**{f: attrs[f] for f in StoreKey.__dataclass_fields__})
    except (KeyError, TypeError, ValueError) as exc:
        raise damaged(path, f"provenance attrs incomplete: {exc}") from exc
    return n, dim, key, strict


def now() -> str:
    """UTC time stamp of attrs (seconds)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def embeddings_codecs() -> list[Any]:
    # zstd's own checksum (xxh64 of the content) plus a crc32c of the stored bytes.
    return [ZstdCodec(level=1, checksum=True), Crc32cCodec()]


def flag_codecs() -> list[Any]:
    """Codecs of ``done`` and ``coords``: zstd + crc32c."""
    return [ZstdCodec(level=1), Crc32cCodec()]


def keep_empty(arr: zarr.Array) -> zarr.Array:
    """``arr`` writing chunks equal to the fill value too (zarr's default deletes them)."""
    if hasattr(arr, "with_config"):
        return arr.with_config({"write_empty_chunks": True})
    return arr  # pragma: no cover - zarr < 3.1: writes go through `writing_empty_chunks`


@contextlib.contextmanager
def writing_empty_chunks() -> Iterator[None]:
    """Process-wide fallback of :func:`keep_empty` for zarr versions without ``with_config``."""
    if hasattr(zarr.Array, "with_config"):
        yield
        return
    with zarr.config.set({"array.write_empty_chunks": True}):  # pragma: no cover - zarr < 3.1
        yield


def create_flag_arrays(group: zarr.Group, n_tiles: int, coords: np.ndarray | None, *, overwrite: bool = False) -> None:
    """(Re)create ``done`` (all False unless given) and, if given, ``coords``, chunks written."""
    with writing_empty_chunks():
        done = group.create_array(
            "done", shape=(n_tiles,), dtype="bool", fill_value=False, chunks=(max(1, n_tiles),),
            compressors=flag_codecs(), overwrite=overwrite,
        )  # fmt: skip
        keep_empty(done)[:] = False
        if coords is not None:
            write_coords(group, coords, overwrite=overwrite)


def write_coords(group: zarr.Group, coords: np.ndarray, *, overwrite: bool = False) -> zarr.Array:
    """Create the ``coords`` array (one chunk, crc32c) holding ``coords``."""
    with writing_empty_chunks():
        arr = group.create_array(
            "coords", shape=coords.shape, dtype="int64", chunks=(max(1, len(coords)), 2),
            compressors=flag_codecs(), overwrite=overwrite,
        )  # fmt: skip
        keep_empty(arr)[:] = np.asarray(coords, dtype=np.int64)
    return arr


def create_store(
    root: Path,
    key: StoreKey,
    *,
    n_tiles: int,
    dim: int,
    slide_path: str | None,
    coords: np.ndarray | None,
    tile_size_l0: int | None,
    chunk_rows: int,
    extra_attrs: Mapping[str, Any] | None = None,
) -> Path:
    """Build a new store in a hidden temp folder and rename it into place (all or nothing).

    ``extra_attrs``: more provenance (JSON types), e.g. whether the magnification is a trained one
    (``EncoderSpec.mpp_provenance``); it never replaces the key, shape or format attrs.
    """
    path = root / store_folder_name(key, slide_path)
    tmp = root / f".creating-{key.digest[:16]}-{uuid.uuid4().hex[:8]}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        group = zarr.open_group(store=AtomicLocalStore(tmp), mode="w", zarr_format=3)
        stamp = now()
        attrs = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            **key.as_dict(),
            "key_digest": key.digest,
            "n_tiles": n_tiles,
            "dim": dim,
            "tile_size_l0": None if tile_size_l0 is None else int(tile_size_l0),
            "slide_path": None if slide_path is None else str(slide_path),
            "package_version": __version__,
            "created": stamp,
            "updated": stamp,
        }
        attrs.update({k: v for k, v in (extra_attrs or {}).items() if k not in attrs and k != "attrs_digest"})
        group.attrs.update({**attrs, "attrs_digest": attrs_digest(attrs)})
        group.create_array(
            "embeddings",
            shape=(n_tiles, dim),
            dtype="float16",
            fill_value=0,
            chunks=(max(1, min(chunk_rows, n_tiles)), dim),
            compressors=embeddings_codecs(),
        )
        create_flag_arrays(group, n_tiles, coords)
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
        raise os_error(exc, root, "creating an embedding store in") from exc
    logger.debug("created embedding store %s", path)
    return path
