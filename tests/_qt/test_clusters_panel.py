"""'Clusters' driven through Qt: k, embedding colours, Cluster, legend."""

from __future__ import annotations

import numpy as np
import pytest
from napari.layers import Points

from napari_virchow._qt.panels.clusters import cluster_color
from napari_virchow._qt.viewport import camera
from tests._qt.conftest import cells, compute_whole_slide, drawn_past_slide, wait_exported, wait_idle

pytestmark = pytest.mark.timeout(300)


@pytest.mark.drives("k_spin", "rgb_check", "cluster_btn")
def test_cluster_draws_labels_legend_and_embedding_colours(qtbot, planted_widget, ui) -> None:
    w, u = planted_widget, ui(planted_widget)
    compute_whole_slide(qtbot, w, u)
    u.spin("k_spin", 3)
    u.click("rgb_check")
    u.click("cluster_btn")
    wait_idle(qtbot, w)
    labels = w.viewer.layers["clusters · planted"]
    assert labels.data.max() == 3 and "cluster 3" in w.clusters.legend.text()
    # one colour per cluster, the same on the canvas and in the legend
    for cid in (1, 2, 3):
        assert cluster_color(cid) in w.clusters.legend.text()
        np.testing.assert_allclose(labels.colormap.map(cid)[:3], [int(cluster_color(cid)[i:i + 2], 16) / 255
                                                                  for i in (1, 3, 5)], atol=1e-6)  # fmt: skip
    rgb = w.viewer.layers["embedding colours · planted"]
    session = w.session()
    rows, cols = session.grid.grid_shape
    not_embedded = ~session.store().done
    tile_um = session.grid.tile_size_l0 * 0.5
    alpha = cells(rgb, tile_um)[:rows, :cols, 3].ravel()
    assert np.all(alpha[not_embedded] == 0) and np.all(alpha[~not_embedded] == 1)  # see-through, not grey
    slide = w.viewer.layers["planted"]
    assert drawn_past_slide(rgb, slide) == 0 and drawn_past_slide(labels, slide) == 0  # nothing off the slide
    assert w.jobbar.status.text() == "3 clusters of the embedded tiles"


@pytest.mark.drives("k_spin", "cluster_btn")
def test_cluster_legend_on_the_canvas(qtbot, planted_widget, ui) -> None:
    w, u = planted_widget, ui(planted_widget)
    compute_whole_slide(qtbot, w, u)
    slide = w.slide_layer()
    for k in (3, 4):  # recomputing the clusters redraws the legend
        u.spin("k_spin", k)
        u.click("cluster_btn")
        wait_idle(qtbot, w)
        labels, legend = w.viewer.layers["clusters · planted"], w.viewer.layers["cluster legend · planted"]
        counts = w.session().cluster_counts()
        assert isinstance(legend, Points) and len(legend.data) == k == len(counts)
        assert list(legend.features["label"]) == [f"cluster {c}: {n:,} tile{'s' * (n != 1)}" for c, n in counts.items()]
        for row, cid in enumerate(counts):  # the dot of each entry has the colour of its cluster on the canvas
            np.testing.assert_allclose(legend.face_color[row], labels.colormap.map(cid), atol=1e-6)
        # at the slide's top left, in µm, inside the slide
        (y0, x0), (y1, x1) = np.asarray(slide.extent.world)[:, -2:]
        assert np.all(legend.data >= [y0, x0]) and np.all(legend.data[:, 0] < y0 + (y1 - y0) / 4)
        assert np.all(legend.data[:, 1] < x0 + (x1 - x0) / 4) and tuple(legend.units) == tuple(slide.units)
        assert w.viewer.layers.selection.active is not legend
        if k == 3:
            callbacks_after_first = len(labels.events.visible.callbacks)
    assert legend.visible and len(labels.events.visible.callbacks) == callbacks_after_first
    labels.visible = False  # hidden with its clusters (the demo's last view hides them)
    assert not legend.visible
    labels.visible = True
    assert legend.visible
    w.viewer.layers.remove(labels)  # the legend goes with its clusters
    assert "cluster legend · planted" not in w.viewer.layers


