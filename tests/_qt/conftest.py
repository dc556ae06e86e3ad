"""Driving the dock widget the way a user does: real Qt events on controls found by objectName.

A test declares the controls it drives with ``@pytest.mark.drives("compute_btn", ...)``; the
``ui`` fixture records every control it actually drove, and the test fails if a declared control
was not driven. ``test_controls.py`` compares the declared names with the widget's controls.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QAbstractButton,
    QAbstractSlider,
    QAbstractSpinBox,
    QCheckBox,
    QComboBox,
    QLineEdit,
    QListWidget,
    QStyle,
    QStyleOptionButton,
    QWidget,
)  # fmt: skip

LEFT = Qt.MouseButton.LeftButton
CTRL = Qt.KeyboardModifier.ControlModifier


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "drives(*names): widget controls (objectNames) a test drives with Qt events")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator:
    report = yield
    if report.when == "call":
        item.rep_call = report  # the ui fixture checks its declarations only when the test passed
    return report


class UI:
    """Real Qt input on the widget's controls, by objectName."""

    def __init__(self, qtbot, widget: QWidget) -> None:
        self.qtbot, self.widget = qtbot, widget
        self.driven: set[str] = set()

    def __getitem__(self, name: str) -> QWidget:
        found = self.widget.findChild(QWidget, name)
        assert found is not None, f"no control named {name!r}"
        return found

    def _use(self, name: str) -> QWidget:
        ctrl = self[name]
        try:  # a dock widget just added is shown by the event loop
            self.qtbot.waitUntil(ctrl.isVisible, timeout=2000)
        except Exception:  # noqa: BLE001 - pytest-qt's TimeoutError: say which control
            pytest.fail(f"{name} is not visible")
        assert ctrl.isEnabled(), f"{name} is disabled"
        self.driven.add(name)
        return ctrl

    def click(self, name: str) -> None:
        """A left click in the middle of a button or check box."""
        ctrl = self._use(name)
        assert isinstance(ctrl, QAbstractButton), name
        pos = ctrl.rect().center()
        if isinstance(ctrl, QCheckBox):  # only the box and its text take clicks, not the whole row
            opt = QStyleOptionButton()
            ctrl.initStyleOption(opt)
            pos = ctrl.style().subElementRect(QStyle.SubElement.SE_CheckBoxClickRect, opt, ctrl).center()
        self.qtbot.mouseClick(ctrl, LEFT, pos=pos)

    def type(self, name: str, text: str) -> None:
        """Select everything in a line edit (or editable combo / spin box), type ``text``, press Enter."""
        ctrl = self._use(name)
        edit = ctrl if isinstance(ctrl, QLineEdit) else ctrl.lineEdit()
        assert edit is not None, f"{name} has no text field"
        edit.setFocus()
        self.qtbot.keyClick(edit, Qt.Key.Key_A, CTRL)
        self.qtbot.keyClicks(edit, text)
        self.qtbot.keyClick(edit, Qt.Key.Key_Return)
        if isinstance(ctrl, QAbstractSpinBox):
            ctrl.interpretText()

    def spin(self, name: str, value: float) -> None:
        ctrl = self[name]
        assert isinstance(ctrl, QAbstractSpinBox), name
        self.type(name, f"{value:g}")
        assert ctrl.value() == pytest.approx(value), f"{name} shows {ctrl.value()}, typed {value}"

    def choose(self, name: str, text: str) -> None:
        """Pick an item of a (non-editable) combo box with the keyboard, as a user does."""
        ctrl = self._use(name)
        assert isinstance(ctrl, QComboBox) and ctrl.findText(text) >= 0, (name, text)
        ctrl.setFocus()
        self.qtbot.keyClick(ctrl, Qt.Key.Key_Home)
        for _ in range(ctrl.findText(text)):
            self.qtbot.keyClick(ctrl, Qt.Key.Key_Down)
        assert ctrl.currentText() == text

    def slide_keys(self, name: str, steps: int) -> None:
        """Move a slider from its minimum by ``steps`` presses of the right arrow key."""
        ctrl = self._use(name)
        assert isinstance(ctrl, QAbstractSlider), name
        ctrl.setFocus()
        self.qtbot.keyClick(ctrl, Qt.Key.Key_Home)
        for _ in range(steps):
            self.qtbot.keyClick(ctrl, Qt.Key.Key_Right)

    def drag_slider(self, name: str, value: int) -> None:
        """Press the handle, move it to ``value`` and release it (``sliderReleased`` fires)."""
        ctrl = self._use(name)
        assert isinstance(ctrl, QAbstractSlider), name
        ctrl.setSliderDown(True)
        ctrl.setValue(value)
        ctrl.setSliderDown(False)  # emits sliderReleased, as a mouse release on the handle does

    def click_item(self, name: str, row: int) -> None:
        ctrl = self._use(name)
        assert isinstance(ctrl, QListWidget) and row < ctrl.count(), name
        ctrl.scrollToItem(ctrl.item(row))
        self.qtbot.mouseClick(ctrl.viewport(), LEFT, pos=ctrl.visualItemRect(ctrl.item(row)).center())


