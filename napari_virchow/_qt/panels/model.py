"""'Slide and model': which slide layer, its µm/px, and the encoder, weights, device, batch size."""

from __future__ import annotations

from pathlib import Path

from napari.layers import Image
from qtpy.QtCore import Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)  # fmt: skip

from napari_virchow._qt.errors import report
from napari_virchow._qt.panels.base import Host, form, named
from napari_virchow._reader import METADATA_KEY
from napari_virchow.errors import VirchowError
from napari_virchow.models.specs import list_encoders
from napari_virchow.session import SessionConfig
from napari_virchow.slides.slide import SLIDE_SUFFIXES

__all__ = ["ModelPanel", "foreign_slide_path"]

RANDOM = "random (demo)"
BANNER = ("Random weights: the overlays are NOT those of the real model. For Virchow 2, accept the licence at "
          "huggingface.co/paige-ai/Virchow2 and log in (hf auth login), or choose a weights file.")  # fmt: skip


def foreign_slide_path(layer: object) -> str | None:
    """The file of an image layer another reader made from a slide file (else ``None``)."""
    if not isinstance(layer, Image) or METADATA_KEY in layer.metadata:
        return None
    path = getattr(getattr(layer, "source", None), "path", None)
    return str(path) if path and Path(path).suffix.lower() in SLIDE_SUFFIXES and Path(path).is_file() else None


