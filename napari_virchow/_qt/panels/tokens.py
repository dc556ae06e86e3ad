"""'Token resolution': the heatmap per 7-µm token for the tiles in view, and compressed token storage.

With a token resolution chosen, the token map follows the view: once the camera is still (debounced
like the tile overlays, :class:`~napari_virchow._qt.viewport.ViewportWatcher`) the tiles in view are
redrawn; with "Follow view" on, the compute job of each view draws it instead (:meth:`view_options`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QCheckBox, QComboBox, QGroupBox, QLabel, QSpinBox, QWidget

from napari_virchow._qt.errors import gui_message
from napari_virchow._qt.layers import BAR_TITLE_KEY, HEAT, overlay_name, show_raster
from napari_virchow._qt.panels.base import Host, form, named
from napari_virchow._qt.viewport import ViewportWatcher
from napari_virchow.analysis.rasters import Raster, mask_below
from napari_virchow.analysis.token_jobs import (
    TOKEN_VIEW_TILES,
    TokenClustersReady,
    TokenMapReady,
    TokensStored,
    token_map_job,
)
from napari_virchow.analysis.token_levels import StoreSummary
from napari_virchow.analysis.token_store import DEFAULT_K
from napari_virchow.errors import VirchowError
from napari_virchow.session import SlideSession

__all__ = ["RESOLUTIONS", "TokenPanel", "view_tiles"]

#: the resolution combo's entries: tile map, exact token map, CLS-attributed token map
RESOLUTIONS = ("tile", "token", "token (CLS attributed)")
RECOMPUTED = "tokens recomputed from the pixels for each view"


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
    """Tile / token resolution of the heatmap, and the switch and k of compressed token storage.

    ``compute_follows`` says whether "Follow view" computes each view (its job then draws the
    token map, so this panel's own view watcher stands aside).
    """

    def __init__(self, host: Host, threshold: Callable[[], float], parent: QWidget | None = None, *,
                 compute_follows: Callable[[], bool] = lambda: False) -> None:  # fmt: skip
        super().__init__("Token resolution", parent)
        self._host, self._threshold, self._compute_follows = host, threshold, compute_follows
        self._raster: Raster | None = None
        self._requested: tuple[Any, ...] | None = None  # the last view asked for (a still view is not redone)
        lay = form(self)
        self.resolution_combo = named(QComboBox(), "resolution_combo",
                                      "tile: a value per 112-µm tile; token: per 7-µm token of the tiles in view; "
                                      "CLS attributed: the tile-level CLS evidence given to the tokens that "
                                      "predict it (same tile means)")  # fmt: skip
        self.resolution_combo.addItems(RESOLUTIONS)
        self.resolution_combo.currentTextChanged.connect(self._resolution_changed)
        lay.addRow("heatmap", self.resolution_combo)
        self.compressed_check = named(QCheckBox("store compressed tokens"), "compressed_check",
                                      "keep the tokens of the tiles computed (per-slide PCA, float16): token "
                                      "views of them need no forward pass; Compute visible fills it too")  # fmt: skip
        self.compressed_check.toggled.connect(self._compressed_toggled)
        lay.addRow(self.compressed_check)
        self.k_spin = named(QSpinBox(), "token_k_spin",
                            "PCA dimensions kept per token (at most the token width): fewer is smaller on disk "
                            "and less exact; each k has its own store")  # fmt: skip
        self.k_spin.setRange(1, 4096)
        self.k_spin.setValue(DEFAULT_K)
        self.k_spin.setKeyboardTracking(False)  # typing "16" asks for k = 16, not 1 then 16
        self._k_timer = QTimer(self)
        self._k_timer.setSingleShot(True)
        self._k_timer.setInterval(300)  # arrow keys held down: one store, not one per step
        self._k_timer.timeout.connect(self._k_changed)
        self.k_spin.valueChanged.connect(lambda _: self._k_timer.start())
        lay.addRow("compressed dims (k)", self.k_spin)
        self.store_label = named(QLabel(RECOMPUTED), "token_store_label")
        self.store_label.setWordWrap(True)
        lay.addRow(self.store_label)
        self._watcher = ViewportWatcher(host.viewer, host.slide_layer, self._view_moved)

    # --- state ---------------------------------------------------------------------------------
    @property
    def compressed(self) -> bool:
        """Whether token views read and fill the compressed token store."""
        return self.compressed_check.isChecked()

    @property
    def k(self) -> int:
        """PCA dims of the compressed store the user chose."""
        return int(self.k_spin.value())

    @property
    def token_resolution(self) -> bool:
        return self.resolution_combo.currentText() != RESOLUTIONS[0]

    def view_options(self) -> dict[str, Any] | None:
        """What the compute job of a view must also do for this panel (None: nothing)."""
        if not self.compressed and not self.token_resolution:
            return None
        return {"compressed": self.compressed, "k": self.k, "token_map": self.token_resolution,
                "attributed": self.resolution_combo.currentText() == RESOLUTIONS[2]}  # fmt: skip

    def _layer_name(self) -> str | None:
        layer = self._host.slide_layer()
        return None if layer is None else overlay_name(layer, "token probability")

    # --- controls ------------------------------------------------------------------------------
    def _resolution_changed(self, _text: str) -> None:
        self._watcher.set_enabled(self.token_resolution, now=False)
        self.refresh()

    def _compressed_toggled(self, on: bool) -> None:
        if not on:
            self.store_label.setText(RECOMPUTED)
        if self.token_resolution or on:
            self.refresh()

    def _k_changed(self) -> None:
        if self.compressed:
            self.refresh()

    def _view_moved(self, _box: tuple[float, float, float, float]) -> None:
        if self.token_resolution and not self._compute_follows():
            self.refresh(moved=True)

    def disconnect_view(self) -> None:
        """Stop following the view (the widget calls this when it closes)."""
        self._watcher.disconnect_all()

    def refresh(self, *_: object, moved: bool = False) -> None:
        """Draw the chosen resolution for the tiles in view (tile: remove the token layer).

        ``moved``: called for a new camera position; a view whose tiles are those already drawn
        (a small pan) is not redone.
        """
        text = self.resolution_combo.currentText()
        name = self._layer_name()
        if text == RESOLUTIONS[0]:  # no token layer; with compressed storage on, the store is still filled
            self._raster, self._requested = None, None
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
        key = (id(session), id(session.head), mpp, tuple(sorted(indices.tolist())), text, self.compressed, self.k)
        if moved and key == self._requested:
            return
        self._requested = key
        self._host.run(token_map_job, session.head, indices, mpp=mpp, compressed=self.compressed,
                       attributed=text == RESOLUTIONS[2], k=self.k)  # fmt: skip

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
            if text != RESOLUTIONS[0] and ev.attributed == (text == RESOLUTIONS[2]):  # not a stale view's
                self._raster = ev.raster
                self.draw()
            self._host.set_status(f"token map of the tiles in view at {ev.mpp:g} µm/px")
        elif isinstance(ev, (TokensStored, TokenClustersReady)):
            self.show_store(ev.store)