def interactive_children(widget: QWidget) -> list[QWidget]:
    """The controls a user can operate (parts of other controls and scroll bars excluded)."""
    kinds = (QAbstractButton, QAbstractSlider, QAbstractSpinBox, QComboBox, QLineEdit, QListWidget)
    found = [w for w in widget.findChildren(QWidget) if isinstance(w, kinds)]
    controls = []
    for w in found:
        if type(w).__name__ == "QScrollBar":
            continue
        parent, inner = w.parentWidget(), False
        while parent is not None and parent is not widget:
            inner |= isinstance(parent, (QAbstractSpinBox, QComboBox, QListWidget))
            parent = parent.parentWidget()
        if not inner:
            controls.append(w)
    return controls


@pytest.fixture
def ui(request: pytest.FixtureRequest, qtbot) -> Iterator:
    """Factory ``ui(widget) -> UI``; checks after the test that every declared control was driven."""
    made: list[UI] = []

    def make(widget: QWidget) -> UI:
        made.append(UI(qtbot, widget))
        return made[-1]

    yield make
    marker = request.node.get_closest_marker("drives")
    report = getattr(request.node, "rep_call", None)
    if marker is not None and report is not None and report.passed:
        driven = set().union(*(u.driven for u in made)) if made else set()
        missing = set(marker.args) - driven
        assert not missing, f"declared but not driven: {sorted(missing)}"


def wait_idle(qtbot, widget, timeout: int = 120_000) -> None:
    qtbot.waitUntil(lambda: not widget.runner.busy, timeout=timeout)


def wait_exported(qtbot, widget, timeout: int = 60_000) -> None:
    """Until the export being written in a worker is done (its buttons are enabled again)."""
    qtbot.waitUntil(lambda: not widget.export.busy, timeout=timeout)
    assert widget.export.export_btn.isEnabled() and widget.export.export_tiff_btn.isEnabled()


def square(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[y0, x0], [y0, x1], [y1, x1], [y1, x0]], float)  # napari (y, x) in level-0 px


def annotate_planted(u: UI, w) -> object:
    """Two classes drawn through the controls on a new annotation layer: the first planted copy
    (``tumour``) and plain tissue (``normal``); returns the layer."""
    u.click("new_annotations_btn")
    layer = w.head.annotation_layer()
    u.type("class_combo", "tumour")
    layer.add_polygons([square(448, 448, 896, 896)])  # first planted copy only
    u.type("class_combo", "normal")
    layer.add_polygons([square(300, 1100, 1000, 1700)])  # plain tissue
    assert list(layer.features["class"]) == ["tumour", "normal"]
    return layer


def train_on_planted(qtbot, u: UI, w, *, compute: bool = True) -> object:
    """(Embed the whole slide,) annotate it as :func:`annotate_planted` and train the probe."""
    if compute:
        compute_whole_slide(qtbot, w, u)
    layer = annotate_planted(u, w)
    u.click("train_btn")
    wait_idle(qtbot, w)
    return layer


def dialogs(monkeypatch, *, save: Path | None = None, open_: Path | None = None) -> None:
    """Answer the next save / open file dialogs with these paths."""
    from qtpy.QtWidgets import QFileDialog

    if save is not None:
        monkeypatch.setattr(QFileDialog, "getSaveFileName", staticmethod(lambda *a, **k: (str(save), "")))
    if open_ is not None:
        monkeypatch.setattr(QFileDialog, "getOpenFileName", staticmethod(lambda *a, **k: (str(open_), "")))


