"""'Slide prediction': load a slide-level head (ABMIL), see the slide's class probabilities and where it looked.

Loading checks the head against the session's encoder and weights (a clear notification when it
does not fit), embeds the tissue tiles at the head's µm/px that are not stored yet (progress and
Cancel in the job bar), then shows the probability per class here and the attention map as an
overlay in µm (its own layer: the tile probe's heatmap stays).
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import TYPE_CHECKING

from qtpy.QtCore import Qt
from qtpy.QtWidgets import QFileDialog, QGroupBox, QHBoxLayout, QLabel, QPushButton, QWidget

from napari_virchow._qt.errors import gui_message, report
from napari_virchow._qt.layers import BAR_TITLE_KEY, _ramp, overlay_name, show_colorbar_on_top, show_raster
from napari_virchow._qt.panels.base import Host, form, named
from napari_virchow.errors import VirchowError
from napari_virchow.jobs_slide_head import SlidePredicted, check_encoder, slide_head_job
from napari_virchow.store.key import mag_name

if TYPE_CHECKING:
    from napari_virchow.analysis.mil import SlideHead
    from napari_virchow.session import SlideSession

__all__ = ["ATTENTION", "SlideHeadPanel"]

#: attention map colours: teal to lime, apart from the probe's inferno and the similarity's viridis
ATTENTION = _ramp("virchow attention", ["#00204c", "#005f73", "#0a9396", "#94d2bd", "#e9ff70"])


def describe(head: SlideHead) -> str:
    """One line about a slide head: encoder, µm/px, classes, cross-validated metric."""
    text = f"slide head for {head.encoder} at {mag_name(head.mpp)}: {' vs '.join(head.classes)}"
    metric = head.cv_metric
    if metric is not None:
        name, value, lo, hi = metric
        what = "AUC" if name == "auc" else name.replace("_", " ")
        text += f" · cross-validated {what} {value:.2f} [{lo:.2f}, {hi:.2f}]"
    return text


class SlideHeadPanel(QGroupBox):
    """Load slide head…, Predict this slide, the probabilities, and the attention overlay."""

    def __init__(self, host: Host, parent: QWidget | None = None) -> None:
        super().__init__("Slide prediction", parent)
        self._host = host
        self.slide_head: SlideHead | None = None
        self.last: SlidePredicted | None = None
        lay = form(self)
        row = QHBoxLayout()
        self.load_btn = named(QPushButton("Load slide head…"), "load_slide_head_btn",
                              "a slide-level head from napari-virchow fit-slide-head (.safetensors)")  # fmt: skip
        self.load_btn.clicked.connect(self._browse)
        self.predict_btn = named(QPushButton("Predict this slide"), "predict_slide_btn",
                                 "embed the missing tissue tiles at the head's µm/px, then predict")  # fmt: skip
        self.predict_btn.clicked.connect(self.predict)
        self.predict_btn.setEnabled(False)
        row.addWidget(self.load_btn)
        row.addWidget(self.predict_btn)
        lay.addRow(row)
        self.head_label = named(QLabel("no slide head: load one made by napari-virchow fit-slide-head"),
                                "slide_head_label")  # fmt: skip
        self.head_label.setWordWrap(True)
        lay.addRow(self.head_label)
        self.prediction_label = named(QLabel(), "slide_prediction_label")
        self.prediction_label.setTextFormat(Qt.TextFormat.RichText)
        self.prediction_label.setWordWrap(True)
        lay.addRow(self.prediction_label)

    def _browse(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Load slide head", "", "Slide heads (*.safetensors)")
        if path:
            self.load(path)

    def load(self, path: str | Path) -> SlideHead | None:
        """Read a slide head file and predict the current slide (one message when it does not fit)."""
        from napari_virchow.analysis.mil_io import load_slide_head

        try:
            head = load_slide_head(path)
        except VirchowError as exc:
            report(exc)
            self._host.set_status(gui_message(exc))
            return None
        self.slide_head = head
        self.head_label.setText(describe(head))
        self.predict_btn.setEnabled(True)
        self.predict()
        return head

    def predict(self) -> None:
        """Embed what the slide head needs and predict the current slide (a worker's job)."""
        if self.slide_head is None:
            return
        self.prediction_label.setText("")
        try:
            check_encoder(self._host.session(), self.slide_head)  # before any work
        except VirchowError as exc:
            report(exc)
            self._host.set_status(gui_message(exc))
            return
        self._host.run(slide_head_job, self.slide_head)

    def _show(self, session: SlideSession, ev: SlidePredicted) -> None:
        self.last = ev
        probabilities = ev.result.probabilities
        top = max(probabilities, key=lambda c: probabilities[c])
        rows = [f"<b>{html.escape(c)} {p:.2f}</b>" if c == top else f"{html.escape(c)} {p:.2f}"
                for c, p in sorted(probabilities.items(), key=lambda kv: -kv[1])]  # fmt: skip
        over = f"over {len(ev.result.indices):,} tissue tiles at {mag_name(ev.result.mpp)}"
        # one class per line: a long class name never splits a name from its probability
        self.prediction_label.setText("<br>".join([f"{html.escape(session.slide.path.name)}:", *rows, over]))
        layer = self._host.slide_layer()
        if layer is None:
            return
        lyr = show_raster(self._host.viewer, overlay_name(layer, "attention"), ev.raster, colormap=ATTENTION,
                          contrast_limits=(0, 1), opacity=0.85, blending="translucent")  # fmt: skip
        lyr.contrast_limits = (0, 1)
        lyr.metadata[BAR_TITLE_KEY] = "attention"
        show_colorbar_on_top(self._host.viewer)
        self._host.set_status(f"slide predicted: {top} ({probabilities[top]:.2f})")

    def on_event(self, session: SlideSession, ev: object) -> None:
        if isinstance(ev, SlidePredicted):
            self._show(session, ev)
