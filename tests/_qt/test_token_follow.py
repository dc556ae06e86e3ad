"""Token resolution driven through Qt: Compute visible fills the compressed token store (at the k the
user picks, whose store label updates), and the token overlay follows pans and zooms (debounced)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_virchow._qt.viewport import camera
from napari_virchow.analysis.token_jobs import TokenMapReady
from napari_virchow.analysis.token_levels import token_store_path
from napari_virchow.analysis.token_store import TokenStore
from napari_virchow.analysis.token_views import token_heatmap
from tests._qt.conftest import compute_whole_slide, train_on_planted, wait_idle, zoom_to

pytestmark = pytest.mark.timeout(400)

TOKEN_LAYER = "token probability · planted"


@pytest.mark.drives("token_k_spin", "compressed_check", "compute_btn")
def test_compute_visible_fills_the_store_at_the_chosen_k(qtbot, planted_widget, ui) -> None:
    w, u = planted_widget, ui(planted_widget)
    u.spin("token_k_spin", 8)
    u.click("compressed_check")  # no head yet: nothing to draw, the store waits for tiles
    wait_idle(qtbot, w)
    seen: list[tuple[int, int, str]] = []  # the job bar after each event the widget handled
    bar = w.jobbar
    w.runner.event.connect(lambda *_: seen.append((bar.progress.value(), bar.progress.maximum(), bar.status.text())))
    compute_whole_slide(qtbot, w, u)  # Compute visible, compressed storage on
    session = w.session()
    path = token_store_path(session, 0.5, 8)
    assert path.exists() and not token_store_path(session, 0.5).exists()
    store = TokenStore.open(path)
    tissue = session.grid.tiles_in((0, 0, *session.slide.dimensions))
    assert len(tissue) and len(store.missing(tissue)) == 0  # every tissue tile embedded has its tokens
    label = u["token_store_label"].text()  # what the user reads: k, explained variance, KB/tile, tiles
    assert f"k = 8, explained variance {store.explained_variance:.3f}" in label
    assert f"{store.kb_per_tile:.1f} KB/tile" in label and f"{len(tissue):,} tiles stored" in label
    filling = [(v, m) for v, m, text in seen if text.startswith("compressed tokens stored with the embeddings")]
    assert not any(text.startswith("storing compressed tokens") for _, _, text in seen)  # no pass of their own
    # the tokens came with the pass that embedded the tiles: one line for them, after the embedding's own
    assert filling == [(len(tissue), len(tissue))]
    first = next(i for i, (_, _, text) in enumerate(seen) if text.startswith("compressed tokens stored"))
    embedding = [v for v, _, text in seen[:first] if text.startswith("embedding")]
    assert len(embedding) > 1 and embedding == sorted(embedding)  # the embedding's progress, batch by batch

    train_on_planted(qtbot, u, w, compute=False)  # (its Compute is a revisit: nothing embedded, nothing stored)
    u.choose("resolution_combo", "token")
    qtbot.waitUntil(lambda: w.tokens._raster is not None, timeout=120_000)
    wait_idle(qtbot, w)
    # the token map of those tiles is drawn from the store's k = 8 codes, not recomputed
    raster = w.tokens._raster
    idx = session.grid.tiles_in((0, 0, *session.slide.dimensions), tissue_only=False)[:64]
    held = idx[np.isin(idx, tissue)]
    one = held[:1]
    coded = token_heatmap(session.grid, session.encoder(), session.head, one, store=TokenStore.open(path))
    exact = token_heatmap(session.grid, session.encoder(), session.head, one)
    x, y = session.grid.coords[one[0]]
    r, c = int(y - raster.origin_l0[1]) // 224 * 16, int(x - raster.origin_l0[0]) // 224 * 16
    np.testing.assert_allclose(raster.data[r : r + 16, c : c + 16], coded.data, atol=1e-6)
    assert not np.allclose(coded.data, exact.data, atol=1e-6)

    # another k: its own store, and the label says what it holds
    u.spin("token_k_spin", 4)
    qtbot.waitUntil(lambda: "k = 4" in u["token_store_label"].text(), timeout=120_000)
    wait_idle(qtbot, w)
    four = TokenStore.open(token_store_path(session, 0.5, 4))
    label = u["token_store_label"].text()
    assert f"explained variance {four.explained_variance:.3f}" in label
    assert four.explained_variance < store.explained_variance
    assert f"{four.kb_per_tile:.1f} KB/tile" in label and four.kb_per_tile < store.kb_per_tile
    assert path.exists()  # the k = 8 tokens are kept


@pytest.mark.drives("resolution_combo")
def test_token_overlay_follows_the_view(qtbot, planted_widget, ui) -> None:
    w, u = planted_widget, ui(planted_widget)
    compute_whole_slide(qtbot, w, u)
    train_on_planted(qtbot, u, w, compute=False)
    maps: list[TokenMapReady] = []
    w.runner.event.connect(lambda _s, ev: maps.append(ev) if isinstance(ev, TokenMapReady) else None)
    u.choose("resolution_combo", "token")
    qtbot.waitUntil(lambda: TOKEN_LAYER in w.viewer.layers, timeout=120_000)
    wait_idle(qtbot, w)
    assert len(maps) == 1  # switching draws once (the watcher does not fire a second time)
    first = w.tokens._raster

    # a burst of camera moves ends on the lower-right planted copy: one redraw, once it is still
    for step in range(10):
        zoom_to(w, 1000 + 40 * step, 1000 + 40 * step, 700)
    qtbot.waitUntil(lambda: len(maps) == 2, timeout=120_000)
    wait_idle(qtbot, w)
    qtbot.wait(600)  # longer than the debounce: no late redraw follows
    assert len(maps) == 2
    session = w.session()
    box = w.compute.visible_box()
    view = session.grid.tiles_in(box, tissue_only=False)[:64]
    moved = w.tokens._raster
    assert moved is not first and moved.origin_l0 != first.origin_l0
    expected = token_heatmap(session.grid, session.encoder(), session.head, view[:1])
    x, y = session.grid.coords[view[0]]
    r, c = int(y - moved.origin_l0[1]) // 224 * 16, int(x - moved.origin_l0[0]) // 224 * 16
    np.testing.assert_allclose(w.viewer.layers[TOKEN_LAYER].data[r : r + 16, c : c + 16], expected.data, atol=1e-5)
    assert tuple(w.viewer.layers[TOKEN_LAYER].translate) == pytest.approx(moved.translate_um)

    # a pan within the same tiles is not redone; back at tile resolution the view is not followed
    layer = w.slide_layer()
    cy, cx = camera(w.viewer).center[-2:]
    camera(w.viewer).center = (cy + layer.scale[-2] * 0.5, cx)
    qtbot.wait(600)
    wait_idle(qtbot, w)
    assert len(maps) == 2
    u.choose("resolution_combo", "tile")
    zoom_to(w, 500, 500, 700)
    qtbot.wait(600)
    wait_idle(qtbot, w)
    assert TOKEN_LAYER not in w.viewer.layers and len(maps) == 2
