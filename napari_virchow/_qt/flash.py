"""Flash one box of a Shapes layer (wider, another colour) a few times, on a QTimer (never blocking)."""

from __future__ import annotations

import numpy as np
from napari.layers import Shapes
from napari.utils.colormaps.standardize_color import transform_color
from qtpy.QtCore import QObject, QTimer

__all__ = ["Flasher"]


class Flasher(QObject):
    """Pulse box ``index`` of a Shapes layer ``pulses`` times, then put its edge back as it was.

    Starting a new flash (or the layer losing the box) ends the previous one, restored.
    """

    def __init__(self, parent: QObject | None = None, *, interval_ms: int = 150, pulses: int = 3,
                 color: str = "yellow", widen: float = 3.0) -> None:  # fmt: skip
        super().__init__(parent)
        self.pulses, self.widen, self.color = pulses, widen, transform_color(color)[0]
        self._timer = QTimer(self, interval=interval_ms)
        self._timer.timeout.connect(self._tick)
        self._layer: Shapes | None = None
        self._index, self._ticks = 0, 0
        self._normal: tuple[float, np.ndarray] = (1.0, np.zeros(4))

    def active(self) -> bool:
        """Whether a box is flashing now."""
        return self._timer.isActive()

    def start(self, layer: Shapes, index: int) -> None:
        """Flash box ``index`` of ``layer``."""
        self.stop()
        if not 0 <= index < layer.nshapes:
            return
        self._layer, self._index, self._ticks = layer, index, 0
        self._normal = (float(layer.edge_width[index]), np.array(layer.edge_color[index]))
        self._set(highlighted=True)
        self._timer.start()

    def stop(self) -> None:
        """End the flash now, the box back to normal."""
        self._timer.stop()
        if self._layer is not None:
            self._set(highlighted=False)
        self._layer = None

    def _tick(self) -> None:
        self._ticks += 1
        if self._ticks >= 2 * self.pulses - 1:
            self.stop()
        else:
            self._set(highlighted=self._ticks % 2 == 0)

    def _set(self, *, highlighted: bool) -> None:
        layer, i = self._layer, self._index
        if layer is None or i >= layer.nshapes:  # the hits were replaced meanwhile: nothing to restore
            self._layer = None
            self._timer.stop()
            return
        width, color = self._normal
        widths = list(layer.edge_width)
        widths[i] = width * self.widen if highlighted else width
        colors = np.array(layer.edge_color)
        colors[i] = self.color if highlighted else color
        layer.edge_width = widths
        layer.edge_color = colors
