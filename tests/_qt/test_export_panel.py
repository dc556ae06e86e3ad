"""The widget's exports (overlays GeoJSON, heatmap TIFF) carry the provenance the CLI's do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tifffile
from qtpy.QtWidgets import QLabel

from napari_virchow.io.provenance import PROVENANCE_KEYS
from tests._qt.conftest import dialogs, train_on_planted, wait_exported

pytestmark = pytest.mark.timeout(300)


def _check(meta: dict, session) -> None:
    missing = set(PROVENANCE_KEYS) - set(meta)
    assert not missing, missing
    assert meta["slide_fingerprint"] == session.slide.fingerprint and meta["slide_name"] == "planted.tif"
    assert meta["encoder"] == "virchow2-tiny" and meta["weights_id"] == session.weights_id
    assert meta["tile_size"] == 224 and meta["tile_size_l0"] == session.grid.tile_size_l0
    assert meta["target_mpp"] == pytest.approx(0.5) and meta["tissue_threshold"] == session.grid.tissue_threshold
    assert meta["positive_class"] == "tumour" and set(meta["head_classes"]) == {"tumour", "normal"}


@pytest.mark.drives("export_geojson_btn", "export_heatmap_btn")
def test_exports_record_provenance(qtbot, planted_widget, ui, tmp_path: Path, monkeypatch) -> None:
    w, u = planted_widget, ui(planted_widget)
    u.click("export_heatmap_btn")  # nothing to export yet: one message, no file
    train_on_planted(qtbot, u, w, compute=False)
    session = w.session()
    assert session.head is not None

    gj = tmp_path / "planted.overlays.geojson"
    dialogs(monkeypatch, save=gj)
    u.click("export_geojson_btn")
    wait_exported(qtbot, w)
    collection = json.loads(gj.read_text())
    assert collection["features"]  # heatmap regions
    status = w.findChild(QLabel, "status_label").text()
    assert status == f"exported {len(collection['features'])} regions to {gj} (heatmap ≥ 0.50, clusters, hits)"
    _check(collection["napari_virchow"], session)

    tif = tmp_path / "planted.heatmap.tif"
    dialogs(monkeypatch, save=tif)
    u.click("export_heatmap_btn")
    wait_exported(qtbot, w)
    with tifffile.TiffFile(tif) as f:
        meta = json.loads(f.pages[0].description)
        data = f.pages[0].asarray()
    _check(meta, session)
    g = session.grid
    assert meta["mpp"] == pytest.approx(g.tile_size_l0 * 0.5)  # a heatmap pixel, not the slide's
    assert meta["slide_mpp"] == pytest.approx(0.5) and meta["mpp_source"] == "file"
    assert (data > 0).any() and (data == 0).any()  # values where tiles are embedded, 0 = no value elsewhere
    for side in data.shape:  # the slide's physical size, to within a heatmap pixel
        assert abs(side * meta["mpp"] - 2048 * 0.5) < meta["mpp"]


@pytest.mark.drives("export_geojson_btn", "export_heatmap_btn")
def test_export_to_an_unwritable_place_says_so_once(qtbot, planted_widget, ui, tmp_path: Path, monkeypatch) -> None:
    w, u = planted_widget, ui(planted_widget)
    shown: list[str] = []
    monkeypatch.setattr("napari_virchow._qt.errors.show_error", shown.append)
    train_on_planted(qtbot, u, w, compute=False)
    blocker = tmp_path / "a file"  # a "folder" that is a file: neither export can write under it
    blocker.write_text("not a folder")
    for button, name in (("export_geojson_btn", "a.geojson"), ("export_heatmap_btn", "a.tif")):
        dialogs(monkeypatch, save=blocker / name)
        u.click(button)
        wait_exported(qtbot, w)
    assert len(shown) == 2 and all("cannot write" in m and "choose another folder" in m for m in shown), shown
    assert "a.geojson" in shown[0] and "a.tif" in shown[1]
    assert blocker.is_file() and blocker.read_text() == "not a folder"
