"""Fault table through the real pipeline: a real slide, the tiny Virchow 2, real stores on disk.

Each row damages a complete cache (or the slide) the way issue 13 found, then asserts:

- reading (mode "r", what export/index/heatmap do) raises one StoreError naming the store and
  ``napari-virchow embed``, or, for a changed slide, finds no cache at all (never stale rows);
- ``iter_embed`` (what ``embed`` does) recomputes exactly the lost tiles, and afterwards every row
  equals a fresh embedding of its tile: nothing wrong is left, nothing else is recomputed.

Also here: Ctrl-C landing while a batch is being written (the writer thread finishes before the
store and its lock are released, and a rerun leaves no done tile without its row).
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import zarr

from napari_virchow.errors import StoreError
from napari_virchow.inference import iter_embed
from napari_virchow.models.encoder import Encoder, load_encoder
from napari_virchow.slides import fingerprint as fp_mod
from napari_virchow.slides.slide import Slide
from napari_virchow.slides.tiling import TileGrid
from napari_virchow.store import atomic
from napari_virchow.store.embeddings import EmbeddingStore
from napari_virchow.stores import open_store, store_key
from tests.slides.test_fingerprint import _swap_level0_tiles

pytestmark = pytest.mark.filterwarnings("ignore:.*random weights:UserWarning")
F16 = {"rtol": 2e-3, "atol": 1e-3}
CHUNK = 16


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return load_encoder("virchow2-tiny", weights="random", device="cpu", dtype="fp32")


@pytest.fixture(autouse=True)
def _memo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(fp_mod.ENV_MEMO, str(tmp_path / "memo"))


@pytest.fixture
def slide_path(planted_slide: Path, tmp_path: Path) -> Path:
    path = tmp_path / "slide.tif"
    shutil.copy(planted_slide, path)
    return path


def _embed(path: Path, encoder: Encoder, cache: Path) -> tuple[int, np.ndarray]:
    """Run the pipeline on every tissue tile; (tiles computed, the store's done rows vs fresh)."""
    with Slide(path) as slide:
        grid = TileGrid(slide, mpp=encoder.spec.mpp, size=encoder.spec.input_size)
        computed = sum(len(b.indices) for b in iter_embed(slide, encoder, grid, cache_root=cache, batch_size=8))
        with open_store(slide, encoder, grid, cache_root=cache, mode="r") as store:
            assert store.verify().ok
            idx, rows = store.read_done()
        np.testing.assert_array_equal(idx, grid.tissue_indices)
        np.testing.assert_allclose(rows, encoder.embed(grid.read_tiles(idx)), **F16)
    return computed, idx


def _filled_cache(path: Path, encoder: Encoder, cache: Path) -> tuple[Path, np.ndarray]:
    """A complete store with small chunks (so a damaged chunk is a few tiles); (folder, tissue)."""
    with Slide(path) as slide:
        grid = TileGrid(slide, mpp=encoder.spec.mpp, size=encoder.spec.input_size)
        with EmbeddingStore.open(store_key(slide, encoder, grid), n_tiles=len(grid), dim=encoder.dim, root=cache,
                                 coords=grid.coords, chunk_rows=CHUNK, slide_path=str(path)) as store:  # fmt: skip
            folder = store.path
        tissue = grid.tissue_indices
    computed, _ = _embed(path, encoder, cache)
    assert computed == len(tissue)
    return folder, tissue


def _flip(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 3] ^= 0x04
    file.write_bytes(bytes(data))


def _lost_update(folder: Path) -> None:
    """Done flags of two never-written background tiles set (what the writer race left)."""
    done = zarr.open_array(folder / "done", mode="r+")
    flags = np.asarray(done[:])
    flags[np.flatnonzero(~flags)[:2]] = True
    done[:] = flags


Damage = Callable[[Path], None]
#: damage -> tiles `embed` must recompute: "chunk1" = the tissue tiles of rows 16..31, else a count
CASES: dict[str, tuple[Damage, str | int]] = {
    "embeddings chunk deleted": (lambda f: (f / "embeddings/c/1/0").unlink(), "chunk1"),
    "embeddings chunk bit flip": (lambda f: _flip(f / "embeddings/c/1/0"), "chunk1"),
    "every embeddings chunk deleted": (lambda f: shutil.rmtree(f / "embeddings/c"), "all"),
    "done chunk bit flip": (lambda f: _flip(f / "done/c/0"), 0),
    "done chunk deleted": (lambda f: (f / "done/c/0").unlink(), 0),
    "coords chunk deleted": (lambda f: (f / "coords/c/0/0").unlink(), 0),
    "done tiles without rows": (_lost_update, 0),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", list(CASES))
def test_damaged_cache_is_reported_then_repaired_by_embed(
    case: str, slide_path: Path, encoder: Encoder, tmp_path: Path
) -> None:
    damage, expect = CASES[case]
    cache = tmp_path / "cache"
    folder, tissue = _filled_cache(slide_path, encoder, cache)
    damage(folder)
    with Slide(slide_path) as slide:
        grid = TileGrid(slide, mpp=encoder.spec.mpp, size=encoder.spec.input_size)
        with pytest.raises(StoreError) as info, open_store(slide, encoder, grid, cache_root=cache, mode="r") as s:
            s.missing(tissue)
            s.read_done()
    msg = str(info.value)
    assert "damaged" in msg and str(folder) in msg and f"napari-virchow embed {slide_path}" in msg, msg
    computed, _ = _embed(slide_path, encoder, cache)  # repairs; rows checked against fresh ones
    n = {"chunk1": int(((tissue >= CHUNK) & (tissue < 2 * CHUNK)).sum()), "all": len(tissue)}.get(expect, expect)
    assert computed == n


@pytest.mark.timeout(120)
def test_a_changed_slide_is_never_served_stale_embeddings(slide_path: Path, encoder: Encoder, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    _filled_cache(slide_path, encoder, cache)
    st = slide_path.stat()
    os.utime(slide_path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touch: the cache is kept
    assert _embed(slide_path, encoder, cache)[0] == 0
    moved = tmp_path / "elsewhere.tif"
    slide_path.rename(moved)  # mv: kept too
    assert _embed(moved, encoder, cache)[0] == 0
    _swap_level0_tiles(moved)  # 16 level-0 tiles re-pointed: OpenSlide's quickhash misses this
    computed, tissue = _embed(moved, encoder, cache)  # compared with fresh embeddings inside
    assert computed == len(tissue)


def _interrupt_first_chunk_write(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Ctrl-C the main thread while the writer replaces the first embeddings chunk."""
    real, fired = atomic.atomic_put, threading.Event()

    def put(path: Path, data: bytes, **kw: object) -> None:
        if {"embeddings", "c"} <= set(path.parts) and not fired.is_set():  # a chunk, not metadata
            fired.set()
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)  # type: ignore[arg-type]
            time.sleep(0.5)  # the write is still in flight when the consumer sees the interrupt
        real(path, data, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(atomic, "atomic_put", put)
    return fired


@pytest.fixture
def python_sigint() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt during the test, whatever handler an earlier test left."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.timeout(120)
@pytest.mark.usefixtures("python_sigint")
def test_ctrl_c_during_a_write_waits_for_the_writer(
    slide_path: Path, encoder: Encoder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    fired = _interrupt_first_chunk_write(monkeypatch)
    with Slide(slide_path) as slide:
        grid = TileGrid(slide, mpp=encoder.spec.mpp, size=encoder.spec.input_size)
        for own_store in (True, False):  # iter_embed's own store, and one the caller holds
            with open_store(slide, encoder, grid, cache_root=cache) as held:
                fired.clear()
                with pytest.raises(KeyboardInterrupt):
                    for _ in iter_embed(slide, encoder, grid, None if own_store else held, batch_size=4,
                                        cache_root=cache):  # fmt: skip
                        pass
                assert fired.is_set()
                # No thread outlives the call: the interrupted batch's writer has finished.
                assert not [t for t in threading.enumerate() if t.name == "napari-virchow-writer" and t.is_alive()]
        with open_store(slide, encoder, grid, cache_root=cache, mode="r") as store:
            assert store.n_done == 8 and store.verify().ok
    monkeypatch.undo()
    computed, tissue = _embed(slide_path, encoder, cache)  # the rerun: every done row is real
    assert computed == len(tissue) - 8
