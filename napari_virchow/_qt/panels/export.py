"""'Export': the overlays on screen as QuPath GeoJSON (heatmap regions, clusters, hits) and the
heatmap as a pyramidal TIFF aligned with the slide; both record their provenance
(:func:`~napari_virchow.io.provenance.provenance`: encoder, weights, µm/px, tiles, tissue, plugin
version, slide fingerprint), as the CLI's exports do."""

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

__all__ = ["ExportPanel", "export_provenance", "overlay_features"]


def _rgb(hex_color: str) -> tuple[int, int, int]:
    return tuple(int(hex_color[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]


def overlay_features(session: SlideSession, threshold: float, hits: list[Any]) -> list[dict[str, Any]]:
    """QuPath features of what the session shows: heatmap ≥ ``threshold``, clusters, ``hits``."""
    from napari_virchow.io.export import threshold_features
    from napari_virchow.io.geojson import hits_to_features, tiles_to_features

    g, bounds = session.grid, session.slide.dimensions
    feats: list[dict[str, Any]] = []
    if session.probability is not None and session.head is not None:
        done = np.isfinite(session.probability)
        feats += threshold_features(session.probability[done], g.coords[done], g.tile_size_l0, threshold,
                                    class_name=str(session.head.positive_class), bounds=bounds)  # fmt: skip
    if session.cluster_labels is not None:
        ids = sorted(int(i) for i in np.unique(session.cluster_labels) if i > 0)
        feats += tiles_to_features(g.coords, g.tile_size_l0, session.cluster_labels,
                                   {i: f"Cluster {i}" for i in ids}, {i: _rgb(cluster_color(i)) for i in ids},
                                   bounds=bounds)  # fmt: skip
    if hits:
        feats += hits_to_features(hits, g.tile_size_l0, bounds=bounds)
    return feats


def export_provenance(session: SlideSession) -> dict[str, Any]:
    """What the widget's exports record: the session's provenance, its head and the overlay levels."""
    from napari_virchow.io.provenance import provenance

    meta = provenance(session)
    head = session.head
    if head is not None:
        meta.update(head_classes=list(head.classes), positive_class=head.positive_class,
                    head_weights_id=head.weights_id)  # fmt: skip
    meta["overlay_mpps"] = sorted(session.overlay_levels("probability")) or None
    return meta


class ExportPanel(QGroupBox):
    """Every overlay of the slide to a GeoJSON file QuPath opens; the heatmap to a TIFF."""

    def __init__(self, host: Host, threshold: Callable[[], float], n_hits: Callable[[], int],
                 parent: QWidget | None = None) -> None:  # fmt: skip
        super().__init__("Export", parent)
        self._host, self._threshold, self._n_hits = host, threshold, n_hits
        lay = QVBoxLayout(self)
        self.export_btn = named(QPushButton("Export overlays to QuPath (GeoJSON)…"), "export_geojson_btn",
                                "heatmap regions above 'hide below', clusters and similar-region hits")
        self.export_btn.clicked.connect(self.export)
        lay.addWidget(self.export_btn)
        self.export_tiff_btn = named(QPushButton("Export heatmap (TIFF)…"), "export_heatmap_btn",
                                     "the probability per tile as a pyramidal TIFF aligned with the slide")
        self.export_tiff_btn.clicked.connect(self.export_heatmap)
        lay.addWidget(self.export_tiff_btn)

    def _session(self) -> SlideSession | None:
        try:
            return self._host.session()
        except VirchowError as exc:
            report(exc)
            return None

    def _save(self, session: SlideSession, title: str, suffix: str, file_filter: str,
              write: Callable[[str], None]) -> str | None:  # fmt: skip
        """Ask where to save (``<slide stem><suffix>`` proposed), then ``write(path)``: the path
        written, or ``None`` when the user cancelled or the write failed (reported once)."""
        name = f"{session.slide.path.stem}{suffix}"
        path, _ = QFileDialog.getSaveFileName(self, title, name, file_filter)
        if not path:
            return None
        try:
            write(path)
        except OSError as exc:
            report(VirchowError(f"cannot write {path}: {exc.strerror or exc}; choose another folder"))
            return None
        except VirchowError as exc:
            report(exc)
            return None
        return path

    def export(self) -> None:
        """Heatmap regions ≥ 'hide below', clusters and hits as QuPath GeoJSON."""
        from napari_virchow.io.geojson import write_annotations

        session = self._session()
        if session is None:
            return
        hits = session.hits(self._n_hits()) if session.similarity is not None else []
        threshold = self._threshold() or 0.5
        feats = overlay_features(session, threshold, hits)
        if not feats:
            report(VirchowError("nothing to export yet: train a probe, cluster, or pick a query first"))
            return
        path = self._save(session, "Export overlays", ".overlays.geojson", "GeoJSON (*.geojson)",
                          lambda p: write_annotations(p, feats, provenance=export_provenance(session)))
        if path:
            show_info(f"exported {len(feats)} regions to {path} (heatmap ≥ {threshold:.2f}, clusters, hits)")

    def export_heatmap(self) -> None:
        """The heatmap (finest magnification computed at each place) as a uint8 pyramidal TIFF."""
        from napari_virchow.io.export import write_heatmap_tiff

        session = self._session()
        if session is None:
            return
        raster = session.overlay_raster("probability") if session.head is not None else None
        if raster is None:
            report(VirchowError("no heatmap yet: train a probe or load a head first"))
            return
        slide = session.slide

        def write(path: str) -> None:
            write_heatmap_tiff(path, raster.data, mpp_l0=slide.require_mpp(), tile_size_l0=raster.tile_size_l0,
                               slide_dims=slide.dimensions, metadata=export_provenance(session))  # fmt: skip

        path = self._save(session, "Export heatmap", ".heatmap.tif", "TIFF (*.tif *.tiff)", write)
        if path:
            show_info(f"exported the heatmap to {path} ({raster.tile_size_l0 * slide.require_mpp():.4g} µm/px)")
