"""Crash-safe file writes for the embedding store: temp file + fsync + rename, whatever zarr does.

zarr >= 3.1.3 writes chunk files this way too, but 3.0 - 3.1.2 wrote them in place, so the store
does not rely on it: every ``set`` of :class:`AtomicLocalStore` goes through :func:`atomic_put`.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from zarr.core.buffer import Buffer
from zarr.storage import LocalStore

from napari_virchow.io.files import atomic_write_bytes

__all__ = ["AtomicLocalStore", "atomic_put"]


def atomic_put(path: Path, data: bytes, *, exclusive: bool = False) -> None:
    """Write ``data`` to ``path`` so that readers and crashes see the old or the new file only.

    The package's one atomic write (:func:`napari_virchow.io.files.atomic_write_bytes`: temp file,
    fsync of the file and its folder, rename); a module function so tests can inject failures here.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data, exclusive=exclusive)


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
