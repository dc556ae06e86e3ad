"""The embedding cache as a whole: where it lives, listing, clearing, and LRU eviction by size.

Every store is a folder ``<slide stem>--<encoder>--<digest16>`` under the cache root (see
``store.py``). Only folders with that name shape are ever listed or removed, so pointing
``--cache`` at a folder holding other data never deletes that data.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import IO, TYPE_CHECKING

from platformdirs import user_cache_dir

from napari_virchow.errors import StoreError
from napari_virchow.store.key import lattice_fingerprint, lattice_version_of, old_lattice_key, slide_fingerprint_of

if TYPE_CHECKING:
    from napari_virchow.store.embeddings import StoreKey

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no cross-process in-use detection
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "ENV_CACHE",
    "ENV_MAX_GB",
    "StoreInfo",
    "cache_max_bytes",
    "clear",
    "default_cache_root",
    "enforce_limit",
    "lattice_fingerprint",
    "lattice_version_of",
    "list_stores",
    "old_lattice_key",
    "old_lattice_store",
    "resolve_cache_root",
    "slide_fingerprint_of",
]

logger = logging.getLogger(__name__)

ENV_CACHE = "NAPARI_VIRCHOW_CACHE"
ENV_MAX_GB = "NAPARI_VIRCHOW_CACHE_MAX_GB"
DEFAULT_MAX_GB = 20.0
STORE_NAME_RE = re.compile(r"^(?P<slide>.*?)--(?P<encoder>.*)--(?P<digest>[0-9a-f]{16})$")


def default_cache_root() -> Path:
    """Folder holding the stores: ``$NAPARI_VIRCHOW_CACHE`` or the user cache dir + /embeddings."""
    env = os.environ.get(ENV_CACHE, "").strip()
    if env:
        return Path(env).expanduser()
    return Path(user_cache_dir("napari-virchow")) / "embeddings"


def resolve_cache_root(root: str | os.PathLike[str] | None = None) -> Path:
    """The one cache-root rule: ``root`` (``--cache DIR``, absolute) if given, else :func:`default_cache_root`.

    Absolute, so a dask worker with another working directory finds the same folder.
    """
    if root is None or not str(root).strip():
        return default_cache_root().absolute()
    return Path(root).expanduser().absolute()


def old_lattice_store(root: Path, key: StoreKey) -> Path | None:
    """The folder of the lattice-1 store (≤ 0.2, edge tiles dropped) of ``key``'s slide, encoder and
    level, if one is cached: it is never read as ``key``'s (its rows are other tiles)."""
    old = old_lattice_key(key)
    if old is None or not root.is_dir():
        return None
    return next((p for p in sorted(root.glob(f"*--{old.digest[:16]}")) if p.is_dir()), None)


def cache_max_bytes(max_gb: float | None = None) -> float:
    """Size limit in bytes: ``max_gb``, else ``$NAPARI_VIRCHOW_CACHE_MAX_GB``, else 20 GB (1e9)."""
    source = "max_gb"
    if max_gb is None:
        env = os.environ.get(ENV_MAX_GB, "").strip()
        source = f"${ENV_MAX_GB}={env!r}"
        try:
            max_gb = float(env) if env else DEFAULT_MAX_GB
        except ValueError:
            max_gb = float("nan")
    if not max_gb > 0:  # also catches NaN
        raise StoreError(f"cache size limit {source} must be a positive number of GB (e.g. 20, or inf)")
    return float(max_gb) * 1e9


def _slug(text: str, limit: int) -> str:
    # "--" is the field separator of folder names, so runs of "-" collapse to one.
    slug = re.sub(r"-{2,}", "-", re.sub(r"[^A-Za-z0-9._-]+", "_", text))
    return slug.strip("._-")[:limit].rstrip("-") or "x"


def store_folder_name(key: StoreKey, slide_path: str | None) -> str:
    """``<slide stem>--<encoder>--<first 16 hex of the key digest>``, filesystem-safe."""
    stem = Path(slide_path).stem if slide_path else key.slide_fingerprint[:12]
    return f"{_slug(stem, 48)}--{_slug(key.encoder, 32)}--{key.digest[:16]}"


# -- in-use locks ------------------------------------------------------------------------------