def cells(layer, cell_um: float) -> np.ndarray:
    """One value per raster cell (tile or token) of an overlay layer, as the user sees it inside the
    slide: the first sub-cell of each (a cell a slide edge cuts is split, see ``clip_to_slide``)."""
    split = cell_um / float(layer.scale[-1])
    assert abs(split - round(split)) < 1e-6, (cell_um, tuple(layer.scale))
    return np.asarray(layer.data)[:: round(split), :: round(split)]


def drawn_past_slide(layer, slide_layer) -> int:
    """How many of ``layer``'s pixels that lie wholly past the slide's edges are drawn (not NaN/0/alpha 0)."""
    data = np.asarray(layer.data)
    shown = data[..., 3] > 0 if data.ndim == 3 else (np.isfinite(data) if data.dtype.kind == "f" else data != 0)
    (sy, sx), (ty, tx) = layer.scale, layer.translate
    h, w = slide_layer.level_shapes[0][:2] if slide_layer.multiscale else slide_layer.data.shape[:2]
    mpp = float(slide_layer.scale[-1])
    # a pixel's near edge (centre - scale/2) at or beyond the slide's far edge ((n - 0.5) mpp)
    past_y = ty + np.arange(data.shape[0]) * sy - sy / 2 >= (h - 0.5) * mpp - 1e-6
    past_x = tx + np.arange(data.shape[1]) * sx - sx / 2 >= (w - 0.5) * mpp - 1e-6
    return int(shown[past_y].sum() + shown[:, past_x].sum())


def planted_truth(session) -> np.ndarray:
    from tests.conftest import PLANTED_PATTERNS

    g = session.grid
    centre = g.coords + g.tile_size_l0 / 2
    truth = np.zeros(len(g), bool)
    for region in PLANTED_PATTERNS:
        x0, y0, x1, y1 = region.box
        truth |= (centre[:, 0] > x0) & (centre[:, 0] < x1) & (centre[:, 1] > y0) & (centre[:, 1] < y1)
    return truth


def compute_whole_slide(qtbot, w, u: UI) -> None:
    """Show the whole slide and embed every tissue tile in view, through the controls."""
    w.viewer.reset_view()
    u.spin("limit_spin", 100000)
    u.choose("mag_combo", "20× (0.5 µm/px)")  # every tile at 20× (auto would pick a coarser level here)
    u.click("compute_btn")
    wait_idle(qtbot, w)


def zoom_to(w, x: float, y: float, width_px: float) -> None:
    """Centre the camera on level-0 ``(x, y)`` of the slide, showing about ``width_px`` level-0 px across."""
    from napari_virchow._qt.viewport import camera

    layer = w.slide_layer()
    camera(w.viewer).center = tuple(layer.data_to_world((y, x)))
    camera(w.viewer).zoom = w.viewer.canvas.size[1] / (width_px * layer.scale[-1])


def canvas_point(viewer, layer, x: float, y: float):
    """The canvas widget and the QPoint (logical px) showing level-0 ``(x, y)`` of ``layer``."""
    from qtpy.QtCore import QPoint

    from napari_virchow._qt.viewport import camera

    native = viewer.window._qt_viewer.canvas._scene_canvas.native
    cam = camera(viewer)
    wy, wx = np.asarray(layer.data_to_world((y, x)))[-2:]
    cy, cx = cam.center[-2:]
    h, w = viewer.canvas.size
    ratio = native.devicePixelRatioF() if hasattr(native, "devicePixelRatioF") else 1.0
    px = (w / 2 + (wx - cx) * cam.zoom) / ratio
    py = (h / 2 + (wy - cy) * cam.zoom) / ratio
    return native, QPoint(int(round(px)), int(round(py)))


def click_canvas(qtbot, w, x: float, y: float) -> None:
    """A real left click on the canvas where level-0 ``(x, y)`` of the slide is shown."""
    native, pos = canvas_point(w.viewer, w.slide_layer(), x, y)
    qtbot.mouseClick(native, LEFT, pos=pos)


@pytest.fixture
def planted_widget(make_widget, planted_slide: Path):
    return make_widget(planted_slide)
