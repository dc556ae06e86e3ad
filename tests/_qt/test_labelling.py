"""'Labelling' driven through Qt: suggest tiles, jump through them, label with number keys, re-fit."""

from __future__ import annotations

import numpy as np
import pytest
from qtpy.QtCore import Qt

from napari_virchow._qt.panels.head import cv_auc
from napari_virchow._qt.panels.labelling import tile_square
from napari_virchow._qt.viewport import camera
from napari_virchow.analysis.suggest import suggest_tiles
from tests._qt.conftest import train_on_planted, wait_idle

pytestmark = pytest.mark.timeout(300)


def _centre_l0(w) -> np.ndarray:
    return np.asarray(camera(w.viewer).center[-2:])[::-1] / 0.5  # (x, y) level-0 px of the 0.5 µm/px slide


@pytest.mark.drives("new_annotations_btn", "class_combo", "train_btn", "suggest_spin", "suggest_btn",
                     "suggest_list", "next_suggestion_btn", "prev_suggestion_btn", "refit_probe_btn")
def test_suggest_jump_label_with_keys_and_refit_shows_the_auc_change(qtbot, planted_widget, ui) -> None:
    w, u = planted_widget, ui(planted_widget)
    layer = train_on_planted(qtbot, u, w)
    session = w.session()
    first_auc = cv_auc(session.head)
    assert w.labelling.labelling_label.text() == f"cross-validated AUC {first_auc:.2f}"
    assert w.labelling.keys_label.text() == "label with keys: 1 tumour · 2 normal"  # shown in the panel

    u.spin("suggest_spin", 4)
    u.click("suggest_btn")
    wait_idle(qtbot, w)
    lst = w.labelling.suggest_list
    g = session.grid
    polygons, classes = w.head.annotations()
    labelled = session.annotated_tiles(polygons, classes)[0]
    expected = suggest_tiles(session.probabilities[0.5], g.coords, g.tile_size_l0, labelled, 4, candidates=g.tissue)
    assert lst.count() == len(expected) == 4
    for row, s in enumerate(expected):  # what the user sees: rank, probability, µm position, thumbnail
        text = lst.item(row).text()
        assert text.startswith(f"{row + 1}. P(tumour) {s.probability:.2f}") and f"({s.x * 0.5:,.0f}, " in text
        assert not lst.item(row).icon().isNull()
    assert not set(s.index for s in expected) & set(labelled.tolist())
    boxes = w.viewer.layers["suggestions · planted"]
    assert len(boxes.data) == 4
    t = g.tile_size_l0
    # the first suggestion is in view, zoomed in, and flashing
    np.testing.assert_allclose(_centre_l0(w), [expected[0].x + t / 2, expected[0].y + t / 2], atol=1)
    assert 20 < t * 0.5 * camera(w.viewer).zoom < min(w.viewer.canvas.size)
    assert w.labelling.flasher.active() and boxes.selected_data == {0}

    u.click("next_suggestion_btn")
    assert lst.currentRow() == 1
    np.testing.assert_allclose(_centre_l0(w), [expected[1].x + t / 2, expected[1].y + t / 2], atol=1)
    u.click("prev_suggestion_btn")
    assert lst.currentRow() == 0
    u.click_item("suggest_list", 2)
    np.testing.assert_allclose(_centre_l0(w), [expected[2].x + t / 2, expected[2].y + t / 2], atol=1)

    # key 1 labels the current tile tumour, key 2 the next one normal; each moves on
    before = len(layer.data)
    qtbot.keyClick(lst, Qt.Key.Key_1)
    assert lst.currentRow() == 3 and lst.item(2).text().startswith("✓ tumour · 3. P(tumour)")
    qtbot.keyClick(lst, Qt.Key.Key_2)
    assert len(layer.data) == before + 2
    assert list(layer.features["class"])[-2:] == ["tumour", "normal"]
    for shape, s in zip(layer.data[-2:], expected[2:4], strict=True):
        np.testing.assert_allclose(np.asarray(shape)[:, -2:], tile_square(s.x, s.y, t))
    assert layer.feature_defaults["class"][0] == "normal"  # the draw class is what the combo shows
    polygons, classes = w.head.annotations()  # saved and exported with the other annotations
    idx, names = session.annotated_tiles(polygons, classes)
    assert dict(zip(idx.tolist(), names.tolist(), strict=True))[expected[2].index] == "tumour"
    assert dict(zip(idx.tolist(), names.tolist(), strict=True))[expected[3].index] == "normal"
    qtbot.keyClick(lst, Qt.Key.Key_1)  # labelled again: the new class replaces the square
    assert len(layer.data) == before + 2 and list(layer.features["class"])[-1] == "tumour"
    qtbot.keyClick(lst, Qt.Key.Key_7)  # no seventh class: nothing happens
    assert len(layer.data) == before + 2

    u.click("refit_probe_btn")
    wait_idle(qtbot, w)
    new_auc = cv_auc(w.session().head)
    assert w.labelling.labelling_label.text() == f"cross-validated AUC {first_auc:.2f} → {new_auc:.2f}"
    assert w.session().head.metrics["n_samples"] > len(labelled)  # the labelled tiles took part

    u.click("suggest_btn")
    wait_idle(qtbot, w)
    again = {lst.item(r).data(Qt.ItemDataRole.UserRole)[:2] for r in range(lst.count())}
    assert not again & {(s.x, s.y) for s in expected[2:4]}  # labelled tiles are not suggested again


@pytest.mark.drives("suggest_btn")
def test_suggesting_without_a_probe_says_what_to_do(qtbot, planted_widget, ui) -> None:
    w, u = planted_widget, ui(planted_widget)
    u.click("suggest_btn")
    wait_idle(qtbot, w)
    assert "Train from annotations" in w.jobbar.status.text()
    assert w.labelling.suggest_list.count() == 0


@pytest.mark.drives("train_btn", "suggest_btn")
def test_nothing_to_suggest_names_the_magnification_to_compute(qtbot, planted_widget, ui) -> None:
    w, u = planted_widget, ui(planted_widget)
    train_on_planted(qtbot, u, w, compute=False)  # only the annotated tiles are embedded
    assert w.session().head is not None
    u.click("suggest_btn")
    wait_idle(qtbot, w)
    assert w.labelling.suggest_list.count() == 0
    assert w.labelling.labelling_label.text() == (
        "no tile to suggest at 20× (0.5 µm/px), the probe's magnification: every tissue tile embedded there "
        "is annotated; compute more at 20× (0.5 µm/px)")
