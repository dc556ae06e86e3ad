"""The slide fingerprint covers every pixel of every level, and is remembered per file version."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_virchow.slides import fingerprint as fp_mod
from napari_virchow.slides.slide import Slide


@pytest.fixture(autouse=True)
def memo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "memo"
    monkeypatch.setenv(fp_mod.ENV_MEMO, str(folder))
    return folder


@pytest.fixture
def hashes(monkeypatch: pytest.MonkeyPatch) -> list[list[Path]]:
    """Every call of the real content hash, by the files it read."""
    calls: list[list[Path]] = []
    real: Callable[..., str] = fp_mod.hash_files

    def counted(files: list[Path], **kw: object) -> str:
        calls.append(list(files))
        return real(files, **kw)

    monkeypatch.setattr(fp_mod, "hash_files", counted)
    return calls


def fingerprint(path: Path) -> str:
    with Slide(path, mpp=0.5) as slide:
        return slide.fingerprint


def test_stripped_tiffs_differing_in_a_central_block(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (4000, 4000, 3), dtype=np.uint8)
    b = a.copy()
    b[1500:2500, 1500:2500] = 255 - b[1500:2500, 1500:2500]
    for name, img in (("a.tif", a), ("b.tif", b)):
        tifffile.imwrite(tmp_path / name, img, photometric="rgb", rowsperstrip=64)  # stripped
    assert not tifffile.TiffFile(tmp_path / "a.tif").pages[0].is_tiled
    assert (tmp_path / "a.tif").stat().st_size == (tmp_path / "b.tif").stat().st_size
    assert fingerprint(tmp_path / "a.tif") != fingerprint(tmp_path / "b.tif")


def _swap_level0_tiles(path: Path, n: int = 16) -> None:
    """Re-point ``n`` level-0 tiles at each other's data (the file size is unchanged)."""
    with tifffile.TiffFile(path, mode="r+b") as tif:
        page = tif.pages[0]
        offsets, counts = list(page.tags["TileOffsets"].value), list(page.tags["TileByteCounts"].value)
        order = list(range(n))[::-1] + list(range(n, len(offsets)))
        page.tags["TileOffsets"].overwrite([offsets[i] for i in order])
        page.tags["TileByteCounts"].overwrite([counts[i] for i in order])


def test_repointed_level0_tiles_of_a_pyramid(sample_pyramid: Path, tmp_path: Path) -> None:
    edited = tmp_path / "edited.tif"
    shutil.copy(sample_pyramid, edited)
    size = edited.stat().st_size
    _swap_level0_tiles(edited)
    assert edited.stat().st_size == size
    with Slide(sample_pyramid) as a, Slide(edited) as b:
        assert not np.array_equal(a.read_region((0, 0), 0, (512, 512)), b.read_region((0, 0), 0, (512, 512)))
        # the coarser levels are untouched: the edit is in level 0 only
        assert np.array_equal(a.read_region((0, 0), 1, (256, 256)), b.read_region((0, 0), 1, (256, 256)))
        assert a.fingerprint != b.fingerprint


def test_reopen_touch_and_move_keep_the_fingerprint(
    sample_pyramid: Path, tmp_path: Path, hashes: list[list[Path]], memo: Path
) -> None:
    path = tmp_path / "slide.tif"
    shutil.copy(sample_pyramid, path)
    first = fingerprint(path)
    assert len(hashes) == 1 and len(list(memo.iterdir())) == 1
    assert fingerprint(path) == first and len(hashes) == 1  # reopen: from the memo, no read
    moved = tmp_path / "sub" / "renamed.tif"
    moved.parent.mkdir()
    path.rename(moved)
    assert fingerprint(moved) == first and len(hashes) == 1  # mv: same inode, no re-hash
    st = moved.stat()
    os.utime(moved, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert fingerprint(moved) == first and len(hashes) == 2  # touch: re-hashed, same content


def test_any_write_invalidates(sample_pyramid: Path, tmp_path: Path) -> None:
    path = tmp_path / "slide.tif"
    shutil.copy(sample_pyramid, path)
    before = fingerprint(path)
    with open(path, "r+b") as fh:  # one byte in the middle of the pixel data, same size
        fh.seek(path.stat().st_size // 2)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 1]))
    assert fingerprint(path) != before


@pytest.mark.parametrize("garbage", [b"", b"{not json", b'{"v": 1, "token": "x", "fingerprint": "zz"}'])
def test_a_damaged_memo_is_ignored(
    sample_pyramid: Path, tmp_path: Path, hashes: list[list[Path]], memo: Path, garbage: bytes
) -> None:
    path = tmp_path / "slide.tif"
    shutil.copy(sample_pyramid, path)
    first = fingerprint(path)
    (entry,) = memo.iterdir()
    entry.write_bytes(garbage)
    assert fingerprint(path) == first and len(hashes) == 2  # recomputed
    assert fingerprint(path) == first and len(hashes) == 2  # and remembered again


def test_unwritable_memo_still_fingerprints(
    sample_pyramid: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(fp_mod.ENV_MEMO, str(blocker / "memo"))  # a path below a file: mkdir fails
    assert fingerprint(sample_pyramid) == fp_mod.hash_files([sample_pyramid])


def test_content_not_path_and_thread_count_independent(
    sample_pyramid: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy = tmp_path / "copy.tif"
    shutil.copy(sample_pyramid, copy)
    assert fingerprint(copy) == fingerprint(sample_pyramid)
    monkeypatch.setattr(fp_mod, "BLOCK", 4096)  # many blocks, hashed out of order by the threads
    one = fp_mod.hash_files([sample_pyramid], threads=1)
    assert one == fp_mod.hash_files([sample_pyramid], threads=3)
    monkeypatch.setattr(fp_mod, "BLOCK", 8192)
    assert fp_mod.hash_files([sample_pyramid], threads=1) != one  # the tree shape is part of the hash


def test_same_stat_other_head_is_not_served_from_the_memo(
    sample_pyramid: Path, tmp_path: Path, hashes: list[list[Path]]
) -> None:
    """A reused inode (same size and mtime, another file) must not get the old fingerprint."""
    path = tmp_path / "slide.tif"
    shutil.copy(sample_pyramid, path)
    before = fingerprint(path)
    st, token = path.stat(), fp_mod.file_token([path])
    with open(path, "r+b") as fh:  # the last byte: another file of the same size
        fh.seek(st.st_size - 1)
        last = fh.read(1)
        fh.seek(st.st_size - 1)
        fh.write(bytes([last[0] ^ 1]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert fp_mod.file_token([path]) == token  # same device, inode, size and mtime
    assert fingerprint(path) != before and len(hashes) == 2
