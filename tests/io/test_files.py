"""The one atomic write: temp + fsync + rename, umask honoured, sets of files all or none."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from napari_virchow.analysis.similarity import spatially_distinct
from napari_virchow.io.files import atomic_write, atomic_write_bytes, atomic_write_set


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "a.txt"
    target.write_text("old")
    atomic_write(target, lambda tmp: Path(tmp).write_text("new"))
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "a.txt"
    target.write_text("old")

    def fail(tmp: str) -> None:
        Path(tmp).write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write(target, fail)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_a_set_is_written_all_or_none(tmp_path: Path) -> None:
    a, b = tmp_path / "x.npz", tmp_path / "x.json"

    def fail(tmp: str) -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write_set([(a, lambda tmp: Path(tmp).write_text("a")), (b, fail)])
    assert list(tmp_path.iterdir()) == []  # no lone first file, no temporary file
    atomic_write_set([(a, lambda tmp: Path(tmp).write_text("a")), (b, lambda tmp: Path(tmp).write_text("b"))])
    assert a.read_text() == "a" and b.read_text() == "b"


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_new_files_honour_the_umask(umask: int, tmp_path: Path) -> None:
    before = os.umask(umask)
    try:
        path = atomic_write_bytes(tmp_path / "f.bin", b"x")
    finally:
        os.umask(before)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_exclusive_write_refuses_an_existing_file(tmp_path: Path) -> None:
    atomic_write_bytes(tmp_path / "f", b"1", exclusive=True)
    with pytest.raises(FileExistsError):
        atomic_write_bytes(tmp_path / "f", b"2", exclusive=True)
    assert (tmp_path / "f").read_bytes() == b"1" and len(list(tmp_path.iterdir())) == 1


def test_spatial_suppression_is_per_group_and_per_reach() -> None:
    xy = np.array([[0, 0], [100, 0], [0, 0], [1000, 0]])  # best first
    assert spatially_distinct(xy, 200, k=10).tolist() == [0, 3]
    assert spatially_distinct(xy, 200, k=10, groups=np.array([0, 0, 1, 0])).tolist() == [0, 2, 3]  # other slide
    assert spatially_distinct(xy, np.array([200, 50, 50, 50]), k=10).tolist() == [0, 1, 3]  # reach of the candidate
    assert spatially_distinct(xy, 0, k=2).tolist() == [0, 1]