def _legend_lines(w, legend) -> tuple[np.ndarray, np.ndarray, float]:
    """(screen y of each dot, screen y of the centre of each line of dark text beside the dots, row px)."""
    shot = np.asarray(w.viewer.screenshot(canvas_only=True, flash=False))[..., :3].astype(int)
    cam, (h, wd) = camera(w.viewer), shot.shape[:2]
    ratio = h / w.viewer.canvas.size[0]  # screenshot px per canvas px
    cy, cx = cam.center[-2:]
    dots = np.asarray(legend.data) * legend.scale + legend.translate  # world µm
    ys = (h / 2 + (dots[:, 0] - cy) * cam.zoom * ratio)
    xs = (wd / 2 + (dots[:, 1] - cx) * cam.zoom * ratio)
    step = float(np.diff(ys).mean())  # px between rows
    x0, x1 = int(xs[0] + 0.45 * step), int(min(wd, xs[0] + 2.5 * step))  # "clus" of "cluster i: …"
    y0, y1 = int(max(0, ys[0] - step)), int(min(h, ys[-1] + step))
    dark = (shot[y0:y1, x0:x1] < 90).all(axis=-1).any(axis=1)  # rows with black text in them
    edges = np.flatnonzero(np.diff(np.r_[0, dark.astype(int), 0]))
    centres = y0 + (edges[0::2] + edges[1::2] - 1) / 2
    return ys, centres, step


@pytest.mark.drives("cluster_btn")
def test_each_legend_label_is_drawn_beside_its_dot_at_every_zoom(qtbot, planted_widget, ui) -> None:
    # as seen on the canvas: fixed-size text sat one row above its dot (wrong colour for every label)
    w, u = planted_widget, ui(planted_widget)
    w.viewer.window._qt_window.resize(1280, 800)
    compute_whole_slide(qtbot, w, u)
    u.spin("k_spin", 5)
    u.click("cluster_btn")
    wait_idle(qtbot, w)
    for layer in w.viewer.layers:  # the slide and the legend alone (the legend shows with its clusters)
        layer.visible = layer.name in ("planted", "clusters · planted", "cluster legend · planted")
    w.viewer.layers["clusters · planted"].opacity = 0.0
    legend = w.viewer.layers["cluster legend · planted"]
    for zoom in (1.0, 3.0):
        w.viewer.reset_view()
        cam = camera(w.viewer)
        cam.zoom *= zoom
        if zoom > 1:
            cam.center = (*cam.center[:-2], *legend.data.mean(axis=0))
        qtbot.wait(100)
        dots, lines, step = _legend_lines(w, legend)
        assert step > 8 and len(lines) == len(dots) == 5, (zoom, dots, lines)
        np.testing.assert_allclose(lines, dots, atol=0.2 * step)  # each line centred on its own dot


@pytest.mark.drives("cluster_btn", "pick_btn", "export_geojson_btn")
def test_export_overlays_to_qupath(qtbot, planted_widget, ui, tmp_path, monkeypatch) -> None:
    import json

    from qtpy.QtWidgets import QFileDialog

    from tests._qt.conftest import click_canvas

    w, u = planted_widget, ui(planted_widget)
    compute_whole_slide(qtbot, w, u)
    u.click("cluster_btn")
    wait_idle(qtbot, w)
    u.click("pick_btn")
    click_canvas(qtbot, w, 600, 600)
    qtbot.waitUntil(lambda: w.similar.hit_list.count() > 0, timeout=60_000)
    wait_idle(qtbot, w)
    out = tmp_path / "planted.overlays.geojson"
    monkeypatch.setattr(QFileDialog, "getSaveFileName", staticmethod(lambda *a, **k: (str(out), "")))
    u.click("export_geojson_btn")
    wait_exported(qtbot, w)
    feats = json.loads(out.read_text())["features"]
    classes = [f["properties"]["classification"]["name"] for f in feats]
    non_empty = sum(n > 0 for n in w.session().cluster_counts().values())
    assert sum(c.startswith("Cluster ") for c in classes) == non_empty > 1
    assert classes.count("Similar") == w.similar.hit_list.count()
    first = next(f for f in feats if f["properties"]["classification"]["name"] == "Cluster 1")
    assert first["properties"]["classification"]["color"] == [int(cluster_color(1)[i:i + 2], 16) for i in (1, 3, 5)]
