"""napari reader contribution: whole-slide images as one lazy multiscale image layer in µm."""

from __future__ import annotations

import os
import uuid
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from napari_virchow.errors import SlideError
from napari_virchow.slides.slide import SLIDE_SUFFIXES, Slide, warn_missing_mpp

PathLike = str | os.PathLike[str]
LayerData = tuple[Any, dict[str, Any], str]

#: key under which slide facts live in a layer's ``metadata``
METADATA_KEY = "napari_virchow"

#: filename patterns the reader claims (kept in step with ``napari.yaml``)
SLIDE_PATTERNS = tuple(f"*{suffix}" for suffix in SLIDE_SUFFIXES)

# The Slide behind each layer this reader made, by the ``slide_id`` in the layer's metadata.
# Weak: the layer's dask levels hold the Slide, so it lives exactly as long as the layer's data,
# and the widget finds the reader's handle instead of opening the file a second time.
_OPEN_SLIDES: weakref.WeakValueDictionary[str, Slide] = weakref.WeakValueDictionary()


def layer_slide(metadata: Mapping[str, Any]) -> Slide | None:
    """The open :class:`Slide` behind a slide layer's ``metadata`` (``None`` once it is gone)."""
    facts = metadata.get(METADATA_KEY) or {}
    key = facts.get("slide_id")
    return _OPEN_SLIDES.get(key) if key else None


def forget_slide(metadata: Mapping[str, Any]) -> None:
    """Drop a layer's slide from the registry (after it was closed)."""
    key = (metadata.get(METADATA_KEY) or {}).get("slide_id")
    if key:
        _OPEN_SLIDES.pop(key, None)


def napari_get_reader(path: PathLike | Sequence[PathLike]) -> Callable[..., list[Any]] | None:
    """Return :func:`read_for_napari` when every path looks like a slide, else ``None``.

    napari_get_reader never raises: napari calls it for every file the user drops, and other
    readers must get their chance. Errors surface later, from :func:`read_slides`.
    """
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    try:
        if paths and all(_looks_like_slide(Path(p)) for p in paths):
            return read_for_napari
    except Exception:  # noqa: BLE001 - a reader probe must never raise (see docstring)
        return None
    return None


def _looks_like_slide(path: Path) -> bool:
    suffix = path.suffix.lower()
    if path.is_dir():  # an OME-Zarr folder: claim brightfield RGB ones, leave the rest to napari-ome-zarr
        from napari_virchow.slides.ngff import is_ngff, open_ngff

        if any(path.glob("*.dcm")):  # a DICOM WSI folder
            import openslide

            return openslide.OpenSlide.detect_format(str(next(iter(sorted(path.glob("*.dcm")))))) == "dicom"
        if not is_ngff(path):
            return False
        try:
            open_ngff(path)
        except SlideError:
            return False
        return True
    if suffix not in SLIDE_SUFFIXES:
        return False
    if suffix not in (".tif", ".tiff"):
        return True
    # plain TIFFs: claim only brightfield RGB images, leave the rest to napari's own reader
    import openslide
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages.first
        rgb = page.dtype is not None and page.dtype.itemsize == 1 and page.samplesperpixel in (3, 4)
        if tif.is_ome:  # fluorescence / multiplex OME-TIFFs are napari's (or another plugin's)
            return rgb
    return rgb or openslide.OpenSlide.detect_format(str(path)) is not None


def read_slides(path: PathLike | Sequence[PathLike]) -> list[LayerData]:
    """Open each slide as a multiscale RGB image layer with ``scale`` in µm.

    Raises
    ------
    SlideError
        For a file that cannot be opened; the message names the file and the fix.
    """
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    return [slide_layer_data(Slide(p)) for p in paths]


def read_for_napari(path: PathLike | Sequence[PathLike]) -> list[Any]:
    """:func:`read_slides` for File ▸ Open: a file that is not a usable slide is one notification.

    napari shows an exception from a reader as an "uncaught exception" with a traceback and the
    fix cut off; a :class:`SlideError` is expected (a broken or foreign file), so it is shown whole,
    without a traceback, and nothing is added (napari's ``[(None,)]``: read, no layers).
    """
    from napari_virchow._qt.errors import report

    try:
        layers = read_slides(path)
    except SlideError as exc:
        report(exc)
        return [(None,)]
    prefer_this_reader()
    return layers


def slide_layer_data(slide: Slide) -> LayerData:
    """Layer data tuple for one open slide (the layer keeps the slide open through its levels)."""
    warn_missing_mpp(slide)
    mpp = slide.mpp or 1.0
    slide_id = uuid.uuid4().hex
    _OPEN_SLIDES[slide_id] = slide
    metadata = {
        METADATA_KEY: {
            "slide_id": slide_id,
            "path": str(slide.path),
            "mpp": slide.mpp,
            "mpp_source": slide.mpp_source,
            "vendor": slide.vendor,
            "objective_power": slide.objective_power,
            "dimensions": slide.dimensions,
            "backend": slide.backend,
        },
        "properties": slide.properties,
    }
    kwargs = {
        "name": slide.path.stem,
        "multiscale": True,
        "rgb": True,
        "scale": (mpp, mpp),
        "units": ("µm", "µm") if slide.mpp else ("pixel", "pixel"),
        "contrast_limits": (0, 255),
        "metadata": metadata,
    }
    return (slide.levels, kwargs, "image")


def prefer_this_reader() -> None:
    """Make this plugin napari's preferred reader for slide files, where the user chose none.

    napari asks "Choose reader" whenever two plugins claim a file (napari's builtins claim every
    ``.tif``); a preference set in ``settings.plugins.extension2reader`` skips the question. A
    pattern the user already assigned (to any reader) is left alone.
    """
    try:
        from napari.settings import get_settings

        plugins = get_settings().plugins
        missing = {p: "napari-virchow" for p in SLIDE_PATTERNS if p not in plugins.extension2reader}
        if missing:
            plugins.extension2reader = {**plugins.extension2reader, **missing}
    except Exception:  # noqa: BLE001 - a preference must never stop a slide from opening
        return
