"""The widget's sessions: one open Slide per slide layer, shared by every session of that layer.

The reader opened the slide to make the layer; a session uses that same :class:`Slide` (no second
handle, no second fingerprint). Sessions are keyed by layer, settings and µm/px override, so a
changed override applies at once; it also rescales the slide layer (and the overlays already drawn)
so slide and overlays stay aligned in µm. Removing the layer, or closing the viewer, closes its
sessions, their stores and the slide.
"""

from __future__ import annotations

from collections.abc import Callable

import napari
import numpy as np
from napari.layers import Image, Layer

from napari_virchow._qt.layers import overlays_of
from napari_virchow._reader import METADATA_KEY, forget_slide, layer_slide
from napari_virchow.errors import SlideError
from napari_virchow.session import SessionConfig, SlideSession
from napari_virchow.slides.slide import Slide

__all__ = ["SessionBook"]

Key = tuple[SessionConfig, float | None]


class SessionBook:
    """Sessions of the viewer's slide layers (UI thread only)."""

    def __init__(self, viewer: napari.Viewer, is_busy: Callable[[SlideSession], bool] = lambda s: False) -> None:
        self._viewer = viewer
        self._is_busy = is_busy
        self._sessions: dict[int, dict[Key, SlideSession]] = {}
        self._slides: dict[int, Slide] = {}
        self._layers: dict[int, Image] = {}
        self._closing: list[int] = []  # layers removed while one of their sessions was running
        viewer.layers.events.removed.connect(self._removed)

    def slide(self, layer: Image) -> Slide:
        """The one open Slide of ``layer`` (the reader's; reopened only if the reader's is gone)."""
        key = id(layer)
        if key not in self._slides:
            slide = layer_slide(layer.metadata)
            self._slides[key] = slide if slide is not None else Slide(layer.metadata[METADATA_KEY]["path"])
            self._layers[key] = layer
        return self._slides[key]

    def get(self, layer: Image, config: SessionConfig, mpp_override: float | None) -> SlideSession:
        """The session of ``layer`` with these settings (made on first use)."""
        slide = self.slide(layer)
        self._apply_mpp(layer, slide, mpp_override)
        if slide.mpp is None:
            raise SlideError(f"{slide.path.name} does not record its resolution (µm per pixel), which the model "
                             "needs to tile at its magnification: type it in 'µm/px override' in the Slide and "
                             "model panel (0.25 for a 40× scan, 0.5 for 20×)")  # fmt: skip
        sessions = self._sessions.setdefault(id(layer), {})
        key = (config, mpp_override)
        if key not in sessions:
            sessions[key] = SlideSession(slide, config)
        return sessions[key]

    def sessions(self, layer: Image) -> list[SlideSession]:
        return list(self._sessions.get(id(layer), {}).values())

    def layer_of(self, session: SlideSession) -> Image | None:
        """The slide layer ``session`` belongs to, ``None`` once that layer left the viewer."""
        for key, sessions in self._sessions.items():
            if any(s is session for s in sessions.values()):
                layer = self._layers.get(key)
                return layer if layer is not None and layer in self._viewer.layers else None
        return None

    def _apply_mpp(self, layer: Image, slide: Slide, override: float | None) -> None:
        file_mpp = layer.metadata[METADATA_KEY].get("mpp")
        wanted = override or file_mpp
        if wanted == slide.mpp:
            return
        slide.mpp = wanted
        slide.mpp_source = "override" if override else ("file" if file_mpp else None)
        old = float(np.asarray(layer.scale)[-1])
        new = float(wanted or 1.0)
        units = ("µm", "µm") if wanted else ("pixel", "pixel")
        # the slide layer and everything drawn over it move together: they stay aligned
        for other in overlays_of(self._viewer, layer.name):
            _rescale(other, new / old, units)
        _rescale(layer, new / old, units)

    # --- lifetime ------------------------------------------------------------------------------
    def _removed(self, event: object) -> None:
        layer = getattr(event, "value", None)
        if isinstance(layer, Layer) and id(layer) in self._slides and self._layers.get(id(layer)) is layer:
            self.close_layer(layer)

    def close_layer(self, layer: Image) -> None:
        """Close the sessions, stores and slide of ``layer`` (later, if one of them is running)."""
        key = id(layer)
        if any(self._is_busy(s) for s in self.sessions(layer)):
            self._closing.append(key)
            return
        self._close(key)

    def finished(self) -> None:
        """A job ended: close what was waiting for it."""
        closing, self._closing = self._closing, []
        for key in closing:
            self._close(key)

    def _close(self, key: int) -> None:
        for session in self._sessions.pop(key, {}).values():
            session.close()  # store; the slide too, when the session owns it
        slide, layer = self._slides.pop(key, None), self._layers.pop(key, None)
        still_shown = layer is not None and any(
            lyr is not layer and layer_slide(lyr.metadata) is slide for lyr in self._viewer.layers
        )  # a duplicated layer shares the handle
        if slide is not None and not still_shown:
            slide.close()
            if layer is not None:
                forget_slide(layer.metadata)

    def close_all(self) -> None:
        """Close everything (the widget or the viewer is closing)."""
        for key in list(self._slides):
            self._close(key)

    def is_open(self, layer: Image) -> bool:
        return id(layer) in self._slides


def _rescale(layer: Layer, factor: float, units: tuple[str, str]) -> None:
    if factor != 1.0:
        scale, translate = np.asarray(layer.scale, float), np.asarray(layer.translate, float)
        scale[-2:] *= factor
        translate[-2:] *= factor
        layer.scale, layer.translate = scale, translate
    layer.units = (*tuple(layer.units)[:-2], *units)
