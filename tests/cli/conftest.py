"""File systems that fail for real: a tiny tmpfs that fills up, one remounted read-only.

Mounting needs root and mount permission (the tests run as root here); elsewhere the tests
that need them are skipped, saying why.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (e.g. "600k") mounted at ``path``, unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)  # fmt: skip
    if proc.returncode != 0:
        why = proc.stderr.strip() or f"exit {proc.returncode}"
        pytest.skip(f"cannot mount a tmpfs here ({why}): needs root with mount rights")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(path: Path, leave_bytes: int) -> None:
    """Fill the file system of ``path`` until about ``leave_bytes`` are free."""
    free = shutil.disk_usage(path).free
    (path / "filler").write_bytes(b"\0" * max(0, free - leave_bytes))


def remount_read_only(path: Path) -> None:
    """Make the tmpfs at ``path`` read-only: every write fails with EROFS, even for root."""
    subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True, capture_output=True)


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A 600 kB tmpfs with 24 kB left: room for a small slide's features, not a large one's."""
    with tmpfs(tmp_path / "full", "600k") as root:
        fill(root, 24 * 1024)
        yield root
