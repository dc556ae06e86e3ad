"""'Compute' and the job bar driven through Qt: compute, the in-place question, cancel, follow, tissue."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_virchow import jobs as _jobs
from tests._qt.conftest import cells, drawn_past_slide, wait_idle, zoom_to

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def widget(make_widget, sample_pyramid: Path):
    return make_widget(sample_pyramid)


@pytest.mark.drives("compute_btn")
def test_compute_visible_embeds_tiles_in_view_shows_them_and_revisit_is_free(qtbot, widget, ui) -> None:
    w, u = widget, ui(widget)
    zoom_to(w, 1100, 1500, 900)
    box = w.compute.visible_box()
    assert box is not None and box[2] - box[0] < 1200
    u.choose("mag_combo", "20× (0.5 µm/px)")  # this test is about 20× tiles
    u.click("compute_btn")
    assert u["cancel_btn"].isEnabled()  # Cancel is there while the job runs
    wait_idle(qtbot, w)
    session = w.session()
    in_view = session.tiles_in(box)
    assert len(in_view) > 0 and not len(session.missing(in_view))
    assert session.store().n_done == len(in_view)  # only what is on screen, nothing else
    # the user sees what was computed: outlines of the embedded tiles
    embedded = w.viewer.layers["embedded · cmu_small_region_pyramid"]
    assert embedded.visible and embedded.contour > 0 and embedded.data.max() == 1
    assert not w.jobbar.progress.isVisible() and not u["cancel_btn"].isEnabled()
    assert w.jobbar.status.text().startswith("done:")

    calls = []
    real = session.encoder().embed_tensor
    session.encoder().embed_tensor = lambda x: calls.append(len(x)) or real(x)
    u.click("compute_btn")
    wait_idle(qtbot, w)
    assert calls == []  # served from the store
    assert "cached" in w.jobbar.status.text()


@pytest.mark.drives("limit_spin", "compute_btn", "decision_skip_btn", "all_btn", "decision_compute_btn")
def test_too_many_tiles_is_asked_in_place_without_widening_the_dock(qtbot, widget, ui) -> None:
    w, u = widget, ui(widget)
    w.viewer.window._qt_window.resize(1280, 800)
    qtbot.wait(50)
    width = w.width()
    w.viewer.reset_view()
    u.spin("limit_spin", 5)
    u.choose("mag_combo", "20× (0.5 µm/px)")  # this test is about 20× tiles
    u.click("compute_btn")
    qtbot.waitUntil(lambda: u["decision_label"].isVisible(), timeout=60_000)
    wait_idle(qtbot, w)
    assert isinstance(w.last_event, _jobs.TooMany) and w.session().store().n_done == 0
    question = u["decision_label"].text()
    assert f"{w.last_event.n_todo:,} tiles" in question and "≈" in question
    assert not w.jobbar.progress.isVisible()  # no "1 / 1" while waiting for the answer
    qtbot.wait(50)
    assert w.width() == width and not w.scroll.horizontalScrollBar().isVisible()
    assert w.compute.compute_btn.text() == "Compute visible"  # no button relabelled
    u.click("decision_skip_btn")
    assert not u["decision_label"].isVisible() and w.session().store().n_done == 0
    u.click("all_btn")
    qtbot.waitUntil(lambda: u["decision_compute_btn"].isVisible(), timeout=60_000)
    wait_idle(qtbot, w)
    u.click("decision_compute_btn")
    wait_idle(qtbot, w)
    session = w.session()
    assert session.store().n_done == len(session.tiles_in(w.compute.visible_box()))
    assert not u["decision_label"].isVisible()


@pytest.mark.drives("batch_spin", "limit_spin", "compute_btn")
def test_the_question_s_eta_uses_the_speed_measured_here(qtbot, widget, ui) -> None:
    from napari_virchow._qt.panels.jobbar import duration

    w, u = widget, ui(widget)
    u.spin("batch_spin", 2)
    zoom_to(w, 1100, 1500, 900)
    u.choose("mag_combo", "20× (0.5 µm/px)")  # this test is about 20× tiles
    u.click("compute_btn")  # a few batches: the speed is measured
    wait_idle(qtbot, w)
    rate = w.rates.rate(w._rate_key(w.session()))
    assert rate is not None and rate > 0
    w.viewer.reset_view()
    u.spin("limit_spin", 5)
    u.click("compute_btn")
    qtbot.waitUntil(lambda: u["decision_label"].isVisible(), timeout=60_000)
    wait_idle(qtbot, w)
    question = u["decision_label"].text()
    assert f"≈ {duration(w.last_event.n_todo / rate)}, at the speed measured here" in question


@pytest.mark.drives("batch_spin", "limit_spin", "compute_btn", "cancel_btn")
def test_cancel_tells_the_truth_and_keeps_the_store_consistent(qtbot, planted_widget, ui) -> None:
    w, u = planted_widget, ui(planted_widget)
    w.viewer.reset_view()
    u.spin("limit_spin", 100000)
    u.spin("batch_spin", 2)  # many small batches: the cancel lands long before the end
    u.choose("mag_combo", "20× (0.5 µm/px)")  # this test is about 20× tiles
    u.click("compute_btn")
    qtbot.waitUntil(lambda: isinstance(w.last_event, _jobs.BatchDone), timeout=60_000)
    assert w.jobbar.progress.isVisible() and w.jobbar.progress.maximum() == w.last_event.n_total
    u.click("cancel_btn")
    wait_idle(qtbot, w)
    session = w.session()
    idx, emb = session.store().read_done()
    assert 0 < len(idx) < session.grid.n_tissue  # stopped early
    status = w.jobbar.status.text()
    assert status.startswith("cancelled after") and f"of {session.grid.n_tissue:,} tiles" in status
    assert f"{session.grid.n_tissue} / {session.grid.n_tissue}" not in w.jobbar.progress.text()
    # the view's read-out counted down with the batches and stopped where the cancel did
    left = session.grid.n_tissue - len(idx)
    assert u["level_label"].text().endswith(f"{session.grid.n_tissue:,} tissue tiles in view, {left:,} to compute")
    assert not w.jobbar.progress.isVisible() and not u["cancel_btn"].isEnabled()
    expected = session.encoder().embed(session.grid.read_tiles(idx[:4]))
    np.testing.assert_allclose(emb[:4], expected, rtol=0.02, atol=0.02)  # float16 rows, all complete


@pytest.mark.drives("follow_check")
def test_follow_view_computes_where_the_camera_goes(qtbot, widget, ui) -> None:
    w, u = widget, ui(widget)
    zoom_to(w, 1100, 1500, 700)
    u.choose("mag_combo", "20× (0.5 µm/px)")  # this test is about 20× tiles
    u.click("follow_check")
    qtbot.waitUntil(lambda: w.runner.busy or isinstance(w.last_event, _jobs.Stage), timeout=10_000)
    wait_idle(qtbot, w)
    session = w.session()
    first = session.store().n_done
    assert first > 0
    zoom_to(w, 1100, 500, 700)  # pan elsewhere
    qtbot.waitUntil(lambda: session.store().n_done > first, timeout=60_000)
    wait_idle(qtbot, w)
    u.click("follow_check")
    assert not w._watcher.enabled


@pytest.mark.drives("tissue_check")
def test_tissue_mask_is_shown_and_hidden(qtbot, widget, ui) -> None:
    w, u = widget, ui(widget)
    u.click("tissue_check")  # the mask is found in a worker, then drawn
    qtbot.waitUntil(lambda: "tissue · cmu_small_region_pyramid" in w.viewer.layers, timeout=30_000)
    wait_idle(qtbot, w)
    layer = w.viewer.layers["tissue · cmu_small_region_pyramid"]
    grid = w.session().grid
    tile_um = grid.tile_size_l0 * grid.slide.require_mpp()
    assert layer.visible and int(cells(layer, tile_um).sum()) == grid.n_tissue
    # the sample's bottom row of tiles is 21 µm tall: its mask ends at the slide's edge
    assert drawn_past_slide(layer, w.viewer.layers["cmu_small_region_pyramid"]) == 0
    assert np.asarray(layer.data).shape[0] > grid.grid_shape[0]  # the edge row was split to end there
    assert "tiles are tissue" in w.jobbar.status.text()
    assert w.compute.tissue_value.text() == f"{grid.tissue_threshold:.2f}"
    u.click("tissue_check")
    assert not layer.visible


@pytest.mark.drives("tissue_check", "tissue_slider")
def test_tissue_threshold_slider_release_refilters_the_mask(qtbot, widget, ui) -> None:
    w, u = widget, ui(widget)
    u.click("tissue_check")
    qtbot.waitUntil(lambda: "tissue · cmu_small_region_pyramid" in w.viewer.layers, timeout=30_000)
    wait_idle(qtbot, w)
    before = w.session().grid.n_tissue
    u.drag_slider("tissue_slider", 50)  # a higher saturation threshold: fewer tissue tiles (42 of 69)
    grid = w.session().grid
    assert grid.tissue_threshold == pytest.approx(0.5) and 0 < grid.n_tissue < before
    assert w.compute.tissue_value.text() == "0.50"
    mask = w.viewer.layers["tissue · cmu_small_region_pyramid"]
    assert int(cells(mask, grid.tile_size_l0 * grid.slide.require_mpp()).sum()) == grid.n_tissue
