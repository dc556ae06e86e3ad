"""Verifying a store: every chunk decoded against its checksum, done flags against the rows present.

Three kinds of damage are told apart, per chunk:

- a chunk file that does not decode (bit flip, truncation, garbage): zstd's checksum and the
  crc32c codec of format 2 fail, so zarr raises;
- a chunk file that is missing: zarr would silently read the fill value (zeros, ``False``), so
  for rows marked done (``embeddings``) and for ``done``/``coords`` (always written in format 2)
  the file's presence is checked;
- a row marked done that holds only zeros: no encoder returns an all-zero embedding, so such a row
  was never written (e.g. a lost update) and is damage, whatever the checksums say.

:func:`scan` returns a :class:`DamageReport` and the done flags that can be trusted (the stored
ones, or, when they are lost, the rows actually present); it never changes the store.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import zarr

__all__ = ["DAMAGE", "DamageReport", "chunk_path", "file_version", "read_flags", "row_chunks", "scan"]

# What zarr raises for a damaged node/chunk: zarr.errors.* are ValueErrors, a bad checksum gives
# a ValueError, a codec error a RuntimeError, a missing file a FileNotFoundError (OSError).
DAMAGE = (OSError, ValueError, KeyError, TypeError, RuntimeError)


@dataclasses.dataclass(frozen=True)
class DamageReport:
    """What :meth:`EmbeddingStore.verify` found.

    Attributes
    ----------
    path : Path
        The store folder.
    rows : numpy.ndarray
        int64 indices of tiles marked done whose embedding is missing or damaged: they must be
        recomputed (:meth:`EmbeddingStore.repair` marks them not done, ``embed`` recomputes them).
    problems : tuple of str
        One line per damaged file (relative path and what is wrong).
    bad_files : tuple of str
        Chunk files (relative to ``path``) that exist but fail their checksum.
    done_lost, coords_lost : bool
        The done flags / tile coordinates themselves are missing or damaged.
    """

    path: Path
    rows: np.ndarray
    problems: tuple[str, ...] = ()
    bad_files: tuple[str, ...] = ()
    done_lost: bool = False
    coords_lost: bool = False

    @property
    def ok(self) -> bool:
        """True when nothing is damaged."""
        return not self.problems

    def summary(self, n_shown: int = 3) -> str:
        """The first problems in one line (``"no damage"`` when there is none)."""
        if self.ok:
            return "no damage"
        more = f" (+{len(self.problems) - n_shown} more)" if len(self.problems) > n_shown else ""
        return "; ".join(self.problems[:n_shown]) + more


def file_version(path: Path) -> tuple[int, int, int] | None:
    """(inode, mtime_ns, size) of ``path``, None when it is missing: changes with every replace."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def chunk_path(root: Path, arr: zarr.Array, chunk: tuple[int, ...]) -> Path:
    """File of chunk ``chunk`` of ``arr`` in the store folder ``root``."""
    return root / arr.path / arr.metadata.encode_chunk_key(chunk)


def row_chunks(arr: zarr.Array) -> int:
    """Rows per chunk of ``arr`` (first axis)."""
    return int(arr.chunks[0])


def read_flags(root: Path, arr: zarr.Array, *, must_exist: bool) -> tuple[np.ndarray | None, str | None]:
    """Decode the one-chunk array ``arr``: (values, None) or (None, what is wrong)."""
    if arr.shape[0] and must_exist and not chunk_path(root, arr, (0,) * arr.ndim).is_file():
        return None, f"{arr.path}/{arr.metadata.encode_chunk_key((0,) * arr.ndim)} is missing"
    try:
        return np.asarray(arr[:]), None
    except DAMAGE as exc:
        return None, f"{arr.path}/{arr.metadata.encode_chunk_key((0,) * arr.ndim)} fails its checksum ({exc})"


def scan(
    root: Path, emb: zarr.Array, done_arr: zarr.Array, coords: zarr.Array | None, *, strict: bool
) -> tuple[DamageReport, np.ndarray]:
    """Decode every chunk of the store at ``root``; (report, done flags that can be trusted).

    ``strict``: ``done``/``coords`` chunks must exist (format 2 writes them at creation).
    """
    problems: list[str] = []
    bad_files: list[str] = []
    done, why = read_flags(root, done_arr, must_exist=strict)
    done_lost = done is None
    if why:
        problems.append(f"done flags: {why}")
    coords_lost = False
    if coords is not None:
        values, why = read_flags(root, coords, must_exist=strict)
        coords_lost = values is None
        if why:
            problems.append(f"tile coordinates: {why}")
    n = int(emb.shape[0])
    present = np.zeros(n, bool)  # rows held, verified, by a chunk that decodes
    bad = np.zeros(n, bool)
    step = row_chunks(emb)
    for i in range(-(-n // step)):
        r0, r1 = i * step, min((i + 1) * step, n)
        marked = done[r0:r1] if done is not None else np.zeros(r1 - r0, bool)
        rel = f"{emb.path}/{emb.metadata.encode_chunk_key((i, 0))}"
        if not chunk_path(root, emb, (i, 0)).is_file():
            if marked.any():
                problems.append(f"{rel} is missing ({int(marked.sum())} tiles marked done)")
                bad[r0:r1] = marked
            continue
        try:
            block = np.asarray(emb.get_block_selection((i, 0)))
        except DAMAGE as exc:
            problems.append(f"{rel} fails its checksum ({type(exc).__name__})")
            bad_files.append(rel)
            bad[r0:r1] = marked
            continue
        written = block.any(axis=1)
        present[r0:r1] = written
        zero = marked & ~written
        if zero.any():
            problems.append(f"{rel}: {int(zero.sum())} tiles marked done hold no embedding")
            bad[r0:r1] |= zero
    # Lost flags are rebuilt from the rows present: a row is written whole before its flag.
    trusted = (done & ~bad) if done is not None else present
    report = DamageReport(root, np.flatnonzero(bad).astype(np.int64), tuple(problems), tuple(bad_files),
                          done_lost, coords_lost)  # fmt: skip
    return report, trusted
