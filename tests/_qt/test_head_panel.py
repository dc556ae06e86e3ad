"""'Cancer probability' driven through Qt: annotate, train, threshold, smooth, save and load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from napari_virchow._qt.panels.head import class_color, rgb
from tests._qt.conftest import (
    annotate_planted,
    cells,
    click_canvas,
    compute_whole_slide,
    dialogs,
    drawn_past_slide,
    planted_truth,
    square,
    wait_idle,
)

pytestmark = pytest.mark.timeout(300)


@pytest.mark.drives("new_annotations_btn", "class_combo", "train_btn", "threshold_slider", "smooth_check",
                     "pick_btn")
def test_probe_from_annotations_shows_auc_and_finds_the_other_copy(qtbot, planted_widget, ui) -> None:
    from sklearn.metrics import roc_auc_score

    w, u = planted_widget, ui(planted_widget)
    compute_whole_slide(qtbot, w, u)
    annotate_planted(u, w)
    u.click("train_btn")
    wait_idle(qtbot, w)
    session = w.session()
    label = w.head.head_label.text()
    assert session.head is not None and "cross-validated accuracy" in label
    assert f"AUC {session.head.metrics['cv_roc_auc']:.2f}" in label  # the probe's cross-validated AUC
    assert "fewer than 10 tiles of tumour" in label  # 4 tiles: the figures are not to be trusted
    assert not w.jobbar.status.text().startswith("fitting")  # no stale stage line
    heat = w.viewer.layers["probability · planted"]
    tile_um = session.grid.tile_size_l0 * 0.5
    # one cell per tile; the last column and row (32 px of the slide) split 7× to end at its edge
    assert tuple(heat.scale) == pytest.approx((tile_um / 7,) * 2)
    assert drawn_past_slide(heat, w.viewer.layers["planted"]) == 0
    # transparent at 0, opaque at 1: low probabilities do not darken the tissue
    assert heat.colormap.map(np.array([0.0]))[0, 3] == 0 and heat.colormap.map(np.array([1.0]))[0, 3] == 1
    assert heat.colorbar.visible
    done = session.store().done & session.grid.tissue
    auc = roc_auc_score(planted_truth(session)[done], session.probability[done])
    assert auc >= 0.9, auc  # the second, never annotated copy is found too
    rows, cols = session.grid.grid_shape
    np.testing.assert_allclose(cells(heat, tile_um)[:rows, :cols].ravel()[done], session.probability[done], rtol=1e-6)

    u.slide_keys("threshold_slider", 50)
    assert w.head.threshold_label.text() == "0.50"
    shown = cells(heat, tile_um)[:rows, :cols].ravel()
    assert np.all(np.isnan(shown[session.probability < 0.5]))
    assert np.all(np.isfinite(shown[done & (session.probability >= 0.5)]))
    u.click("smooth_check")
    heat = w.viewer.layers["probability · planted"]
    assert heat.data.shape[0] > rows  # upsampled, smoothed
    assert drawn_past_slide(heat, w.viewer.layers["planted"]) == 0
    assert w.viewer.canvas.overlays.text.text == "colour bar: P(tumour)"

    # a similarity overlay on top: its bar (and title) is the one shown
    u.click("pick_btn")
    click_canvas(qtbot, w, 600, 600)
    qtbot.waitUntil(lambda: "similarity · planted" in w.viewer.layers, timeout=60_000)
    wait_idle(qtbot, w)
    similarity = w.viewer.layers["similarity · planted"]
    assert similarity.colorbar.visible and not heat.colorbar.visible
    assert w.viewer.canvas.overlays.text.text == "colour bar: similarity"
    similarity.visible = False
    assert heat.colorbar.visible and w.viewer.canvas.overlays.text.text == "colour bar: P(tumour)"


@pytest.mark.drives("new_annotations_btn", "class_combo", "train_btn")
def test_annotations_with_one_class_are_refused(qtbot, planted_widget, ui) -> None:
    w, u = planted_widget, ui(planted_widget)
    u.click("new_annotations_btn")
    u.type("class_combo", "tumour")
    w.head.annotation_layer().add_polygons([square(448, 448, 896, 896)])
    u.click("train_btn")
    wait_idle(qtbot, w)
    assert "only 'tumour'" in w.jobbar.status.text() and "two classes" in w.jobbar.status.text()


@pytest.mark.drives("refit_check", "save_head_btn", "load_head_btn", "save_geojson_btn", "load_geojson_btn")
def test_refit_save_and_load(qtbot, planted_widget, ui, tmp_path: Path, monkeypatch) -> None:
    w, u = planted_widget, ui(planted_widget)
    compute_whole_slide(qtbot, w, u)
    layer = annotate_planted(u, w)
    u.click("refit_check")
    layer.add_polygons([square(1152, 1152, 1600, 1600)])  # an edit re-fits on its own
    qtbot.waitUntil(lambda: w.session().head is not None, timeout=60_000)
    wait_idle(qtbot, w)
    u.click("refit_check")
    head = w.session().head
    assert head.metrics["n_samples"] > 0

    dialogs(monkeypatch, save=tmp_path / "probe.safetensors")
    u.click("save_head_btn")
    assert (tmp_path / "probe.safetensors").is_file()
    w.session().set_head(None)
    dialogs(monkeypatch, open_=tmp_path / "probe.safetensors")
    u.click("load_head_btn")
    wait_idle(qtbot, w)
    assert w.session().head is not None and "head for virchow2-tiny" in w.head.head_label.text()
    np.testing.assert_allclose(w.session().head.weights, head.weights, rtol=1e-6)

    dialogs(monkeypatch, save=tmp_path / "regions.geojson")
    u.click("save_geojson_btn")
    saved = json.loads((tmp_path / "regions.geojson").read_text())
    assert len(saved["features"]) == 3
    # one colour per class: on the canvas, in the class list, in the file
    colors = {f["properties"]["classification"]["name"]: f["properties"]["classification"]["color"]
              for f in saved["features"]}  # fmt: skip
    assert colors == {"tumour": list(rgb(class_color("tumour"))), "normal": list(rgb(class_color("normal")))}
    assert colors["tumour"] != colors["normal"]
    for shape_color, cls in zip(layer.edge_color, layer.features["class"], strict=True):
        assert [round(c * 255) for c in shape_color[:3]] == colors[cls]
    assert list(layer.text.values) == ["tumour", "normal", "normal"]  # class names on the canvas
    dialogs(monkeypatch, open_=tmp_path / "regions.geojson")
    u.click("load_geojson_btn")
    loaded = w.head.annotation_layer()
    assert loaded is not layer and len(loaded.data) == 3
    assert list(loaded.features["class"]) == ["tumour", "normal", "normal"]


@pytest.mark.drives("save_geojson_btn", "save_head_btn")
def test_saving_to_a_bad_place_is_one_message(planted_widget, ui, tmp_path: Path, monkeypatch) -> None:
    from napari_virchow.analysis.heads import LinearHead

    w, u = planted_widget, ui(planted_widget)
    shown: list[str] = []
    monkeypatch.setattr("napari_virchow._qt.errors.show_error", shown.append)
    w.head.new_annotation_layer().add_polygons([square(448, 448, 896, 896)])
    dialogs(monkeypatch, save=tmp_path / "missing" / "a.geojson")
    u.click("save_geojson_btn")
    w.session().head = LinearHead(np.zeros((1, 96)), [0.0], ["normal", "tumour"], encoder="virchow2-tiny")
    dialogs(monkeypatch, save=tmp_path / "myhead")
    u.click("save_head_btn")
    assert len(shown) == 2 and "a.geojson" in shown[0] and "myhead" in shown[1], shown


def test_a_head_with_one_probe_per_magnification_shows_each_auc(qtbot, planted_widget, ui, tmp_path: Path,
                                                                monkeypatch) -> None:  # fmt: skip
    from napari_virchow.analysis.head_files import save_head
    from napari_virchow.analysis.heads import MultiScaleHead, fit_head

    w, u = planted_widget, ui(planted_widget)
    dim = w.session().config.spec.dim
    rng = np.random.default_rng(0)
    probes = []
    for mpp, shift in ((0.5, 3.0), (1.0, 0.6)):  # well and less well separated classes
        x = np.concatenate([rng.normal(0, 1, (20, dim)), rng.normal(shift, 1, (20, dim))]).astype(np.float32)
        probes.append(fit_head(x, ["normal"] * 20 + ["tumour"] * 20, encoder="virchow2-tiny", cv=3, mpp=mpp))
    head = MultiScaleHead.from_probes(probes)
    path = save_head(head, tmp_path / "levels.safetensors")
    dialogs(monkeypatch, open_=path)
    u.click("load_head_btn")
    wait_idle(qtbot, w)
    label = w.head.head_label.text()
    a, b = head.cv_aucs[0.5], head.cv_aucs[1.0]
    assert isinstance(w.session().head, MultiScaleHead)
    assert f"AUC {a:.2f} at 0.5 µm/px, {b:.2f} at 1 µm/px" in label, label


@pytest.mark.drives("load_geojson_btn", "class_combo")
def test_loaded_annotation_classes_become_the_draw_classes_and_keys(qtbot, planted_widget, ui, tmp_path: Path,
                                                                    monkeypatch) -> None:  # fmt: skip
    # QuPath annotations of classes the panel does not list: they were drawn, but 'draw class' and the
    # labelling keys still offered only tumour / normal, so key 1 labelled a class the file never had
    w, u = planted_widget, ui(planted_widget)

    def region(x0: int, y0: int, name: str) -> dict:
        ring = [[x0, y0], [x0 + 400, y0], [x0 + 400, y0 + 400], [x0, y0 + 400], [x0, y0]]
        return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {"objectType": "annotation", "classification": {"name": name}}}  # fmt: skip

    path = tmp_path / "qupath.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [
        region(100, 100, "Epithelium"), region(900, 900, "Stroma"), region(100, 900, "Epithelium")]}))  # fmt: skip
    dialogs(monkeypatch, open_=path)
    u.click("load_geojson_btn")
    combo = u["class_combo"]
    assert [combo.itemText(i) for i in range(combo.count())] == ["Epithelium", "Stroma", "tumour", "normal"]
    assert combo.currentText() == "Epithelium"
    assert w.labelling.keys_label.text() == "label with keys: 1 Epithelium · 2 Stroma · 3 tumour · 4 normal"
    layer = w.head.annotation_layer()
    assert list(layer.features["class"]) == ["Epithelium", "Stroma", "Epithelium"]
    assert layer.feature_defaults["class"][0] == "Epithelium"  # the next region drawn is of that class
    u.choose("class_combo", "Stroma")
    dialogs(monkeypatch, open_=path)
    u.click("load_geojson_btn")  # the same classes again: the order and the choice stay
    assert [combo.itemText(i) for i in range(combo.count())][:2] == ["Epithelium", "Stroma"]
    assert combo.currentText() == "Stroma"


@pytest.mark.drives("load_geojson_btn")
def test_many_qupath_regions_load_in_file_order_with_their_class_colours(qtbot, planted_widget, ui, tmp_path: Path,
                                                                         monkeypatch) -> None:  # fmt: skip
    # the whole file is added in one go (one at a time took 12 s for 500 regions on the UI thread): each
    # shape must still get its own class and that class's colour, in the file's order, holes included
    from napari.utils.colormaps.standardize_color import transform_color

    w, u = planted_widget, ui(planted_widget)
    names = ["Tumor", "Stroma", "Necrosis"]
    feats = []
    for i in range(60):
        x0, y0 = 100 + (i % 10) * 180, 100 + (i // 10) * 300
        ring = [[x0, y0], [x0 + 150, y0], [x0 + 150, y0 + 250], [x0, y0 + 250], [x0, y0]]
        rings = [ring]
        if i == 7:  # a region with a hole: drawn as a second shape of class 'hole'
            rings.append([[x0 + 50, y0 + 50], [x0 + 100, y0 + 50], [x0 + 100, y0 + 100], [x0 + 50, y0 + 100],
                          [x0 + 50, y0 + 50]])  # fmt: skip
        feats.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": rings},
                      "properties": {"objectType": "annotation", "classification": {"name": names[i % 3]}}})
    path = tmp_path / "many.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    dialogs(monkeypatch, open_=path)
    u.click("load_geojson_btn")
    layer = w.head.annotation_layer()
    want = [names[i % 3] for i in range(8)] + ["hole"] + [names[i % 3] for i in range(8, 60)]
    assert list(layer.features["class"]) == want and len(layer.data) == 61
    for k, name in enumerate(want):
        np.testing.assert_allclose(layer.edge_color[k], transform_color(class_color(name))[0], atol=1e-6)
    first = np.asarray(layer.data[0])[:, -2:]  # napari (y, x), level-0 px
    np.testing.assert_allclose(first.min(axis=0), [100, 100])
    np.testing.assert_allclose(first.max(axis=0), [350, 250])
    regions, orphans = w.head.annotation_regions()
    assert len(regions) == 60 and not orphans and len(regions[7].holes) == 1
    # a region drawn next gets the draw class and its colour
    layer.add_polygons([np.array([[10, 10], [10, 60], [60, 60]], float)])
    assert layer.features["class"].iloc[-1] == w.head.class_combo.currentText() == "Tumor"
    np.testing.assert_allclose(layer.edge_color[-1], transform_color(class_color("Tumor"))[0], atol=1e-6)
