"""What every panel needs from the widget that holds it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from qtpy.QtWidgets import QAbstractButton, QWidget

if TYPE_CHECKING:
    import napari
    from napari.layers import Image

    from napari_virchow.session import SlideSession

__all__ = ["Host", "named"]


class Host(Protocol):
    """The dock widget, as panels see it."""

    viewer: napari.Viewer

    def slide_layer(self) -> Image | None: ...
    def session(self) -> SlideSession: ...
    def run(self, job: Any, *args: Any, **kwargs: Any) -> None: ...
    def set_status(self, text: str) -> None: ...


def named(widget: QWidget, name: str, tip: str | None = None) -> Any:
    """Give ``widget`` its stable ``objectName`` (tests and scripts find controls by it)."""
    widget.setObjectName(name)
    if tip:
        widget.setToolTip(tip)
    if isinstance(widget, QAbstractButton) and widget.text():
        widget.setAccessibleName(widget.text())
    return widget
