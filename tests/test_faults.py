"""Faults: cancel at every stage of the widget's jobs, a reader thread failing, two processes racing.

Covered elsewhere, not repeated here:

- SIGKILL mid-embedding, then resume == an uninterrupted run:
  ``test_inference.py::test_sigkill_mid_run_then_resume`` (a real child process running
  ``iter_embed``), and at the store level ``test_store.py::test_sigkill_never_leaves_done_without_row``.
- CUDA out-of-memory: ``test_inference.py::test_cuda_oom_halves_the_batch_and_finishes`` injects the
  real ``torch.cuda.OutOfMemoryError`` into the encoder call (8 → 4 → 2, same embeddings) and
  ``test_oom_with_one_tile_is_raised`` the case where even one tile does not fit.
- A reader raising in an injected (wrapped) grid, readers 0 and 2:
  ``test_inference.py::test_reader_exception_propagates_without_hang``; here the failure is real
  (the slide file is cut short after it was opened).

Cancel during slide open: not applicable. ``Slide(path)`` is synchronous and reads only
metadata (milliseconds, even for the 90 MB stripped TIFF of ``test_bad_inputs``); the widget opens
slides through napari's reader, and every cancellable step (model load, tissue detection,
embedding, clustering) is covered below.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from napari_virchow import jobs as _jobs
from napari_virchow.errors import SlideError
from napari_virchow.inference import iter_embed
from napari_virchow.models.encoder import Encoder, load_encoder
from napari_virchow.session import SessionConfig, SlideSession
from napari_virchow.slides.slide import Slide
from napari_virchow.slides.tiling import TileGrid
from napari_virchow.store.cache import list_stores
from napari_virchow.stores import open_store
from tests.conftest import PLANTED_PATTERNS, PLANTED_SIZE

pytestmark = pytest.mark.filterwarnings("ignore:.*random weights:UserWarning")

WHOLE = (0, 0, PLANTED_SIZE, PLANTED_SIZE)
#: float16 on disk vs float32 from the encoder
F16 = {"rtol": 2e-3, "atol": 1e-3}


def _tiny() -> Encoder:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return load_encoder("virchow2-tiny", weights="random", device="cpu", dtype="fp32")


def _session(slide: Path, cache_root: Path) -> SlideSession:
    config = SessionConfig(encoder="virchow2-tiny", weights="random", device="cpu", dtype="fp32", batch_size=4,
                           cache_root=cache_root)  # fmt: skip
    return SlideSession(slide, config)


def _drive(job: Iterator[object], cancel: threading.Event, when: Callable[[object], bool]) -> list[object]:
    """Consume a job as the widget's worker does, pressing Cancel right after ``when(event)``."""
    events = []
    for event in job:
        events.append(event)
        if when(event):
            cancel.set()
    return events


def _at(fragment: str) -> Callable[[object], bool]:
    return lambda ev: isinstance(ev, _jobs.Stage) and fragment in ev.message


def _assert_cancelled(events: list[object]) -> None:
    last = events[-1]
    assert isinstance(last, _jobs.Stage) and last.final and "cancelled" in last.message, events
    assert sum(isinstance(e, _jobs.Stage) and e.final for e in events) == 1


def _assert_consistent(session: SlideSession, encoder: Encoder) -> np.ndarray:
    """Every done row equals a fresh embedding of its tile (within float16); returns the done tiles."""
    idx, rows = session.store().read_done()
    if len(idx):
        np.testing.assert_allclose(rows, encoder.embed(session.grid.read_tiles(idx)), **F16)
    return idx


def _boxes() -> tuple[list[np.ndarray], list[str]]:
    """Two annotation squares (level-0 (x, y)): a planted pattern, and plain tissue."""
    x0, y0, x1, y1 = PLANTED_PATTERNS[0].box
    square = lambda a, b, c, d: np.array([[a, b], [c, b], [c, d], [a, d]], float)  # noqa: E731
    return [square(x0, y0, x1, y1), square(300, 1100, 1000, 1700)], ["tumour", "normal"]


