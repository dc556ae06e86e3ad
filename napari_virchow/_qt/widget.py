"""The dock widget: compute the visible tiles, then heatmap, clusters and similar regions.

A thin shell: each group box is a panel module (:mod:`.panels`), jobs run through
:class:`~napari_virchow._qt.runner.JobRunner` (napari workers; the UI thread only draws what they
yield), sessions live in :class:`~napari_virchow._qt.sessions.SessionBook` (one open slide per
layer), picking on the canvas in :mod:`.picking`.

Controls, by ``objectName`` (stable: tests and scripts find them by it)

- Slide and model: ``slide_combo``, ``reopen_btn``, ``mpp_spin``, ``encoder_combo``,
  ``weights_edit``, ``weights_browse_btn``, ``random_check``, ``device_combo``, ``batch_spin``
- Compute: ``compute_btn``, ``follow_check``, ``all_btn``, ``mag_combo`` (auto or a pinned
  magnification), ``overview_btn`` (whole tissue at 5×), ``limit_spin``, ``tissue_check``, ``tissue_slider``
- Cancer probability: ``class_combo``, ``new_annotations_btn``, ``load_geojson_btn``,
  ``save_geojson_btn``, ``load_head_btn``, ``save_head_btn``, ``train_btn``, ``refit_check``,
  ``threshold_slider``, ``smooth_check``
- Token resolution: ``resolution_combo`` (tile / token / token (CLS attributed), for the tiles in
  view at the view's magnification; follows the view), ``compressed_check`` (store compressed tokens;
  Compute visible then stores the tokens of the tiles it embeds too), ``token_k_spin`` (their PCA dims)
- Labelling: ``suggest_btn``, ``suggest_spin``, ``suggest_list`` (number keys label the current tile),
  ``prev_suggestion_btn``, ``next_suggestion_btn``, ``refit_probe_btn``
- Slide prediction: ``load_slide_head_btn``, ``predict_slide_btn``
- Clusters: ``k_spin``, ``rgb_check``, ``cluster_btn``, ``token_clusters_check`` (token-resolution
  clusters of the tiles in view)
- Similar regions: ``pick_btn``, ``hits_spin``, ``token_sim_check`` (also a per-token similarity of
  the tiles in view), ``index_edit``, ``index_browse_btn``, ``search_index_btn``, ``hit_list``
- Export: ``export_geojson_btn``, ``export_heatmap_btn``
- Job bar (always visible, under the panels): ``decision_compute_btn``, ``decision_skip_btn``,
  ``cancel_btn``

Read-outs: ``random_banner``, ``level_label`` (the magnification of the view),
``tissue_value_label``, ``head_label``, ``threshold_label``, ``token_store_label``,
``label_keys_label``, ``labelling_label``, ``slide_head_label``, ``slide_prediction_label``,
``legend_label``, ``progress_bar``, ``status_label``, ``decision_label``.
"""

from __future__ import annotations

import contextlib
from typing import Any

import napari
from napari.layers import Image
from qtpy.QtCore import QSize
from qtpy.QtWidgets import QFrame, QScrollArea, QVBoxLayout, QWidget

from napari_virchow import jobs as _jobs
from napari_virchow._qt.errors import gui_message, report
from napari_virchow._qt.layers import overlay_name, remove_overlays, show_colorbar_on_top
from napari_virchow._qt.panels.clusters import ClusterPanel
from napari_virchow._qt.panels.compute import ComputePanel
from napari_virchow._qt.panels.export import ExportPanel
from napari_virchow._qt.panels.head import HeadPanel
from napari_virchow._qt.panels.jobbar import JobBar, RateMeter, duration
from napari_virchow._qt.panels.labelling import LabellingPanel
from napari_virchow._qt.panels.model import ModelPanel, foreign_slide_path
from napari_virchow._qt.panels.similar import SimilarPanel
from napari_virchow._qt.panels.slide_head import SlideHeadPanel
from napari_virchow._qt.panels.tokens import TokenPanel
from napari_virchow._qt.runner import JobRunner
from napari_virchow._qt.sessions import SessionBook
from napari_virchow._qt.viewport import ViewportWatcher
from napari_virchow._reader import METADATA_KEY, prefer_this_reader
from napari_virchow.analysis.token_jobs import TokensStored
from napari_virchow.errors import VirchowError
from napari_virchow.session import SessionConfig, SlideSession
from napari_virchow.slides.lattice import SlideGeometry

__all__ = ["VirchowWidget"]