class ModelPanel(QGroupBox):
    """Slide layer, µm/px override, encoder, weights, device and batch size."""

    changed = Signal()  # encoder, weights or device changed: another session, another head
    mpp_changed = Signal()

    def __init__(self, host: Host, parent: QWidget | None = None) -> None:
        super().__init__("Slide and model", parent)
        self._host = host
        lay = QVBoxLayout(self)
        self.banner = named(QLabel(BANNER), "random_banner")
        self.banner.setWordWrap(True)
        self.banner.setStyleSheet("background:#7a1f1f;color:white;padding:4px;border-radius:3px")
        lay.addWidget(self.banner)
        rows = form()
        lay.addLayout(rows)
        self.slide_combo = named(QComboBox(), "slide_combo", "the slide layer to analyse")
        self.reopen_btn = named(QPushButton("Reopen with Virchow"), "reopen_btn",
                                "this layer was opened by another reader: reopen the file through this plugin")
        self.reopen_btn.clicked.connect(self.reopen)
        self.reopen_btn.hide()
        self.mpp_spin = named(QDoubleSpinBox(decimals=4, minimum=0.0, maximum=100.0, singleStep=0.05,
                                             specialValueText="from file"), "mpp_spin",
                              "µm per level-0 pixel, for slides that do not record it (or record it wrongly)")
        self.mpp_spin.valueChanged.connect(lambda _: self.mpp_changed.emit())
        self.encoder_combo = named(QComboBox(editable=True), "encoder_combo")
        self.encoder_combo.addItems(list_encoders())
        self.encoder_combo.setCurrentText("virchow2")
        self.weights_edit = named(QLineEdit(placeholderText="Hugging Face cache, or a file"), "weights_edit",
                                  "a .safetensors (or .bin/.pth) weights file; empty: the Hugging Face cache")
        browse = named(QPushButton("…"), "weights_browse_btn", "choose a weights file")
        browse.setMaximumWidth(32)
        browse.clicked.connect(self._browse_weights)
        self.random_check = named(QCheckBox(RANDOM), "random_check", "random weights: a demo of the pipeline")
        weights_row = QHBoxLayout()
        weights_row.addWidget(self.weights_edit, 1)
        weights_row.addWidget(browse)
        self.device_combo = named(QComboBox(), "device_combo")
        self.device_combo.addItems(["auto", "cpu", "cuda", "mps"])
        self.batch_spin = named(QSpinBox(minimum=0, maximum=1024, specialValueText="auto"), "batch_spin")
        rows.addRow("slide", self.slide_combo)
        rows.addRow(self.reopen_btn)
        rows.addRow("µm/px override", self.mpp_spin)
        rows.addRow("encoder", self.encoder_combo)
        rows.addRow("weights", weights_row)
        rows.addRow("", self.random_check)
        rows.addRow("device", self.device_combo)
        rows.addRow("batch size", self.batch_spin)
        for combo in (self.encoder_combo, self.device_combo):
            combo.currentTextChanged.connect(self._changed)
        self.random_check.toggled.connect(self._changed)
        self.weights_edit.editingFinished.connect(self._changed)
        self.slide_combo.currentTextChanged.connect(self._slide_chosen)
        self._changed()

    # --- settings ------------------------------------------------------------------------------
    def config(self) -> SessionConfig:
        """The encoder, weights, device and batch size chosen here."""
        from napari_virchow.inference import leave_one_core

        weights = "random" if self.random_check.isChecked() else (self.weights_edit.text().strip() or None)
        return SessionConfig(encoder=self.encoder_combo.currentText().strip(), weights=weights,
                             device=self.device_combo.currentText(), batch_size=self.batch_spin.value() or None,
                             threads=leave_one_core())  # fmt: skip

    def mpp_override(self) -> float | None:
        return self.mpp_spin.value() or None

    def _changed(self, *_: object) -> None:
        random = self.random_check.isChecked()
        self.weights_edit.setEnabled(not random)
        self.banner.setVisible(random)
        self.changed.emit()

    def _browse_weights(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Encoder weights", "", "Weights (*.safetensors *.bin *.pth *.pt)")
        if path:
            self.weights_edit.setText(path)
            self.random_check.setChecked(False)
            self._changed()

    # --- slide layers --------------------------------------------------------------------------
    def refresh_layers(self) -> None:
        """List the slide layers (and slide files other readers opened, to reopen here)."""
        viewer = self._host.viewer
        current = self.slide_combo.currentText()
        ours = [lyr.name for lyr in viewer.layers if isinstance(lyr, Image) and METADATA_KEY in lyr.metadata]
        foreign = [lyr.name for lyr in viewer.layers if foreign_slide_path(lyr)]
        self.slide_combo.blockSignals(True)
        self.slide_combo.clear()
        self.slide_combo.addItems(ours + foreign)
        if current in ours + foreign:
            self.slide_combo.setCurrentText(current)
        self.slide_combo.blockSignals(False)
        self._slide_chosen()

    def _slide_chosen(self, *_: object) -> None:
        self.reopen_btn.setVisible(self.foreign_layer() is not None)

    def slide_layer(self) -> Image | None:
        """The chosen slide layer (``None`` when none, or when another reader made it)."""
        viewer = self._host.viewer
        name = self.slide_combo.currentText()
        layer = viewer.layers[name] if name in viewer.layers else None  # noqa: SIM401 - LayerList
        return layer if isinstance(layer, Image) and METADATA_KEY in layer.metadata else None

    def foreign_layer(self) -> Image | None:
        viewer = self._host.viewer
        name = self.slide_combo.currentText()
        layer = viewer.layers[name] if name in viewer.layers else None  # noqa: SIM401 - LayerList
        return layer if foreign_slide_path(layer) else None

    def reopen(self) -> None:
        """Replace a layer another reader made from a slide file by this plugin's slide layer."""
        layer = self.foreign_layer()
        if layer is None:
            return
        viewer = self._host.viewer
        index, path = viewer.layers.index(layer), foreign_slide_path(layer)
        # remove first: a µm layer drawn next to the pixel one, then the pixel one removed, can
        # crash the GL canvas (napari 0.9, "Inconsistent units")
        viewer.layers.remove(layer)
        try:
            new = viewer.open(path, plugin="napari-virchow")
        except VirchowError as exc:
            viewer.layers.insert(index, layer)
            report(exc)
            return
        for lyr in new:
            viewer.layers.move(viewer.layers.index(lyr), index)
        self.refresh_layers()
        self.slide_combo.setCurrentText(new[0].name)
