"""OME-Zarr (OME-NGFF multiscales) in a local folder, read lazily as a slide's pyramid.

NGFF 0.4 (zarr v2, ``.zattrs``) and 0.5 (zarr v3, ``zarr.json`` with ``"ome"``) both list the
levels under ``multiscales[0].datasets``, each with a ``scale`` transformation, and the axes with
their units; µm/px is the ``x`` scale of the first dataset in µm. Brightfield RGB only: a
channel axis of 3 (or 4, or 1) samples, any ``t`` / ``z`` axis of length 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from napari_virchow.errors import SlideError
from napari_virchow.slides.tiff import WHITE, to_rgb

__all__ = ["NgffLevel", "NgffPyramid", "is_ngff", "open_ngff"]

#: µm per NGFF (UDUNITS-2) space unit
NGFF_UNITS_UM = {"micrometer": 1.0, "micron": 1.0, "µm": 1.0, "um": 1.0, "nanometer": 1e-3, "millimeter": 1e3,
                 "centimeter": 1e4, "meter": 1e6, "angstrom": 1e-4, "picometer": 1e-6}  # fmt: skip


def is_ngff(path: Path) -> bool:
    """Whether ``path`` is a folder holding OME-Zarr multiscales metadata (v2 or v3)."""
    return path.is_dir() and ((path / ".zattrs").is_file() or (path / "zarr.json").is_file())


def _multiscales(attrs: dict[str, Any]) -> dict[str, Any] | None:
    ms = attrs.get("multiscales") or (attrs.get("ome") or {}).get("multiscales")
    return ms[0] if isinstance(ms, list) and ms and isinstance(ms[0], dict) else None


def _scale(transforms: list[dict[str, Any]] | None, n: int) -> np.ndarray:
    scale = np.ones(n)
    for t in transforms or []:
        if t.get("type") == "scale" and "scale" in t:
            scale = scale * np.asarray(t["scale"], dtype=np.float64)
    return scale


class NgffLevel:
    """One multiscales dataset: reads ``[y0:y1, x0:x1]`` as RGB uint8, white outside."""

    def __init__(self, array: Any, axes: list[str]) -> None:
        self._array = array
        self._y, self._x = axes.index("y"), axes.index("x")
        self._c = axes.index("c") if "c" in axes else None
        self.shape = (int(array.shape[self._y]), int(array.shape[self._x]))
        chunks = array.chunks
        self.chunk_unit = (int(chunks[self._y]), int(chunks[self._x]))

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Pixels ``[y0:y1, x0:x1]`` as RGB uint8 (only the chunks under them are read)."""
        out = np.full((y1 - y0, x1 - x0, 3), WHITE, np.uint8)
        h, w = self.shape
        cy0, cy1, cx0, cx1 = max(y0, 0), min(y1, h), max(x0, 0), min(x1, w)
        if cy0 >= cy1 or cx0 >= cx1:
            return out
        key: list[Any] = [0] * self._array.ndim
        key[self._y], key[self._x] = slice(cy0, cy1), slice(cx0, cx1)
        if self._c is not None:
            key[self._c] = slice(None)
        block = np.asarray(self._array[tuple(key)])
        kept = [a for a in range(self._array.ndim) if not isinstance(key[a], int)]
        order = [kept.index(self._y), kept.index(self._x)] + ([kept.index(self._c)] if self._c is not None else [])
        out[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] = to_rgb(np.transpose(block, order))
        return out


class NgffPyramid:
    """The levels of an OME-Zarr image and its µm/px (``None`` when the axes carry no unit)."""

    vendor = "ome-ngff"

    def __init__(self, levels: list[NgffLevel], mpp: float | None) -> None:
        self.levels, self.mpp = levels, mpp

    def close(self) -> None:
        """Nothing to release (zarr opens chunk files per read)."""


def open_ngff(path: Path) -> NgffPyramid:
    """Open the OME-Zarr folder ``path`` lazily; :class:`SlideError` naming it when it is not a slide."""
    import zarr

    name = path.name
    try:
        group = zarr.open_group(str(path), mode="r")
        attrs = dict(group.attrs)
    except Exception as exc:  # zarr raises several types for a folder that is not a group
        raise SlideError(f"{name}: not a readable OME-Zarr folder ({exc}).") from exc
    ms = _multiscales(attrs)
    if ms is None:
        raise SlideError(f"{name}: a zarr folder without OME-NGFF 'multiscales' metadata; write it with "
                         "ome-zarr-py or bioformats2raw, or convert it to a pyramidal TIFF.")  # fmt: skip
    axes_meta = [a if isinstance(a, dict) else {"name": a} for a in ms.get("axes", [])]
    axes = [str(a["name"]) for a in axes_meta]
    if "y" not in axes or "x" not in axes:
        raise SlideError(f"{name}: OME-Zarr axes {axes} have no y and x")
    levels = []
    for ds in ms.get("datasets", []):
        try:
            arr = group[ds["path"]]
        except (KeyError, TypeError) as exc:
            raise SlideError(f"{name}: multiscales dataset {ds.get('path')!r} is missing ({exc}).") from exc
        if not isinstance(arr, zarr.Array):
            raise SlideError(f"{name}: multiscales dataset {ds.get('path')!r} is a group, not an array")
        sizes = {a: int(n) for a, n in zip(axes, arr.shape, strict=True)}
        extra = {a: n for a, n in sizes.items() if a not in ("y", "x", "c") and n > 1}
        if extra or np.dtype(arr.dtype) != np.uint8 or sizes.get("c", 1) not in (1, 3, 4):
            raise SlideError(f"{name}: an OME-Zarr image with {arr.dtype} pixels and axes {sizes} is not a "
                             "brightfield RGB slide (fluorescence, multiplex, z-stacks and time series are not "
                             "supported); write 8-bit RGB (c = 3).")  # fmt: skip
        levels.append(NgffLevel(arr, axes))
    if not levels:
        raise SlideError(f"{name}: OME-Zarr multiscales list no datasets")
    scale = _scale(ms["datasets"][0].get("coordinateTransformations"), len(axes))
    scale = scale * _scale(ms.get("coordinateTransformations"), len(axes))
    unit = axes_meta[axes.index("x")].get("unit")
    mpp = float(scale[axes.index("x")]) * NGFF_UNITS_UM[unit] if unit in NGFF_UNITS_UM else None
    return NgffPyramid(levels, mpp if mpp and np.isfinite(mpp) and mpp > 0 else None)
