"""What every panel needs from the widget that holds it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from qtpy.QtWidgets import QAbstractButton, QComboBox, QFormLayout, QWidget

if TYPE_CHECKING:
    import napari
    from napari.layers import Image

    from napari_virchow.session import SlideSession

__all__ = ["Host", "form", "named"]


class Host(Protocol):
    """The dock widget, as panels see it."""

    viewer: napari.Viewer

    def slide_layer(self) -> Image | None: ...
    def session(self) -> SlideSession: ...
    def run(self, job: Any, *args: Any, **kwargs: Any) -> None: ...
    def set_status(self, text: str) -> None: ...
    def choose_slide(self, name: str) -> None: ...
    def view_mpp(self) -> float | None: ...


def named(widget: QWidget, name: str, tip: str | None = None) -> Any:
    """Give ``widget`` its stable ``objectName`` (tests and scripts find controls by it)."""
    widget.setObjectName(name)
    if tip:
        widget.setToolTip(tip)
    if isinstance(widget, QAbstractButton) and widget.text():
        widget.setAccessibleName(widget.text())
    if isinstance(widget, QComboBox):  # a long layer or encoder name must not widen the dock
        widget.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        widget.setMinimumContentsLength(8)
    return widget


def form(parent: QWidget | None = None) -> QFormLayout:
    """A form whose labels go above their fields when the dock is narrow."""
    lay = QFormLayout(parent) if parent is not None else QFormLayout()
    lay.setRowWrapPolicy(QFormLayout.RowWrapPolicy.WrapLongRows)
    lay.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
    return lay
