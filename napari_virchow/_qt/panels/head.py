"""'Cancer probability': annotate two classes, train a probe (or load one), and the heatmap."""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import numpy as np
from napari.layers import Shapes
from napari.utils.notifications import show_info, show_warning
from qtpy.QtCore import Qt
from qtpy.QtGui import QColor, QIcon, QPixmap
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSlider,
    QWidget,
)  # fmt: skip

from napari_virchow import jobs as _jobs
from napari_virchow._qt.annotation_shapes import HOLE_CLASS, HOLE_COLOR, regions_with_holes, shapes_of
from napari_virchow._qt.errors import gui_message, report
from napari_virchow._qt.layers import BAR_TITLE_KEY, HEAT, overlay_name, show_colorbar_on_top, show_raster
from napari_virchow._qt.panels.base import Host, form, named
from napari_virchow.analysis.rasters import mask_below
from napari_virchow.errors import VirchowError
from napari_virchow.session import SlideSession, TrainResult

#: below this many tiles in a class, the cross-validated figures mean little
MIN_TILES_PER_CLASS = 10

__all__ = ["CLASS_COLORS", "HeadPanel", "class_color", "cv_auc", "set_head_job"]

CLASS_COLORS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6",
                "#bcf60c", "#fabebe", "#008080", "#e6beff", "#9a6324", "#fffac8", "#800000"]  # fmt: skip


#: colours for other classes: strong ones that read on H&E pink and purple (no pinks, no purples)
OTHER_CLASS_COLORS = ["#4363d8", "#f58231", "#00b3b3", "#9acd32", "#ffd700", "#000000", "#8b4513"]
POSITIVE_WORDS = ("tumour", "tumor", "cancer", "carcinoma", "malignant", "lesion")
NEGATIVE_WORDS = ("normal", "benign", "healthy", "background")


def class_color(name: str) -> str:
    """The one colour of an annotation class: on the canvas, in the class list and in GeoJSON.

    Tumour-like names are red, normal-like green, others a stable palette entry by name.
    """
    low = name.strip().lower()
    if low == HOLE_CLASS:  # holes of the region around them (annotation_shapes)
        return HOLE_COLOR
    if any(word in low for word in POSITIVE_WORDS):
        return CLASS_COLORS[0]
    if any(word in low for word in NEGATIVE_WORDS):
        return CLASS_COLORS[1]
    return OTHER_CLASS_COLORS[zlib.crc32(low.encode()) % len(OTHER_CLASS_COLORS)]


def rgb(hex_color: str) -> tuple[int, int, int]:
    return (int(hex_color[1:3], 16), int(hex_color[3:5], 16), int(hex_color[5:7], 16))


def _swatch(hex_color: str) -> QIcon:
    pixmap = QPixmap(12, 12)
    pixmap.fill(QColor(hex_color))
    return QIcon(pixmap)


def cv_auc(head: Any) -> float | None:
    """The head's cross-validated ROC AUC (``head.cv_auc`` once the core has it)."""
    return getattr(head, "cv_auc", None) if hasattr(head, "cv_auc") else head.metrics.get("cv_roc_auc")


def cv_accuracy(head: Any) -> float | None:
    return getattr(head, "cv_accuracy", None) if hasattr(head, "cv_accuracy") else head.metrics.get("cv_accuracy")


@_jobs.cancellable
def set_head_job(session: SlideSession, head: Any, *, cancel: Any = None) -> Any:
    """Apply a loaded head to every embedded tile (reads the store: a worker's job)."""
    yield _jobs.Stage("applying the head to the embedded tiles …")
    session.set_head(head)
    yield _jobs.Trained(TrainResult(head, {}))


