"""'Export': the overlays on screen as QuPath GeoJSON (heatmap regions, clusters, hits) and the
heatmap as a pyramidal TIFF aligned with the slide; both record their provenance
(:func:`~napari_virchow.io.provenance.provenance`: encoder, weights, µm/px, tiles, tissue, plugin
version, slide fingerprint), as the CLI's exports do.

What is on screen is copied when the button is pressed (:mod:`napari_virchow.io.overlay_export`),
and the file is traced and written in a worker thread: a whole slide's cluster regions take
seconds, and napari stays responsive (the buttons wait until the file is written).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from napari.qt.threading import create_worker
from napari.utils.notifications import show_info
from qtpy.QtWidgets import QFileDialog, QGroupBox, QPushButton, QVBoxLayout, QWidget

from napari_virchow._qt.errors import report
from napari_virchow._qt.panels.base import Host, named
from napari_virchow._qt.panels.clusters import cluster_color
from napari_virchow.errors import VirchowError
from napari_virchow.io.overlay_export import HeatmapSnapshot, OverlaySnapshot, write_heatmap, write_overlays
from napari_virchow.session import SlideSession

__all__ = ["ExportPanel"]


def _rgb(hex_color: str) -> tuple[int, int, int]:
    return tuple(int(hex_color[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]


class ExportPanel(QGroupBox):
    """Every overlay of the slide to a GeoJSON file QuPath opens; the heatmap to a TIFF."""

    def __init__(self, host: Host, threshold: Callable[[], float], n_hits: Callable[[], int],
                 parent: QWidget | None = None) -> None:  # fmt: skip
        super().__init__("Export", parent)
        self._host, self._threshold, self._n_hits = host, threshold, n_hits
        self.worker: Any = None  # the export being written, if any
        lay = QVBoxLayout(self)
        self.export_btn = named(QPushButton("Export overlays to QuPath (GeoJSON)…"), "export_geojson_btn",
                                "heatmap regions above 'hide below', clusters and similar-region hits")
        self.export_btn.clicked.connect(self.export)
        lay.addWidget(self.export_btn)
        self.export_tiff_btn = named(QPushButton("Export heatmap (TIFF)…"), "export_heatmap_btn",
                                     "the probability per tile as a pyramidal TIFF aligned with the slide")
        self.export_tiff_btn.clicked.connect(self.export_heatmap)
        lay.addWidget(self.export_tiff_btn)

    @property
    def busy(self) -> bool:
        """An export is being written."""
        return self.worker is not None

    def _session(self) -> SlideSession | None:
        try:
            return self._host.session()
        except VirchowError as exc:
            report(exc)
            return None

    def _ask(self, session: SlideSession, title: str, suffix: str, file_filter: str) -> str | None:
        """Where to save (``<slide stem><suffix>`` proposed); ``None`` when the user cancelled."""
        path, _ = QFileDialog.getSaveFileName(self, title, f"{session.slide.path.stem}{suffix}", file_filter)
        return path or None

    def _write(self, path: str, write: Callable[[], Any], done: Callable[[Any], str]) -> None:
        """Run ``write()`` in a worker; then ``done(result)`` is said, or the failure reported once."""
        worker = create_worker(write, _start_thread=False, _ignore_errors=True)
        worker.returned.connect(lambda result: self._said(done(result)))
        worker.errored.connect(lambda exc: self._failed(path, exc))
        worker.finished.connect(self._finished)
        self.worker = worker
        for button in (self.export_btn, self.export_tiff_btn):
            button.setEnabled(False)
        self._host.set_status(f"exporting to {path} …")
        worker.start()

    def _said(self, text: str) -> None:
        self._host.set_status(text)
        show_info(text)

    def _failed(self, path: str, exc: BaseException) -> None:
        if isinstance(exc, OSError):
            exc = VirchowError(f"cannot write {path}: {exc.strerror or exc}; choose another folder")
        report(exc)
        self._host.set_status("")

    def _finished(self) -> None:
        self.worker = None
        for button in (self.export_btn, self.export_tiff_btn):
            button.setEnabled(True)

    def export(self) -> None:
        """Heatmap regions ≥ 'hide below', clusters and hits as QuPath GeoJSON."""
        session = self._session()
        if session is None:
            return
        labels = session.cluster_labels
        ids = [] if labels is None else [int(i) for i in np.unique(labels) if i > 0]
        colors = {i: _rgb(cluster_color(i)) for i in ids}
        snapshot = OverlaySnapshot.of(session, n_hits=self._n_hits(), cluster_colors=colors)
        if snapshot.empty:
            report(VirchowError("nothing to export yet: train a probe, cluster, or pick a query first"))
            return
        path = self._ask(session, "Export overlays", ".overlays.geojson", "GeoJSON (*.geojson)")
        if path is None:
            return
        threshold = self._threshold() or 0.5
        self._write(path, lambda: write_overlays(path, snapshot, threshold),
                    lambda n: f"exported {n} regions to {path} (heatmap ≥ {threshold:.2f}, clusters, hits)")

    def export_heatmap(self) -> None:
        """The heatmap (finest magnification computed at each place) as a uint8 pyramidal TIFF."""
        session = self._session()
        if session is None:
            return
        try:
            snapshot = HeatmapSnapshot.of(session)
        except VirchowError as exc:
            report(exc)
            return
        if snapshot is None:
            report(VirchowError("no heatmap yet: train a probe or load a head first"))
            return
        path = self._ask(session, "Export heatmap", ".heatmap.tif", "TIFF (*.tif *.tiff)")
        if path is None:
            return
        self._write(path, lambda: write_heatmap(path, snapshot),
                    lambda _: f"exported the heatmap to {path} ({snapshot.pixel_mpp:.4g} µm/px)")
