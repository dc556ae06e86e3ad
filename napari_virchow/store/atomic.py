"""Crash-safe file writes for the embedding store: temp file + fsync + rename, whatever zarr does.

zarr >= 3.1.3 writes chunk files this way too, but 3.0 - 3.1.2 wrote them in place, so the store
does not rely on it: every ``set`` of :class:`AtomicLocalStore` goes through :func:`atomic_put`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from pathlib import Path

from zarr.core.buffer import Buffer
from zarr.storage import LocalStore

__all__ = ["AtomicLocalStore", "atomic_put"]


def atomic_put(path: Path, data: bytes, *, exclusive: bool = False) -> None:
    """Write ``data`` to ``path`` so that readers and crashes see the old or the new file only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Dot-prefixed so zarr listings and the LRU walk ignore leftovers of a killed writer.
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            # fsync so that after a power cut too the rows reach disk before `done` does.
            os.fsync(fh.fileno())
        if exclusive:
            os.link(tmp, path)  # raises FileExistsError instead of replacing
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


class AtomicLocalStore(LocalStore):
    """zarr LocalStore whose every ``set`` is :func:`atomic_put` (temp file + fsync + rename)."""

    async def set(self, key: str, value: Buffer) -> None:  # noqa: D102 - zarr's docstring
        await self._put(key, value, exclusive=False)

    async def set_if_not_exists(self, key: str, value: Buffer) -> None:  # noqa: D102
        with contextlib.suppress(FileExistsError):
            await self._put(key, value, exclusive=True)

    def set_sync(self, key: str, value: Buffer) -> None:  # noqa: D102
        self._ensure_open_sync()
        self._check_writable()
        atomic_put(self.root / key, value.to_bytes())

    async def _put(self, key: str, value: Buffer, *, exclusive: bool) -> None:
        if not self._is_open:
            await self._open()
        self._check_writable()
        # ``atomic_put`` is a module global looked up at call time: tests patch it (disk full).
        await asyncio.to_thread(atomic_put, self.root / key, value.to_bytes(), exclusive=exclusive)