def open_inuse_shared(path: Path) -> IO[bytes] | None:
    """Hold a shared flock on ``path/.inuse`` while a store is open (None if there is none)."""
    try:
        # Read-only open: works in read-only folders too. Kept open: it holds the lock.
        fh = open(path / ".inuse", "rb")  # noqa: SIM115
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StoreError(f"cannot open embedding store {path}: {exc}; check the folder") from exc
    if fcntl is not None:
        fcntl.flock(fh.fileno(), fcntl.LOCK_SH)
        # A remover may have renamed the folder away while we waited for the lock.
        with contextlib.suppress(OSError):
            if os.stat(path / ".inuse").st_ino == os.fstat(fh.fileno()).st_ino:
                return fh
        fh.close()
        raise StoreError(f"embedding store {path} was removed while opening it; try again")
    return fh


def _try_exclusive(path: Path) -> IO[bytes] | bool:
    """Non-blocking exclusive flock on ``.inuse``: the handle; True: no such file; False: busy."""
    try:
        fh = open(path / ".inuse", "rb")  # noqa: SIM115 - returned, holds the lock
    except OSError:
        return True
    if fcntl is None:
        return fh
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        return False
    return fh


def remove_store(path: Path) -> bool:
    """Delete one store folder unless some process has it open; True if removed."""
    held = _try_exclusive(path)
    if held is False:
        return False
    try:
        # Rename first (atomic) so nobody ever sees a half-deleted store, then delete at leisure.
        trash = path.parent / f".removing-{path.name}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise StoreError(
                f"cannot remove embedding store {path} ({exc.strerror}); check the folder's "
                "permissions or use --cache DIR"
            ) from exc
    finally:
        if not isinstance(held, bool):
            held.close()
    shutil.rmtree(trash, ignore_errors=True)
    return True


# -- listing -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StoreInfo:
    """One store as listed by :func:`list_stores`; ``error`` is set for a damaged store."""

    path: Path
    slide_path: str | None
    slide_fingerprint: str | None
    encoder: str | None
    weights_id: str | None
    mpp: float | None
    tile_size: int | None
    n_done: int
    n_tiles: int
    size_bytes: int
    last_used: float
    error: str | None = None

    @property
    def old_lattice(self) -> bool:
        """A store of lattice 1 (≤ 0.2: partial edge tiles dropped): never read as a current store (a new
        one adopts its rows once, :mod:`~napari_virchow.store.migrate`); listed and cleared."""
        return self.slide_fingerprint is not None and lattice_version_of(self.slide_fingerprint) == 1


def _size_on_disk(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(dirpath, name))
                total += getattr(st, "st_blocks", 0) * 512 or st.st_size
    return total


def _last_used(path: Path) -> float:
    for name in ("last_used", "zarr.json"):
        with contextlib.suppress(OSError):
            return os.stat(path / name).st_mtime
    return 0.0


def _store_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and STORE_NAME_RE.match(p.name))


def _info(path: Path) -> StoreInfo:
    from napari_virchow.store.embeddings import EmbeddingStore

    size, last = _size_on_disk(path), _last_used(path)
    try:
        # touch=False: listing must not make every store "recently used".
        with EmbeddingStore(path, mode="r", touch=False) as store:
            a = store.attrs
            return StoreInfo(
                path,
                a.get("slide_path"),
                a["slide_fingerprint"],
                a["encoder"],
                a["weights_id"],
                a["mpp"],
                a["tile_size"],
                store.n_done,
                store.n_tiles,
                size,
                last,
            )
    except StoreError as exc:
        m = STORE_NAME_RE.match(path.name)
        enc = m.group("encoder") if m else None
        return StoreInfo(path, None, None, enc, None, None, None, 0, 0, size, last, str(exc))


def list_stores(root: Path | str | None = None) -> list[StoreInfo]:
    """All stores under ``root`` (default :func:`default_cache_root`), most recently used first."""
    root = resolve_cache_root(root)
    infos = [_info(p) for p in _store_dirs(root)]
    return sorted(infos, key=lambda i: i.last_used, reverse=True)


