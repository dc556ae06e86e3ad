"""Picking a query on the canvas: a click takes the tile under the cursor, a drag a box.

While picking is on, a drag draws a rubber band instead of panning. napari turns ``mouse_pan`` back
on whenever the active layer changes (e.g. when an overlay is added), so the picker holds it off
for as long as it is on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import napari
import numpy as np
from napari.layers import Image

from napari_virchow._qt.layers import layer_named, overlay_name, show_boxes
from napari_virchow._qt.viewport import camera

__all__ = ["Picker", "box_corners"]

Box = tuple[float, float, float, float]
CLICK_SCREEN_PX = 5  # a press and release closer than this (on screen) is a click, not a box


def box_corners(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    """A rectangle's corners in napari (y, x) order."""
    return np.array([[y0, x0], [y0, x1], [y1, x1], [y1, x0]], float)


class Picker:
    """Mouse-drag callback of the viewer while picking is on."""

    def __init__(self, viewer: napari.Viewer, slide_layer: Callable[[], Image | None],
                 on_pick: Callable[[float, float, Box | None], None]) -> None:  # fmt: skip
        self._viewer, self._slide_layer, self._on_pick = viewer, slide_layer, on_pick
        self._enabled = False
        camera(viewer).events.mouse_pan.connect(self._hold_pan_off)

    @property
    def enabled(self) -> bool:
        return self._enabled

    def set_enabled(self, on: bool) -> None:
        self._enabled = on
        callbacks = self._viewer.mouse_drag_callbacks
        camera(self._viewer).mouse_pan = not on
        if on and self.drag not in callbacks:
            callbacks.append(self.drag)
        elif not on and self.drag in callbacks:
            callbacks.remove(self.drag)

    def _hold_pan_off(self, event: Any = None) -> None:
        cam = camera(self._viewer)
        if self._enabled and cam.mouse_pan:
            cam.mouse_pan = False

    def drag(self, viewer: napari.Viewer, event: Any) -> Iterator[None]:
        """Click: the tile under the cursor is the query; drag: the tissue tiles in the box."""
        layer = self._slide_layer()
        if layer is None or event.type != "mouse_press":
            return
        start = end = np.asarray(layer.world_to_data(event.position))[-2:]
        name = overlay_name(layer, "query")
        click = CLICK_SCREEN_PX / camera(viewer).zoom / float(np.asarray(layer.scale)[-1])  # in level-0 px
        yield
        while event.type == "mouse_move":
            end = np.asarray(layer.world_to_data(event.position))[-2:]
            (y0, x0), (y1, x1) = np.minimum(start, end), np.maximum(start, end)
            if max(y1 - y0, x1 - x0) >= click:  # the rubber band
                band = layer_named(viewer, name)
                rect = box_corners(x0, y0, x1, y1)
                if band is None:
                    show_boxes(viewer, name, layer, [rect], edge_color="yellow", edge_width=2 * click / 5)
                else:
                    band.data = [rect]
            yield
        (y0, x0), (y1, x1) = np.minimum(start, end), np.maximum(start, end)
        if max(y1 - y0, x1 - x0) < click:  # a click (or a wobble)
            self._on_pick(float(start[1]), float(start[0]), None)
        else:
            self._on_pick(float(start[1]), float(start[0]), (float(x0), float(y0), float(x1), float(y1)))

    def disconnect(self) -> None:
        self.set_enabled(False)
        camera(self._viewer).events.mouse_pan.disconnect(self._hold_pan_off)
