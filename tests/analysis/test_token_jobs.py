"""The view's compute job with token work on (Qt-free): Compute visible fills the compressed token
store from the forward pass that embeds the view (tiles embedded before get a pass of their own,
with progress per batch; cancel keeps what is computed), and a later token map of those tiles is
drawn from the store's codes; each k has its own store."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_virchow import jobs as _jobs
from napari_virchow.analysis.heads import fit_head
from napari_virchow.analysis.token_jobs import TokenMapReady, TokensStored, view_tokens_job
from napari_virchow.analysis.token_levels import token_map, token_store_path
from napari_virchow.analysis.token_store import TokenStore
from napari_virchow.analysis.token_views import token_heatmap
from napari_virchow.config import SessionConfig
from napari_virchow.models.encoder import Encoder
from napari_virchow.models.tokens import encode_tokens
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


def _run(s: SlideSession, cancel: threading.Event | None = None, stop_after: int | None = None,
         stop_on: type = TokensStored, **kw) -> list:  # fmt: skip
    events = []
    for ev in view_tokens_job(s, VIEW, (1920, 1080), pinned=0.5, limit=10_000, cancel=cancel, **kw):
        events.append(ev)
        if stop_after is not None and isinstance(ev, stop_on) and ev.n_done >= stop_after:
            cancel.set()
    return events


@pytest.fixture
def forward_tiles(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Tiles through the encoder's forward pass, per call (the real pass, counted)."""
    seen: list[int] = []
    real = Encoder.forward_features

    def counting(self: Encoder, x: torch.Tensor) -> torch.Tensor:
        seen.append(len(x))
        return real(self, x)

    monkeypatch.setattr(Encoder, "forward_features", counting)
    return seen


def test_compute_visible_stores_the_tokens_of_the_pass_that_embeds(slide: Path, tmp_path: Path,
                                                                     forward_tiles: list[int]) -> None:  # fmt: skip
    with _session(slide, tmp_path) as s:
        events = _run(s, compressed=True, k=8)
        tiles = s.grid.tiles_in(VIEW)
        embedded = [e for e in events if isinstance(e, _jobs.BatchDone)]
        assert sum(len(e.indices) for e in embedded) == len(tiles)  # the view was embedded ...
        assert sum(forward_tiles) == len(tiles)  # ... and its tokens kept from that one pass
        stored = [e for e in events if isinstance(e, TokensStored)]
        assert len(stored) == 1 and stored[0].n_done == stored[0].n_total == len(tiles) and stored[0].with_embeddings
        assert stored[0].store is not None and stored[0].store.k == 8 and stored[0].store.n_stored == len(tiles)
        path = token_store_path(s, 0.5, 8)
        assert path.exists() and not token_store_path(s, 0.5).exists()  # k = 8 has its own store
        store = TokenStore.open(path)
        assert len(store.missing(tiles)) == 0 and store.k == 8 and 0 < store.explained_variance < 1
        assert stored[0].store.explained_variance == store.explained_variance
        # each tile's row holds its own tokens: its CLS is the one a fresh pass over it gives
        forward_tiles.clear()
        want_cls, _ = encode_tokens(s.encoder(), s.grid.read_tiles(tiles))
        got_cls, _ = store.read(tiles)
        np.testing.assert_allclose(got_cls, want_cls, rtol=1e-2, atol=1e-2 * float(np.abs(want_cls).max()))

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


def test_tiles_embedded_before_get_a_token_pass_per_batch(slide: Path, tmp_path: Path,
                                                          forward_tiles: list[int]) -> None:  # fmt: skip
    with _session(slide, tmp_path) as s:
        _run(s)  # embedded without token work
        tiles = s.grid.tiles_in(VIEW)
        forward_tiles.clear()
        events = _run(s, compressed=True, k=8)
        assert not any(isinstance(e, _jobs.BatchDone) for e in events) and sum(forward_tiles) == len(tiles)
        stored = [e for e in events if isinstance(e, TokensStored)]
        assert [e.n_done for e in stored] == sorted({min(n, len(tiles)) for n in range(8, len(tiles) + 8, 8)})
        assert stored[-1].n_total == len(tiles) and stored[-1].store is not None
        assert not any(e.with_embeddings for e in stored)  # a pass of their own
        assert len(TokenStore.open(token_store_path(s, 0.5, 8)).missing(tiles)) == 0


def test_cancel_while_filling_keeps_every_token_computed(slide: Path, tmp_path: Path) -> None:
    with _session(slide, tmp_path) as s:
        _run(s)  # embedded before: the tokens take a pass of their own
        cancel = threading.Event()
        events = _run(s, cancel=cancel, stop_after=8, compressed=True, k=8)
        assert isinstance(events[-1], _jobs.Stage) and events[-1].message.startswith("cancelled")
        stored = [e for e in events if isinstance(e, TokensStored)]
        assert stored[-1].n_done == 8 and stored[-1].store is None  # the PCA sample was still being gathered
        store = TokenStore.open(token_store_path(s, 0.5, 8))  # written on cancel, PCA on those 8 tiles
        assert int(store.done().sum()) == 8 and store.attrs["pca_sample_tokens"] == 8 * 256
        assert not any(isinstance(e, TokenMapReady) for e in events)


def test_cancel_while_embedding_keeps_the_tokens_of_every_batch_embedded(slide: Path, tmp_path: Path) -> None:
    with _session(slide, tmp_path) as s:
        cancel = threading.Event()
        events = _run(s, cancel=cancel, stop_after=8, stop_on=_jobs.BatchDone, compressed=True, k=8)
        assert isinstance(events[-1], _jobs.Stage) and events[-1].message.startswith("cancelled")
        done = [int(i) for e in events if isinstance(e, _jobs.BatchDone) for i in e.indices]
        assert len(done) == 8 and not any(isinstance(e, TokensStored) for e in events)
        store = TokenStore.open(token_store_path(s, 0.5, 8))  # the embedded batch's tokens, PCA on them
        assert sorted(np.flatnonzero(store.done())) == sorted(done) and store.attrs["pca_sample_tokens"] == 8 * 256


def test_without_token_work_nothing_is_stored(slide: Path, tmp_path: Path) -> None:
    with _session(slide, tmp_path) as s:
        events = _run(s)
        assert not any(isinstance(e, (TokensStored, TokenMapReady)) for e in events)
        assert not token_store_path(s, 0.5).parent.exists()
