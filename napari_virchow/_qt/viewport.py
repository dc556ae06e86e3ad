"""The part of a slide on screen: camera → level-0 pixel box, and a debounced watcher."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import napari
import numpy as np
from napari.layers import Image
from qtpy.QtCore import QObject, QTimer

__all__ = ["ViewportWatcher", "camera", "visible_box_level0"]

Box = tuple[float, float, float, float]


def camera(viewer: napari.Viewer) -> Any:
    """The viewer's camera (``viewer.scene.camera`` since napari 0.9, ``viewer.camera`` before)."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None else viewer.camera


def visible_box_level0(viewer: napari.Viewer, layer: Image) -> Box | None:
    """``(x0, y0, x1, y1)`` in the layer's level-0 pixels that the canvas shows, clipped.

    Computed from the camera (centre, zoom) and the canvas size, so it is exact at any zoom
    (napari's ``corner_pixels`` are rounded out to whole chunks). ``None`` when the slide is
    entirely off screen.
    """
    height, width = viewer.canvas.size
    cam = camera(viewer)
    zoom = cam.zoom
    if zoom <= 0 or height <= 0 or width <= 0:
        return None
    cy, cx = cam.center[-2:]
    half_h, half_w = height / (2 * zoom), width / (2 * zoom)
    # world (µm) corners → data (level-0 px); world_to_data handles scale, translate, affine
    ndim = viewer.dims.ndim
    corners = []
    for wy, wx in ((cy - half_h, cx - half_w), (cy + half_h, cx + half_w)):
        point = list(viewer.dims.point)
        point[-2:] = [wy, wx]
        corners.append(np.asarray(layer.world_to_data(point[-ndim:]))[-2:])
    (y0, x0), (y1, x1) = np.min(corners, axis=0), np.max(corners, axis=0)
    h0, w0 = layer.level_shapes[0][:2] if layer.multiscale else layer.data.shape[:2]
    # napari pixel centres sit at integer coordinates: pixel i spans [i - 0.5, i + 0.5]
    x0, y0 = max(x0 + 0.5, 0.0), max(y0 + 0.5, 0.0)
    x1, y1 = min(x1 + 0.5, float(w0)), min(y1 + 0.5, float(h0))
    if x0 >= x1 or y0 >= y1:
        return None
    return (float(x0), float(y0), float(x1), float(y1))


class ViewportWatcher(QObject):
    """Call ``callback(box)`` once the camera has been still for ``delay_ms`` (debounce).

    Panning and zooming fire dozens of camera events a second; recomputing on each would queue
    work for views the user has already left.
    """

    def __init__(self, viewer: napari.Viewer, layer_getter: Callable[[], Image | None],
                 callback: Callable[[Box], None], delay_ms: int = 250) -> None:  # fmt: skip
        super().__init__()
        self._viewer, self._layer, self._callback = viewer, layer_getter, callback
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(delay_ms)
        self._timer.timeout.connect(self._fire)
        self._enabled = False
        cam = camera(viewer)
        self._emitters = (cam.events.center, cam.events.zoom, viewer.canvas.events.size)
        for emitter in self._emitters:
            emitter.connect(self._changed)

    def set_enabled(self, enabled: bool, *, now: bool = True) -> None:
        """Start or stop following the view (starting fires once right away unless ``now`` is false)."""
        self._enabled = enabled
        if enabled and now:
            self._timer.start(0)
        elif not enabled:
            self._timer.stop()

    @property
    def enabled(self) -> bool:
        return self._enabled

    def _changed(self, _event: object = None) -> None:
        if self._enabled:
            self._timer.start()  # restart: fires only after the camera is still

    def _fire(self) -> None:
        layer = self._layer()
        if layer is None or not self._enabled:
            return
        box = visible_box_level0(self._viewer, layer)
        if box is not None:
            self._callback(box)

    def disconnect_all(self) -> None:
        """Stop listening to the viewer (when the widget closes)."""
        self._timer.stop()
        for emitter in self._emitters:
            emitter.disconnect(self._changed)
