"""The view's compute job with token work on (Qt-free): Compute visible fills the compressed token
store (progress per batch, cancel keeps what is computed), and a later token map of those tiles is
drawn from the store's codes; each k has its own store."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from napari_virchow import jobs as _jobs
from napari_virchow.analysis.heads import fit_head
from napari_virchow.analysis.token_jobs import TokenMapReady, TokensStored, view_tokens_job
from napari_virchow.analysis.token_levels import token_map, token_store_path
from napari_virchow.analysis.token_store import TokenStore
from napari_virchow.analysis.token_views import token_heatmap
from napari_virchow.config import SessionConfig
from napari_virchow.session import SlideSession
from napari_virchow.slides.synthetic import write_planted_blocks

pytestmark = pytest.mark.filterwarnings("ignore:.*random weights:UserWarning")

SIZE = 1344  # 6 × 6 tiles of 224 px at 0.5 µm/px
BOX = (301, 287, 1009, 1051)
VIEW = (0.0, 0.0, float(SIZE), float(SIZE))


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_planted_blocks(tmp_path_factory.mktemp("slides") / "block.tif", SIZE, [BOX], "solid", levels=2)


def _session(path: Path, cache: Path) -> SlideSession:
    return SlideSession(path, SessionConfig(encoder="virchow2-tiny", weights="random", device="cpu", dtype="fp32",
                                            batch_size=8, cache_root=cache))  # fmt: skip


def _run(s: SlideSession, cancel: threading.Event | None = None, stop_after: int | None = None, **kw) -> list:
    events = []
    for ev in view_tokens_job(s, VIEW, (1920, 1080), pinned=0.5, limit=10_000, cancel=cancel, **kw):
        events.append(ev)
        if stop_after is not None and isinstance(ev, TokensStored) and ev.n_done >= stop_after:
            cancel.set()
    return events


def test_compute_visible_fills_the_compressed_store_and_the_map_reads_it(slide: Path, tmp_path: Path) -> None:
    with _session(slide, tmp_path) as s:
        events = _run(s, compressed=True, k=8)
        assert any(isinstance(e, _jobs.BatchDone) for e in events)  # the view was embedded first
        stored = [e for e in events if isinstance(e, TokensStored)]
        tiles = s.grid.tiles_in(VIEW)
        assert [e.n_done for e in stored] == sorted({min(n, len(tiles)) for n in range(8, len(tiles) + 8, 8)})
        assert stored[-1].n_total == len(tiles) and stored[-1].store is not None
        assert stored[-1].store.k == 8 and stored[-1].store.n_stored == len(tiles)
        path = token_store_path(s, 0.5, 8)
        assert path.exists() and not token_store_path(s, 0.5).exists()  # k = 8 has its own store
        store = TokenStore.open(path)
        assert len(store.missing(tiles)) == 0 and store.k == 8 and 0 < store.explained_variance < 1
        assert stored[-1].store.explained_variance == store.explained_variance

        # a token map of those tiles now comes from the codes (lossy at k = 8), not a forward pass
        idx, emb = s.embedded()
        inside = np.isin(idx, s.grid.tiles_in(BOX))
        head = fit_head(emb, inside.astype(int), ["tissue", "tumour"], encoder="virchow2-tiny", positive_class="tumour")
        via = token_map(s, head, tiles, store=TokenStore.open(path, mode="r+"))
        from_codes = token_heatmap(s.grid, s.encoder(), head, tiles, store=store)
        exact = token_map(s, head, tiles)
        np.testing.assert_array_equal(via.data, from_codes.data)
        assert not np.array_equal(via.data, exact.data) and np.nanmean(np.abs(via.data - exact.data)) < 0.05

        # seen before: nothing to embed, nothing to store; with a head the token map is drawn
        s.head = head
        again = _run(s, compressed=True, k=8, token_map=True)
        assert not any(isinstance(e, (_jobs.BatchDone, TokensStored)) for e in again)
        drawn = [e for e in again if isinstance(e, TokenMapReady)]
        assert len(drawn) == 1 and drawn[0].store is not None and drawn[0].store.k == 8


def test_cancel_while_filling_keeps_every_token_computed(slide: Path, tmp_path: Path) -> None:
    with _session(slide, tmp_path) as s:
        cancel = threading.Event()
        events = _run(s, cancel=cancel, stop_after=8, compressed=True, k=8)
        assert isinstance(events[-1], _jobs.Stage) and events[-1].message.startswith("cancelled")
        stored = [e for e in events if isinstance(e, TokensStored)]
        assert stored[-1].n_done == 8 and stored[-1].store is None  # the PCA sample was still being gathered
        store = TokenStore.open(token_store_path(s, 0.5, 8))  # written on cancel, PCA on those 8 tiles
        assert int(store.done().sum()) == 8 and store.attrs["pca_sample_tokens"] == 8 * 256
        assert not any(isinstance(e, TokenMapReady) for e in events)


def test_without_token_work_nothing_is_stored(slide: Path, tmp_path: Path) -> None:
    with _session(slide, tmp_path) as s:
        events = _run(s)
        assert not any(isinstance(e, (TokensStored, TokenMapReady)) for e in events)
        assert not token_store_path(s, 0.5).parent.exists()
