"""One open Slide per file, shared by the layer and the widget; closed with the layer or the viewer."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest

from napari_virchow._reader import layer_slide
from napari_virchow.errors import SlideError
from napari_virchow.slides.slide import Slide
from tests._qt.conftest import wait_idle

pytestmark = pytest.mark.timeout(300)


def _open_slides(path: Path) -> list[Slide]:
    gc.collect()
    return [o for o in gc.get_objects() if type(o) is Slide and o.path == path and not o._closed]


@pytest.mark.drives("compute_btn")
def test_layer_and_widget_share_one_slide(qtbot, make_widget, ui, planted_slide: Path) -> None:
    w = make_widget(planted_slide)
    u = ui(w)
    w.viewer.reset_view()
    u.choose("mag_combo", "20× (0.5 µm/px)")  # this test is about 20× tiles
    u.click("compute_btn")
    wait_idle(qtbot, w)
    layer = w.slide_layer()
    assert w.session().slide is layer_slide(layer.metadata)
    assert len(_open_slides(planted_slide)) == 1


def test_removing_the_layer_closes_session_store_and_slide(qtbot, make_widget, planted_slide: Path) -> None:
    w = make_widget(planted_slide)
    w.viewer.reset_view()
    w.compute.compute_visible()
    wait_idle(qtbot, w)
    session = w.session()
    store, slide = session.store(), session.slide
    assert "embedded · planted" in w.viewer.layers
    w.viewer.layers.remove(w.slide_layer())
    assert _overlays_of(w.viewer, "planted") == []  # the outlines went with their slide
    assert w.jobbar.status.text() == "planted closed with its 1 overlay"
    # A job still running (e.g. the outlines of what was embedded) defers the close until it ends.
    qtbot.waitUntil(lambda: not _open_slides(planted_slide), timeout=30_000)
    with pytest.raises(SlideError, match="closed"):
        slide.read_region((0, 0), 0, (8, 8))
    assert store._lock_fh is None  # the store's locks are released


def test_closing_the_viewer_closes_the_slide(qtbot, make_widget, planted_slide: Path) -> None:
    w = make_widget(planted_slide)
    slide = w.session().slide
    w.viewer.close()
    with pytest.raises(SlideError, match="closed"):
        slide.read_region((0, 0), 0, (8, 8))


def _overlays_of(viewer, name: str) -> list[str]:
    return sorted(lyr.name for lyr in viewer.layers if lyr.name.endswith(f" · {name}"))


@pytest.mark.drives("slide_combo", "batch_spin", "mag_combo", "compute_btn")
def test_a_job_draws_over_its_own_slide_when_another_is_chosen(qtbot, make_widget, ui, planted_slide: Path,
                                                               sample_pyramid: Path) -> None:  # fmt: skip
    from napari_virchow import jobs as _jobs

    w = make_widget(planted_slide)
    u = ui(w)
    w.viewer.open(str(sample_pyramid), plugin="napari-virchow")
    u.choose("slide_combo", "planted")
    w.viewer.reset_view()
    u.spin("limit_spin", 100000)
    u.spin("batch_spin", 2)  # many small batches: the slide is switched long before the end
    u.choose("mag_combo", "20× (0.5 µm/px)")
    u.click("compute_btn")
    qtbot.waitUntil(lambda: isinstance(w.last_event, _jobs.BatchDone), timeout=60_000)
    u.choose("slide_combo", "cmu_small_region_pyramid")  # the user looks at the other slide meanwhile
    wait_idle(qtbot, w)
    planted = w.sessions.get(w.viewer.layers["planted"], w.config(), None)  # the job's session
    assert planted.store().n_done == planted.grid.n_tissue  # the job ran to its end, on its slide
    assert _overlays_of(w.viewer, "planted") == ["embedded · planted"]
    assert _overlays_of(w.viewer, "cmu_small_region_pyramid") == []  # nothing of planted's drawn on it


@pytest.mark.drives("new_annotations_btn", "batch_spin", "mag_combo", "compute_btn")
def test_removing_a_slide_mid_job_stops_it_and_takes_its_overlays(qtbot, make_widget, ui, planted_slide: Path,
                                                                  sample_pyramid: Path) -> None:  # fmt: skip
    from napari_virchow import jobs as _jobs

    w = make_widget(planted_slide)
    u = ui(w)
    w.viewer.reset_view()
    u.click("new_annotations_btn")  # the user's work: kept when the slide goes
    u.spin("limit_spin", 100000)
    u.spin("batch_spin", 2)
    u.choose("mag_combo", "20× (0.5 µm/px)")
    u.click("compute_btn")
    qtbot.waitUntil(lambda: isinstance(w.last_event, _jobs.BatchDone), timeout=60_000)
    w.viewer.layers.remove("planted")
    wait_idle(qtbot, w)
    assert w.jobbar.status.text().startswith("cancelled after")  # stopped: its slide is gone
    assert _overlays_of(w.viewer, "planted") == ["annotations · planted"]
    # with overlays of a removed image left, napari 0.9 crashed drawing the next slide (Mesa, Xvfb)
    w.viewer.open(str(sample_pyramid), plugin="napari-virchow")
    u.choose("slide_combo", "cmu_small_region_pyramid")
    u.click("compute_btn")
    wait_idle(qtbot, w)
    qtbot.wait(200)  # drawn
    assert "embedded · cmu_small_region_pyramid" in w.viewer.layers
