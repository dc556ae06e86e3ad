"""Content fingerprint of a slide: a hash of every byte of its files, computed once per file version.

Cache keys must change with any pixel edit (OpenSlide's quickhash skips level 0; the head and tail
of a stripped TIFF miss everything in between), so the fingerprint hashes the whole file: every
level's pixels, and the metadata with them. For MIRAX (``.mrxs``) the data files of the folder
beside it are hashed too.

Hashing is a BLAKE2b tree: each 16 MiB block is hashed on its own (in a few threads: hashlib
releases the GIL, so blocks hash in parallel and the read-ahead overlaps), then the block digests
are hashed in order. The result does not depend on the thread count.

Hashing a multi-GB slide takes seconds, so the result is remembered in a memo folder
(``$NAPARI_VIRCHOW_FINGERPRINTS``, default ``<user cache>/napari-virchow/fingerprints``), one tiny
file per file version, keyed by (device, inode, size, mtime in ns) of every hashed file, never by
path, and checked against a digest of the file's first and last 64 KiB (a reused inode is not
taken for the old file). So ``mv`` (same inode) keeps the entry; a copy and ``touch`` re-hash to the
same fingerprint; any write (which moves the mtime) re-hashes. Memo files are written atomically;
one that cannot be read or parsed is ignored and recomputed; a memo folder that cannot be written
only costs the re-hash. An edit that restores the old mtime by hand (``touch -r``) and keeps the
head and tail is not seen -- the trade-off make and rsync make too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from platformdirs import user_cache_dir

from napari_virchow.io.files import atomic_write

__all__ = ["ENV_MEMO", "content_files", "file_token", "fingerprint", "hash_files", "memo_dir", "sample_digest"]

logger = logging.getLogger(__name__)

ENV_MEMO = "NAPARI_VIRCHOW_FINGERPRINTS"
BLOCK = 16 << 20
SAMPLE = 64 << 10
#: the memo keeps at most this many entries (the oldest are dropped)
MEMO_MAX_ENTRIES = 4096
_VERSION = 1
_HEX32 = re.compile(r"^[0-9a-f]{32}$")


def memo_dir() -> Path:
    """Folder of the fingerprint memo: ``$NAPARI_VIRCHOW_FINGERPRINTS`` or the user cache dir."""
    env = os.environ.get(ENV_MEMO, "").strip()
    return Path(env).expanduser() if env else Path(user_cache_dir("napari-virchow")) / "fingerprints"


def content_files(path: Path) -> list[Path]:
    """The files holding ``path``'s pixels: the file itself, plus a MIRAX slide's data folder, the
    other instances of a DICOM WSI (.dcm), or every file of an OME-Zarr folder."""
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    if path.suffix.lower() == ".dcm":  # a DICOM WSI: every instance (level) of the folder
        return [path, *sorted(p for p in path.parent.glob("*.dcm") if p.is_file() and p != path)]
    files = [path]
    folder = path.with_suffix("")
    if path.suffix.lower() == ".mrxs" and folder.is_dir():
        files += sorted(p for p in folder.rglob("*") if p.is_file())
    return files


def file_token(files: list[Path]) -> str:
    """Identity of these files' current versions: (device, inode, size, mtime_ns) of each."""
    parts = []
    for f in files:
        st = os.stat(f)
        parts.append(f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.blake2b("|".join(parts).encode(), digest_size=16).hexdigest()


def _hash_block(fd: int, offset: int, length: int) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) != length:
        raise OSError(f"file shrank while hashing (read {len(data)} of {length} bytes at {offset})")
    return hashlib.blake2b(data, digest_size=32).digest()


def hash_files(files: list[Path], *, threads: int | None = None) -> str:
    """BLAKE2b tree hash (hex, 128 bits) of the bytes of ``files``, their relative names included."""
    threads = threads or min(4, os.cpu_count() or 1)
    top = hashlib.blake2b(digest_size=16, person=b"nv-slide-fp")
    folder = files[0].with_suffix("")  # MIRAX data files are named relative to it
    with ThreadPoolExecutor(threads, thread_name_prefix="napari-virchow-hash") as pool:
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            try:
                size = os.fstat(fd).st_size
                offsets = range(0, size, BLOCK)
                leaves = pool.map(lambda o, fd=fd, size=size: _hash_block(fd, o, min(BLOCK, size - o)), offsets)
                # The slide's own name is left out: the fingerprint is content, not path.
                name = "" if f == files[0] else os.path.relpath(f, folder)
                top.update(name.encode() + b"\0" + str(size).encode() + b"\0")
                for leaf in leaves:
                    top.update(leaf)
            finally:
                os.close(fd)
    return top.hexdigest()


def sample_digest(path: Path) -> str:
    """Digest of the first and last :data:`SAMPLE` bytes: a memo entry must match it too.

    Guards against a reused inode (a deleted slide's, given to a new file of the same size within
    one mtime tick on a coarse-clock file system) serving another file's fingerprint.
    """
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        head = os.pread(fh.fileno(), SAMPLE, 0)
        tail = os.pread(fh.fileno(), SAMPLE, max(size - SAMPLE, 0))
    return hashlib.blake2b(head + tail, digest_size=16).hexdigest()


def _memo_get(token: str, sample: str) -> str | None:
    try:
        entry = json.loads((memo_dir() / token).read_text())
        ok = entry.get("v") == _VERSION and entry.get("token") == token and entry.get("sample") == sample
        fp = entry["fingerprint"] if ok else None
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None  # absent, unreadable or damaged: recomputed
    return fp if isinstance(fp, str) and _HEX32.match(fp) else None


def _memo_put(token: str, sample: str, fp: str) -> None:
    folder = memo_dir()
    body = json.dumps({"v": _VERSION, "token": token, "sample": sample, "fingerprint": fp})
    try:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / token, lambda tmp: Path(tmp).write_text(body))
        if random.random() < 1 / 64:  # not security: amortised pruning
            _prune(folder)
    except OSError as exc:  # a read-only or full cache only costs the next re-hash
        logger.debug("fingerprint memo %s not written: %s", folder, exc)


def _prune(folder: Path) -> None:
    entries = [p for p in folder.iterdir() if _HEX32.match(p.name)]
    if len(entries) <= MEMO_MAX_ENTRIES:
        return
    entries.sort(key=lambda p: p.stat().st_mtime)
    for p in entries[: len(entries) - MEMO_MAX_ENTRIES]:
        with contextlib.suppress(OSError):
            p.unlink()


def fingerprint(path: str | os.PathLike[str]) -> str:
    """Content fingerprint (32 hex) of the slide at ``path``; instant when the memo has it."""
    files = content_files(Path(path))
    token, sample = file_token(files), sample_digest(files[0])
    found = _memo_get(token, sample)
    if found is not None:
        return found
    fp = hash_files(files)
    if file_token(files) == token:  # not modified while hashing: safe to remember
        _memo_put(token, sample, fp)
    return fp
