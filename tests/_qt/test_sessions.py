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
    w.viewer.layers.remove(w.slide_layer())
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
