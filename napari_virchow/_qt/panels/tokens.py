"""'Token resolution': the heatmap per 7-µm token for the tiles in view, and compressed token storage."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
from qtpy.QtWidgets import QCheckBox, QComboBox, QGroupBox, QLabel, QWidget

from napari_virchow._qt.errors import gui_message
from napari_virchow._qt.layers import BAR_TITLE_KEY, HEAT, overlay_name, show_raster
from napari_virchow._qt.panels.base import Host, form, named
from napari_virchow.analysis.rasters import Raster, mask_below
from napari_virchow.analysis.token_jobs import TOKEN_VIEW_TILES, TokenClustersReady, TokenMapReady, token_map_job
from napari_virchow.analysis.token_levels import StoreSummary
from napari_virchow.errors import VirchowError
from napari_virchow.session import SlideSession

__all__ = ["RESOLUTIONS", "TokenPanel", "view_tiles"]

#: the resolution combo's entries: tile map, exact token map, CLS-attributed token map
RESOLUTIONS = ("tile", "token", "token (CLS attributed)")


def view_tiles(host: Host, session: SlideSession) -> tuple[np.ndarray, float] | None:
    """Tiles in view (at most :data:`TOKEN_VIEW_TILES`, centre-out) at the view's level, and that level."""
    from napari_virchow._qt.viewport import visible_box_level0

    layer = host.slide_layer()
    box = None if layer is None else visible_box_level0(host.viewer, layer)
    if box is None:
        return None
    mpp = host.view_mpp() or session.default_mpp
    return session.grid_at(mpp).tiles_in(box, tissue_only=False)[:TOKEN_VIEW_TILES], mpp


class TokenPanel(QGroupBox):
    """Tile / token resolution of the heatmap, and the switch for compressed token storage."""

    def __init__(self, host: Host, threshold: Callable[[], float], parent: QWidget | None = None) -> None:
        super().__init__("Token resolution", parent)
        self._host, self._threshold = host, threshold
        self._raster: Raster | None = None
        lay = form(self)
        self.resolution_combo = named(QComboBox(), "resolution_combo",
                                      "tile: a value per 112-µm tile; token: per 7-µm token of the tiles in view; "
                                      "CLS attributed: the tile-level CLS evidence given to the tokens that "
                                      "predict it (same tile means)")  # fmt: skip
        self.resolution_combo.addItems(RESOLUTIONS)
        self.resolution_combo.currentTextChanged.connect(self.refresh)
        lay.addRow("heatmap", self.resolution_combo)
        self.compressed_check = named(QCheckBox("store compressed tokens"), "compressed_check",
                                      "keep the tokens of the tiles computed (per-slide PCA, float16): token "
                                      "views of them need no forward pass")  # fmt: skip
        self.compressed_check.toggled.connect(self._compressed_toggled)
        lay.addRow(self.compressed_check)
        self.store_label = named(QLabel("tokens recomputed from the pixels for each view"), "token_store_label")
        self.store_label.setWordWrap(True)
        lay.addRow(self.store_label)

    @property
    def compressed(self) -> bool:
        """Whether token views read and fill the compressed token store."""
        return self.compressed_check.isChecked()

    def _layer_name(self) -> str | None:
        layer = self._host.slide_layer()
        return None if layer is None else overlay_name(layer, "token probability")

    def _compressed_toggled(self, on: bool) -> None:
        if not on:
            self.store_label.setText("tokens recomputed from the pixels for each view")
        if self.resolution_combo.currentText() != "tile" or on:
            self.refresh()

    def refresh(self, *_: object) -> None:
        """Draw the chosen resolution for the tiles in view (tile: remove the token layer)."""
        text = self.resolution_combo.currentText()
        name = self._layer_name()
        if text == "tile":  # no token layer; with compressed storage on, the store is still filled
            self._raster = None
            if name is not None and name in self._host.viewer.layers:
                self._host.viewer.layers.remove(name)
            if not self.compressed:
                return
        try:
            session = self._host.session()
        except VirchowError as exc:
            self._host.set_status(gui_message(exc))
            return
        if session.head is None:
            self._host.set_status("token resolution needs a head: train one or load one first")
            return
        view = view_tiles(self._host, session)
        if view is None:
            return
        indices, mpp = view
        self._host.run(token_map_job, session.head, indices, mpp=mpp, compressed=self.compressed,
                       attributed=text == RESOLUTIONS[2])  # fmt: skip

    def draw(self) -> None:
        """(Re)draw the token map with the heatmap's threshold."""
        name = self._layer_name()
        if self._raster is None or name is None:
            return
        values = mask_below(self._raster.data, self._threshold())
        lyr = show_raster(self._host.viewer, name, replace(self._raster, data=values), colormap=HEAT,
                          contrast_limits=(0, 1), opacity=0.85, blending="translucent")  # fmt: skip
        lyr.contrast_limits = (0, 1)
        lyr.metadata[BAR_TITLE_KEY] = None

    def show_store(self, info: StoreSummary | None) -> None:
        if info is not None:
            self.store_label.setText(info.text())

    def on_event(self, session: SlideSession, ev: object) -> None:
        if isinstance(ev, TokenMapReady):
            self.show_store(ev.store)
            text = self.resolution_combo.currentText()
            if text != "tile" and ev.attributed == (text == RESOLUTIONS[2]):  # not a stale view's
                self._raster = ev.raster
                self.draw()
            self._host.set_status(f"token map of the tiles in view at {ev.mpp:g} µm/px")
        elif isinstance(ev, TokenClustersReady):
            self.show_store(ev.store)
