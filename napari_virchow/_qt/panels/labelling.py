"""'Labelling': the tiles the probe is least sure of, jumped through and labelled with one key per class.

"Suggest tiles to label" lists embedded tissue tiles whose probability is nearest 0.5 and that lie
far from the annotated ones (:mod:`napari_virchow.analysis.suggest`); Next / Previous (or a click)
zooms to one and flashes its box; a number key labels it: the tile's square is added to the
annotation layer as a polygon of that class (saved and exported with the others), and the next
tile comes. Re-fitting the probe shows how the cross-validated AUC moved ("AUC 0.84 → 0.91").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import QEvent, Qt
from qtpy.QtWidgets import QGroupBox, QHBoxLayout, QLabel, QPushButton, QSpinBox, QWidget

from napari_virchow._qt.errors import report
from napari_virchow._qt.flash import Flasher
from napari_virchow._qt.hitlist import add_hit, hit_list, zoom_to_tile
from napari_virchow._qt.layers import layer_named, overlay_name, show_boxes
from napari_virchow._qt.panels.base import Host, form, named
from napari_virchow._qt.picking import box_corners
from napari_virchow.errors import VirchowError
from napari_virchow.jobs import Trained
from napari_virchow.jobs_labelling import Suggested, suggest_job
from napari_virchow.session import SlideSession
from napari_virchow.store.key import mag_name

if TYPE_CHECKING:
    from napari_virchow._qt.panels.head import HeadPanel

__all__ = ["SUGGESTION_COLOR", "LabellingPanel", "tile_square"]

SUGGESTION_COLOR = "#00e5ff"  # cyan: reads on H&E and on the inferno heatmap, unlike the magenta hits
_TEXT = Qt.ItemDataRole.UserRole + 1  # a row's text before it was labelled
_NUMBER_KEYS = {getattr(Qt.Key, f"Key_{i}"): i for i in range(1, 10)}


def tile_square(x: float, y: float, t: float) -> np.ndarray:
    """The tile at level-0 top-left ``(x, y)``, side ``t``, as a napari (y, x) polygon."""
    return np.array([[y, x], [y, x + t], [y + t, x + t], [y + t, x]], float)


class LabellingPanel(QGroupBox):
    """Suggest tiles, jump through them, label each with a number key, re-fit and see the AUC move."""

    def __init__(self, host: Host, head: HeadPanel, parent: QWidget | None = None) -> None:
        super().__init__("Labelling", parent)
        self._host, self._head = host, head
        self._auc: float | None = None
        self._suggested: Suggested | None = None
        self._labels: dict[int, str] = {}  # row → class given
        lay = form(self)
        row = QHBoxLayout()
        self.suggest_btn = named(QPushButton("Suggest tiles to label"), "suggest_btn",
                                 "tiles the probe is least sure of, away from those already annotated")  # fmt: skip
        self.suggest_btn.clicked.connect(self.suggest)
        self.suggest_spin = named(QSpinBox(minimum=1, maximum=200, value=10, suffix=" tiles"), "suggest_spin",
                                  "how many tiles to suggest")  # fmt: skip
        row.addWidget(self.suggest_btn, 1)
        row.addWidget(self.suggest_spin)
        lay.addRow(row)
        self.suggest_list = hit_list("suggest_list", "click a tile to go there; press 1, 2, … to label it")
        self.suggest_list.currentRowChanged.connect(self.go_to)
        self.suggest_list.itemClicked.connect(lambda item: self.go_to(self.suggest_list.row(item)))
        lay.addRow(self.suggest_list)
        nav = QHBoxLayout()
        self.prev_btn = named(QPushButton("◀ Previous"), "prev_suggestion_btn")
        self.next_btn = named(QPushButton("Next ▶"), "next_suggestion_btn")
        self.prev_btn.clicked.connect(lambda: self.step(-1))
        self.next_btn.clicked.connect(lambda: self.step(1))
        self.refit_btn = named(QPushButton("Re-fit probe"), "refit_probe_btn",
                               "train the probe again on every annotation, labelled tiles included")  # fmt: skip
        self.refit_btn.clicked.connect(self._head.train)
        for b in (self.prev_btn, self.next_btn, self.refit_btn):
            nav.addWidget(b)
        lay.addRow(nav)
        self.keys_label = named(QLabel(), "label_keys_label")
        self.keys_label.setWordWrap(True)
        lay.addRow(self.keys_label)
        self.labelling_label = named(QLabel("train a probe, then ask which tiles to label"), "labelling_label")
        self.labelling_label.setWordWrap(True)
        lay.addRow(self.labelling_label)
        self.flasher = Flasher(self)
        for w in (self.suggest_list, self.prev_btn, self.next_btn, self.suggest_btn):
            w.installEventFilter(self)  # a number key labels the current tile while the panel has focus
        self._head.class_combo.currentTextChanged.connect(lambda _: self.show_keys())
        self.show_keys()

    # --- classes and keys ------------------------------------------------------------------------
    def classes(self) -> list[str]:
        """The annotation classes in key order (1 is the first of the 'draw class' list)."""
        combo = self._head.class_combo
        names = [combo.itemText(i) for i in range(combo.count())]
        return [n for i, n in enumerate(names) if n.strip() and n not in names[:i]][:9]

    def show_keys(self) -> None:
        self.keys_label.setText("label with keys: " + " · ".join(f"{i} {c}" for i, c in enumerate(self.classes(), 1)))

    def eventFilter(self, obj: Any, event: Any) -> bool:  # noqa: N802 - Qt API
        if event.type() == QEvent.Type.KeyPress and event.key() in _NUMBER_KEYS and not event.modifiers() & (
                Qt.KeyboardModifier.ControlModifier | Qt.KeyboardModifier.AltModifier):  # fmt: skip
            number = _NUMBER_KEYS[event.key()]
            if number <= len(self.classes()):
                self.label_current(self.classes()[number - 1])
                return True
        return super().eventFilter(obj, event)

    # --- suggestions ------------------------------------------------------------------------------
    def _annotations(self) -> tuple[list[np.ndarray], list[str]]:
        try:
            return self._head.annotations()
        except VirchowError:  # nothing annotated yet: every tile is far from a labelled one
            return [], []

    def suggest(self) -> None:
        """Ask the probe which tiles to label (a worker's job: reads the probabilities, the thumbnails)."""
        polygons, classes = self._annotations()
        self._host.run(suggest_job, polygons, classes, k=self.suggest_spin.value())

    def _show(self, session: SlideSession, ev: Suggested) -> None:
        layer = self._host.slide_layer()
        if layer is None:
            return
        self._suggested, self._labels = ev, {}
        t, mpp = ev.tile_size_l0, session.slide.require_mpp()
        boxes = [box_corners(s.x, s.y, s.x + t, s.y + t) for s in ev.suggestions]
        show_boxes(self._host.viewer, overlay_name(layer, "suggestions"), layer, boxes, edge_color=SUGGESTION_COLOR,
                   edge_width=max(t / 20, 2),
                   text={"string": [str(i + 1) for i in range(len(boxes))], "color": SUGGESTION_COLOR, "size": 12})
        self.suggest_list.blockSignals(True)
        self.suggest_list.clear()
        for rank, (s, thumb) in enumerate(zip(ev.suggestions, ev.thumbnails, strict=True), start=1):
            text = f"{rank}. P({ev.positive_class}) {s.probability:.2f}\n({s.x * mpp:,.0f}, {s.y * mpp:,.0f}) µm"
            add_hit(self.suggest_list, text, thumb, (s.x, s.y, t)).setData(_TEXT, text)
        self.suggest_list.blockSignals(False)
        self.show_keys()
        if not ev.suggestions:
            mag = mag_name(ev.mpp)
            self.labelling_label.setText(f"no tile to suggest at {mag}, the probe's magnification: every tissue tile "
                                         f"embedded there is annotated; compute more at {mag}")  # fmt: skip
            return
        self.labelling_label.setText(f"{len(ev.suggestions)} tiles to label, least certain first "
                                     f"({ev.n_labelled} annotated so far)")  # fmt: skip
        self.suggest_list.setCurrentRow(0)  # jumps to the first
        self.suggest_list.setFocus()  # so the number keys label it straight away

    def go_to(self, row: int) -> None:
        """Zoom to suggestion ``row`` and flash its box."""
        item = self.suggest_list.item(row)
        layer = self._host.slide_layer()
        if item is None or layer is None:
            return
        x, y, t = item.data(Qt.ItemDataRole.UserRole)
        viewer = self._host.viewer
        zoom_to_tile(viewer, layer, x + t / 2, y + t / 2, t * float(np.asarray(layer.scale)[-1]),
                     boxes=layer_named(viewer, overlay_name(layer, "suggestions")), row=row,
                     flasher=self.flasher)  # fmt: skip

    def step(self, by: int) -> None:
        """The next (``by=1``) or previous suggestion."""
        n = self.suggest_list.count()
        if n:
            self.suggest_list.setCurrentRow(min(max(self.suggest_list.currentRow() + by, 0), n - 1))

    def label_current(self, name: str) -> None:
        """Add the current tile's square to the annotation layer as class ``name``, go to the next."""
        row = self.suggest_list.currentRow()
        item = self.suggest_list.item(row)
        if item is None:
            self._host.set_status("no tile chosen: press 'Suggest tiles to label' first")
            return
        x, y, t = item.data(Qt.ItemDataRole.UserRole)
        layer = self._head.annotation_layer()
        if layer is None:
            layer = self._head.new_annotation_layer()
            layer.mode = "pan_zoom"
        try:
            self._head._use_class(layer, name)
            if row in self._labels:  # labelled again: the new class replaces the old square
                self._remove_square(layer, x, y, t)
            layer.add_polygons([tile_square(x, y, t)])
        except Exception as exc:  # noqa: BLE001 - napari refusing an edit is shown, not raised into Qt
            report(exc)
        finally:
            self._head._use_class(layer, self._head.class_combo.currentText())
        self._labels[row] = name
        item.setText(f"✓ {name} · {item.data(_TEXT)}")
        done = len(self._labels)
        self.labelling_label.setText(f"{done} of {self.suggest_list.count()} labelled: press 'Re-fit probe' "
                                     "to see the AUC change")  # fmt: skip
        if row + 1 < self.suggest_list.count():
            self.suggest_list.setCurrentRow(row + 1)

    @staticmethod
    def _remove_square(layer: Any, x: float, y: float, t: float) -> None:
        square = tile_square(x, y, t)
        shapes = [np.asarray(shape)[:, -2:] for shape in layer.data]
        same = [i for i, shape in enumerate(shapes) if shape.shape == square.shape and np.allclose(shape, square)]
        if same:
            layer.selected_data = set(same)
            layer.remove_selected()

    # --- events -------------------------------------------------------------------------------------
    def on_event(self, session: SlideSession, ev: object) -> None:
        if isinstance(ev, Suggested):
            self._show(session, ev)
            self._host.set_status(f"{len(ev.suggestions)} tiles to label")
        elif isinstance(ev, Trained):
            self._show_auc(ev)

    def _show_auc(self, ev: Trained) -> None:
        from napari_virchow._qt.panels.head import cv_auc

        new = cv_auc(ev.result.head)
        if new is None:
            return
        old, self._auc = self._auc, new
        text = f"cross-validated AUC {new:.2f}" if old is None else f"cross-validated AUC {old:.2f} → {new:.2f}"
        self.labelling_label.setText(text)
