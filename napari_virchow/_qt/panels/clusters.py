"""'Clusters': k-means over the embedded tiles, with a legend and optional PCA colours."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from napari.layers import Layer, Points
from napari.utils.colormaps import DirectLabelColormap
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QCheckBox, QGroupBox, QHBoxLayout, QLabel, QPushButton, QSpinBox, QWidget

from napari_virchow import jobs as _jobs
from napari_virchow._qt.errors import gui_message
from napari_virchow._qt.layers import layer_named, overlay_name, show_raster
from napari_virchow._qt.panels.base import Host, form, named
from napari_virchow.analysis.token_jobs import TokenClustersReady
from napari_virchow.errors import VirchowError
from napari_virchow.session import SlideSession

__all__ = ["LEGEND", "PALETTE", "ClusterPanel"]

#: overlay kind of the on-canvas legend (a Points layer: one coloured dot and label per cluster)
LEGEND = "cluster legend"
#: height of a legend line in rows (one row = the spacing of the dots)
TEXT_EM = 0.6


def n_tiles(n: int) -> str:
    """"1 tile", "2 tiles", "1,024 tiles"."""
    return f"{n:,} tile{'' if n == 1 else 's'}"

#: a qualitative palette that reads on H&E (Okabe–Ito, then Tableau): no three near-purples
PALETTE = ["#e69f00", "#56b4e9", "#009e73", "#f0e442", "#0072b2", "#d55e00", "#cc79a7", "#000000",
           "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]  # fmt: skip


def cluster_color(cid: int) -> str:
    return PALETTE[(cid - 1) % len(PALETTE)]


class ClusterPanel(QGroupBox):
    """Number of clusters, embedding colours, Cluster, and the legend."""

    def __init__(self, host: Host, parent: QWidget | None = None) -> None:
        super().__init__("Clusters", parent)
        self._host = host
        lay = form(self)
        row = QHBoxLayout()
        self.k_spin = named(QSpinBox(minimum=2, maximum=64, value=8), "k_spin", "number of clusters")
        self.rgb_check = named(QCheckBox("embedding colours"), "rgb_check",
                               "also colour each embedded tile by its first 3 principal components")
        self.cluster_btn = named(QPushButton("Cluster"), "cluster_btn")
        self.cluster_btn.clicked.connect(self.cluster)
        row.addWidget(self.k_spin)
        row.addWidget(self.cluster_btn)
        lay.addRow("k", row)
        lay.addRow(self.rgb_check)
        self.token_check = named(QCheckBox("token clusters (tiles in view)"), "token_clusters_check",
                                 "also k-means of the 7-µm patch tokens of the tiles in view, as a finer overlay")
        self.token_check.toggled.connect(self._token_toggled)
        lay.addRow(self.token_check)
        self.legend = named(QLabel(), "legend_label")
        self.legend.setTextFormat(Qt.TextFormat.RichText)
        lay.addRow(self.legend)
        host.viewer.layers.events.removed.connect(self._layer_removed)

    def _layer_removed(self, event: object) -> None:
        """The canvas legend goes with its clusters layer."""
        name = getattr(getattr(event, "value", None), "name", "")
        if name.startswith("clusters · "):
            legend = layer_named(self._host.viewer, f"{LEGEND} · {name.split(' · ', 1)[1]}")
            if legend is not None:
                self._host.viewer.layers.remove(legend)

    def _sync_legend(self, event: object) -> None:
        """The canvas legend is shown exactly when its clusters layer is."""
        labels = getattr(event, "source", None)
        name = getattr(labels, "name", "")
        if name.startswith("clusters · "):
            legend = layer_named(self._host.viewer, f"{LEGEND} · {name.split(' · ', 1)[1]}")
            if legend is not None:
                legend.visible = labels.visible

    def _draw_legend(self, slide_layer: Layer, counts: dict[int, int]) -> Points:
        """One dot (the cluster's colour) and "cluster i: n tiles" per cluster, at the slide's top left, in µm."""
        viewer = self._host.viewer
        name = overlay_name(slide_layer, LEGEND)
        if name in viewer.layers:
            viewer.layers.remove(name)
        (y0, x0), (y1, x1) = np.asarray(slide_layer.extent.world)[:, -2:]
        step = max(min(y1 - y0, x1 - x0) / 25, 1e-6)  # µm between rows; dots and text scale with the slide
        cids = list(counts)
        coords = np.array([[y0 + step * (i + 1), x0 + step] for i in range(len(cids))], float).reshape(-1, 2)
        keep = viewer.layers.selection.active
        legend = viewer.add_points(
            coords, name=name, size=0.7 * step, face_color=[cluster_color(c) for c in cids], border_color="white",
            features={"label": [f"cluster {c}: {n_tiles(counts[c])}" for c in cids]},
            # text that scales with the zoom, like the dots: each label stays beside its dot at every zoom
            # (fixed-size text drifted a row above it at some zooms); the anchor is the text's
            # bottom-left on napari's y-down canvas, so 0.6 line below the dot centres the line's letters on it
            text={"string": "{label}", "anchor": "upper_left", "translation": [0.6 * TEXT_EM * step, 0.6 * step],
                  "color": "black", "size": TEXT_EM * step * 72 / 96, "scaling": True},
            units=("µm", "µm"),
        )  # fmt: skip
        if keep is not None:  # the legend must not take the selection (and its mouse mode) away
            viewer.layers.selection.active = keep
        return legend

    def cluster(self) -> None:
        """K-means over every embedded tile of the slide (or the tokens of the tiles in view)."""
        if self.token_check.isChecked():
            self.cluster_tokens()
            return
        self._host.run(_jobs.cluster_job, self.k_spin.value(), with_rgb=self.rgb_check.isChecked(),
                       mpp=self._host.view_mpp())

    # --- token resolution ----------------------------------------------------------------------
    def _token_layer(self) -> str | None:
        layer = self._host.slide_layer()
        return None if layer is None else overlay_name(layer, "token clusters")

    def _token_toggled(self, on: bool) -> None:
        name = self._token_layer()
        if on:
            self.cluster_tokens()
        elif name is not None and name in self._host.viewer.layers:
            self._host.viewer.layers.remove(name)

    def cluster_tokens(self) -> None:
        """K-means of the patch tokens of the tiles in view (their own k-means: see token_clusters)."""
        from napari_virchow._qt.panels.tokens import view_tiles
        from napari_virchow.analysis.token_jobs import token_clusters_job
        from napari_virchow.analysis.token_store import DEFAULT_K

        try:
            session = self._host.session()
        except VirchowError as exc:
            self._host.set_status(gui_message(exc))
            return
        view = view_tiles(self._host, session)
        if view is not None:
            tokens = getattr(self._host, "tokens", None)
            compressed = getattr(tokens, "compressed", False)
            token_k = getattr(tokens, "k", DEFAULT_K)
            self._host.run(token_clusters_job, view[0], self.k_spin.value(), mpp=view[1], compressed=compressed,
                           token_k=token_k)  # fmt: skip

    def _draw_tokens(self, ev: TokenClustersReady) -> None:
        name = self._token_layer()
        if name is None or not self.token_check.isChecked():
            return
        counts = ev.clusters.counts
        colormap = DirectLabelColormap(color_dict={None: "transparent", 0: "transparent",
                                                   **{cid: cluster_color(cid) for cid in counts}})  # fmt: skip
        lyr = show_raster(self._host.viewer, name, ev.clusters.raster, kind="labels", opacity=0.6, colormap=colormap)
        lyr.colormap = colormap
        self.legend.setText("token clusters (tiles in view)<br>" + "<br>".join(
            f"<span style='color:{cluster_color(cid)}'>■</span> cluster {cid}: {n:,} tokens"
            for cid, n in counts.items()))  # fmt: skip

    def draw(self, session: SlideSession) -> None:
        layer = self._host.slide_layer()
        if layer is None or session.cluster_labels is None:
            return
        counts = session.cluster_counts()
        colormap = DirectLabelColormap(color_dict={None: "transparent", 0: "transparent",
                                                   **{cid: cluster_color(cid) for cid in counts}})  # fmt: skip
        lyr = show_raster(self._host.viewer, overlay_name(layer, "clusters"),
                          session.raster(session.cluster_labels, mpp=session.cluster_mpp),
                          kind="labels", opacity=0.5, colormap=colormap)  # fmt: skip
        lyr.colormap = colormap
        if counts:
            legend = self._draw_legend(layer, counts)
            legend.visible = lyr.visible
            lyr.events.visible.connect(self._sync_legend)  # connected once: napari skips a known callback
        self.legend.setText("<br>".join(f"<span style='color:{cluster_color(cid)}'>■</span> cluster {cid}: "
                                        f"{n_tiles(n)}" for cid, n in counts.items()))  # fmt: skip

    def on_event(self, session: SlideSession, ev: object) -> None:
        if isinstance(ev, TokenClustersReady):
            self._draw_tokens(ev)
            return
        if isinstance(ev, _jobs.Clustered):
            self.draw(session)
            layer = self._host.slide_layer()
            if ev.result.rgb is not None and layer is not None:
                # only the embedded tiles get a colour: the rest stays see-through (alpha 0), not grey
                raster = session.raster(ev.result.rgb, mpp=ev.result.mpp)
                seen = np.isfinite(raster.data[..., :1]).astype(np.float32)
                rgba = replace(raster, data=np.concatenate([np.nan_to_num(raster.data), seen], axis=-1))
                show_raster(self._host.viewer, overlay_name(layer, "embedding colours"), rgba, rgb=True,
                            opacity=0.6)  # fmt: skip
            m = ev.result.mpp
            where = f" at {m:g} µm/px" if m is not None and m != session.default_mpp else ""
            self._host.set_status(f"{len(ev.result.counts)} clusters of the embedded tiles{where}")
        elif isinstance(ev, _jobs.BatchDone) and "clusters" in ev.changed:
            self.draw(session)
