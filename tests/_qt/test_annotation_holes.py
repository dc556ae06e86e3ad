"""GeoJSON holes through the widget: shown as 'hole' shapes, never labelled, kept by a save → load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from qtpy.QtWidgets import QFileDialog

from napari_virchow._qt.annotation_shapes import HOLE_CLASS, regions_with_holes
from napari_virchow.io.geojson import Annotation, read_annotations, write_annotations
from napari_virchow.io.provenance import PROVENANCE_KEYS
from tests._qt.conftest import wait_idle

pytestmark = pytest.mark.timeout(300)


def box(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], float)  # level-0 (x, y)


#: a tumour ring (the tissue around the first planted copy) whose hole is the copy itself, and normal tissue
OUTER, HOLE, NORMAL = box(260, 260, 1100, 1100), box(440, 440, 900, 900), box(300, 1150, 1000, 1750)


def _dialogs(monkeypatch, *, save: Path | None = None, open_: Path | None = None) -> None:
    if save is not None:
        monkeypatch.setattr(QFileDialog, "getSaveFileName", staticmethod(lambda *a, **k: (str(save), "")))
    if open_ is not None:
        monkeypatch.setattr(QFileDialog, "getOpenFileName", staticmethod(lambda *a, **k: (str(open_), "")))


def _probes(head) -> dict[float, object]:
    return dict(getattr(head, "probes", None) or {head.mpp: head})


def test_holes_belong_to_the_smallest_region_around_them() -> None:
    inner = box(500, 500, 800, 800)  # a normal island inside the hole: its own region, not cut
    regions, orphans = regions_with_holes([OUTER, HOLE, inner, box(10, 10, 50, 50)],
                                          ["tumour", HOLE_CLASS, "normal", HOLE_CLASS])  # fmt: skip
    assert [r.class_name for r in regions] == ["tumour", "normal"]
    assert len(regions[0].holes) == 1 and np.array_equal(regions[0].holes[0], HOLE)
    assert regions[1].holes == [] and len(orphans) == 1  # the last hole lies in no region


@pytest.mark.drives("load_geojson_btn", "train_btn", "save_geojson_btn")
def test_geojson_holes_are_not_labelled_and_survive_a_round_trip(qtbot, planted_widget, ui, tmp_path: Path,
                                                                 monkeypatch) -> None:  # fmt: skip
    w, u = planted_widget, ui(planted_widget)
    src = tmp_path / "qupath.geojson"
    write_annotations(src, [Annotation(OUTER, "tumour", holes=[HOLE]), Annotation(NORMAL, "normal")])
    _dialogs(monkeypatch, open_=src)
    u.click("load_geojson_btn")
    layer = w.head.annotation_layer()
    assert list(layer.features["class"]) == ["tumour", HOLE_CLASS, "normal"]  # the hole is a shape of its own
    u.click("train_btn")
    wait_idle(qtbot, w)
    session = w.session()
    assert session.head is not None, w.jobbar.status.text()
    for m, probe in _probes(session.head).items():
        g = session.grid_at(m)
        with_holes, _ = session.annotated_tiles([OUTER, NORMAL], ["tumour", "normal"], holes=[[HOLE], []], mpp=m)
        without, _ = session.annotated_tiles([OUTER, NORMAL], ["tumour", "normal"], mpp=m)
        assert len(with_holes) < len(without)  # the hole covers tiles at this level
        assert sum(probe.metrics["class_counts"].values()) == len(with_holes)  # trained on exactly those
        centre = g.coords[with_holes] + g.tile_size_l0 / 2
        in_hole = np.all((centre > HOLE[0] + g.tile_size_l0 / 2) & (centre < HOLE[2] - g.tile_size_l0 / 2), axis=1)
        assert not in_hole.any()  # no tile wholly inside the hole is labelled

    out = tmp_path / "saved.geojson"
    _dialogs(monkeypatch, save=out)
    u.click("save_geojson_btn")
    saved = read_annotations(out)
    assert [a.class_name for a in saved] == ["tumour", "normal"]
    assert len(saved[0].holes) == 1 and np.allclose(saved[0].holes[0], HOLE) and saved[1].holes == []
    meta = json.loads(out.read_text())["napari_virchow"]  # the slide travels with the annotations
    assert set(PROVENANCE_KEYS) <= set(meta) and meta["slide_fingerprint"] == session.slide.fingerprint
    _dialogs(monkeypatch, open_=out)
    u.click("load_geojson_btn")
    assert list(w.head.annotation_layer().features["class"]) == ["tumour", HOLE_CLASS, "normal"]