# --- cancel at every stage ------------------------------------------------------------------------

CANCEL_AT: dict[str, tuple[Callable[[SlideSession, threading.Event], Iterator[object]], str]] = {
    "model-load": (lambda s, c: _jobs.compute_job(s, WHOLE, limit=10_000, cancel=c), "loading"),
    "tissue-detection": (lambda s, c: _jobs.compute_job(s, WHOLE, limit=10_000, cancel=c), "finding tissue"),
    "query-embedding": (lambda s, c: _jobs.query_job(s, *PLANTED_PATTERNS[0].box[:2], cancel=c), "query region"),
    "annotated-embedding": (lambda s, c: _jobs.train_job(s, *_boxes(), cancel=c), "annotated tiles"),
}  # fmt: skip


@pytest.mark.timeout(60)
@pytest.mark.parametrize("stage", list(CANCEL_AT))
def test_cancel_before_inference_embeds_nothing(stage: str, planted_slide: Path, tmp_path: Path) -> None:
    job, fragment = CANCEL_AT[stage]
    session = _session(planted_slide, tmp_path)
    cancel = threading.Event()
    events = _drive(job(session, cancel), cancel, _at(fragment))
    assert any(_at(fragment)(e) for e in events)  # the stage was reached, then cancelled
    _assert_cancelled(events)
    assert not [e for e in events if isinstance(e, (_jobs.BatchDone, _jobs.Queried, _jobs.Trained))]
    assert all(info.n_done == 0 for info in list_stores(tmp_path))  # no tile embedded
    assert session.head is None and session.similarity is None


