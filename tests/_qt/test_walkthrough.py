"""A pathologist's first session on the sample, scripted with real Qt input at every step (Xvfb)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from qtpy.QtWidgets import QFileDialog

from napari_virchow._qt.viewport import camera
from tests._qt.conftest import LEFT, canvas_point, click_canvas, wait_exported, wait_idle

pytestmark = pytest.mark.timeout(300)


def _draw_rectangle(qtbot, w, layer, x0: float, y0: float, x1: float, y1: float) -> None:
    """Draw a rectangle on the canvas with the mouse, in napari's rectangle tool."""
    layer.mode = "add_rectangle"
    native, p0 = canvas_point(w.viewer, w.slide_layer(), x0, y0)
    _, p1 = canvas_point(w.viewer, w.slide_layer(), x1, y1)
    qtbot.mousePress(native, LEFT, pos=p0)
    for t in np.linspace(0.25, 1.0, 4):
        qtbot.mouseMove(native, pos=p0 + (p1 - p0) * float(t))
        qtbot.wait(10)
    qtbot.mouseRelease(native, LEFT, pos=p1)
    layer.mode = "pan_zoom"


@pytest.mark.drives("limit_spin", "compute_btn", "new_annotations_btn", "class_combo", "train_btn",
                    "threshold_slider", "pick_btn", "hit_list", "save_head_btn", "load_head_btn",
                    "export_geojson_btn")  # fmt: skip
def test_walkthrough_on_the_sample(qtbot, make_napari_viewer, ui, sample_pyramid: Path, tmp_path: Path,
                                   monkeypatch) -> None:
    from napari_virchow._qt.widget import VirchowWidget
    from napari_virchow._reader import METADATA_KEY, prefer_this_reader

    monkeypatch.setenv("NAPARI_VIRCHOW_CACHE", str(tmp_path / "cache"))
    viewer = make_napari_viewer(show=True)
    prefer_this_reader()
    viewer.window._qt_viewer._qt_open([str(sample_pyramid)], stack=False)  # File ▸ Open, no reader question
    [slide] = viewer.layers
    assert METADATA_KEY in slide.metadata
    w = VirchowWidget(viewer)
    viewer.window.add_dock_widget(w)
    u = ui(w)
    w.model.encoder_combo.setCurrentText("virchow2-tiny")
    w.model.random_check.setChecked(True)

    # 1. compute what is on screen
    viewer.reset_view()
    u.spin("limit_spin", 100000)
    u.choose("mag_combo", "20× (0.5 µm/px)")  # this test is about 20× tiles
    u.click("compute_btn")
    wait_idle(qtbot, w)
    session = w.session()
    assert session.store().n_done == session.grid.n_tissue
    assert "embedded · cmu_small_region_pyramid" in viewer.layers

    # 2. draw two classes with the mouse (epidermis and dermis of the sample, level-0 px)
    u.click("new_annotations_btn")
    layer = w.head.annotation_layer()
    u.type("class_combo", "Epidermis")
    _draw_rectangle(qtbot, w, layer, 900, 1700, 1500, 2300)
    u.type("class_combo", "Dermis")
    _draw_rectangle(qtbot, w, layer, 300, 2300, 900, 2900)
    assert list(layer.features["class"]) == ["Epidermis", "Dermis"]

    # 3. train: the head label and the heatmap
    u.click("train_btn")
    wait_idle(qtbot, w)
    assert "AUC" in w.head.head_label.text() and "probability · cmu_small_region_pyramid" in viewer.layers

    # 4. move the threshold
    u.slide_keys("threshold_slider", 40)
    assert w.head.threshold_label.text() == "0.40"

    # 5. query by a real click, jump to the best hit
    u.click("pick_btn")
    click_canvas(qtbot, w, 1230, 2000)
    qtbot.waitUntil(lambda: w.similar.hit_list.count() > 0, timeout=60_000)
    wait_idle(qtbot, w)
    u.click("pick_btn")
    u.click_item("hit_list", 0)
    hit = session.hits(w.similar.hits_spin.value())[0]
    centre = np.asarray(camera(viewer).center[-2:]) / float(slide.scale[-1])
    assert np.allclose(centre[::-1], (hit.x + session.grid.tile_size_l0 / 2, hit.y + session.grid.tile_size_l0 / 2),
                       atol=1)  # fmt: skip

    # 6. save and load the head
    head_file = tmp_path / "skin.safetensors"
    monkeypatch.setattr(QFileDialog, "getSaveFileName", staticmethod(lambda *a, **k: (str(head_file), "")))
    u.click("save_head_btn")
    session.set_head(None)
    monkeypatch.setattr(QFileDialog, "getOpenFileName", staticmethod(lambda *a, **k: (str(head_file), "")))
    u.click("load_head_btn")
    wait_idle(qtbot, w)
    assert session.head is not None and session.head.classes == ["Dermis", "Epidermis"]

    # 7. export the overlays for QuPath
    out = tmp_path / "sample.geojson"
    monkeypatch.setattr(QFileDialog, "getSaveFileName", staticmethod(lambda *a, **k: (str(out), "")))
    u.click("export_geojson_btn")
    wait_exported(qtbot, w)
    names = {f["properties"]["classification"]["name"] for f in json.loads(out.read_text())["features"]}
    assert "Similar" in names and names & {"Epidermis", "Dermis"}
