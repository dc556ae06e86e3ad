"""The dock widget in a real headless viewer: compute visible, cache, heatmap, clusters, similarity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_virchow import jobs as _jobs
from napari_virchow._qt.viewport import camera
from napari_virchow._qt.widget import VirchowWidget

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def widget(make_widget, sample_pyramid: Path) -> VirchowWidget:
    return make_widget(sample_pyramid)


def _wait(qtbot, w: VirchowWidget, timeout: int = 120_000) -> None:
    qtbot.waitUntil(lambda: w._worker is None, timeout=timeout)


def _compute_whole_slide(qtbot, w: VirchowWidget) -> None:
    """Show the whole slide and embed every tissue tile in view."""
    w.viewer.reset_view()
    w.limit_spin.setValue(10_000)
    w.compute_visible()
    _wait(qtbot, w)


def _zoom_to(w: VirchowWidget, x: float, y: float, width_px: float) -> None:
    """Centre the camera on level-0 (x, y) showing about ``width_px`` level-0 pixels across."""
    layer = w._slide_layer()
    camera(w.viewer).center = tuple(layer.data_to_world((y, x)))
    camera(w.viewer).zoom = w.viewer.canvas.size[1] / (width_px * layer.scale[-1])


def test_compute_visible_embeds_tiles_in_view_and_revisit_is_free(qtbot, widget: VirchowWidget) -> None:
    _zoom_to(widget, 1100, 1500, 900)
    box = widget.visible_box()
    assert box is not None and box[2] - box[0] < 1200
    widget.compute_visible()
    _wait(qtbot, widget)
    session = widget.session()
    in_view = session.tiles_in(box)
    assert len(in_view) > 0 and not len(session.missing(in_view))
    assert session.store().n_done == len(in_view)  # only what is on screen, nothing else

    calls = []
    real = session.encoder().embed_tensor
    session.encoder().embed_tensor = lambda x: calls.append(len(x)) or real(x)
    widget.compute_visible()
    _wait(qtbot, widget)
    assert calls == []  # served from the store
    assert isinstance(widget.last_event, _jobs.Stage) and "cached" in widget.last_event.message


def test_too_many_tiles_asks_first(qtbot, widget: VirchowWidget) -> None:
    widget.viewer.reset_view()
    widget.limit_spin.setValue(5)
    widget.compute_visible()
    _wait(qtbot, widget)
    assert isinstance(widget.last_event, _jobs.TooMany)
    assert widget.session().store().n_done == 0
    assert "Compute" in widget.all_btn.text() and "tiles" in widget.all_btn.text()


def test_no_slide_layer_is_a_message_not_a_crash(make_napari_viewer, qtbot) -> None:
    viewer = make_napari_viewer(show=True)
    viewer.add_image(np.zeros((64, 64), np.uint8), name="plain")
    w = VirchowWidget(viewer)
    w.compute_visible()
    assert "slide" in w.status.text() or w._worker is None


@pytest.fixture
def planted_widget(make_widget, planted_slide: Path) -> VirchowWidget:
    return make_widget(planted_slide)


def _square(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[y0, x0], [y0, x1], [y1, x1], [y1, x0]], float)  # napari (y, x) in level-0 px


def _planted_truth(session) -> np.ndarray:
    from tests.conftest import PLANTED_PATTERNS

    g = session.grid
    centre = g.coords + g.tile_size_l0 / 2
    truth = np.zeros(len(g), bool)
    for region in PLANTED_PATTERNS:
        x0, y0, x1, y1 = region.box
        truth |= (centre[:, 0] > x0) & (centre[:, 0] < x1) & (centre[:, 1] > y0) & (centre[:, 1] < y1)
    return truth


def test_probe_trained_on_annotations_finds_planted_region(qtbot, planted_widget: VirchowWidget) -> None:
    from sklearn.metrics import roc_auc_score

    w = planted_widget
    _compute_whole_slide(qtbot, w)
    layer = w.new_annotation_layer()
    w.class_edit.setCurrentText("tumour")
    layer.add_polygons([_square(448, 448, 896, 896)])  # first planted copy only
    w.class_edit.setCurrentText("normal")
    layer.add_polygons([_square(300, 1100, 1000, 1700)])  # plain tissue
    assert list(layer.features["class"]) == ["tumour", "normal"]
    w.train()
    _wait(qtbot, w)
    session = w.session()
    assert session.head is not None and "accuracy" in w.head_label.text()
    heat = w.viewer.layers["planted · probability"]
    assert tuple(heat.scale) == pytest.approx((session.grid.tile_size_l0 * 0.5,) * 2)
    done = session.store().done & session.grid.tissue
    truth = _planted_truth(session)
    auc = roc_auc_score(truth[done], session.probability[done])
    assert auc >= 0.9, auc  # the second, never annotated copy is found too
    # the layer shows exactly the per-tile probabilities, NaN where nothing was computed
    rows, cols = session.grid.grid_shape
    np.testing.assert_allclose(heat.data[:rows, :cols].ravel()[done], session.probability[done], rtol=1e-6)


def test_annotations_with_one_class_are_refused(qtbot, planted_widget: VirchowWidget) -> None:
    w = planted_widget
    layer = w.new_annotation_layer()
    layer.add_polygons([_square(448, 448, 896, 896)])
    w.train()
    _wait(qtbot, w)
    assert "only 'tumour'" in w.status.text() and "two classes" in w.status.text()


def test_cancel_mid_run_keeps_store_consistent(qtbot, planted_widget: VirchowWidget) -> None:
    w = planted_widget
    w.viewer.reset_view()
    w.limit_spin.setValue(10_000)
    w.batch_spin.setValue(2)  # many small batches: the cancel lands long before the end
    w.compute_visible()
    qtbot.waitUntil(lambda: isinstance(w.last_event, _jobs.BatchDone), timeout=60_000)
    w.cancel()
    _wait(qtbot, w)
    session = w.session()
    store = session.store()
    idx, emb = store.read_done()
    assert 0 < len(idx) < session.grid.n_tissue  # stopped early
    expected = session.encoder().embed(session.grid.read_tiles(idx[:4]))
    np.testing.assert_allclose(emb[:4], expected, rtol=0.02, atol=0.02)  # float16 rows, all complete


def test_clusters_and_similarity(qtbot, planted_widget: VirchowWidget) -> None:
    w = planted_widget
    _compute_whole_slide(qtbot, w)
    w.k_spin.setValue(3)
    w.cluster()
    _wait(qtbot, w)
    labels = w.viewer.layers["planted · clusters"]
    assert labels.data.max() == 3 and "cluster 1" in w.legend.text()
    w.hits_spin.setValue(5)
    w.query_at(600, 600)  # inside the first planted copy
    _wait(qtbot, w)
    session = w.session()
    hits = session.hits(5)
    truth = _planted_truth(session)
    assert truth[hits[0].index], "the best hit is in the other planted copy"
    assert 0 < w.hit_list.count() == len(hits) <= 5 and "planted · hits" in w.viewer.layers
    w._go_to_hit(w.hit_list.item(0))
    centre = np.asarray(camera(w.viewer).center[-2:]) / 0.5
    assert abs(centre[1] - (hits[0].x + session.grid.tile_size_l0 / 2)) < 1


def test_search_indexed_slides_opens_the_other_slide_at_the_hit(qtbot, planted_widget: VirchowWidget,
                                                               planted_slide: Path, tmp_path: Path) -> None:
    import shutil

    from napari_virchow.analysis.index import IndexEntry, build_index
    from napari_virchow.session import SlideSession

    other_path = tmp_path / "other.tif"
    shutil.copy(planted_slide, other_path)  # same content, another file: the cohort's second slide
    w = planted_widget
    other = SlideSession(other_path, w.config())
    other_store = other.store()
    for _ in other.compute(indices=other.grid.tissue_indices):
        pass
    idx, emb = other_store.read_done()
    index_path = tmp_path / "cohort.faiss"
    build_index([IndexEntry(str(other_path), other.slide.fingerprint + "-copy", emb, other.grid.coords[idx],
                            other.grid.tile_size_l0, idx)], index_path, encoder="virchow2-tiny")  # fmt: skip
    other.close()

    w.query_at(600, 600)  # a planted pattern in this slide
    _wait(qtbot, w)
    w.index_edit.setText(str(index_path))
    w.search_index()
    _wait(qtbot, w)
    assert w.hit_list.count() > 0 and "other.tif" in w.hit_list.item(0).text()
    top = w.hit_list.item(0).data(0x0100)  # Qt.UserRole: (x, y, slide)
    assert _planted_truth(w.session())[w.session().grid.index_at(top[0], top[1])]
    w._go_to_hit(w.hit_list.item(0))
    assert w.slide_combo.currentText() == "other" and "other" in w.viewer.layers


def test_saving_to_a_bad_place_is_one_message(planted_widget: VirchowWidget, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from qtpy.QtWidgets import QFileDialog

    from napari_virchow.analysis.heads import LinearHead

    w = planted_widget
    shown: list[str] = []
    monkeypatch.setattr("napari_virchow._qt.widget.show_error", shown.append)
    layer = w.new_annotation_layer()
    layer.add_polygons([_square(448, 448, 896, 896)])
    monkeypatch.setattr(QFileDialog, "getSaveFileName",
                        staticmethod(lambda *a, **k: (str(tmp_path / "missing" / "a.geojson"), "")))  # fmt: skip
    w._save_geojson()
    w.session().head = LinearHead(np.zeros((1, 96)), [0.0], ["normal", "tumour"], encoder="virchow2-tiny")
    monkeypatch.setattr(QFileDialog, "getSaveFileName", staticmethod(lambda *a, **k: (str(tmp_path / "myhead"), "")))
    w._save_head()
    assert len(shown) == 2 and "a.geojson" in shown[0] and "myhead" in shown[1], shown


def test_box_query_uses_the_mean_of_the_tiles_in_the_box(qtbot, planted_widget: VirchowWidget) -> None:
    from types import SimpleNamespace

    w = planted_widget
    _compute_whole_slide(qtbot, w)
    w.hits_spin.setValue(3)
    w.pick_btn.setChecked(True)
    assert not camera(w.viewer).mouse_pan  # a drag draws the box instead of panning
    layer = w._slide_layer()
    # drive the real drag callback: press at one corner, move, release at the other (level-0 px)
    event = SimpleNamespace(type="mouse_press", position=tuple(layer.data_to_world((460, 460))))
    drag = w._pick(w.viewer, event)
    next(drag)
    event.type, event.position = "mouse_move", tuple(layer.data_to_world((880, 880)))
    next(drag)
    event.type = "mouse_release"
    with pytest.raises(StopIteration):
        next(drag)
    _wait(qtbot, w)
    session = w.session()
    assert len(session.query_idx) == 4  # the 2 × 2 tiles of the first planted copy
    assert _planted_truth(session)[session.hits(3)[0].index]  # best hit: the other copy
    w.pick_btn.setChecked(False)
    assert camera(w.viewer).mouse_pan
