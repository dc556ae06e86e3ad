"""A list of tiles to visit (similar regions, tiles to label): thumbnails, and the jump to one.

Shared by the 'Similar regions' and 'Labelling' panels: the list widget, its rows (thumbnail +
text + level-0 centre), and zooming the camera to a tile and flashing its box.
"""

from __future__ import annotations

from typing import Any

import napari
import numpy as np
from napari.layers import Layer, Shapes
from qtpy.QtCore import QSize, Qt
from qtpy.QtGui import QIcon, QImage, QPixmap
from qtpy.QtWidgets import QListWidget, QListWidgetItem

from napari_virchow._qt.flash import Flasher
from napari_virchow._qt.panels.base import named
from napari_virchow._qt.viewport import camera

__all__ = ["add_hit", "hit_list", "tile_icon", "zoom_to_tile"]

#: how many tiles across the canvas shows after a jump
TILES_ACROSS = 6


def tile_icon(rgb: np.ndarray) -> QIcon:
    """An icon from an ``(h, w, 3+)`` uint8 RGB picture."""
    rgb = np.ascontiguousarray(rgb[..., :3])
    h, w = rgb.shape[:2]
    return QIcon(QPixmap.fromImage(QImage(rgb.data, w, h, 3 * w, QImage.Format.Format_RGB888).copy()))


def hit_list(name: str, tip: str, *, rows: int = 5) -> QListWidget:
    """A named list with 48-px thumbnails, at least ``rows`` rows high."""
    lst = named(QListWidget(), name, tip)
    lst.setIconSize(QSize(48, 48))
    lst.setMinimumHeight(rows * 52)
    # a long row is elided, not scrolled sideways: the dock is narrow
    lst.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    lst.setTextElideMode(Qt.TextElideMode.ElideRight)
    return lst


def add_hit(lst: QListWidget, text: str, thumb: np.ndarray | None, data: tuple[Any, ...]) -> QListWidgetItem:
    """Append a row; ``data`` (level-0 centre ``(x, y, ...)``) is kept in the item's UserRole."""
    item = QListWidgetItem(text)
    if thumb is not None:
        item.setIcon(tile_icon(thumb))
    item.setData(Qt.ItemDataRole.UserRole, data)
    lst.addItem(item)
    return item


def zoom_to_tile(viewer: napari.Viewer, layer: Layer, x: float, y: float, tile_um: float,
                 *, boxes: Shapes | None = None, row: int = -1, flasher: Flasher | None = None) -> None:  # fmt: skip
    """Centre on level-0 ``(x, y)`` of ``layer``, zoom in to about six tiles across, flash box ``row``."""
    cam = camera(viewer)
    cam.center = tuple(np.asarray(layer.data_to_world((y, x))))
    cam.zoom = max(cam.zoom, min(viewer.canvas.size) / (TILES_ACROSS * tile_um))
    if boxes is not None and 0 <= row < len(boxes.data):
        boxes.selected_data = {row}  # napari highlights the selected box
        if flasher is not None:
            flasher.start(boxes, row)