@pytest.mark.timeout(60)
def test_cancel_mid_inference_keeps_a_consistent_store(planted_slide: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    session = _session(planted_slide, tmp_path)
    encoder = session.encoder()
    real, calls, cancel = encoder.embed, [], threading.Event()

    def embed(tiles: np.ndarray, **kwargs: Any) -> np.ndarray:
        calls.append(len(tiles))
        if len(calls) == 2:
            cancel.set()  # Cancel pressed while the encoder is busy with the second batch
        return real(tiles, **kwargs)

    monkeypatch.setattr(encoder, "embed", embed)  # undone after: the encoder is shared by the process
    events = _drive(_jobs.compute_job(session, WHOLE, limit=10_000, cancel=cancel), cancel, lambda ev: False)
    _assert_cancelled(events)
    batches = [e for e in events if isinstance(e, _jobs.BatchDone)]
    assert calls == [4, 4] and len(batches) == 2  # the running batch finishes and is stored, no more
    done = _assert_consistent(session, _tiny())
    np.testing.assert_array_equal(done, np.sort(np.concatenate([b.indices for b in batches])))
    assert session.grid.n_tissue > len(done)


@pytest.fixture(scope="module")
def embedded(planted_slide: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache root holding every tissue tile of the planted slide (computed once)."""
    root = tmp_path_factory.mktemp("embedded")
    session = _session(planted_slide, root)
    events = list(_jobs.compute_job(session, WHOLE, limit=10_000))
    assert isinstance(events[-1], _jobs.Stage) and events[-1].message.startswith("done")
    session.close()
    return root


@pytest.mark.timeout(60)
def test_cancel_during_clustering_drops_the_result(planted_slide: Path, embedded: Path) -> None:
    session = _session(planted_slide, embedded)
    cancel = threading.Event()
    events = _drive(_jobs.cluster_job(session, 3, cancel=cancel), cancel, _at("clustering"))
    _assert_cancelled(events)
    assert not [e for e in events if isinstance(e, _jobs.Clustered)]
    assert session.store().n_done == session.grid.n_tissue  # what was computed is kept


@pytest.mark.timeout(60)
def test_cancelled_clustering_leaves_no_cluster_overlay(planted_slide: Path, embedded: Path) -> None:
    session = _session(planted_slide, embedded)
    cancel = threading.Event()
    _drive(_jobs.cluster_job(session, 3, cancel=cancel), cancel, _at("clustering"))
    assert session.cluster_labels is None  # else the next batch redraws the cancelled clusters
    assert "clusters" not in session.absorb(np.array([0]), np.ones((1, 96), np.float32))


# --- a reader thread fails for real ------------------------------------------------------------------


def _new_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    # Compared as a set, not by threading.active_count(): a thread some earlier test left running
    # may end meanwhile. zarr's I/O loop and executor are daemon threads zarr starts and grows on
    # demand, not the pipeline's, so they are left out (as in test_inference.py).
    return [t for t in threading.enumerate() if t not in before and not t.name.startswith(("zarr_io", "asyncio_"))]


@pytest.mark.timeout(60)
def test_reader_thread_error_stops_the_pipeline_cleanly(planted_slide: Path, tmp_path: Path) -> None:
    path = tmp_path / "planted.tif"
    shutil.copy(planted_slide, path)
    encoder = _tiny()
    with Slide(path) as slide:
        grid = TileGrid(slide)
        store = open_store(slide, encoder, grid, cache_root=tmp_path / "cache")  # fingerprint read: still whole
        before = set(threading.enumerate())
        os.truncate(path, int(path.stat().st_size * 0.45))  # e.g. the network share dropped mid-run
        stored: list[int] = []
        with store, pytest.raises(SlideError, match="planted.tif: reading pixels failed") as info:
            for batch in iter_embed(slide, encoder, grid, store, batch_size=4, readers=2):
                stored.extend(batch.indices.tolist())
        failing = grid.tissue_indices[len(stored) : len(stored) + 4]
        assert stored == grid.tissue_indices[: len(stored)].tolist() and 0 < len(stored) < grid.n_tissue
        assert any(f"while reading tiles {failing.tolist()} of planted.tif" in n for n in info.value.__notes__)
        with pytest.raises(SlideError):
            grid.read_tiles(failing)  # the batch named really is unreadable
        assert not [t for t in threading.enumerate() if t.name.startswith("napari-virchow-reader")]
        assert _new_threads(before) == []  # the reader pool was joined: nothing leaked
        with open_store(slide, encoder, grid, cache_root=tmp_path / "cache", mode="r") as after:
            np.testing.assert_array_equal(after.read_done()[0], stored)  # batches before the failure


# --- two processes embed the same slide into the same cache -----------------------------------------------


def _embed_in_child(slide_path: str, cache_root: str, reverse: bool, start: Any) -> None:
    warnings.simplefilter("ignore")
    encoder = _tiny()
    with Slide(slide_path) as slide:
        grid = TileGrid(slide)
        order = grid.tissue_indices[::-1] if reverse else grid.tissue_indices
        start.wait(60)  # both ready: they open (create) the store and write at the same time
        for _ in iter_embed(slide, encoder, grid, indices=order, cache_root=cache_root, batch_size=4, threads=1):
            pass


@pytest.mark.timeout(120)
def test_two_processes_embed_the_same_slide(planted_slide: Path, tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(2)
    procs = [ctx.Process(target=_embed_in_child, args=(str(planted_slide), str(tmp_path), rev, start))
             for rev in (False, True)]  # fmt: skip
    for p in procs:
        p.start()
    for p in procs:
        p.join(100)
    assert [p.exitcode for p in procs] == [0, 0]
    encoder = _tiny()
    with Slide(planted_slide) as slide:
        grid = TileGrid(slide)
        assert len(list_stores(tmp_path)) == 1  # both found the same store (one created it)
        with open_store(slide, encoder, grid, cache_root=tmp_path, mode="r") as store:
            idx, rows = store.read_done()
        np.testing.assert_array_equal(idx, grid.tissue_indices)
        np.testing.assert_allclose(rows, encoder.embed(grid.read_tiles(idx)), **F16)