def _matches(info: StoreInfo, slide: str | None, encoder: str | None) -> bool:
    m = STORE_NAME_RE.match(info.path.name)
    if encoder is not None:
        folder_encoder = m.group("encoder").lower() if m else None
        if encoder.lower() != (info.encoder or "").lower() and (_slug(encoder, 32).lower() != folder_encoder):
            return False
    if slide is None:
        return True
    # stores are keyed by "<fingerprint>-step<lattice px>": the bare fingerprint matches too
    fingerprint = info.slide_fingerprint
    if fingerprint is not None and slide in (fingerprint, slide_fingerprint_of(fingerprint)):
        return True
    if info.slide_path:
        sp = Path(info.slide_path)
        if slide in (sp.name, sp.stem):
            return True
        with contextlib.suppress(OSError, RuntimeError):
            if Path(slide).expanduser().resolve() == sp.expanduser().resolve():
                return True
    # The folder name's slide part (what error messages suggest; all damaged stores have).
    return m is not None and m.group("slide") in (slide, _slug(Path(slide).stem, 48))


def clear(root: Path | str | None = None, *, slide: str | None = None, encoder: str | None = None,
          mpp: float | None = None) -> list[Path]:  # fmt: skip
    """Delete stores under ``root``; with ``slide`` / ``encoder`` / ``mpp`` only the matching ones.

    Parameters
    ----------
    root : path, optional
        Cache root; default :func:`default_cache_root`.
    slide : str, optional
        Slide path, file name, stem, or fingerprint.
    encoder : str, optional
        Encoder name (case-insensitive).
    mpp : float, optional
        The stores' resolution in µm/px (e.g. 2.0 for the 5× stores), to within 1 %.

    Returns
    -------
    list of Path
        Removed folders. Stores open in some process are skipped (logged), never torn away.
    """
    removed = []
    for info in list_stores(root):
        if not _matches(info, slide, encoder):
            continue
        if mpp is not None and (info.mpp is None or abs(info.mpp - mpp) > 0.01 * mpp):
            continue
        if remove_store(info.path):
            removed.append(info.path)
        else:
            logger.warning("embedding store %s is in use by a running process; kept", info.path)
    return removed


def _sweep_leftovers(root: Path, *, min_age_s: float = 3600.0) -> None:
    """Delete folders left by killed processes: half-built (old) or half-deleted stores."""
    if not root.is_dir():
        return
    for p in root.iterdir():
        # A ".creating-" folder may belong to a process building it right now: only old ones.
        with contextlib.suppress(OSError):
            if p.name.startswith(".removing-") or (
                p.name.startswith(".creating-") and time.time() - p.stat().st_mtime > min_age_s
            ):
                shutil.rmtree(p, ignore_errors=True)


def enforce_limit(
    root: Path | str | None = None,
    max_bytes: float | None = None,
    *,
    keep: Iterable[Path | str] = (),
    reserve_bytes: int = 0,
) -> list[Path]:
    """Evict least-recently-used stores until the cache (+ ``reserve_bytes``) fits ``max_bytes``.

    Parameters
    ----------
    root : path, optional
        Cache root; default :func:`default_cache_root`.
    max_bytes : float, optional
        Limit; default :func:`cache_max_bytes` (``$NAPARI_VIRCHOW_CACHE_MAX_GB``, 20 GB).
    keep : paths
        Stores never evicted (besides any store some process has open).
    reserve_bytes : int
        Room to make for a store about to grow (its full size).

    Returns
    -------
    list of Path
        Evicted folders, oldest first.
    """
    root = resolve_cache_root(root)
    limit = cache_max_bytes() if max_bytes is None else float(max_bytes)
    kept = {Path(p).resolve() for p in keep}
    _sweep_leftovers(root)
    dirs = _store_dirs(root)
    sizes = {p: _size_on_disk(p) for p in dirs}
    total = sum(sizes.values()) + reserve_bytes
    evicted: list[Path] = []
    for path in sorted(dirs, key=_last_used):
        if total <= limit:
            break
        if path.resolve() in kept:
            continue
        try:
            gone = remove_store(path)
        except StoreError as exc:  # e.g. someone else's store in a shared cache: skip it
            logger.warning("could not evict %s: %s", path, exc)
            continue
        if gone:
            total -= sizes[path]
            evicted.append(path)
            logger.info("evicted embedding store %s (%d bytes, LRU)", path, sizes[path])
    if total > limit:
        logger.warning(
            "embedding cache %s holds %.2f GB, over its %.2f GB limit, after evicting all stores "
            "not in use; raise $%s or use another --cache DIR",
            root,
            total / 1e9,
            limit / 1e9,
            ENV_MAX_GB,
        )
    return evicted
