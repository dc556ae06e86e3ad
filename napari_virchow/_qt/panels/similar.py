"""'Similar regions': pick a query on the canvas, list the hits, search a cohort index."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from napari.utils.notifications import show_warning
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QFileDialog,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidgetItem,
    QPushButton,
    QSpinBox,
    QWidget,
)  # fmt: skip

from napari_virchow import jobs as _jobs
from napari_virchow._qt.errors import report
from napari_virchow._qt.flash import Flasher
from napari_virchow._qt.hitlist import add_hit, hit_list, zoom_to_tile
from napari_virchow._qt.layers import (
    SIMILARITY,
    layer_named,
    overlay_name,
    show_boxes,
    show_colorbar_on_top,
    show_raster,
)
from napari_virchow._qt.panels.base import Host, form, named
from napari_virchow._qt.picking import Picker, box_corners
from napari_virchow._reader import METADATA_KEY
from napari_virchow.analysis.token_jobs import TokenSimilarityReady
from napari_virchow.errors import VirchowError
from napari_virchow.session import SlideSession

__all__ = ["SimilarPanel"]

HIT_COLOR = "#ff00ff"  # magenta with a black outline reads on viridis, inferno and H&E


class SimilarPanel(QGroupBox):
    """Pick query, number of hits, cohort index search, and the hit list."""

    def __init__(self, host: Host, parent: QWidget | None = None) -> None:
        super().__init__("Similar regions", parent)
        self._host = host
        self.picker = Picker(host.viewer, host.slide_layer, self.query_at)
        lay = form(self)
        row = QHBoxLayout()
        self.pick_btn = named(QPushButton("Pick query"), "pick_btn",
                              "then click a region (one tile) or drag a box (the mean of its tiles)")
        self.pick_btn.setCheckable(True)
        self.pick_btn.toggled.connect(self.picker.set_enabled)
        self.hits_spin = named(QSpinBox(minimum=1, maximum=500, value=20, suffix=" hits"), "hits_spin")
        row.addWidget(self.pick_btn, 1)
        row.addWidget(self.hits_spin)
        lay.addRow(row)
        self.token_check = named(QCheckBox("token similarity (tiles in view)"), "token_sim_check",
                                 "also the cosine of each 7-µm token in view to the query's mean token: "
                                 "a click on a gland lights glands")  # fmt: skip
        lay.addRow(self.token_check)
        self.index_edit = named(QLineEdit(placeholderText="cohort index (napari-virchow index)"), "index_edit")
        browse = named(QPushButton("…"), "index_browse_btn", "choose a cohort index file")
        browse.setMaximumWidth(32)
        browse.clicked.connect(self._browse_index)
        index_row = QHBoxLayout()
        index_row.addWidget(self.index_edit, 1)
        index_row.addWidget(browse)
        lay.addRow(index_row)
        self.index_info = QLabel("")  # the searched index: size, kind, encoder, magnification
        self.index_info.setObjectName("index_info_label")
        self.index_info.setWordWrap(True)
        lay.addRow(self.index_info)
        self.search_btn = named(QPushButton("Search indexed slides"), "search_index_btn")
        self.search_btn.clicked.connect(self.search_index)
        lay.addRow(self.search_btn)
        self.hit_list = hit_list("hit_list", "click a hit to go there")  # at least five hits visible
        self.hit_list.itemActivated.connect(self.go_to_hit)
        self.hit_list.itemClicked.connect(self.go_to_hit)
        self.flasher = Flasher(self)
        lay.addRow(self.hit_list)

    # --- query ---------------------------------------------------------------------------------
    def query_at(self, x: float, y: float, box: tuple[float, float, float, float] | None = None) -> None:
        """Similar regions to the tile under level-0 ``(x, y)``, or to the mean of the tissue tiles
        in ``box`` (x0, y0, x1, y1); tiles not embedded yet are embedded first."""
        if self.token_check.isChecked():
            from napari_virchow._qt.viewport import visible_box_level0
            from napari_virchow.analysis.token_jobs import query_tokens_job

            layer = self._host.slide_layer()
            view = None if layer is None else visible_box_level0(self._host.viewer, layer)
            if view is not None:
                self._host.run(query_tokens_job, x, y, view, k=self.hits_spin.value(), box=box,
                               mpp=self._host.view_mpp())  # fmt: skip
                return
        self._host.run(_jobs.query_job, x, y, k=self.hits_spin.value(), box=box, mpp=self._host.view_mpp())

    def draw(self, session: SlideSession) -> None:
        layer = self._host.slide_layer()
        if layer is None or session.similarity is None:
            return
        show_raster(self._host.viewer, overlay_name(layer, "similarity"),
                    session.raster(session.similarity, mpp=session.query_mpp),
                    colormap=SIMILARITY, contrast_limits=(0, 1), opacity=0.85)  # fmt: skip
        show_colorbar_on_top(self._host.viewer)

    def _show_query(self, session: SlideSession, ev: _jobs.Queried) -> None:
        layer = self._host.slide_layer()
        g = session.grid_at(session.query_mpp)
        t = g.tile_size_l0
        boxes = [box_corners(x, y, x + t, y + t) for x, y in g.coords[ev.query_indices]]
        show_boxes(self._host.viewer, overlay_name(layer, "query"), layer, boxes, edge_color="yellow",
                   edge_width=max(t / 16, 2))  # fmt: skip

    def _show_hits(self, session: SlideSession, ev: _jobs.Queried) -> None:
        layer = self._host.slide_layer()
        t = session.grid_at(session.query_mpp).tile_size_l0
        mpp = session.slide.require_mpp()
        boxes = [box_corners(h.x, h.y, h.x + t, h.y + t) for h in ev.hits]
        show_boxes(self._host.viewer, overlay_name(layer, "hits"), layer, boxes, edge_color=HIT_COLOR,
                   edge_width=max(t / 20, 2),
                   text={"string": [str(i + 1) for i in range(len(boxes))], "color": HIT_COLOR, "size": 12})
        self.hit_list.clear()
        for rank, (hit, thumb) in enumerate(zip(ev.hits, ev.thumbnails, strict=True), start=1):
            add_hit(self.hit_list, f"{rank}. score {hit.score:.3f} · ({hit.x * mpp:,.0f}, {hit.y * mpp:,.0f}) µm",
                    thumb, (hit.x + t / 2, hit.y + t / 2, None, t))  # fmt: skip

    def _explain(self, session: SlideSession, ev: _jobs.Queried) -> str:
        n_embedded = int(np.count_nonzero(np.isfinite(session.similarity))) if session.similarity is not None else 0
        asked = self.hits_spin.value()
        if not session.grid_at(session.query_mpp).tissue[ev.query_indices].any():
            return ("the query is on glass (no tissue under it): its hits are glass too; "
                    "click on tissue, or drag a box over it")
        if n_embedded <= len(ev.query_indices):
            return ("only the query is embedded: press Compute visible (or zoom out and compute) to find "
                    "similar regions")
        text = f"{len(ev.hits)} similar regions"
        if len(ev.hits) < asked:
            text += (f" ({asked} asked: hits closer than 2 tiles to a better one are merged, and only "
                     f"{n_embedded:,} tiles are embedded)")
        return text

    def on_event(self, session: SlideSession, ev: object) -> None:
        if isinstance(ev, _jobs.Queried):
            self.draw(session)
            self._show_query(session, ev)
            self._show_hits(session, ev)
            self._host.set_status(self._explain(session, ev))
        elif isinstance(ev, TokenSimilarityReady) and (layer := self._host.slide_layer()) is not None:
            show_raster(self._host.viewer, overlay_name(layer, "token similarity"), ev.raster,
                        colormap=SIMILARITY, contrast_limits=(0, 1), opacity=0.85)  # fmt: skip
        elif isinstance(ev, _jobs.IndexHits):
            self._show_index_hits(session, ev)
        elif isinstance(ev, _jobs.BatchDone) and "similarity" in ev.changed:
            self.draw(session)

    # --- cohort index --------------------------------------------------------------------------
    def _browse_index(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Cohort index", "", "faiss index (*.faiss);;All files (*)")
        if path:
            self.index_edit.setText(path)

    def search_index(self) -> None:
        """Hits for the current query in the other slides of the chosen cohort index."""
        path = self.index_edit.text().strip()
        if not path:
            show_warning("choose a cohort index first (the … button next to the index field)")
            return
        self._host.run(_jobs.index_search_job, path, k=self.hits_spin.value())

    def _show_index_hits(self, session: SlideSession, ev: _jobs.IndexHits) -> None:
        if ev.warning:
            show_warning(ev.warning)
        self.index_info.setText(ev.description)
        query_tile = session.grid_at(session.query_mpp).tile_size_l0
        self.hit_list.clear()
        for rank, (hit, thumb) in enumerate(zip(ev.hits, ev.thumbnails, strict=True), start=1):
            where = Path(hit.slide or "?").name + ("" if hit.exists else " (file missing)")
            t = hit.tile_size_l0 or query_tile  # the tile in its own slide's level-0 px
            add_hit(self.hit_list, f"{rank}. {where} score {hit.score:.3f} at ({hit.x}, {hit.y}) px", thumb,
                    (hit.x + t / 2, hit.y + t / 2, hit.slide if hit.exists else None, t))  # fmt: skip
        self._host.set_status(f"{len(ev.hits)} similar regions in other slides")

    def go_to_hit(self, item: QListWidgetItem) -> None:
        """Centre on a hit (opening its slide when it is in another one), zoom to a few tiles, flash its box."""
        x, y, slide_path, tile_l0 = item.data(Qt.ItemDataRole.UserRole)  # tile_l0: in the hit's own slide
        viewer = self._host.viewer
        layer = self._host.slide_layer()
        if slide_path and (layer is None or layer.metadata[METADATA_KEY]["path"] != slide_path):
            # the hit's slide: its layer when it is open already (a second search from the first slide
            # must not open it again), else opened now
            layer = next((lyr for lyr in viewer.layers
                          if METADATA_KEY in lyr.metadata and lyr.metadata[METADATA_KEY].get("path") == slide_path),
                         None)  # fmt: skip
            if layer is None:
                try:
                    [layer] = viewer.open(slide_path, plugin="napari-virchow")
                except VirchowError as exc:
                    report(exc)
                    return
            self._host.choose_slide(layer.name)
        if layer is None:
            return
        tile_um = tile_l0 * float(np.asarray(layer.scale)[-1])  # the layer's scale is its µm/px
        zoom_to_tile(viewer, layer, x, y, tile_um, boxes=layer_named(viewer, overlay_name(layer, "hits")),
                     row=self.hit_list.row(item), flasher=self.flasher)  # fmt: skip
