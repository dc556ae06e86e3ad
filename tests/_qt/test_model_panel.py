"""'Slide and model' driven through Qt: slide choice, µm/px override, encoder, weights, device, batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from qtpy.QtWidgets import QFileDialog

from napari_virchow.analysis.heads import LinearHead
from napari_virchow.slides.synthetic import PlantedSource, write_pyramid
from tests._qt.conftest import wait_idle
from tests.conftest import PLANTED_PATTERNS, PLANTED_TISSUE

pytestmark = pytest.mark.timeout(300)


@pytest.mark.drives("random_check")
def test_random_weights_banner_follows_the_check_box(planted_widget, ui) -> None:
    w, u = planted_widget, ui(planted_widget)
    assert w.model.banner.isVisible() and not u["weights_edit"].isEnabled()
    u.click("random_check")
    assert not w.model.banner.isVisible() and u["weights_edit"].isEnabled()
    assert w.config().weights is None  # the Hugging Face cache
    u.click("random_check")
    assert w.model.banner.isVisible() and w.config().weights == "random"


@pytest.mark.drives("weights_browse_btn", "weights_edit")
def test_weights_file_by_dialog_or_typed(planted_widget, ui, tmp_path: Path, monkeypatch) -> None:
    w, u = planted_widget, ui(planted_widget)
    chosen = tmp_path / "virchow2.safetensors"
    chosen.write_bytes(b"")
    monkeypatch.setattr(QFileDialog, "getOpenFileName", staticmethod(lambda *a, **k: (str(chosen), "")))
    u.click("weights_browse_btn")
    assert u["weights_edit"].text() == str(chosen) and not u["random_check"].isChecked()
    assert w.config().weights == str(chosen)
    u.type("weights_edit", "/models/other.safetensors")
    assert w.config().weights == "/models/other.safetensors"


@pytest.mark.drives("encoder_combo", "device_combo", "batch_spin")
def test_encoder_device_and_batch_reach_the_session(planted_widget, ui) -> None:
    w, u = planted_widget, ui(planted_widget)
    tiny = w.session()
    tiny.head = LinearHead(np.zeros((1, 96)), [0.0], ["normal", "tumour"], encoder="virchow2-tiny")
    w.head.show_head(tiny)
    assert "head for virchow2-tiny" in w.head.head_label.text()
    u.choose("device_combo", "cpu")
    u.spin("batch_spin", 4)
    u.type("encoder_combo", "virchow2")
    config = w.session().config
    assert (config.encoder, config.device, config.batch_size) == ("virchow2", "cpu", 4)
    assert w.session() is not tiny
    # the label no longer names the head of the other encoder
    assert w.head.head_label.text().startswith("no head for virchow2")
    u.type("encoder_combo", "virchow2-tiny")
    assert w.head.head_label.text().startswith("no head for virchow2-tiny")  # cpu, batch 4: another session


@pytest.mark.drives("slide_combo")
def test_slide_combo_chooses_the_slide(planted_widget, ui, sample_pyramid: Path) -> None:
    w, u = planted_widget, ui(planted_widget)
    w.viewer.open(str(sample_pyramid), plugin="napari-virchow")
    assert [w.model.slide_combo.itemText(i) for i in range(w.model.slide_combo.count())] == [
        "planted", "cmu_small_region_pyramid"]  # fmt: skip
    u.choose("slide_combo", "cmu_small_region_pyramid")
    assert w.slide_layer().name == "cmu_small_region_pyramid"
    assert w.session().slide.path == sample_pyramid
    u.choose("slide_combo", "planted")
    assert w.session().slide.path.name == "planted.tif"


@pytest.fixture
def no_mpp_slide(tmp_path: Path) -> Path:
    """The planted slide without any resolution tag: analysis needs an override."""
    return write_pyramid(tmp_path / "nompp.tif", 2048, 2048, PlantedSource([PLANTED_TISSUE, *PLANTED_PATTERNS]),
                         mpp=None, levels=3)  # fmt: skip


@pytest.mark.drives("mpp_spin", "compute_btn")
def test_mpp_override_after_a_failed_attempt_applies_at_once_and_aligns(qtbot, make_widget, ui,
                                                                       no_mpp_slide: Path) -> None:
    with pytest.warns(UserWarning, match="override"):
        w = make_widget(no_mpp_slide)
    u = ui(w)
    slide_layer = w.slide_layer()
    assert tuple(slide_layer.scale) == (1.0, 1.0)
    w.viewer.reset_view()
    u.choose("mag_combo", "20× (0.5 µm/px)")  # this test is about 20× tiles
    u.click("compute_btn")
    assert "µm/px override" in w.jobbar.status.text() and "--mpp" not in w.jobbar.status.text()
    u.spin("mpp_spin", 0.5)
    # the slide layer itself is in µm now, like every overlay drawn over it
    assert tuple(slide_layer.scale) == pytest.approx((0.5, 0.5))
    assert str(slide_layer.units[-1]) == "micrometer"
    w.viewer.reset_view()
    u.spin("limit_spin", 100000)
    u.click("compute_btn")
    wait_idle(qtbot, w)
    session = w.session()
    assert session.slide.mpp == 0.5 and session.store().n_done == session.grid.n_tissue
    embedded = w.viewer.layers["embedded · nompp"]
    slide_edges = np.asarray(slide_layer.extent.world)[:, -2:]
    overlay_edges = np.asarray(embedded.extent.world)[:, -2:]
    tile_um = session.grid.tile_size_l0 * 0.5
    assert np.all(np.abs(overlay_edges[0] - slide_edges[0]) < tile_um)  # same corner, not a quarter
    assert np.all(overlay_edges[1] > 0.5 * slide_edges[1])
    assert {str(u) for lyr in w.viewer.layers for u in lyr.units} == {"micrometer"}  # no "Inconsistent units"


@pytest.mark.drives("reopen_btn")
def test_a_slide_opened_by_another_reader_is_offered_for_reopening(make_napari_viewer, ui, sample_pyramid: Path,
                                                                  tmp_path: Path, monkeypatch) -> None:
    from napari_virchow._qt.widget import VirchowWidget

    monkeypatch.setenv("NAPARI_VIRCHOW_CACHE", str(tmp_path / "cache"))
    viewer = make_napari_viewer(show=True)
    [foreign] = viewer.open(str(sample_pyramid), plugin="napari")  # napari's builtins
    w = VirchowWidget(viewer)
    viewer.window.add_dock_widget(w)
    u = ui(w)
    assert w.model.slide_combo.currentText() == foreign.name
    assert "Reopen with Virchow" in w.jobbar.status.text()
    u.click("reopen_btn")
    assert foreign not in viewer.layers
    assert w.slide_layer() is not None and w.slide_layer().name == "cmu_small_region_pyramid"
    assert not u["reopen_btn"].isVisible()
