"""Store integrity, as a fault table: each damage of issue 13 on a real zarr store on disk.

Every row damages one file of a store holding known rows, then asserts both outcomes:

- read-only (what ``export``/``index``/``heatmap`` do): one StoreError naming the store and the fix
  (``napari-virchow embed``), never a row of zeros or a stale row;
- writable (what ``embed`` does): the store repairs itself, marks exactly the damaged tiles not done,
  keeps every other row (nothing computed is lost), and a rewrite of those tiles restores the store.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import ZstdCodec

from napari_virchow.errors import StoreError
from napari_virchow.store import atomic
from napari_virchow.store.embeddings import EmbeddingStore
from tests.store.test_store import DIM, N, expected, open_store

COORDS = np.stack([np.arange(N) * 448, np.zeros(N)], axis=1).astype(np.int64)
WRITTEN = np.arange(0, 200)  # chunks 0..6 done (CHUNK 32), chunk 6 partly, 7..9 untouched


def _flip(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x10
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _store(tmp_path: Path) -> Path:
    with open_store(tmp_path, coords=COORDS) as s:
        s.write(WRITTEN, expected(WRITTEN))
        return s.path


def _mark_done_unwritten(path: Path) -> None:
    """A lost update: tiles 250..259 flagged done although their rows were never written."""
    done = zarr.open_array(path / "done", mode="r+")
    flags = np.asarray(done[:])
    flags[250:260] = True
    done[:] = flags


Damage = Callable[[Path], None]
#: (damage, tiles it destroys among WRITTEN or marks done wrongly, done flags lost, coords lost)
TABLE: dict[str, tuple[Damage, np.ndarray, bool, bool]] = {
    "embeddings chunk deleted": (lambda p: (p / "embeddings/c/2/0").unlink(), np.arange(64, 96), False, False),
    "every embeddings chunk deleted": (lambda p: shutil.rmtree(p / "embeddings/c"), WRITTEN, False, False),
    "embeddings chunk bit flip": (lambda p: _flip(p / "embeddings/c/1/0"), np.arange(32, 64), False, False),
    "embeddings chunk truncated": (lambda p: _truncate(p / "embeddings/c/0/0"), np.arange(0, 32), False, False),
    "done chunk bit flip": (lambda p: _flip(p / "done/c/0", 0.3), np.array([], int), True, False),
    "done chunk truncated": (lambda p: _truncate(p / "done/c/0"), np.array([], int), True, False),
    "done chunk deleted": (lambda p: (p / "done/c/0").unlink(), np.array([], int), True, False),
    "coords chunk deleted": (lambda p: (p / "coords/c/0/0").unlink(), np.array([], int), False, True),
    "coords chunk bit flip": (lambda p: _flip(p / "coords/c/0/0"), np.array([], int), False, True),
    "done rows never written": (_mark_done_unwritten, np.arange(250, 260), False, False),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", list(TABLE))
def test_read_only_reports_damage_once_with_the_fix(tmp_path: Path, case: str) -> None:
    damage, _, _, coords_lost = TABLE[case]
    path = _store(tmp_path)
    damage(path)
    with pytest.raises(StoreError) as info, open_store(tmp_path, coords=COORDS, mode="r") as s:
        s.missing()
        s.read_done()
    msg = str(info.value)
    assert "damaged" in msg and str(path) in msg and "napari-virchow embed" in msg, msg
    assert "another encoder" not in msg  # a deleted coords chunk is damage, not a foreign store
    # Nothing was changed by reading: the same damage is found again.
    with open_store(tmp_path, mode="r") as s:
        assert not s.verify().ok


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", list(TABLE))
def test_writable_open_repairs_exactly_the_damaged_tiles(tmp_path: Path, case: str) -> None:
    damage, lost, done_lost, coords_lost = TABLE[case]
    path = _store(tmp_path)
    damage(path)
    with open_store(tmp_path, mode="r") as s:
        report = s.verify()
    assert not report.ok and (report.done_lost, report.coords_lost) == (done_lost, coords_lost)
    np.testing.assert_array_equal(report.rows, lost)
    with open_store(tmp_path, coords=COORDS) as s:  # what `embed` does: repairs on open
        todo = s.missing()
        kept = np.setdiff1d(WRITTEN, lost)
        np.testing.assert_array_equal(np.setdiff1d(np.arange(N), todo), kept)  # nothing else lost
        np.testing.assert_array_equal(s.coords, COORDS)
        idx, rows = s.read_done()
        np.testing.assert_array_equal(rows, expected(idx).astype(np.float32))
        redo = np.intersect1d(todo, WRITTEN)
        s.write(redo, expected(redo))  # the recomputation
    with open_store(tmp_path, coords=COORDS, mode="r") as s:
        assert s.verify().ok
        idx, rows = s.read_done()
        np.testing.assert_array_equal(idx, WRITTEN)
        np.testing.assert_array_equal(rows, expected(idx).astype(np.float32))


@pytest.mark.timeout(60)
def test_provenance_metadata_bit_flip_is_detected(tmp_path: Path) -> None:
    path = _store(tmp_path)
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["tile_size_l0"] = 449  # one digit: still valid JSON, still plausible
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="zarr.json\\) fails its checksum"):
        EmbeddingStore.from_path(path)


@pytest.mark.timeout(60)
def test_read_refuses_rows_not_done(tmp_path: Path) -> None:
    _store(tmp_path)
    with open_store(tmp_path, mode="r") as s:
        np.testing.assert_array_equal(s.read([3, 199]), expected([3, 199]).astype(np.float32))
        with pytest.raises(StoreError, match="not in the embedding store"):
            s.read([3, 200])  # 200 was never written: it must not read as zeros


@pytest.mark.timeout(60)
def test_invalidate_marks_tiles_for_recomputation(tmp_path: Path) -> None:
    _store(tmp_path)
    with open_store(tmp_path) as s:
        s.invalidate(np.array([5, 7]))
        np.testing.assert_array_equal(s.missing(np.arange(10)), [5, 7])
    with open_store(tmp_path, mode="r") as s, pytest.raises(StoreError, match="read-only"):
        s.invalidate(np.array([1]))


@pytest.mark.timeout(60)
def test_all_zero_rows_are_never_stored(tmp_path: Path) -> None:
    with open_store(tmp_path) as s, pytest.raises(ValueError, match="all zeros"):
        s.write([1], np.zeros((1, DIM), np.float32))


def _downgrade_to_format_1(path: Path) -> None:
    """Rewrite a store the way napari-virchow wrote format 1: no crc32c, no attrs digest."""
    group = zarr.open_group(path, mode="r+")
    done, coords = np.asarray(group["done"][:]), np.asarray(group["coords"][:])
    group.create_array("done", shape=(N,), dtype="bool", fill_value=False, chunks=(N,), overwrite=True,
                       compressors=ZstdCodec())[:] = done  # fmt: skip
    group.create_array("coords", shape=(N, 2), dtype="int64", chunks=(N, 2), overwrite=True,
                       compressors=ZstdCodec())[:] = coords  # fmt: skip
    attrs = group.attrs.asdict()
    attrs.pop("attrs_digest")
    group.attrs.put({**attrs, "format_version": 1})


@pytest.mark.timeout(60)
def test_format_1_store_is_read_then_upgraded_without_losing_rows(tmp_path: Path) -> None:
    path = _store(tmp_path)
    _downgrade_to_format_1(path)
    _mark_done_unwritten(path)  # a format 1 done chunk has no checksum: the cross-check catches it
    with open_store(tmp_path, coords=COORDS, mode="r") as s, pytest.raises(StoreError, match="marked done"):
        s.read_done()
    with open_store(tmp_path, coords=COORDS) as s:
        assert s.attrs["format_version"] == 2
        np.testing.assert_array_equal(np.flatnonzero(s.done), WRITTEN)
    with open_store(tmp_path, coords=COORDS, mode="r") as s:
        assert s.verify().ok
        idx, rows = s.read_done()
        np.testing.assert_array_equal(rows, expected(WRITTEN).astype(np.float32))
    _flip(path / "done/c/0", 0.3)  # upgraded: the done chunk now carries a checksum
    with open_store(tmp_path, mode="r") as s, pytest.raises(StoreError, match="done flags"):
        s.n_done  # noqa: B018 - reading the flags is the test


@pytest.mark.timeout(60)
def test_chunk_deleted_while_open_is_still_detected(tmp_path: Path) -> None:
    path = _store(tmp_path)
    with open_store(tmp_path, mode="r") as s:
        assert s.n_done == len(WRITTEN)
        # The presence of chunk 3 was checked (and cached) above; zarr now reads it as zeros,
        # which the done-rows cross-check refuses.
        (path / "embeddings/c/3/0").unlink()
        with pytest.raises(StoreError, match="damaged"):
            s.read(np.arange(96, 128))



@pytest.mark.timeout(60)
def test_close_waits_for_a_write_in_flight_and_later_writes_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real, started = atomic.atomic_put, threading.Event()

    def slow(path: Path, data: bytes, **kw: object) -> None:
        if "embeddings" in path.parts:
            started.set()
            time.sleep(0.3)
        real(path, data, **kw)  # type: ignore[arg-type]

    s = open_store(tmp_path)
    monkeypatch.setattr(atomic, "atomic_put", slow)
    writer = threading.Thread(target=s.write, args=(np.arange(10), expected(np.arange(10))))
    writer.start()
    started.wait(10)
    s.close()  # returns only once the write (rows and done flags) is complete
    writer.join(5)
    monkeypatch.undo()
    with open_store(tmp_path, mode="r") as r:
        assert r.n_done == 10
    with pytest.raises(StoreError, match="read-only|closed"):
        s.write([11], expected([11]))
