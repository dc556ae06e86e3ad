"""Concurrent ``embed``s of one slide split the work: per-chunk claims, taken over when their holder dies."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from napari_virchow.inference import iter_embed
from napari_virchow.models.encoder import Encoder, load_encoder
from napari_virchow.slides import fingerprint as fp_mod
from napari_virchow.slides.slide import Slide
from napari_virchow.slides.tiling import TileGrid
from napari_virchow.store.embeddings import EmbeddingStore
from napari_virchow.stores import open_store, store_key

pytestmark = pytest.mark.filterwarnings("ignore:.*random weights:UserWarning")
F16 = {"rtol": 2e-3, "atol": 1e-3}
CHUNK = 8


def _tiny() -> Encoder:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return load_encoder("virchow2-tiny", weights="random", device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return _tiny()


@pytest.fixture
def slide_path(planted_slide: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(fp_mod.ENV_MEMO, str(tmp_path / "memo"))
    path = tmp_path / "slide.tif"
    shutil.copy(planted_slide, path)
    return path


def _create(path: Path, encoder: Encoder, cache: Path) -> None:
    """The store with small chunks, so that the slide's tissue spans several of them."""
    with Slide(path) as slide:
        grid = TileGrid(slide, mpp=encoder.spec.mpp, size=encoder.spec.input_size)
        EmbeddingStore.open(store_key(slide, encoder, grid), n_tiles=len(grid), dim=encoder.dim, root=cache,
                            coords=grid.coords, chunk_rows=CHUNK, slide_path=str(path)).close()  # fmt: skip


def _check_complete(path: Path, encoder: Encoder, cache: Path) -> np.ndarray:
    with Slide(path) as slide:
        grid = TileGrid(slide, mpp=encoder.spec.mpp, size=encoder.spec.input_size)
        with open_store(slide, encoder, grid, cache_root=cache, mode="r") as store:
            assert store.verify().ok
            idx, rows = store.read_done()
        np.testing.assert_array_equal(idx, grid.tissue_indices)
        np.testing.assert_allclose(rows, encoder.embed(grid.read_tiles(idx)), **F16)
        return grid.tissue_indices


def _wait_for(cond: object, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


@pytest.mark.timeout(120)
def test_a_chunk_another_run_computes_is_skipped_then_waited_for(
    slide_path: Path, encoder: Encoder, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    _create(slide_path, encoder, cache)
    with Slide(slide_path) as slide:
        grid = TileGrid(slide, mpp=encoder.spec.mpp, size=encoder.spec.input_size)
        tissue = grid.tissue_indices
        chunk = int(tissue[len(tissue) // 2]) // CHUNK
        theirs = tissue[tissue // CHUNK == chunk]
        other = open_store(slide, encoder, grid, cache_root=cache)  # "another run", with its own lock
        assert other.claims.take(chunk, theirs)
        counted: list[int] = []
        run = threading.Thread(target=lambda: counted.append(
            sum(len(b.indices) for b in iter_embed(slide, encoder, grid, cache_root=cache, batch_size=4))))
        run.start()
        with open_store(slide, encoder, grid, cache_root=cache, mode="r") as view:
            _wait_for(lambda: len(view.missing(tissue)) == len(theirs))  # everything but their chunk
        assert run.is_alive()  # it waits for the chunk it skipped
        other.write(theirs, encoder.embed(grid.read_tiles(theirs)))  # their run stores it: claim released
        run.join(60)
        other.close()
    assert counted == [len(tissue) - len(theirs)]  # nothing computed twice
    _check_complete(slide_path, encoder, cache)


def _hold_claim(store_dir: str, chunk: int, ready: multiprocessing.synchronize.Event) -> None:  # type: ignore[name-defined]
    store = EmbeddingStore.from_path(store_dir, mode="a")
    store.claims.take(chunk, np.array([chunk * CHUNK]))
    ready.set()
    time.sleep(300)  # killed long before


@pytest.mark.timeout(120)
def test_the_claim_of_a_killed_process_is_taken_over(slide_path: Path, encoder: Encoder, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    _create(slide_path, encoder, cache)
    with Slide(slide_path) as slide:
        grid = TileGrid(slide, mpp=encoder.spec.mpp, size=encoder.spec.input_size)
        with open_store(slide, encoder, grid, cache_root=cache) as store:
            folder = store.path
        chunk = int(grid.tissue_indices[0]) // CHUNK
        ctx = multiprocessing.get_context("spawn")
        ready = ctx.Event()
        holder = ctx.Process(target=_hold_claim, args=(str(folder), chunk, ready))
        holder.start()
        assert ready.wait(60)
        os.kill(holder.pid, signal.SIGKILL)  # type: ignore[arg-type]
        holder.join(30)
        computed = sum(len(b.indices) for b in iter_embed(slide, encoder, grid, cache_root=cache, batch_size=4))
    tissue = _check_complete(slide_path, encoder, cache)
    assert computed == len(tissue)


def _embed_child(path: str, cache: str, memo: str, start: multiprocessing.synchronize.Barrier, out: str) -> None:  # type: ignore[name-defined]
    os.environ[fp_mod.ENV_MEMO] = memo
    encoder = _tiny()
    with Slide(path) as slide:
        grid = TileGrid(slide, mpp=encoder.spec.mpp, size=encoder.spec.input_size)
        start.wait(60)
        n = sum(len(b.indices) for b in iter_embed(slide, encoder, grid, cache_root=cache, batch_size=2, threads=1))
    Path(out).write_text(str(n))


@pytest.mark.timeout(180)
def test_two_processes_share_the_tiles(slide_path: Path, encoder: Encoder, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    _create(slide_path, encoder, cache)
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(2)
    outs = [tmp_path / f"n{i}" for i in range(2)]
    procs = [ctx.Process(target=_embed_child, args=(str(slide_path), str(cache), str(tmp_path / "memo"), start,
                                                     str(o))) for o in outs]  # fmt: skip
    for p in procs:
        p.start()
    for p in procs:
        p.join(150)
    assert [p.exitcode for p in procs] == [0, 0]
    tissue = _check_complete(slide_path, encoder, cache)
    assert sum(int(o.read_text()) for o in outs) == len(tissue)  # each tile computed once
