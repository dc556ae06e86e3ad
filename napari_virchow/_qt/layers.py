"""Create or update the plugin's napari layers in place (UI thread only)."""

from __future__ import annotations

from typing import Any

import napari
from napari.layers import Image, Labels, Layer

from napari_virchow.analysis.rasters import Raster

__all__ = ["overlay_name", "show_raster"]


def overlay_name(slide_layer: Layer, what: str) -> str:
    """Layer name of an overlay of ``slide_layer`` (e.g. ``"CMU-1 · probability"``)."""
    return f"{slide_layer.name} · {what}"


def show_raster(viewer: napari.Viewer, name: str, raster: Raster, *, kind: str = "image",
                **kwargs: Any) -> Layer:  # fmt: skip
    """Put ``raster`` in the layer called ``name``, creating it (with ``kwargs``) if needed.

    Updating in place keeps the user's colormap, opacity and visibility choices.
    """
    geometry = raster.layer_kwargs()
    if name in viewer.layers:
        layer = viewer.layers[name]
        wanted = Labels if kind == "labels" else Image
        if isinstance(layer, wanted) and layer.data.shape == raster.data.shape:
            layer.data = raster.data
            layer.scale, layer.translate = geometry["scale"], geometry["translate"]
            return layer
        viewer.layers.remove(layer)
    kwargs.setdefault("units", ("µm", "µm"))  # rasters are placed in µm, like the slide
    if kind == "labels":
        return viewer.add_labels(raster.data, name=name, **geometry, **kwargs)
    return viewer.add_image(raster.data, name=name, **geometry, **kwargs)

