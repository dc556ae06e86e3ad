"""Token resolution driven through Qt: a 7-µm token heatmap over the tiles in view (exact and
CLS-attributed), compressed token storage, token clusters and token similarity."""

from __future__ import annotations

import numpy as np
import pytest

from napari_virchow.analysis.token_jobs import TOKEN_VIEW_TILES
from napari_virchow.analysis.token_levels import token_store_path
from napari_virchow.analysis.token_views import token_heatmap
from tests._qt.conftest import cells, click_canvas, compute_whole_slide, drawn_past_slide, train_on_planted, wait_idle
from tests.conftest import PLANTED_PATTERNS

pytestmark = pytest.mark.timeout(300)

TOKEN_LAYER = "token probability · planted"


def _planted_cells(raster) -> np.ndarray:
    """Cells of ``raster`` wholly inside a planted block."""
    c, (ox, oy) = raster.tile_size_l0, raster.origin_l0
    rows, cols = raster.data.shape
    y0, x0 = oy + np.arange(rows) * c, ox + np.arange(cols) * c
    inside = np.zeros((rows, cols), bool)
    for region in PLANTED_PATTERNS:
        bx0, by0, bx1, by1 = region.box
        inside |= ((y0[:, None] >= by0) & (y0[:, None] + c <= by1)) & ((x0[None] >= bx0) & (x0[None] + c <= bx1))
    return inside


