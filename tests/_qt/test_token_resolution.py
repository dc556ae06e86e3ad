"""'tile / token resolution' driven through Qt: a 7-µm token heatmap over the tiles in view."""

from __future__ import annotations

import numpy as np
import pytest

from napari_virchow.analysis.token_views import token_heatmap
from tests._qt.conftest import compute_whole_slide, square, wait_idle

pytestmark = pytest.mark.timeout(300)


@pytest.mark.drives("resolution_combo")
def test_token_resolution_draws_a_finer_aligned_overlay(qtbot, planted_widget, ui) -> None:
    w, u = planted_widget, ui(planted_widget)
    compute_whole_slide(qtbot, w, u)
    u.click("new_annotations_btn")
    layer = w.head.annotation_layer()
    u.type("class_combo", "tumour")
    layer.add_polygons([square(448, 448, 896, 896)])
    u.type("class_combo", "normal")
    layer.add_polygons([square(300, 1100, 1000, 1700)])
    u.click("train_btn")
    wait_idle(qtbot, w)
    session = w.session()
    tile_layer = w.viewer.layers["probability · planted"]

    u.choose("resolution_combo", "token")
    qtbot.waitUntil(lambda: "token probability · planted" in w.viewer.layers, timeout=120_000)
    wait_idle(qtbot, w)
    tok = w.viewer.layers["token probability · planted"]
    # 16 × finer than the tile heatmap, same colormap and contrast limits
    assert tuple(tok.scale) == pytest.approx(tuple(np.asarray(tile_layer.scale) / 16))
    assert tok.colormap.name == tile_layer.colormap.name and tuple(tok.contrast_limits) == (0, 1)
    # what it shows is token_heatmap of the tiles in view (first ones centre-out), in place
    raster = w.head._token_raster
    assert raster is not None and tuple(tok.translate) == pytest.approx(raster.translate_um)
    idx = session.grid.tiles_in((0, 0, *session.slide.dimensions))[:1]
    expected = token_heatmap(session.grid, session.encoder(), session.head, idx)
    x, y = session.grid.coords[idx[0]]
    t, (ox, oy) = session.grid.tile_size_l0, raster.origin_l0
    r, c = int(y - oy) // t * 16, int(x - ox) // t * 16
    np.testing.assert_allclose(tok.data[r : r + 16, c : c + 16], expected.data, atol=1e-5)

    u.slide_keys("threshold_slider", 50)  # the same threshold hides low tokens too
    shown = w.viewer.layers["token probability · planted"].data
    assert np.all(np.isnan(shown[np.nan_to_num(raster.data, nan=0) < 0.5]))

    u.choose("resolution_combo", "tile")
    assert "token probability · planted" not in w.viewer.layers
    assert "probability · planted" in w.viewer.layers
