"""Create or update the plugin's napari layers in place (UI thread only)."""

from __future__ import annotations

from typing import Any

import napari
import numpy as np
from napari.layers import Image, Labels, Layer, Shapes
from napari.utils.colormaps import Colormap

from napari_virchow.analysis.rasters import Raster, clip_to_slide

__all__ = [
    "HEAT", "SIMILARITY", "layer_named", "overlay_kind", "overlay_name", "overlays_of", "remove_overlays",
    "show_boxes", "show_colorbar_on_top", "show_raster",
]  # fmt: skip

#: colour-bar titles of the overlays that have one (the kind in the layer's name → what the bar shows)
BAR_TITLES = {"probability": "P(tumour)", "similarity": "similarity", "attention": "attention"}
#: a layer's own colour-bar title (e.g. ``"P(Epidermis)"``), in its ``metadata``
BAR_TITLE_KEY = "virchow_colorbar_title"


def _ramp(name: str, colors: list[str]) -> Colormap:
    """A colormap transparent at 0 and opaque at 1: low values let the tissue show through."""
    rgba = np.array([[int(c[i : i + 2], 16) / 255 for i in (1, 3, 5)] + [1.0] for c in colors], np.float32)
    rgba[:, 3] = np.linspace(0.0, 1.0, len(rgba)) ** 0.7
    return Colormap(rgba, name=name, display_name=name)


HEAT = _ramp("virchow heat", ["#000004", "#57106e", "#bc3754", "#f98e09", "#fcffa4"])  # inferno stops
SIMILARITY = _ramp("virchow similarity", ["#440154", "#3b528b", "#21918c", "#5ec962", "#fde725"])  # viridis


def layer_named(viewer: napari.Viewer, name: str) -> Layer | None:
    """The layer called ``name``, or ``None`` (napari's LayerList has no ``get``)."""
    return viewer.layers[name] if name in viewer.layers else None  # noqa: SIM401 - LayerList


def overlay_name(slide_layer: Layer, what: str) -> str:
    """Layer name of an overlay of ``slide_layer`` (e.g. ``"probability · CMU-1"``).

    The kind comes first: napari's layer list elides long names in the middle, and the kind is
    what tells overlays apart.
    """
    return f"{what} · {slide_layer.name}"


def overlays_of(viewer: napari.Viewer, slide_name: str) -> list[Layer]:
    """The layers drawn over the slide layer ``slide_name`` (named ``"<kind> · <slide_name>"``)."""
    return [lyr for lyr in viewer.layers if lyr.name.endswith(f" · {slide_name}")]


def remove_overlays(viewer: napari.Viewer, slide_name: str, keep: tuple[str, ...] = ("annotations",)) -> list[str]:
    """Remove the overlays drawn over the slide layer ``slide_name`` (not the kinds in ``keep``).

    Returns the names removed. The user's annotations are kept: they are work, the rest is
    redrawn from the cache in seconds.
    """
    gone = [lyr.name for lyr in overlays_of(viewer, slide_name) if overlay_kind(lyr) not in keep]
    for name in gone:
        viewer.layers.remove(name)
    return gone


def overlay_kind(layer: Layer) -> str:
    """``"probability"`` for ``"probability · CMU-1"`` (the name of any other layer for others)."""
    return layer.name.split(" · ", 1)[0]


def show_raster(viewer: napari.Viewer, name: str, raster: Raster, *, kind: str = "image",
                **kwargs: Any) -> Layer:  # fmt: skip
    """Put ``raster`` in the layer called ``name``, creating it (with ``kwargs``) if needed.

    Updating in place keeps the user's colormap, opacity and visibility choices. Nothing is drawn
    past the slide's edges (:func:`~napari_virchow.analysis.rasters.clip_to_slide`): the cells of
    partial edge tiles are split and cut there.
    """
    raster = clip_to_slide(raster)
    geometry = raster.layer_kwargs()
    index = None
    if name in viewer.layers:
        layer = viewer.layers[name]
        wanted = Labels if kind == "labels" else Image
        if isinstance(layer, wanted) and layer.data.shape == raster.data.shape:
            layer.data = raster.data
            layer.scale, layer.translate = geometry["scale"], geometry["translate"]
            return layer
        index = viewer.layers.index(layer)  # replaced (e.g. smoothed): same place in the stack
        kwargs.setdefault("visible", layer.visible)
        viewer.layers.remove(layer)
    kwargs.setdefault("units", ("µm", "µm"))  # rasters are placed in µm, like the slide
    keep = viewer.layers.selection.active
    if kind == "labels":
        layer = viewer.add_labels(raster.data, name=name, **geometry, **kwargs)
    else:
        layer = viewer.add_image(raster.data, name=name, **geometry, **kwargs)
    if index is not None:
        viewer.layers.move(viewer.layers.index(layer), index)
    if keep is not None:  # a new overlay must not take the selection (and its mouse mode) away
        viewer.layers.selection.active = keep
    return layer


def show_boxes(viewer: napari.Viewer, name: str, slide_layer: Layer, boxes: list[np.ndarray],
               **kwargs: Any) -> Shapes | None:  # fmt: skip
    """Rectangles (level-0 (y, x) corners) over ``slide_layer`` in the layer ``name`` (replaced)."""
    if name in viewer.layers:
        viewer.layers.remove(name)
    if not boxes:
        return None
    keep = viewer.layers.selection.active
    layer = viewer.add_shapes(boxes, shape_type="rectangle", name=name, scale=tuple(slide_layer.scale),
                              translate=tuple(slide_layer.translate), units=tuple(slide_layer.units),
                              face_color="transparent", **kwargs)  # fmt: skip
    if keep is not None:
        viewer.layers.selection.active = keep
    return layer


def show_colorbar_on_top(viewer: napari.Viewer) -> str | None:
    """Show the colour bar of the topmost visible overlay that has one, titled; hide the others.

    napari's colour bar has no title, so the title goes in the viewer's text overlay.
    """
    top = None
    for layer in reversed(list(viewer.layers)):
        kind = overlay_kind(layer)
        if kind in BAR_TITLES and isinstance(layer, Image) and layer.visible and top is None:
            top = layer
        if kind in BAR_TITLES and isinstance(layer, Image):
            layer.colorbar.visible = layer is top
    overlays = getattr(viewer.canvas, "overlays", None)  # napari ≥ 0.9; viewer.text_overlay before
    text = overlays.text if overlays is not None and hasattr(overlays, "text") else viewer.text_overlay
    title = None
    if top is not None:
        title = top.metadata.get(BAR_TITLE_KEY) or BAR_TITLES[overlay_kind(top)]
    if title is not None:
        text.text, text.position, text.font_size, text.visible = f"colour bar: {title}", "top_right", 11, True
    elif text.text.startswith("colour bar: "):
        text.visible = False
    return title