class HeadPanel(QGroupBox):
    """Annotation classes, GeoJSON and head files, training, and the heatmap's threshold."""

    def __init__(self, host: Host, parent: QWidget | None = None) -> None:
        super().__init__("Cancer probability", parent)
        self._host = host
        lay = form(self)
        self.class_combo = named(QComboBox(editable=True), "class_combo", "class of the regions you draw next")
        for name in ("tumour", "normal"):
            self.class_combo.addItem(_swatch(class_color(name)), name)
        self.class_combo.currentTextChanged.connect(self._class_changed)
        new_ann = named(QPushButton("New annotation layer"), "new_annotations_btn")
        new_ann.clicked.connect(self.new_annotation_layer)
        lay.addRow("draw class", self.class_combo)
        lay.addRow(new_ann)
        files = QGridLayout()
        for i, (text, name, slot) in enumerate((
            ("Load GeoJSON", "load_geojson_btn", self._load_geojson), ("Save GeoJSON", "save_geojson_btn",
             self._save_geojson), ("Load head", "load_head_btn", self._load_head),
            ("Save head", "save_head_btn", self._save_head),
        )):  # fmt: skip
            btn = named(QPushButton(text), name)
            btn.clicked.connect(slot)
            files.addWidget(btn, i // 2, i % 2)
        lay.addRow(files)
        train_row = QHBoxLayout()
        self.train_btn = named(QPushButton("Train from annotations"), "train_btn")
        self.train_btn.clicked.connect(self.train)
        self.refit_check = named(QCheckBox("re-fit on edits"), "refit_check")
        train_row.addWidget(self.train_btn)
        train_row.addWidget(self.refit_check)
        lay.addRow(train_row)
        self.head_label = named(QLabel("no head"), "head_label")
        self.head_label.setWordWrap(True)
        lay.addRow(self.head_label)
        self.threshold_slider = named(QSlider(Qt.Orientation.Horizontal, minimum=0, maximum=100, value=0),
                                      "threshold_slider", "hide tiles whose probability is below this")
        self.threshold_slider.valueChanged.connect(self._threshold_moved)
        self.threshold_label = named(QLabel("0.00"), "threshold_label")
        self.threshold_label.setMinimumWidth(self.threshold_label.fontMetrics().horizontalAdvance("0.00 "))
        self.smooth_check = named(QCheckBox("smooth"), "smooth_check")
        self.smooth_check.toggled.connect(lambda _: self.draw())
        thr = QHBoxLayout()
        thr.addWidget(self.threshold_slider, 1)
        thr.addWidget(self.threshold_label)
        thr.addWidget(self.smooth_check)
        lay.addRow("hide below", thr)

    # --- annotations ---------------------------------------------------------------------------
    def new_annotation_layer(self) -> Shapes:
        """A Shapes layer in the slide's scale whose new shapes get the chosen class."""
        slide = self._host.slide_layer()
        scale = tuple(slide.scale) if slide is not None else (1.0, 1.0)
        # edges in level-0 px: thick enough to see on the whole slide, thin when zoomed in
        width = max(4.0, max(slide.level_shapes[0][:2]) / 300) if slide is not None else 4.0
        units = tuple(slide.units) if slide is not None else None
        name = overlay_name(slide, "annotations") if slide is not None else "annotations"
        layer = self._host.viewer.add_shapes(name=name, scale=scale, units=units,
                                             features={"class": np.array([], dtype=object)},
                                             face_color="transparent", edge_width=width, edge_color="class",
                                             edge_color_cycle=CLASS_COLORS,
                                             text={"string": "{class}", "size": 11, "color": "black",
                                                   "anchor": "upper_left"})  # fmt: skip
        self._use_class(layer, self.class_combo.currentText())
        layer.mode = "add_polygon"
        layer.events.data.connect(self._annotations_edited)
        return layer

    def offer_classes(self, names: list[str]) -> None:
        """Put the classes ``names`` first in 'draw class' (those listed already keep their order), so
        number keys 1, 2, … label with them; the draw class becomes the first unless it is one already."""
        wanted = list(dict.fromkeys(n for n in names if n.strip()))
        if not wanted:
            return
        combo = self.class_combo
        current = combo.currentText()
        listed = [combo.itemText(i) for i in range(combo.count())]
        first = [n for n in listed if n in wanted] + [n for n in wanted if n not in listed]
        combo.blockSignals(True)
        combo.clear()
        for name in first + [n for n in listed if n not in wanted]:
            combo.addItem(_swatch(class_color(name)), name)
        combo.setCurrentText(current if current in wanted else first[0])
        combo.blockSignals(False)
        if combo.currentText() != current:
            combo.currentTextChanged.emit(combo.currentText())

    def annotation_layer(self) -> Shapes | None:
        shapes = [lyr for lyr in self._host.viewer.layers if isinstance(lyr, Shapes) and "class" in lyr.features]
        return shapes[-1] if shapes else None

    def _class_changed(self, name: str) -> None:
        index = self.class_combo.findText(name)
        if index >= 0:
            self.class_combo.setItemIcon(index, _swatch(class_color(name)))
        layer = self.annotation_layer()
        if layer is not None:
            self._use_class(layer, name)

    @staticmethod
    def _add_classes(layer: Shapes, names: list[str]) -> None:
        """Give each class of ``names`` its one colour in ``layer`` (one update for all)."""
        from napari.utils.colormaps.standardize_color import transform_color

        colors = dict(layer.edge_color_cycle_map)
        new = {n: transform_color(class_color(n))[0] for n in dict.fromkeys(names) if n not in colors}
        if new:
            layer.edge_color_cycle_map = {**colors, **new}

    @classmethod
    def _use_class(cls, layer: Shapes, name: str) -> None:
        """New shapes get class ``name``, drawn in its one colour."""
        cls._add_classes(layer, [name])
        layer.feature_defaults["class"] = name

    def annotation_regions(self) -> tuple[list[Any], list[np.ndarray]]:
        """Regions of the annotation layer (Annotations, level-0 (x, y) px, their holes attached) and
        the hole shapes inside no region (see :mod:`~napari_virchow._qt.annotation_shapes`)."""
        layer = self.annotation_layer()
        if layer is None or not len(layer.data):
            raise VirchowError("no annotations: press 'New annotation layer' and draw regions of two classes")
        polygons = [np.asarray(shape)[:, -2:][:, ::-1] for shape in layer.data]  # (y, x) → (x, y)
        return regions_with_holes(polygons, [str(c) for c in layer.features["class"]])

    def annotations(self) -> tuple[list[np.ndarray], list[str]]:
        """Polygons (level-0 (x, y) px) and class names of the annotation layer's regions (holes apart)."""
        regions, _ = self.annotation_regions()
        return [r.polygon for r in regions], [str(r.class_name) for r in regions]

    def _annotations_edited(self, *_: object) -> None:
        if self.refit_check.isChecked():
            self.train()

    def train(self) -> None:
        """Embed the annotated tiles, fit the probe, draw the heatmap."""
        try:
            regions, _ = self.annotation_regions()
        except VirchowError as exc:
            report(exc)
            self._host.set_status(gui_message(exc))
            return
        self._host.run(_jobs.train_job, [r.polygon for r in regions], [str(r.class_name) for r in regions],
                       holes=[r.holes for r in regions])  # fmt: skip

    def load_geojson(self, path: str | Path) -> Shapes | None:
        """Add QuPath GeoJSON polygons (level-0 px) as an annotation layer, holes as shapes of class ``hole``."""
        from napari_virchow.io.geojson import read_annotations

        try:
            items = read_annotations(path)
        except VirchowError as exc:
            report(exc)
            return None
        layer = self.new_annotation_layer()
        layer.mode = "pan_zoom"
        layer.events.data.disconnect(self._annotations_edited)
        shapes = shapes_of(items)
        if shapes:
            # one add for the whole file, in its order, then each shape's class: adding shapes one at a
            # time re-validates the layer per shape (500 QuPath regions took 12 s; this 0.7 s)
            self._add_classes(layer, [name for _, name in shapes])
            layer.add_polygons([polygon[:, ::-1] for polygon, _ in shapes])
            layer.features = {"class": np.array([name for _, name in shapes], dtype=object)}
            layer.refresh_colors(update_color_mapping=False)
        self.offer_classes([name for _, name in shapes if name != HOLE_CLASS])
        self._use_class(layer, self.class_combo.currentText())
        layer.events.data.connect(self._annotations_edited)
        return layer

    def _load_geojson(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "QuPath annotations", "", "GeoJSON (*.geojson *.json)")
        if path:
            self.load_geojson(path)

    def _save_geojson(self) -> None:
        from napari_virchow.io.geojson import Annotation, write_annotations
        from napari_virchow.io.provenance import provenance

        try:
            regions, orphans = self.annotation_regions()
        except VirchowError as exc:
            report(exc)
            return
        path, _ = QFileDialog.getSaveFileName(self, "Save annotations", "annotations.geojson", "GeoJSON (*.geojson)")
        if not path:
            return
        for r in regions:
            r.color = rgb(class_color(str(r.class_name)))
        items = regions + [Annotation(h, HOLE_CLASS, color=rgb(HOLE_COLOR)) for h in orphans]
        try:  # the slide's provenance travels with the file (fingerprint, µm/px, ...)
            write_annotations(path, items, provenance=provenance(self._host.session()))
        except (VirchowError, OSError) as exc:
            report(VirchowError(str(exc)) if isinstance(exc, OSError) else exc)
            return
        show_info(f"saved {len(items)} annotations to {path}")

    # --- heads ---------------------------------------------------------------------------------
    def _load_head(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Load head", "", "Heads (*.safetensors *.json)")
        if path:
            self.load_head(path)

    def load_head(self, path: str | Path) -> None:
        """Load a head file (refused when made for another encoder) and draw its heatmap."""
        from napari_virchow.analysis.head_files import load_head

        try:
            head = load_head(path, encoder=self._host.session().config.encoder)
        except VirchowError as exc:
            report(exc)
            return
        self._host.run(set_head_job, head)

    def _save_head(self) -> None:
        from napari_virchow.analysis.head_files import save_head

        try:
            head = self._host.session().head
        except VirchowError as exc:
            report(exc)
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
            report(VirchowError(str(exc)) if isinstance(exc, OSError) else exc)

    def show_head(self, session: SlideSession | None, counts: dict[str, int] | None = None) -> None:
        """Describe the session's head (or say there is none for its encoder)."""
        head = session.head if session is not None else None
        if head is None:
            encoder = session.config.encoder if session is not None else "this encoder"
            self.head_label.setText(f"no head for {encoder}: train one from annotations or load one")
            return
        self.offer_classes([str(c) for c in head.classes])  # labelling keys follow the probe's classes
        parts = [f"head for {head.encoder}: {' vs '.join(head.classes)} (map shows {head.positive_class})"]
        if counts:
            parts.append(", ".join(f"{k}: {v} tiles" for k, v in counts.items()))
            few = [k for k, v in counts.items() if v < MIN_TILES_PER_CLASS]
            if few:
                parts.append(f"⚠ fewer than {MIN_TILES_PER_CLASS} tiles of {', '.join(few)}: too few to trust the "
                             "accuracy, annotate more")  # fmt: skip
        if cv_accuracy(head) is not None:
            parts.append(f"cross-validated accuracy {cv_accuracy(head):.2f}")
        if cv_auc(head) is not None:
            others = [f"{a:.2f} at {m:g} µm/px" for m, a in getattr(head, "cv_aucs", {}).items()
                      if a is not None and m != head.mpp]  # fmt: skip
            parts.append(", ".join([f"AUC {cv_auc(head):.2f}" + (f" at {head.mpp:g} µm/px" if others else ""),
                                    *others]))  # fmt: skip
        self.head_label.setText(" · ".join(parts))

    # --- heatmap -------------------------------------------------------------------------------
    def _threshold_moved(self, value: int) -> None:
        self.threshold_label.setText(f"{value / 100:.2f}")
        self.draw()

    def draw(self, session: SlideSession | None = None) -> None:
        layer = self._host.slide_layer()
        if layer is None:
            return
        try:
            session = session or self._host.session()
        except VirchowError:
            return
        threshold = self.threshold_slider.value() / 100
        smooth = 4 if self.smooth_check.isChecked() else 0
        # each place from the finest magnification computed there (coarser levels fill in around it)
        raster = session.overlay_raster("probability", transform=lambda v: mask_below(v, threshold), smooth=smooth)
        if raster is None or session.head is None:
            return
        lyr = show_raster(self._host.viewer, overlay_name(layer, "probability"), raster,
                          colormap=HEAT, contrast_limits=(0, 1), opacity=0.85, blending="translucent")  # fmt: skip
        lyr.contrast_limits = (0, 1)
        lyr.metadata[BAR_TITLE_KEY] = f"P({session.head.positive_class})" if session.head is not None else None
        show_colorbar_on_top(self._host.viewer)

    def on_event(self, session: SlideSession, ev: object) -> None:
        if isinstance(ev, _jobs.Trained):
            self.show_head(session, ev.result.counts)
            self.draw(session)
            self._host.set_status(f"probe ready for {ev.result.head.encoder}")
        elif isinstance(ev, _jobs.BatchDone) and "probability" in ev.changed:
            self.draw(session)