class VirchowWidget(QWidget):
    """Viewport-driven Virchow inference and overlays for slide layers."""

    def __init__(self, napari_viewer: napari.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.last_event: object = None
        self._event_layer: Image | None = None  # the slide layer of the job event being drawn
        self.runner = JobRunner(self)
        self.sessions = SessionBook(napari_viewer, is_busy=lambda s: s is self.runner.session)
        self.rates = RateMeter()
        self._build()
        self.runner.event.connect(self._on_event)
        self.runner.failed.connect(self._on_error)
        self.runner.busy_changed.connect(self._busy_changed)
        self.jobbar.decided.connect(self._decided)
        self.jobbar.cancel_btn.clicked.connect(self.cancel)
        self.model.changed.connect(self._config_changed)
        self.model.mpp_changed.connect(self._mpp_changed)
        self.model.slide_combo.currentTextChanged.connect(self._offer_magnifications)
        self._watcher = ViewportWatcher(self.viewer, self.slide_layer, self.compute.follow)
        self.compute.follow_check.toggled.connect(self._watcher.set_enabled)
        self.viewer.layers.events.inserted.connect(self._layers_changed)
        self.viewer.layers.events.removed.connect(self._layers_changed)
        self.viewer.layers.events.moved.connect(self._layers_changed)
        self.destroyed.connect(self.sessions.close_all)
        self._layers_changed()
        prefer_this_reader()

    def _build(self) -> None:
        # the panels scroll (a docked panel is often shorter than its content); the job bar with
        # Cancel and the "compute N tiles?" question stays in sight under them
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        self.scroll = QScrollArea(widgetResizable=True)
        self.scroll.setObjectName("panels_scroll")
        self.scroll.setFrameShape(QFrame.Shape.NoFrame)
        content = QWidget()
        self.scroll.setWidget(content)
        root = QVBoxLayout(content)
        self.model = ModelPanel(self)
        self.compute = ComputePanel(self)
        self.head = HeadPanel(self)
        self.tokens = TokenPanel(self, lambda: self.head.threshold_slider.value() / 100,
                                 compute_follows=self.compute.follow_check.isChecked)
        self.compute.token_options = self.tokens.view_options
        self.head.threshold_slider.valueChanged.connect(lambda _: self.tokens.draw())
        self.labelling = LabellingPanel(self, self.head)
        self.slide_head = SlideHeadPanel(self)
        self.clusters = ClusterPanel(self)
        self.similar = SimilarPanel(self)
        self.export = ExportPanel(self, lambda: self.head.threshold_slider.value() / 100,
                                  self.similar.hits_spin.value)
        for panel in (self.model, self.compute, self.head, self.tokens, self.labelling, self.slide_head,
                      self.clusters, self.similar, self.export):
            root.addWidget(panel)
        root.addStretch(1)
        self.jobbar = JobBar()
        outer.addWidget(self.scroll, 1)
        outer.addWidget(self.jobbar)
        # short names used by the demo, scripts and benchmarks
        self.encoder_combo, self.random_check = self.model.encoder_combo, self.model.random_check
        self.weights_edit, self.limit_spin = self.model.weights_edit, self.compute.limit_spin
        self.threshold_slider, self.smooth_check = self.head.threshold_slider, self.head.smooth_check
        self.tissue_check, self.status = self.compute.tissue_check, self.jobbar.status

    def minimumSizeHint(self) -> QSize:  # noqa: N802 - Qt API
        """Never narrower than the panels: no horizontal scroll bar cutting buttons off."""
        hint = super().minimumSizeHint()
        bar = self.scroll.verticalScrollBar().sizeHint().width()
        width = self.scroll.widget().minimumSizeHint().width() + bar + 2 * self.scroll.frameWidth()
        return QSize(max(hint.width(), width), hint.height())

    # --- what panels call ----------------------------------------------------------------------
    def slide_layer(self) -> Image | None:
        """The chosen slide layer, or ``None``; while a job's event is drawn, the job's slide layer."""
        if self._event_layer is not None:
            return self._event_layer
        return self.model.slide_layer()

    _slide_layer = slide_layer

    def config(self) -> SessionConfig:
        return self.model.config()

    def session(self) -> SlideSession:
        """The session of the chosen slide layer with the current settings (made once)."""
        layer = self.slide_layer()
        if layer is None:
            if self.model.foreign_layer() is not None:
                raise VirchowError(f"{self.model.foreign_layer().name} was opened by another reader: "
                                   "press 'Reopen with Virchow' in the Slide and model panel")  # fmt: skip
            raise VirchowError("no slide layer: open a slide with File ▸ Open (SVS, NDPI, MRXS, TIFF …)")
        return self.sessions.get(layer, self.config(), self.model.mpp_override())

    def run(self, job: Any, *args: Any, **kwargs: Any) -> None:
        """Run a job of :mod:`napari_virchow.jobs` on the current session, in a worker."""
        try:
            session = self.session()
        except VirchowError as exc:
            report(exc)
            self.set_status(gui_message(exc))
            return
        self.jobbar.ask(None)
        self.rates.start()
        self.runner.run(session, job, *args, **kwargs)

    _run = run

    def set_status(self, text: str) -> None:
        self.jobbar.set_status(text)

    def choose_slide(self, name: str) -> None:
        self.model.slide_combo.setCurrentText(name)

    def view_mpp(self) -> float | None:
        """The magnification (µm/px) of what is on screen: pinned, else the last view's; None before any."""
        return self.compute.pinned() or self.compute.view_mpp

    @property
    def _worker(self) -> Any:  # for scripts that wait on the widget
        return self.runner.worker

    def cancel(self) -> None:
        """Stop the running job after its current batch (what is stored stays stored)."""
        if self.runner.cancel():
            self.set_status("cancelling after this batch …")

    def compute_visible(self, *, force: bool = False) -> None:
        self.compute.compute_visible(force=force)

    def annotations(self) -> Any:
        return self.head.annotations()

    def load_geojson(self, path: Any) -> Any:
        return self.head.load_geojson(path)

    def _config_changed(self, *_: object) -> None:
        try:
            session = self.session()
        except VirchowError:
            session = None
        self.head.show_head(session)

    def _mpp_changed(self) -> None:
        try:
            self.session()  # applies the override to the slide layer and its overlays now
        except VirchowError as exc:
            self.set_status(gui_message(exc))
        self._offer_magnifications()

    def _offer_magnifications(self, *_: object) -> None:
        """The magnification list offers what the chosen slide (at its µm/px) can give."""
        layer, geometry = self.model.slide_layer(), None
        if layer is not None:
            mpp = self.model.mpp_override() or layer.metadata[METADATA_KEY].get("mpp")
            if mpp:
                with contextlib.suppress(VirchowError):
                    w, h = self.sessions.slide(layer).dimensions
                    geometry = SlideGeometry(int(w), int(h), float(mpp))
        self.compute.offer_magnifications(geometry)

    # --- job events ----------------------------------------------------------------------------
    def _rate_key(self, session: SlideSession) -> object:
        c = session.config
        return (c.encoder, c.weights, c.device, c.batch_size)

    def _on_event(self, session: SlideSession, ev: object) -> None:
        self.last_event = ev
        if isinstance(ev, _jobs.Stage):
            self.jobbar.on_stage(ev)
        elif isinstance(ev, _jobs.BatchDone):
            self.rates.batch(self._rate_key(session), ev.n_done)
            self.jobbar.on_batch(ev, self.rates.rate(self._rate_key(session)))
        elif isinstance(ev, TokensStored):
            what = "compressed tokens stored with the embeddings" if ev.with_embeddings else "storing compressed tokens"
            self.jobbar.on_progress(ev.n_done, ev.n_total, what)
        elif isinstance(ev, _jobs.TooMany):
            rate = self.rates.rate(self._rate_key(session))
            eta = ev.n_todo / rate if rate else ev.eta_s
            how = "at the speed measured here" if rate else "estimated"
            self.jobbar.ask(f"{ev.n_todo:,} tiles in view are not computed yet (≈ {duration(eta)}, {how}). "
                            "Compute them, or zoom in?", ev.n_todo)  # fmt: skip
            self.jobbar.set_status("")
        # overlays go over the job's own slide, whichever slide is chosen now; none once it is removed
        layer = self.sessions.layer_of(session)
        if layer is None:
            return
        self._event_layer = layer
        try:
            for panel in (self.compute, self.head, self.tokens, self.labelling, self.slide_head, self.clusters,
                          self.similar):
                panel.on_event(session, ev)
        finally:
            self._event_layer = None

    def _decided(self, yes: bool) -> None:
        if yes:
            self.compute.compute_visible(force=True)

    def _on_error(self, exc: BaseException) -> None:
        report(exc)
        self.jobbar.set_status(f"error: {gui_message(exc)}" if isinstance(exc, VirchowError) else "")

    def _busy_changed(self, busy: bool) -> None:
        self.jobbar.set_busy(busy)
        if not busy:
            self.sessions.finished()

    def _layers_changed(self, event: Any = None) -> None:
        layer = getattr(event, "value", None)
        if getattr(event, "type", None) == "inserted" and layer is not None:
            layer.events.visible.connect(self._visibility_changed)
        if getattr(event, "type", None) == "removed" and isinstance(layer, Image) and METADATA_KEY in layer.metadata:
            self._slide_removed(layer)
        self.model.refresh_layers()
        if self.model.foreign_layer() is not None and not self.slide_layer():
            self.set_status(f"{foreign_slide_path(self.model.foreign_layer())} was opened by another reader: "
                            "press 'Reopen with Virchow' to analyse it")  # fmt: skip
        show_colorbar_on_top(self.viewer)
        self._offer_magnifications()

    def _slide_removed(self, layer: Image) -> None:
        """A slide layer left the viewer: its job stops (what is stored stays) and its overlays go."""
        running = self.runner.session
        if running is not None and any(s is running for s in self.sessions.sessions(layer)):
            self.cancel()
        gone = remove_overlays(self.viewer, layer.name)
        if gone:
            kept = overlay_name(layer, "annotations") in self.viewer.layers
            self.set_status(f"{layer.name} closed with its {len(gone)} overlay{'' if len(gone) == 1 else 's'}"
                            + ("; its annotations are kept" if kept else ""))  # fmt: skip

    def _visibility_changed(self, *_: object) -> None:
        show_colorbar_on_top(self.viewer)  # the bar shown is the one of the overlay on top

    def closeEvent(self, event: Any) -> None:  # noqa: N802 - Qt API
        self.runner.cancel()
        self._watcher.disconnect_all()
        self.tokens.disconnect_view()
        self.similar.picker.disconnect()
        super().closeEvent(event)
