"""The store's error messages: each names the store folder and the fix."""

from __future__ import annotations

import errno
from pathlib import Path

from napari_virchow.errors import StoreError
from napari_virchow.store.cache import STORE_NAME_RE

__all__ = ["damaged", "mismatch", "os_error", "repair_hint"]

_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}
_READ_ONLY = {errno.EACCES, errno.EPERM, errno.EROFS}


def os_error(exc: OSError, path: Path, action: str) -> StoreError:
    """Translate an OSError into a StoreError that names the folder and the fix."""
    if exc.errno in _DISK_FULL:
        return StoreError(f"disk full while {action} {path}; free space or use --cache DIR")
    if exc.errno in _READ_ONLY or isinstance(exc, PermissionError):
        return StoreError(
            f"cannot write to the embedding cache folder {path} ({exc.strerror}); "
            "use --cache DIR with a writable folder (or set NAPARI_VIRCHOW_CACHE)"
        )
    return StoreError(f"{action} {path} failed: {exc}; check the folder or use --cache DIR")


def _slide_name(path: Path) -> str:
    stem = STORE_NAME_RE.match(path.name)
    return stem.group("slide") if stem else path.name


def clear_hint(path: Path) -> str:
    """How to remove the store at ``path``."""
    return (
        f"clear it with `napari-virchow cache clear --slide {_slide_name(path)}` (or delete {path}) "
        "or use another --cache DIR"
    )


def repair_hint(path: Path, slide_path: str | None = None) -> str:
    """How to recompute the damaged tiles of the store at ``path`` (and the fallback)."""
    slide = slide_path or _slide_name(path)
    return f"run `napari-virchow embed {slide}` (same --cache) to recompute the damaged tiles, or {clear_hint(path)}"


def damaged(path: Path, why: object, slide_path: str | None = None, *, repairable: bool = False) -> StoreError:
    """The store at ``path`` is damaged; ``repairable``: ``embed`` recomputes what is lost."""
    fix = repair_hint(path, slide_path) if repairable else clear_hint(path)
    return StoreError(f"embedding store at {path} is damaged ({why}); {fix}")


def mismatch(path: Path, what: str) -> StoreError:
    """The store at ``path`` belongs to another encoder, grid or format version."""
    return StoreError(
        f"store at {path} was made by another encoder/version ({what}); it is never mixed: {clear_hint(path)}"
    )
