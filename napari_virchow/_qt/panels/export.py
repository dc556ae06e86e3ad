"""'Export': the overlays on screen as QuPath GeoJSON (heatmap regions, clusters, hits)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from napari.utils.notifications import show_info
from qtpy.QtWidgets import QFileDialog, QGroupBox, QPushButton, QVBoxLayout, QWidget

from napari_virchow._qt.errors import report
from napari_virchow._qt.panels.base import Host, named
from napari_virchow._qt.panels.clusters import cluster_color
from napari_virchow.errors import VirchowError
from napari_virchow.session import SlideSession

__all__ = ["ExportPanel", "overlay_features"]


def _rgb(hex_color: str) -> tuple[int, int, int]:
    return tuple(int(hex_color[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]


def overlay_features(session: SlideSession, threshold: float, hits: list[Any]) -> list[dict[str, Any]]:
    """QuPath features of what the session shows: heatmap ≥ ``threshold``, clusters, ``hits``."""
    from napari_virchow.io.export import threshold_features
    from napari_virchow.io.geojson import hits_to_features, tiles_to_features

    g = session.grid
    feats: list[dict[str, Any]] = []
    if session.probability is not None and session.head is not None:
        done = np.isfinite(session.probability)
        feats += threshold_features(session.probability[done], g.coords[done], g.tile_size_l0, threshold,
                                    class_name=str(session.head.positive_class))  # fmt: skip
    if session.cluster_labels is not None:
        ids = sorted(int(i) for i in np.unique(session.cluster_labels) if i > 0)
        feats += tiles_to_features(g.coords, g.tile_size_l0, session.cluster_labels,
                                   {i: f"Cluster {i}" for i in ids}, {i: _rgb(cluster_color(i)) for i in ids})
    if hits:
        feats += hits_to_features(hits, g.tile_size_l0)
    return feats


class ExportPanel(QGroupBox):
    """One button: every overlay of the slide to a GeoJSON file QuPath opens."""

    def __init__(self, host: Host, threshold: Callable[[], float], n_hits: Callable[[], int],
                 parent: QWidget | None = None) -> None:  # fmt: skip
        super().__init__("Export", parent)
        self._host, self._threshold, self._n_hits = host, threshold, n_hits
        lay = QVBoxLayout(self)
        self.export_btn = named(QPushButton("Export overlays to QuPath (GeoJSON)…"), "export_geojson_btn",
                                "heatmap regions above 'hide below', clusters and similar-region hits")
        self.export_btn.clicked.connect(self.export)
        lay.addWidget(self.export_btn)

    def export(self) -> None:
        try:
            session = self._host.session()
        except VirchowError as exc:
            report(exc)
            return
        hits = session.hits(self._n_hits()) if session.similarity is not None else []
        threshold = self._threshold() or 0.5
        feats = overlay_features(session, threshold, hits)
        if not feats:
            report(VirchowError("nothing to export yet: train a probe, cluster, or pick a query first"))
            return
        name = f"{session.slide.path.stem}.overlays.geojson"
        path, _ = QFileDialog.getSaveFileName(self, "Export overlays", name, "GeoJSON (*.geojson)")
        if not path:
            return
        from napari_virchow.io.geojson import write_annotations

        try:
            write_annotations(path, feats)
        except OSError as exc:
            report(VirchowError(f"cannot write {path}: {exc.strerror or exc}; choose another folder"))
            return
        show_info(f"exported {len(feats)} regions to {path} (heatmap ≥ {threshold:.2f}, clusters, hits)")
