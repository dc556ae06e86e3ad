"""Level of detail in the viewer, driven through Qt: the view picks the magnification, zooming in
refines, a pinned magnification, the whole-slide overview. Planted TIFF, tiny random Virchow 2."""

from __future__ import annotations

import numpy as np
import pytest
from qtpy.QtCore import Qt

from napari_virchow import jobs as _jobs
from tests._qt.conftest import wait_idle, zoom_to

pytestmark = [pytest.mark.timeout(300), pytest.mark.filterwarnings("ignore:.*random weights:UserWarning")]


@pytest.mark.drives("compute_btn")
def test_the_view_picks_the_finest_level_that_fits_and_zooming_in_refines(qtbot, planted_widget, ui) -> None:
    w, u = planted_widget, ui(planted_widget)
    w.viewer.window._qt_window.resize(1280, 800)
    qtbot.wait(50)
    w.viewer.reset_view()
    u.click("compute_btn")  # "auto": no question, about one screen of tiles
    wait_idle(qtbot, w)
    s = w.session()
    whole = s.plan_view(w.compute.visible_box(), w.compute.canvas_px())
    assert whole.mpp > 0.5 and whole.fits and w.compute.view_mpp == whole.mpp
    assert len(whole.in_view) <= whole.budget
    assert s.done_at(whole.mpp)[whole.in_view].all()
    assert s.open_levels() == (whole.mpp,)  # nothing was computed at 20×
    assert f"{whole.mpp:g} µm/px" in u["level_label"].text() and not u["decision_label"].isVisible()
    assert u["level_label"].text().endswith(f"{len(whole.in_view):,} tissue tiles in view, all computed")
    coarse_done = s.done_at(whole.mpp).copy()
    zoom_to(w, 1376, 1376, 500)
    u.click("compute_btn")
    wait_idle(qtbot, w)
    zoomed = s.plan_view(w.compute.visible_box(), w.compute.canvas_px())
    assert zoomed.mpp == 0.5 and whole.mpp in zoomed.underneath
    assert s.done_at(0.5)[zoomed.in_view].all()
    assert np.array_equal(s.done_at(whole.mpp), coarse_done)  # the coarse level stays as it was, underneath
    u.click("compute_btn")  # seen before: nothing recomputed
    wait_idle(qtbot, w)
    assert isinstance(w.last_event, _jobs.Stage) and "all cached" in w.last_event.message


@pytest.mark.drives("mag_combo", "overview_btn", "mpp_spin")
def test_pinned_magnification_and_whole_slide_overview(qtbot, planted_widget, ui) -> None:
    w, u = planted_widget, ui(planted_widget)
    w.viewer.reset_view()
    u.click("overview_btn")
    wait_idle(qtbot, w)
    s = w.session()
    g5 = s.grid_at(2.0)
    assert s.done_at(2.0)[g5.tissue_indices].all() and s.open_levels() == (2.0,)
    assert w.compute.view_mpp == 2.0 and "overview 5×" in w.jobbar.status.text()
    u.choose("mag_combo", "10× (1 µm/px)")
    assert "pinned" in u["level_label"].text() and w.compute.pinned() == 1.0
    u.click("compute_btn")
    wait_idle(qtbot, w)
    g10 = s.grid_at(1.0)
    in_view = g10.tiles_in(w.compute.visible_box())
    assert len(in_view) and s.done_at(1.0)[in_view].all()  # pinned: every tile in view at 10×
    # a 0.5 µm/px scan cannot give 40× without upsampling: greyed out, with the reason, and the keys skip it
    combo = u["mag_combo"]
    forty = combo.findText("40× (0.25 µm/px)")
    assert not combo.model().item(forty).isEnabled()
    assert "scanned at 0.5 µm/px" in combo.model().item(forty).toolTip()
    assert all(combo.model().item(i).isEnabled() for i in range(combo.count()) if i != forty)
    combo.setFocus()
    qtbot.keyClick(combo, Qt.Key.Key_End)
    assert combo.currentText() == "20× (0.5 µm/px)" and 0.25 not in s.open_levels()
    u.spin("mpp_spin", 0.25)  # told it is a 40× scan: now it can
    qtbot.waitUntil(lambda: combo.model().item(forty).isEnabled(), timeout=10_000)
    u.choose("mag_combo", "40× (0.25 µm/px)")
    u.spin("mpp_spin", 0)  # back to the file's 0.5 µm/px: the pinned 40× goes back to auto
    qtbot.waitUntil(lambda: not combo.model().item(forty).isEnabled(), timeout=10_000)
    assert combo.currentText() == "auto"
    u.choose("mag_combo", "auto")
    assert w.compute.pinned() is None
