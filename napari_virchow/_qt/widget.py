"""The dock widget: compute the visible tiles, then heatmap, clusters and similar regions.

Everything slow (opening the model, reading tiles, encoding, fitting) runs in napari
``thread_worker`` generators from :mod:`._jobs`; the UI thread only draws what they yield.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import napari
import numpy as np
from napari.layers import Image, Shapes
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QSize, Qt
from qtpy.QtGui import QIcon, QImage, QPixmap
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QFrame,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSlider,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)  # fmt: skip

from napari_virchow import jobs as _jobs
from napari_virchow._qt.layers import overlay_name, show_raster
from napari_virchow._qt.viewport import ViewportWatcher, camera, visible_box_level0
from napari_virchow._reader import METADATA_KEY
from napari_virchow.analysis.rasters import mask_below
from napari_virchow.errors import VirchowError
from napari_virchow.models.specs import list_encoders
from napari_virchow.session import SessionConfig, SlideSession

__all__ = ["VirchowWidget"]

RANDOM = "random (demo)"
CLUSTER_COLORS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6",
                  "#bcf60c", "#fabebe", "#008080", "#e6beff", "#9a6324", "#fffac8", "#800000"]  # fmt: skip


def _report(exc: BaseException) -> None:
    """One notification, never a traceback dialog: our errors carry the fix in their message."""
    if isinstance(exc, VirchowError):
        show_error(str(exc))
    else:
        show_error(f"{type(exc).__name__}: {exc}")


class VirchowWidget(QWidget):
    """Viewport-driven Virchow inference and overlays for slide layers."""

    def __init__(self, napari_viewer: napari.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self._sessions: dict[tuple[int, SessionConfig], SlideSession] = {}
        self._worker: Any = None
        self._cancel = threading.Event()
        self._pending: Callable[[], None] | None = None
        self._confirm_all: int | None = None  # tiles the "All in view" button will compute
        self.last_event: object = None
        self._build()
        self._watcher = ViewportWatcher(self.viewer, self._slide_layer, self._follow)
        self.viewer.layers.events.inserted.connect(self._refresh_layers)
        self.viewer.layers.events.removed.connect(self._refresh_layers)
        self._refresh_layers()

    # --- layout ------------------------------------------------------------------------------
    def _build(self) -> None:
        # everything lives in a scroll area: a docked panel is often shorter than its content
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        scroll = QScrollArea(widgetResizable=True)
        scroll.setFrameShape(QFrame.Shape.NoFrame)
        content = QWidget()
        scroll.setWidget(content)
        outer.addWidget(scroll)
        root = QVBoxLayout(content)
        self.banner = QLabel()
        self.banner.setWordWrap(True)
        self.banner.setStyleSheet("background:#7a1f1f;color:white;padding:4px;border-radius:3px")
        root.addWidget(self.banner)

        model = QGroupBox("Slide and model")
        form = QFormLayout(model)
        self.slide_combo = QComboBox()
        self.mpp_spin = QDoubleSpinBox(decimals=4, minimum=0.0, maximum=100.0, singleStep=0.05,
                                       specialValueText="from file")  # fmt: skip
        self.encoder_combo = QComboBox(editable=True)
        self.encoder_combo.addItems(list_encoders())
        self.encoder_combo.setCurrentText("virchow2")
        weights_row = QHBoxLayout()
        self.weights_edit = QLineEdit(placeholderText="Hugging Face cache, or a .safetensors file")
        browse = QPushButton("…")
        browse.clicked.connect(self._browse_weights)
        self.random_check = QCheckBox(RANDOM)
        for w in (self.weights_edit, browse, self.random_check):
            weights_row.addWidget(w)
        self.device_combo = QComboBox()
        self.device_combo.addItems(["auto", "cpu", "cuda", "mps"])
        self.batch_spin = QSpinBox(minimum=0, maximum=1024, specialValueText="auto")
        form.addRow("slide", self.slide_combo)
        form.addRow("µm/px override", self.mpp_spin)
        form.addRow("encoder", self.encoder_combo)
        form.addRow("weights", weights_row)
        form.addRow("device", self.device_combo)
        form.addRow("batch size", self.batch_spin)
        root.addWidget(model)

        compute = QGroupBox("Compute")
        grid = QVBoxLayout(compute)
        row = QHBoxLayout()
        self.compute_btn = QPushButton("Compute visible")
        self.compute_btn.clicked.connect(self.compute_visible)
        self.follow_check = QCheckBox("Follow view")
        self.follow_check.toggled.connect(self._set_follow)
        self.all_btn = QPushButton("All in view")
        self.all_btn.clicked.connect(self.compute_all_in_view)
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.clicked.connect(self.cancel)
        for w in (self.compute_btn, self.follow_check, self.all_btn, self.cancel_btn):
            row.addWidget(w)
        grid.addLayout(row)
        limits = QFormLayout()
        self.limit_spin = QSpinBox(minimum=1, maximum=10_000_000, value=2000, singleStep=500)
        limits.addRow("max tiles without asking", self.limit_spin)
        tissue_row = QHBoxLayout()
        self.tissue_check = QCheckBox("show")
        self.tissue_check.toggled.connect(self._show_tissue)
        self.tissue_slider = QSlider(Qt.Orientation.Horizontal, minimum=0, maximum=100)
        self.tissue_slider.setToolTip("saturation threshold (0 = Otsu's automatic value)")
        self.tissue_slider.sliderReleased.connect(self._tissue_threshold_changed)
        tissue_row.addWidget(self.tissue_check)
        tissue_row.addWidget(self.tissue_slider)
        limits.addRow("tissue mask", tissue_row)
        grid.addLayout(limits)
        self.progress = QProgressBar(format="%v / %m tiles")
        self.status = QLabel("open a slide, then Compute visible")
        self.status.setWordWrap(True)
        grid.addWidget(self.progress)
        grid.addWidget(self.status)
        root.addWidget(compute)

        root.addWidget(self._build_head_box())
        root.addWidget(self._build_cluster_box())
        root.addWidget(self._build_similar_box())
        root.addStretch(1)
        for w in (self.encoder_combo, self.device_combo):
            w.currentTextChanged.connect(self._config_changed)
        self.random_check.toggled.connect(self._config_changed)
        self.weights_edit.editingFinished.connect(self._config_changed)
        self._config_changed()

    def _build_head_box(self) -> QGroupBox:
        box = QGroupBox("Cancer probability")
        lay = QFormLayout(box)
        ann = QHBoxLayout()
        self.class_edit = QComboBox(editable=True)
        self.class_edit.addItems(["tumour", "normal"])
        self.class_edit.currentTextChanged.connect(self._class_changed)
        new_ann = QPushButton("New annotation layer")
        new_ann.clicked.connect(self.new_annotation_layer)
        ann.addWidget(self.class_edit)
        ann.addWidget(new_ann)
        lay.addRow("draw class", ann)
        io_row = QHBoxLayout()
        for text, slot in (("Load GeoJSON", self._load_geojson), ("Save GeoJSON", self._save_geojson),
                           ("Load head", self._load_head), ("Save head", self._save_head)):  # fmt: skip
            b = QPushButton(text)
            b.clicked.connect(slot)
            io_row.addWidget(b)
        lay.addRow(io_row)
        train_row = QHBoxLayout()
        self.train_btn = QPushButton("Train from annotations")
        self.train_btn.clicked.connect(self.train)
        self.refit_check = QCheckBox("re-fit on edits")
        train_row.addWidget(self.train_btn)
        train_row.addWidget(self.refit_check)
        lay.addRow(train_row)
        self.head_label = QLabel("no head")
        self.head_label.setWordWrap(True)
        lay.addRow(self.head_label)
        self.threshold_slider = QSlider(Qt.Orientation.Horizontal, minimum=0, maximum=100, value=0)
        self.threshold_slider.valueChanged.connect(lambda _: self._draw("probability"))
        self.smooth_check = QCheckBox("smooth")
        self.smooth_check.toggled.connect(lambda _: self._draw("probability"))
        thr = QHBoxLayout()
        thr.addWidget(self.threshold_slider)
        thr.addWidget(self.smooth_check)
        lay.addRow("hide below", thr)
        return box

    def _build_cluster_box(self) -> QGroupBox:
        box = QGroupBox("Clusters")
        lay = QFormLayout(box)
        row = QHBoxLayout()
        self.k_spin = QSpinBox(minimum=2, maximum=64, value=8)
        self.rgb_check = QCheckBox("embedding colours")
        btn = QPushButton("Cluster")
        btn.clicked.connect(self.cluster)
        for w in (self.k_spin, self.rgb_check, btn):
            row.addWidget(w)
        lay.addRow("k", row)
        self.legend = QLabel()
        self.legend.setTextFormat(Qt.TextFormat.RichText)
        lay.addRow(self.legend)
        return box

    def _build_similar_box(self) -> QGroupBox:
        box = QGroupBox("Similar regions")
        lay = QFormLayout(box)
        row = QHBoxLayout()
        self.pick_btn = QPushButton("Pick query (click or drag a box)")
        self.pick_btn.setCheckable(True)
        self.pick_btn.toggled.connect(self._set_picking)
        self.hits_spin = QSpinBox(minimum=1, maximum=500, value=20)
        row.addWidget(self.pick_btn)
        row.addWidget(self.hits_spin)
        lay.addRow(row)
        index_row = QHBoxLayout()
        self.index_edit = QLineEdit(placeholderText="cohort index from `napari-virchow index`")
        browse = QPushButton("…")
        browse.clicked.connect(self._browse_index)
        search = QPushButton("Search indexed slides")
        search.clicked.connect(self.search_index)
        for w in (self.index_edit, browse, search):
            index_row.addWidget(w)
        lay.addRow(index_row)
        self.hit_list = QListWidget()
        self.hit_list.setIconSize(QSize(48, 48))
        self.hit_list.itemActivated.connect(self._go_to_hit)
        self.hit_list.itemClicked.connect(self._go_to_hit)
        lay.addRow(self.hit_list)
        return box

    # --- configuration -------------------------------------------------------------------------
    def config(self) -> SessionConfig:
        """The encoder, weights, device and batch size chosen in the widget."""
        from napari_virchow.inference import leave_one_core

        weights = "random" if self.random_check.isChecked() else (self.weights_edit.text().strip() or None)
        return SessionConfig(encoder=self.encoder_combo.currentText().strip(), weights=weights,
                             device=self.device_combo.currentText(), batch_size=self.batch_spin.value() or None,
                             threads=leave_one_core())  # fmt: skip

    def _config_changed(self, *_: object) -> None:
        random = self.random_check.isChecked()
        self.weights_edit.setEnabled(not random)
        self.banner.setVisible(random)
        self.banner.setText(
            "Random weights: the overlays are NOT those of the real model. For Virchow 2, accept the "
            "licence at huggingface.co/paige-ai/Virchow2, log in (`hf auth login`), or choose a weights file."
        )

    def _browse_weights(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Encoder weights", "", "Weights (*.safetensors *.bin *.pth *.pt)")
        if path:
            self.weights_edit.setText(path)
            self.random_check.setChecked(False)
            self._config_changed()

    def _refresh_layers(self, *_: object) -> None:
        current = self.slide_combo.currentText()
        names = [lyr.name for lyr in self.viewer.layers if isinstance(lyr, Image) and METADATA_KEY in lyr.metadata]
        self.slide_combo.clear()
        self.slide_combo.addItems(names)
        if current in names:
            self.slide_combo.setCurrentText(current)

    def _slide_layer(self) -> Image | None:
        name = self.slide_combo.currentText()
        layer = self.viewer.layers[name] if name in self.viewer.layers else None  # noqa: SIM401 - LayerList
        return layer if isinstance(layer, Image) and METADATA_KEY in layer.metadata else None

    def session(self) -> SlideSession:
        """The session of the chosen slide layer with the current settings (opened once)."""
        layer = self._slide_layer()
        if layer is None:
            others = [lyr.name for lyr in self.viewer.layers if isinstance(lyr, Image)]
            hint = f" ({', '.join(others)} were not opened from a slide file)" if others else ""
            raise VirchowError(f"no slide layer{hint}: open a slide with File ▸ Open (SVS, NDPI, MRXS, TIFF …)")
        config = self.config()
        key = (id(layer), config)
        if key not in self._sessions:
            meta = layer.metadata[METADATA_KEY]
            override = self.mpp_spin.value() or None
            self._sessions[key] = SlideSession(meta["path"], config, mpp=override)
        return self._sessions[key]

    # --- running jobs -------------------------------------------------------------------------------
    def _run(self, job: Callable[..., Iterator[object]], *args: Any, **kwargs: Any) -> None:
        """Run a job generator in a worker; a running one is cancelled and this one queued."""
        try:
            session = self.session()
        except VirchowError as exc:
            _report(exc)
            self.status.setText(str(exc))
            return
        if self._worker is not None:
            self._pending = lambda: self._run(job, *args, **kwargs)
            self._cancel.set()
            return
        self._cancel = threading.Event()
        # _ignore_errors: _on_error shows one notification; napari's default would add a traceback
        worker = create_worker(job, session, *args, cancel=self._cancel, _start_thread=False, _ignore_errors=True,
                               **kwargs)  # fmt: skip
        worker.yielded.connect(lambda ev: self._on_event(session, ev))
        worker.errored.connect(self._on_error)
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self._started = time.perf_counter()
        worker.start()

    def _on_error(self, exc: BaseException) -> None:
        _report(exc)
        self.status.setText(f"error: {exc}")

    def _on_finished(self) -> None:
        self._worker = None
        pending, self._pending = self._pending, None
        if pending is not None:
            pending()

    def cancel(self) -> None:
        """Stop the running job after its current batch (what is stored stays stored).

        Only the job's cancel event is set (no ``worker.quit()``): the job then ends on its own,
        so its ``finally`` blocks run now — store closed, session lock released — instead of
        whenever an abandoned generator happens to be collected.
        """
        self._pending = None
        self._cancel.set()
        if self._worker is not None:
            self.status.setText("cancelling after this batch …")

    def _on_event(self, session: SlideSession, ev: object) -> None:
        self.last_event = ev
        if isinstance(ev, _jobs.Stage):
            self.status.setText(ev.message)
            if ev.final:
                self.progress.setMaximum(max(self.progress.maximum(), 1))
                self.progress.setValue(self.progress.maximum())
        elif isinstance(ev, _jobs.BatchDone):
            self.progress.setMaximum(ev.n_total)
            self.progress.setValue(ev.n_done)
            self.status.setText(f"{ev.n_done} / {ev.n_total} tiles · {ev.tiles_per_s:.1f} tiles/s")
            for name in ev.changed:
                self._draw(name, session)
        elif isinstance(ev, _jobs.TooMany):
            self._confirm_all = ev.n_todo
            self.all_btn.setText(f"Compute {ev.n_todo:,} tiles (≈ {_duration(ev.eta_s)})")
            self.status.setText(f"{ev.n_todo:,} tiles to compute in view (limit {ev.limit:,}): zoom in, "
                                "or press the button to compute them all")  # fmt: skip
        elif isinstance(ev, _jobs.Trained):
            self._show_head(ev.result.head, ev.result.counts)
            self._draw("probability", session)
        elif isinstance(ev, _jobs.Clustered):
            self._draw("clusters", session)
            if ev.result.rgb is not None:
                show_raster(self.viewer, overlay_name(self._slide_layer(), "embedding colours"),
                            session.raster(ev.result.rgb), rgb=True, opacity=0.6)  # fmt: skip
            self._show_legend(ev.result.counts)
        elif isinstance(ev, _jobs.Queried):
            self._draw("similarity", session)
            self._show_hits(session, ev)
        elif isinstance(ev, _jobs.IndexHits):
            self._show_index_hits(session, ev)

    # --- compute -------------------------------------------------------------------------------
    def visible_box(self) -> tuple[float, float, float, float] | None:
        layer = self._slide_layer()
        return None if layer is None else visible_box_level0(self.viewer, layer)

    def compute_visible(self, *, force: bool = False) -> None:
        """Embed the tissue tiles on screen that are not cached yet (centre-out)."""
        box = self.visible_box()
        if box is None:
            self.status.setText("the slide is not on screen")
            return
        self._confirm_all = None
        self.all_btn.setText("All in view")
        self._run(_jobs.compute_job, box, limit=self.limit_spin.value(), force=force)

    def compute_all_in_view(self) -> None:
        """First press: count tiles and show the expected time; second press: compute them."""
        if self._confirm_all is not None:
            self.compute_visible(force=True)
        else:
            self._run(_jobs.compute_job, self.visible_box() or (0, 0, 0, 0), limit=0)

    def _follow(self, box: tuple[float, float, float, float]) -> None:
        self._run(_jobs.compute_job, box, limit=self.limit_spin.value())

    def _set_follow(self, on: bool) -> None:
        self._watcher.set_enabled(on)

    def _show_tissue(self, on: bool | None = None) -> None:
        slide = self._slide_layer()
        name = overlay_name(slide, "tissue") if slide is not None else None
        if not self.tissue_check.isChecked():
            if name and name in self.viewer.layers:
                self.viewer.layers[name].visible = False
            return
        try:
            session = self.session()
            grid = session.grid
        except VirchowError as exc:
            _report(exc)
            return
        tissue = grid.tissue.astype(np.int32)
        layer = show_raster(self.viewer, name, session.raster(tissue), kind="labels", opacity=0.35)
        layer.visible = True
        self.tissue_slider.blockSignals(True)
        self.tissue_slider.setValue(int(round(grid.tissue_threshold * 100)))
        self.tissue_slider.blockSignals(False)
        self.status.setText(f"{grid.n_tissue:,} of {len(grid):,} tiles are tissue "
                            f"(saturation threshold {grid.tissue_threshold:.2f})")  # fmt: skip

    def _tissue_threshold_changed(self) -> None:
        try:
            self.session().set_tissue_threshold(self.tissue_slider.value() / 100 or None)
        except VirchowError as exc:
            _report(exc)
            return
        self._show_tissue()

    # --- drawing overlays -------------------------------------------------------------------------
    def _draw(self, what: str, session: SlideSession | None = None) -> None:
        layer = self._slide_layer()
        if layer is None:
            return
        try:
            session = session or self.session()
        except VirchowError:
            return
        name = overlay_name(layer, what)
        if what == "probability" and session.probability is not None:
            values = mask_below(session.probability, self.threshold_slider.value() / 100)
            smooth = 4 if self.smooth_check.isChecked() else 0
            lyr = show_raster(self.viewer, name, session.raster(values, smooth=smooth), colormap="inferno",
                              contrast_limits=(0, 1), opacity=0.6, blending="translucent")  # fmt: skip
            lyr.contrast_limits = (0, 1)
            if hasattr(lyr, "colorbar"):
                lyr.colorbar.visible = True
        elif what == "clusters" and session.cluster_labels is not None:
            show_raster(self.viewer, name, session.raster(session.cluster_labels), kind="labels", opacity=0.5)
            self._show_legend(session.cluster_counts())
        elif what == "similarity" and session.similarity is not None:
            lyr = show_raster(self.viewer, name, session.raster(session.similarity), colormap="viridis",
                              contrast_limits=(0, 1), opacity=0.6)  # fmt: skip
            lyr.contrast_limits = (float(np.nanmin(session.similarity)), 1.0)

    def _show_legend(self, counts: dict[int, int]) -> None:
        layer = self.viewer.layers[overlay_name(self._slide_layer(), "clusters")] if self._slide_layer() else None
        rows = []
        for cid, n in counts.items():
            color = layer.get_color(cid) if layer is not None else None
            hexc = "#{:02x}{:02x}{:02x}".format(*(int(255 * c) for c in color[:3])) if color is not None else "#888"
            rows.append(f"<span style='color:{hexc}'>■</span> cluster {cid}: {n:,} tiles")
        self.legend.setText("<br>".join(rows))

    # --- head -------------------------------------------------------------------------------
    def new_annotation_layer(self) -> Shapes:
        """A Shapes layer in level-0 px (slide scale) whose new shapes get the chosen class."""
        slide = self._slide_layer()
        scale = tuple(slide.scale) if slide is not None else (1.0, 1.0)
        units = tuple(slide.units) if slide is not None else None
        layer = self.viewer.add_shapes(name="annotations", scale=scale, units=units,
                                       features={"class": np.array([], dtype=object)},
                                       face_color="transparent", edge_width=4, edge_color="class",
                                       edge_color_cycle=CLUSTER_COLORS)  # fmt: skip
        layer.feature_defaults["class"] = self.class_edit.currentText()
        layer.mode = "add_polygon"
        layer.events.data.connect(self._annotations_edited)
        return layer

    def _annotation_layer(self) -> Shapes | None:
        shapes = [lyr for lyr in self.viewer.layers if isinstance(lyr, Shapes) and "class" in lyr.features]
        return shapes[-1] if shapes else None

    def _class_changed(self, name: str) -> None:
        layer = self._annotation_layer()
        if layer is not None:
            layer.feature_defaults["class"] = name

    def annotations(self) -> tuple[list[np.ndarray], list[str]]:
        """Polygons (level-0 (x, y) px) and class names of the annotation layer."""
        layer = self._annotation_layer()
        if layer is None or not len(layer.data):
            raise VirchowError("no annotations: press 'New annotation layer' and draw regions of two classes")
        polygons = [np.asarray(shape)[:, -2:][:, ::-1] for shape in layer.data]  # (y, x) → (x, y)
        return polygons, [str(c) for c in layer.features["class"]]

    def _annotations_edited(self, *_: object) -> None:
        if self.refit_check.isChecked():
            self.train()

    def train(self) -> None:
        """Embed the annotated tiles, fit the probe, draw the heatmap."""
        try:
            polygons, classes = self.annotations()
        except VirchowError as exc:
            _report(exc)
            return
        self._run(_jobs.train_job, polygons, classes)

    def _show_head(self, head: Any, counts: dict[str, int] | None = None) -> None:
        m = head.metrics
        parts = [f"head for {head.encoder}: {' vs '.join(head.classes)} (map shows {head.positive_class})"]
        if counts:
            parts.append(", ".join(f"{k}: {v} tiles" for k, v in counts.items()))
        if m.get("cv_accuracy") is not None:
            parts.append(f"cross-validated accuracy {m['cv_accuracy']:.2f}")
        if m.get("cv_auc") is not None:
            parts.append(f"AUC {m['cv_auc']:.2f}")
        self.head_label.setText(" · ".join(parts))

    def _load_head(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Load head", "", "Heads (*.safetensors *.json)")
        if path:
            self.load_head(path)

    def load_head(self, path: str | Path) -> None:
        """Load a head file (refused when made for another encoder) and draw its heatmap."""
        from napari_virchow.analysis.heads import load_head

        try:
            session = self.session()
            head = load_head(path, encoder=session.config.encoder)
        except VirchowError as exc:
            _report(exc)
            return
        self._run(_set_head_job, head)

    def _save_head(self) -> None:
        from napari_virchow.analysis.heads import save_head

        try:
            head = self.session().head
        except VirchowError as exc:
            _report(exc)
            return
        if head is None:
            show_warning("no head yet: train one from annotations or load one")
            return
        path, _ = QFileDialog.getSaveFileName(self, "Save head", "head.safetensors", "Heads (*.safetensors *.json)")
        if not path:
            return
        try:
            show_info(f"saved {save_head(head, path)}")
        except (VirchowError, OSError) as exc:
            _report(exc)

    def _load_geojson(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "QuPath annotations", "", "GeoJSON (*.geojson *.json)")
        if path:
            self.load_geojson(path)

    def load_geojson(self, path: str | Path) -> Shapes | None:
        """Add QuPath GeoJSON polygons (level-0 px) as an annotation layer."""
        from napari_virchow.io.geojson import read_annotations

        try:
            items = read_annotations(path)
        except VirchowError as exc:
            _report(exc)
            return None
        layer = self.new_annotation_layer()
        layer.mode = "pan_zoom"
        layer.events.data.disconnect(self._annotations_edited)
        for item in items:
            layer.feature_defaults["class"] = item.class_name or "unclassified"
            layer.add_polygons([np.asarray(item.polygon)[:, ::-1]])
        layer.feature_defaults["class"] = self.class_edit.currentText()
        layer.events.data.connect(self._annotations_edited)
        return layer

    def _save_geojson(self) -> None:
        from napari_virchow.io.geojson import Annotation, write_annotations

        try:
            polygons, classes = self.annotations()
        except VirchowError as exc:
            _report(exc)
            return
        path, _ = QFileDialog.getSaveFileName(self, "Save annotations", "annotations.geojson", "GeoJSON (*.geojson)")
        if not path:
            return
        try:
            write_annotations(path, [Annotation(p, c) for p, c in zip(polygons, classes, strict=True)])
        except (VirchowError, OSError) as exc:
            _report(exc)
            return
        show_info(f"saved {len(polygons)} annotations to {path}")

    # --- clusters and similarity ----------------------------------------------------------------------
    def cluster(self) -> None:
        """K-means over every embedded tile of the slide."""
        self._run(_jobs.cluster_job, self.k_spin.value(), with_rgb=self.rgb_check.isChecked())

    def _set_picking(self, on: bool) -> None:
        callbacks = self.viewer.mouse_drag_callbacks
        camera(self.viewer).mouse_pan = not on  # while picking, a drag draws a box instead of panning
        if on and self._pick not in callbacks:
            callbacks.append(self._pick)
        elif not on and self._pick in callbacks:
            callbacks.remove(self._pick)

    def _pick(self, viewer: napari.Viewer, event: Any) -> Iterator[None]:
        """Click: the tile under the cursor is the query; drag: the mean of the tiles in the box."""
        layer = self._slide_layer()
        if layer is None or event.type != "mouse_press":
            return
        start = end = np.asarray(layer.world_to_data(event.position))[-2:]
        yield
        while event.type == "mouse_move":
            end = np.asarray(layer.world_to_data(event.position))[-2:]
            yield
        (y0, x0), (y1, x1) = np.minimum(start, end), np.maximum(start, end)
        click_px = 5 / camera(viewer).zoom / float(np.asarray(layer.scale)[-1])  # 5 screen px, in level 0
        if max(y1 - y0, x1 - x0) < click_px:  # a click (or a wobble)
            self.query_at(float(start[1]), float(start[0]))
        else:
            self.query_at(float(start[1]), float(start[0]), box=(float(x0), float(y0), float(x1), float(y1)))

    def query_at(self, x: float, y: float, box: tuple[float, float, float, float] | None = None) -> None:
        """Similar regions to the tile under level-0 ``(x, y)``, or to the mean of the tissue tiles
        in ``box`` (x0, y0, x1, y1); tiles not embedded yet are embedded first."""
        self._run(_jobs.query_job, x, y, k=self.hits_spin.value(), box=box)

    def _show_hits(self, session: SlideSession, ev: _jobs.Queried) -> None:
        layer = self._slide_layer()
        t = session.grid.tile_size_l0
        boxes = [np.array([[h.y, h.x], [h.y, h.x + t], [h.y + t, h.x + t], [h.y + t, h.x]]) for h in ev.hits]
        name = overlay_name(layer, "hits")
        if name in self.viewer.layers:
            self.viewer.layers.remove(name)
        if boxes:
            self.viewer.add_shapes(boxes, name=name, scale=tuple(layer.scale), units=tuple(layer.units),
                                   face_color="transparent",
                                   edge_color="cyan", edge_width=max(t / 20, 2),
                                   text={"string": [str(i + 1) for i in range(len(boxes))],
                                         "color": "cyan"})  # fmt: skip
        self.hit_list.clear()
        for rank, (hit, thumb) in enumerate(zip(ev.hits, ev.thumbnails, strict=True), start=1):
            item = QListWidgetItem(_icon(thumb), f"{rank}. score {hit.score:.3f} at ({hit.x}, {hit.y})")
            item.setData(Qt.ItemDataRole.UserRole, (hit.x + t / 2, hit.y + t / 2))
            self.hit_list.addItem(item)
        self.status.setText(f"{len(ev.hits)} similar regions")

    def _browse_index(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Cohort index", "", "faiss index (*.faiss);;All files (*)")
        if path:
            self.index_edit.setText(path)

    def search_index(self) -> None:
        """Hits for the current query in the other slides of the chosen cohort index."""
        path = self.index_edit.text().strip()
        if not path:
            show_warning("choose a cohort index first (build one with `napari-virchow index SLIDES... --out INDEX`)")
            return
        self._run(_jobs.index_search_job, path, k=self.hits_spin.value())

    def _show_index_hits(self, session: SlideSession, ev: _jobs.IndexHits) -> None:
        if ev.warning:
            show_warning(ev.warning)
        t = session.grid.tile_size_l0
        self.hit_list.clear()
        for rank, (hit, thumb) in enumerate(zip(ev.hits, ev.thumbnails, strict=True), start=1):
            where = Path(hit.slide or "?").name + ("" if hit.exists else " (file missing)")
            item = QListWidgetItem(f"{rank}. {where} score {hit.score:.3f} at ({hit.x}, {hit.y})")
            if thumb is not None:
                item.setIcon(_icon(thumb))
            item.setData(Qt.ItemDataRole.UserRole, (hit.x + t / 2, hit.y + t / 2, hit.slide if hit.exists else None))
            self.hit_list.addItem(item)
        self.status.setText(f"{len(ev.hits)} similar regions in other slides")

    def _go_to_hit(self, item: QListWidgetItem) -> None:
        x, y, *other = item.data(Qt.ItemDataRole.UserRole)
        slide_path = other[0] if other else None
        layer = self._slide_layer()
        if slide_path and (layer is None or layer.metadata[METADATA_KEY]["path"] != slide_path):
            try:
                [layer] = self.viewer.open(slide_path, plugin="napari-virchow")
            except VirchowError as exc:
                _report(exc)
                return
            self.slide_combo.setCurrentText(layer.name)
        if layer is not None:
            camera(self.viewer).center = tuple(np.asarray(layer.data_to_world((y, x))))

    def closeEvent(self, event: Any) -> None:  # noqa: N802 - Qt API
        self.cancel()
        self._watcher.disconnect_all()
        super().closeEvent(event)


def _set_head_job(session: SlideSession, head: Any, *, cancel: threading.Event | None = None) -> Iterator[object]:
    yield _jobs.Stage("applying the head to the embedded tiles …")
    session.set_head(head)
    from napari_virchow.session import TrainResult

    yield _jobs.Trained(TrainResult(head, {}))


def _icon(rgb: np.ndarray) -> QIcon:
    rgb = np.ascontiguousarray(rgb[..., :3])
    h, w = rgb.shape[:2]
    image = QImage(rgb.data, w, h, 3 * w, QImage.Format.Format_RGB888).copy()
    return QIcon(QPixmap.fromImage(image))


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
