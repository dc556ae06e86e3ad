"""'Similar regions' driven through Qt: pick by a real click or drag on the canvas, hits, index search."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from qtpy.QtWidgets import QFileDialog

from napari_virchow._qt.viewport import camera
from napari_virchow._reader import METADATA_KEY
from tests._qt.conftest import LEFT, canvas_point, click_canvas, compute_whole_slide, planted_truth, wait_idle

pytestmark = pytest.mark.timeout(300)


def _drag_canvas(qtbot, w, start: tuple[float, float], end: tuple[float, float], during=None) -> None:
    native, p0 = canvas_point(w.viewer, w.slide_layer(), *start)
    _, p1 = canvas_point(w.viewer, w.slide_layer(), *end)
    qtbot.mousePress(native, LEFT, pos=p0)
    for t in np.linspace(0.2, 1.0, 5):
        qtbot.mouseMove(native, pos=p0 + (p1 - p0) * float(t))
        qtbot.wait(10)
    if during is not None:
        during()
    qtbot.mouseRelease(native, LEFT, pos=p1)


@pytest.mark.drives("pick_btn", "hits_spin", "hit_list")
def test_click_query_lists_hits_and_jump_zooms_to_one(qtbot, planted_widget, ui) -> None:
    w, u = planted_widget, ui(planted_widget)
    compute_whole_slide(qtbot, w, u)
    u.spin("hits_spin", 5)
    u.click("pick_btn")
    assert u["pick_btn"].isChecked()
    click_canvas(qtbot, w, 600, 600)  # inside the first planted copy
    qtbot.waitUntil(lambda: w.similar.hit_list.count() > 0, timeout=60_000)
    wait_idle(qtbot, w)
    session = w.session()
    hits = session.hits(5)
    assert planted_truth(session)[hits[0].index], "the best hit is in the other planted copy"
    assert 0 < w.similar.hit_list.count() == len(hits) <= 5
    assert "µm" in w.similar.hit_list.item(0).text() and "score" in w.similar.hit_list.item(0).text()
    row_height = w.similar.hit_list.visualItemRect(w.similar.hit_list.item(0)).height()
    assert w.similar.hit_list.viewport().height() >= 5 * row_height  # at least five hits in sight
    assert "hits · planted" in w.viewer.layers and "query · planted" in w.viewer.layers  # the query is marked
    zoom = camera(w.viewer).zoom
    boxes = w.viewer.layers["hits · planted"]
    normal_width, normal_color = list(boxes.edge_width), np.array(boxes.edge_color)
    seen: list[tuple[float, bool]] = []  # (width, colour changed) of hit 1's box at each redraw
    boxes.events.edge_color.connect(lambda _: seen.append(
        (boxes.edge_width[0], not np.allclose(boxes.edge_color[0], normal_color[0])))
    )  # fmt: skip
    u.click_item("hit_list", 0)
    t = session.grid.tile_size_l0
    centre = np.asarray(camera(w.viewer).center[-2:]) / 0.5
    assert abs(centre[1] - (hits[0].x + t / 2)) < 1 and abs(centre[0] - (hits[0].y + t / 2)) < 1
    assert camera(w.viewer).zoom > zoom  # jumping zooms in on the hit
    tile_px = t * 0.5 * camera(w.viewer).zoom  # the tile on screen: clearly visible, and all of it in view
    assert 20 < tile_px < min(w.viewer.canvas.size)
    assert boxes.selected_data == {0}  # and highlights it
    # the box flashes (wider, another colour) a few times without blocking the UI thread, then is normal again
    qtbot.waitUntil(lambda: sum(1 for width, recoloured in seen if width > normal_width[0] and recoloured) >= 2,
                    timeout=5000)  # fmt: skip
    qtbot.waitUntil(lambda: not w.similar.flasher.active(), timeout=5000)
    assert any(width == normal_width[0] for width, _ in seen[:-1])  # it pulses: back to normal in between
    assert list(boxes.edge_width) == normal_width
    np.testing.assert_allclose(boxes.edge_color, normal_color)


@pytest.mark.drives("pick_btn")
def test_drag_after_a_click_query_draws_a_box_and_does_not_pan(qtbot, planted_widget, ui) -> None:
    w, u = planted_widget, ui(planted_widget)
    compute_whole_slide(qtbot, w, u)
    u.click("pick_btn")
    click_canvas(qtbot, w, 600, 600)
    qtbot.waitUntil(lambda: w.similar.hit_list.count() > 0, timeout=60_000)
    wait_idle(qtbot, w)  # the query added layers: napari turned mouse panning back on here before
    centre = tuple(camera(w.viewer).center)
    seen = []
    _drag_canvas(qtbot, w, (460, 460), (880, 880),
                 during=lambda: seen.append(len(w.viewer.layers["query · planted"].data)))  # fmt: skip
    assert tuple(camera(w.viewer).center) == pytest.approx(centre)  # no pan
    assert seen == [1]  # a rubber band while dragging
    wait_idle(qtbot, w)
    session = w.session()
    assert len(session.query_idx) == 4  # the 2 × 2 tiles of the first planted copy
    assert planted_truth(session)[session.hits(3)[0].index]
    u.click("pick_btn")
    assert camera(w.viewer).mouse_pan


@pytest.mark.drives("pick_btn")
def test_picking_before_computing_says_what_to_do(qtbot, planted_widget, ui) -> None:
    w, u = planted_widget, ui(planted_widget)
    w.viewer.reset_view()
    u.click("pick_btn")
    click_canvas(qtbot, w, 600, 600)  # was "Sequence (1.0, 1.0) must be monotonically increasing"
    qtbot.waitUntil(lambda: w.last_event is not None and not w.runner.busy, timeout=60_000)
    assert "only the query is embedded" in w.jobbar.status.text()
    assert "Compute visible" in w.jobbar.status.text()


@pytest.mark.drives("pick_btn")
def test_a_query_on_glass_is_explained(qtbot, planted_widget, ui) -> None:
    w, u = planted_widget, ui(planted_widget)
    compute_whole_slide(qtbot, w, u)
    u.click("pick_btn")
    click_canvas(qtbot, w, 100, 100)  # white background, outside the tissue block
    qtbot.waitUntil(lambda: "glass" in w.jobbar.status.text(), timeout=60_000)
    wait_idle(qtbot, w)


@pytest.mark.drives("index_browse_btn", "index_edit", "search_index_btn", "hit_list")
def test_search_indexed_slides_opens_the_other_slide_at_the_hit(qtbot, planted_widget, ui, planted_slide: Path,
                                                               tmp_path: Path, monkeypatch) -> None:
    from napari_virchow.analysis.index import IndexEntry, build_index
    from napari_virchow.session import SlideSession

    other_path = tmp_path / "other.tif"
    shutil.copy(planted_slide, other_path)  # same content, another file: the cohort's second slide
    w, u = planted_widget, ui(planted_widget)
    other = SlideSession(other_path, w.config())
    for _ in other.compute(indices=other.grid.tissue_indices):
        pass
    idx, emb = other.store().read_done()
    index_path = tmp_path / "cohort.faiss"
    build_index([IndexEntry(str(other_path), other.slide.fingerprint, emb, other.grid.coords[idx],
                            other.grid.tile_size_l0, idx)], index_path, encoder="virchow2-tiny")  # fmt: skip
    other.close()

    w.viewer.reset_view()
    w.similar.query_at(600, 600)  # a planted pattern in this slide (the click is tested above)
    wait_idle(qtbot, w)
    u.type("index_edit", "nowhere")
    monkeypatch.setattr(QFileDialog, "getOpenFileName", staticmethod(lambda *a, **k: (str(index_path), "")))
    u.click("index_browse_btn")
    assert u["index_edit"].text() == str(index_path)
    u.click("search_index_btn")
    wait_idle(qtbot, w)
    hit_list = w.similar.hit_list
    assert hit_list.count() > 0 and "other.tif" in hit_list.item(0).text()
    top = hit_list.item(0).data(0x0100)  # Qt.UserRole: (x, y, slide)
    assert planted_truth(w.session())[w.session().grid.index_at(top[0], top[1])]
    u.click_item("hit_list", 0)
    assert w.model.slide_combo.currentText() == "other" and "other" in w.viewer.layers
    # back to the first slide, search again: a hit in 'other' goes to its open layer, never a second copy
    u.choose("slide_combo", "planted")
    w.similar.query_at(600, 600)
    wait_idle(qtbot, w)
    u.click("search_index_btn")
    wait_idle(qtbot, w)
    u.click_item("hit_list", 0)
    opened = [lyr.name for lyr in w.viewer.layers if lyr.metadata.get(METADATA_KEY, {}).get("path") == str(other_path)]
    assert opened == ["other"] and w.model.slide_combo.currentText() == "other"


@pytest.mark.drives("index_edit", "search_index_btn")
def test_the_searched_index_is_described_and_a_query_at_another_magnification_refused(
        qtbot, planted_widget, ui, tmp_path: Path, monkeypatch) -> None:  # fmt: skip
    from napari_virchow.analysis.index import IndexEntry, build_index

    w, u = planted_widget, ui(planted_widget)
    session = w.session()
    for _ in session.compute(indices=session.grid.tissue_indices):
        pass
    idx, emb = session.store().read_done()
    entry = IndexEntry("elsewhere.tif", "fp-elsewhere", emb, session.grid.coords[idx], session.grid.tile_size_l0, idx)
    build_index([entry], tmp_path / "x20.faiss", encoder="virchow2-tiny", provenance={"mpp": 0.5})
    build_index([entry], tmp_path / "x5" / "INDEX.faiss", encoder="virchow2-tiny", provenance={"mpp": 2.0})
    w.similar.query_at(600, 600)  # picked at 20× (0.5 µm/px, the default level)
    wait_idle(qtbot, w)
    u.type("index_edit", str(tmp_path / "x20.faiss"))
    u.click("search_index_btn")
    wait_idle(qtbot, w)
    info = w.similar.index_info.text()
    assert f"{len(idx):,} tiles of 1 slide," in info and " kB)" in info
    assert "virchow2-tiny" in info and "20× (0.5 µm/px)" in info
    shown: list[str] = []
    monkeypatch.setattr("napari_virchow._qt.errors.show_error", shown.append)
    u.type("index_edit", str(tmp_path / "x5"))
    u.click("search_index_btn")
    wait_idle(qtbot, w)
    assert len(shown) == 1 and "5× (2 µm/px)" in shown[0] and "20× (0.5 µm/px)" in shown[0], shown
    assert "not comparable" in shown[0] and w.similar.index_info.text() == info  # nothing else changed


@pytest.mark.drives("index_edit", "search_index_btn", "hit_list")
def test_a_cohort_hit_in_a_40x_slide_is_its_own_tile(qtbot, planted_widget, ui, tmp_path: Path) -> None:
    # a 40× slide of the cohort has 448-px tiles at 0.5 µm/px: the hit, its thumbnail and the zoom must use
    # them, not the 224 px of the query's 20× slide
    from napari_virchow._qt.hitlist import TILES_ACROSS
    from napari_virchow.analysis.index import IndexEntry, build_index
    from napari_virchow.session import SlideSession
    from napari_virchow.slides.synthetic import PlantedSource, Region, write_pyramid
    from tests.conftest import PLANTED_PATTERNS, PLANTED_SIZE, PLANTED_TISSUE

    regions = [Region(tuple(2 * v for v in r.box), r.kind) for r in (PLANTED_TISSUE, *PLANTED_PATTERNS)]
    forty = write_pyramid(tmp_path / "forty.tif", 2 * PLANTED_SIZE, 2 * PLANTED_SIZE, PlantedSource(regions),
                          mpp=0.25, levels=3)  # fmt: skip
    w, u = planted_widget, ui(planted_widget)
    other = SlideSession(forty, w.config())
    assert other.grid.tile_size_l0 == 448
    for _ in other.compute(indices=other.grid.tissue_indices):
        pass
    idx, emb = other.store().read_done()
    index_path = tmp_path / "cohort.faiss"
    build_index([IndexEntry(str(forty), other.slide.fingerprint, emb, other.grid.coords[idx], 448, idx)],
                index_path, encoder="virchow2-tiny")  # fmt: skip
    other.close()
    w.viewer.reset_view()
    w.similar.query_at(600, 600)
    wait_idle(qtbot, w)
    u.type("index_edit", str(index_path))
    u.click("search_index_btn")
    wait_idle(qtbot, w)
    item = w.similar.hit_list.item(0)
    x, y, slide, t = item.data(0x0100)
    assert slide == str(forty) and t == 448
    assert (x - 224) % 448 == 0 and (y - 224) % 448 == 0  # the centre of a 448-px tile
    u.click_item("hit_list", 0)
    layer = w.viewer.layers["forty"]
    cam = camera(w.viewer)
    np.testing.assert_allclose(cam.center[-2:], np.asarray(layer.data_to_world((y, x)))[-2:], atol=1e-6)
    tile_um = 448 * 0.25
    assert cam.zoom == pytest.approx(min(w.viewer.canvas.size) / (TILES_ACROSS * tile_um), rel=1e-6)
