"""Atomic file writes: the one implementation every writer of the package uses.

A file is written to a dot-prefixed temporary file next to its target, flushed to disk
(``fsync``), renamed over the target, and the folder is fsync'ed so the rename survives a power
cut. Readers see the old file or the new one, never half of one; a failure (full disk, no
permission) removes the temporary file and leaves the previous file intact. New files get the
mode the process umask allows (``0o666 & ~umask``), like any file ``open()`` creates.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_set", "fsync_dir"]

Writer = Callable[[str], Any]


def _temp_path(target: Path) -> Path:
    # Dot-prefixed: zarr listings, the cache's LRU walk and `ls` ignore a killed writer's leftover.
    return target.parent / f".{target.name}.{uuid.uuid4().hex[:12]}.tmp"


def _create(tmp: Path) -> None:
    """Create ``tmp`` empty with mode ``0o666 & ~umask`` (``mkstemp`` would force ``0o600``)."""
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """Flush a folder's entries (a rename) to disk; a no-op where folders cannot be opened."""
    with contextlib.suppress(OSError):  # e.g. Windows, or file systems without directory fsync
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _discard(tmp: Path) -> None:
    with contextlib.suppress(OSError):
        tmp.unlink()


def _prepare(target: Path, write: Writer) -> Path:
    """``write(tmp)`` into a new temporary file next to ``target``, fsync'ed; returns ``tmp``."""
    tmp = _temp_path(target)
    try:
        _create(tmp)
        write(str(tmp))
        _fsync_file(tmp)
    except BaseException:
        _discard(tmp)
        raise
    return tmp


def atomic_write(target: str | os.PathLike[str], write: Writer) -> Path:
    """Call ``write(tmp_path)`` on a temporary file next to ``target``, then rename it into place.

    ``write`` may open the path itself (h5py, tifffile, faiss) or write to it; the file exists
    (empty) when it is called. Returns ``target`` as a :class:`~pathlib.Path`.
    """
    return atomic_write_set([(target, write)])[0]


def atomic_write_bytes(target: str | os.PathLike[str], data: bytes, *, exclusive: bool = False) -> Path:
    """Write ``data`` to ``target`` atomically; ``exclusive`` raises FileExistsError instead of replacing."""
    target = Path(target)

    def put(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    tmp = _prepare(target, put)
    try:
        if exclusive:
            os.link(tmp, target)  # raises FileExistsError instead of replacing
        else:
            os.replace(tmp, target)
    finally:
        _discard(tmp)  # after link(): the temporary name; after replace(): already gone
    fsync_dir(target.parent)
    return target


def atomic_write_set(files: Sequence[tuple[str | os.PathLike[str], Writer]]) -> list[Path]:
    """Write several files that belong together: all of them, or none.

    Every file is written and fsync'ed under a temporary name first; only when all succeeded
    are they renamed into place, in the order given (put the file that readers check last
    last). A failure in any write leaves every target as it was and no temporary file behind.
    """
    targets = [Path(t) for t, _ in files]
    temps: list[Path] = []
    try:
        for target, (_, write) in zip(targets, files, strict=True):
            temps.append(_prepare(target, write))
        for tmp, target in zip(temps, targets, strict=True):
            os.replace(tmp, target)
    finally:
        for tmp in temps:
            _discard(tmp)
    for folder in {t.parent for t in targets}:
        fsync_dir(folder)
    return targets