@pytest.mark.drives("resolution_combo", "compressed_check")
def test_token_resolution_draws_a_finer_aligned_overlay(qtbot, planted_widget, ui) -> None:
    w, u = planted_widget, ui(planted_widget)
    train_on_planted(qtbot, u, w)
    session = w.session()
    tile_layer = w.viewer.layers["probability · planted"]

    u.choose("resolution_combo", "token")
    qtbot.waitUntil(lambda: TOKEN_LAYER in w.viewer.layers, timeout=120_000)
    wait_idle(qtbot, w)
    tok = w.viewer.layers[TOKEN_LAYER]
    # 16 × finer than the tile heatmap, same colormap and contrast limits
    tile_um = session.grid.tile_size_l0 * 0.5
    assert tuple(tok.scale) in (pytest.approx((tile_um / 16,) * 2), pytest.approx((tile_um / 16 / 7,) * 2))
    assert tok.colormap.name == tile_layer.colormap.name and tuple(tok.contrast_limits) == (0, 1)
    # what it shows is token_heatmap of the tiles in view (first ones centre-out), in place
    raster = w.tokens._raster
    assert raster is not None and tuple(tok.translate) == pytest.approx(raster.translate_um)
    idx = session.grid.tiles_in((0, 0, *session.slide.dimensions), tissue_only=False)[:1]
    expected = token_heatmap(session.grid, session.encoder(), session.head, idx)
    x, y = session.grid.coords[idx[0]]
    t, (ox, oy) = session.grid.tile_size_l0, raster.origin_l0
    r, c = int(y - oy) // t * 16, int(x - ox) // t * 16
    np.testing.assert_allclose(cells(tok, tile_um / 16)[r : r + 16, c : c + 16], expected.data, atol=1e-5)
    assert drawn_past_slide(tok, w.viewer.layers["planted"]) == 0
    inside = _planted_cells(raster)
    assert inside.any() and raster.data[inside].mean() > 0.5 > raster.data[~inside & np.isfinite(raster.data)].mean()

    u.slide_keys("threshold_slider", 50)  # the same threshold hides low tokens too
    shown = cells(w.viewer.layers[TOKEN_LAYER], tile_um / 16)
    assert np.all(np.isnan(shown[np.nan_to_num(raster.data, nan=0) < 0.5]))
    u.slide_keys("threshold_slider", 0)

    u.choose("resolution_combo", "token (CLS attributed)")  # the second view: redrawn, same tile means
    qtbot.waitUntil(lambda: w.tokens._raster is not raster and w.tokens._raster is not None, timeout=120_000)
    wait_idle(qtbot, w)
    moved = w.tokens._raster.data
    moved = w.tokens._raster.data
    assert moved.shape == raster.data.shape and w.viewer.layers[TOKEN_LAYER].visible

    def tile_logits(p: np.ndarray) -> np.ndarray:
        z = np.log(np.clip(p, 1e-6, 1 - 1e-6) / (1 - np.clip(p, 1e-6, 1 - 1e-6)))
        return z.reshape(p.shape[0] // 16, 16, p.shape[1] // 16, 16).mean(axis=(1, 3))

    both = np.isfinite(moved) & np.isfinite(raster.data)
    blocks = both.reshape(both.shape[0] // 16, 16, both.shape[1] // 16, 16).all(axis=(1, 3))
    np.testing.assert_allclose(tile_logits(moved)[blocks], tile_logits(raster.data)[blocks], atol=2e-2)

    # compressed storage: the store is written for the tiles in view, its k and explained variance shown
    assert not token_store_path(session).exists()
    u.click("compressed_check")
    qtbot.waitUntil(lambda: "explained variance" in w.tokens.store_label.text(), timeout=120_000)
    wait_idle(qtbot, w)
    assert token_store_path(session).exists()
    label = w.tokens.store_label.text()
    assert "k = 48" in label and f"{TOKEN_VIEW_TILES} tiles stored" in label

    u.choose("resolution_combo", "tile")
    wait_idle(qtbot, w)
    u.click("compressed_check")  # off: tile resolution, nothing token-level left on the canvas
    assert TOKEN_LAYER not in w.viewer.layers and "probability · planted" in w.viewer.layers
    assert "recomputed" in w.tokens.store_label.text()


@pytest.mark.drives("token_clusters_check")
def test_token_clusters_overlay_finds_the_planted_texture(qtbot, planted_widget, ui) -> None:
    w, u = planted_widget, ui(planted_widget)
    compute_whole_slide(qtbot, w, u)
    u.spin("k_spin", 3)
    u.click("token_clusters_check")
    qtbot.waitUntil(lambda: "token clusters · planted" in w.viewer.layers, timeout=120_000)
    wait_idle(qtbot, w)
    layer = w.viewer.layers["token clusters · planted"]
    tiles = w.viewer.layers["planted"]
    assert tuple(layer.scale) == pytest.approx(tuple(np.asarray(tiles.scale) * 14))  # 14-px token cells
    data = np.asarray(layer.data)
    assert set(np.unique(data)) <= {0, 1, 2, 3} and len(set(np.unique(data)) - {0}) == 3
    # the planted tokens fall (almost all) in one cluster that tissue tokens seldom join
    from napari_virchow.analysis.rasters import Raster

    c = 14.0
    oy, ox = (np.asarray(layer.translate) / 0.5 - (c - 1) / 2).round().astype(int)
    inside = _planted_cells(Raster(data, 7.0, tuple(layer.translate), (int(ox), int(oy)), c, 0.5))
    label = np.bincount(data[inside]).argmax()
    assert (data[inside] == label).mean() > 0.8 and (data[~inside & (data > 0)] == label).mean() < 0.2
    assert "tokens" in w.clusters.legend.text()
    u.click("token_clusters_check")
    assert "token clusters · planted" not in w.viewer.layers


@pytest.mark.drives("token_sim_check")
def test_token_similarity_of_a_click_lights_the_planted_texture(qtbot, planted_widget, ui) -> None:
    w, u = planted_widget, ui(planted_widget)
    compute_whole_slide(qtbot, w, u)
    u.click("token_sim_check")
    u.click("pick_btn")
    click_canvas(qtbot, w, 600, 600)  # inside the first planted copy
    qtbot.waitUntil(lambda: "token similarity · planted" in w.viewer.layers, timeout=120_000)
    wait_idle(qtbot, w)
    assert w.similar.hit_list.count() > 0  # the tile query ran too
    layer = w.viewer.layers["token similarity · planted"]
    data = np.asarray(layer.data)
    from napari_virchow.analysis.rasters import Raster

    c = 14.0
    oy, ox = (np.asarray(layer.translate) / 0.5 - (c - 1) / 2).round().astype(int)
    inside = _planted_cells(Raster(data, 7.0, tuple(layer.translate), (int(ox), int(oy)), c, 0.5))
    seen = np.isfinite(data)
    assert inside.any() and data[inside].mean() > data[~inside & seen].mean() + 0.1
