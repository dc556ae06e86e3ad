"""Files for other tools: HDF5 features + coords (TRIDENT layout), heatmap TIFFs, GeoJSON regions.

HDF5 (what TRIDENT's ``extract_patch_features`` writes, so MIL code reading TRIDENT/CLAM bags
reads these unchanged)::

    features   float32 (n, dim)   attrs: name, savetodir
    coords     int64 (n, 2)       level-0 (x, y) of each tile's top-left corner; attrs: patch_size
                                  (px at the target magnification), patch_size_level0,
                                  level0_magnification, target_magnification, overlap, name,
                                  savetodir, level0_width, level0_height
    /          file attrs         provenance: format, encoder, weights_id, mpp, target_mpp, slide...

Heatmap TIFF: one pixel per tile (or per sub-tile after smoothing), tiled, pyramidal (reduced
pages, as OpenSlide's generic TIFF expects), with resolution tags that give it the slide's
physical size, so QuPath or this package's :class:`~napari_virchow.slides.slide.Slide` overlay it.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_virchow import __version__
from napari_virchow.io.files import atomic_write
from napari_virchow.io.geojson import PALETTE, Color, tiles_to_features

__all__ = [
    "FEATURES_FORMAT",
    "HEATMAP_NODATA",
    "FeaturesFile",
    "cluster_features",
    "magnification",
    "read_features_h5",
    "threshold_features",
    "trident_coords_attrs",
    "write_features_h5",
    "write_heatmap_tiff",
]

FEATURES_FORMAT = "napari-virchow-features"
#: uint8 heatmaps store round(p * 255); tiles without a value (background, not embedded) are 0
HEATMAP_NODATA = 0
#: µm/px of a 1× objective in the usual convention (20× = 0.5 µm/px, 40× = 0.25 µm/px)
_MPP_AT_1X = 10.0
_H5_CHUNK_ROWS = 1024


# --- HDF5 features + coords ---------------------------------------------------------------------


def magnification(mpp: float, objective_power: float | None = None) -> float | int:
    """Objective magnification of a resolution: the file's value, else ``10 / mpp`` (0.5 → 20).

    Returned as an ``int`` when it is one (TRIDENT writes integers, e.g. 20 or 40).
    """
    return _round_mag(float(objective_power) if objective_power else _MPP_AT_1X / float(mpp))


def _round_mag(mag: float) -> float | int:
    return int(round(mag)) if abs(mag - round(mag)) < 1e-3 else round(mag, 3)


def trident_coords_attrs(
    name: str,
    *,
    patch_size: int,
    patch_size_level0: int,
    level0_mpp: float,
    target_mpp: float,
    level0_size: tuple[int, int],
    objective_power: float | None = None,
    savetodir: str = "",
) -> dict[str, Any]:
    """The attributes TRIDENT puts on ``coords`` for non-overlapping tiles of one slide.

    Parameters
    ----------
    name : slide name (file stem).
    patch_size, patch_size_level0 : tile side at the target magnification and in level-0 px.
    level0_mpp, target_mpp : µm/px of level 0 and of the encoder's input.
    level0_size : (width, height) of level 0.
    objective_power : scan magnification recorded in the file, if any.
    """
    level0_mag = magnification(level0_mpp, objective_power)
    # Scaled from level 0's magnification, so both follow the same convention even when the file
    # records an objective power that disagrees with 10 / mpp (as TRIDENT: size0 = size·mag0/mag).
    target_mag = _round_mag(float(level0_mag) * float(level0_mpp) / float(target_mpp))
    return {
        "patch_size": int(patch_size),
        "patch_size_level0": int(patch_size_level0),
        "level0_magnification": level0_mag,
        "target_magnification": target_mag,
        "overlap": 0,
        "name": str(name),
        "savetodir": str(savetodir),
        "level0_width": int(level0_size[0]),
        "level0_height": int(level0_size[1]),
    }


def _h5_value(value: Any) -> Any:
    # As TRIDENT's save_h5: HDF5 attributes cannot hold None or dicts.
    if value is None:
        return "None"
    if isinstance(value, Mapping):
        return json.dumps(value)
    return value


def write_features_h5(
    path: str | os.PathLike[str],
    features: np.ndarray,
    coords: np.ndarray,
    *,
    attrs: Mapping[str, Any],
    file_attrs: Mapping[str, Any] | None = None,
) -> Path:
    """Write one slide's tile features in TRIDENT's HDF5 layout (atomically).

    Parameters
    ----------
    path : output ``.h5`` file.
    features : (n, dim) embeddings, stored as float32.
    coords : (n, 2) level-0 (x, y) tile corners, stored as int64.
    attrs : attributes of the ``coords`` dataset (see :func:`trident_coords_attrs`).
    file_attrs : provenance stored on the file root (encoder, weights id, mpp, ...).

    Returns
    -------
    Path
    """
    import h5py

    feats = np.asarray(features, dtype=np.float32)
    xy = np.asarray(coords, dtype=np.int64)
    if feats.ndim != 2 or xy.shape != (feats.shape[0], 2):
        raise ValueError(f"need features (n, dim) and coords (n, 2), got {feats.shape} and {xy.shape}")
    path = Path(path)
    rows = max(1, min(_H5_CHUNK_ROWS, feats.shape[0]))

    def write(tmp: str) -> None:
        # HDF5 builds the file in memory and Python writes it out: a full disk or a lost share is
        # then a plain OSError. HDF5 failing to flush on close (ENOSPC) leaves its file id
        # half-closed, and the next HDF5 file of the process crashed the interpreter (exit 139).
        image = io.BytesIO()
        with h5py.File(image, "w") as f:
            # maxshape (None, ...) as TRIDENT, so its save_h5(mode="a") can append to these files.
            dim = feats.shape[1]
            fd = f.create_dataset("features", data=feats, maxshape=(None, dim), chunks=(rows, dim))
            cd = f.create_dataset("coords", data=xy, maxshape=(None, 2), chunks=(rows, 2))
            for key, value in attrs.items():
                cd.attrs[key] = _h5_value(value)
            fd.attrs["name"] = _h5_value(attrs.get("name"))
            fd.attrs["savetodir"] = _h5_value(attrs.get("savetodir", str(path.parent)))
            f.attrs.update({"format": FEATURES_FORMAT, "package_version": __version__})
            for key, value in (file_attrs or {}).items():
                f.attrs[key] = _h5_value(value)
        with open(tmp, "wb") as fh:
            fh.write(image.getbuffer())

    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, write)


@dataclass
class FeaturesFile:
    """Content of a features HDF5 file: arrays plus the attributes of coords, features and root."""

    features: np.ndarray
    coords: np.ndarray
    attrs: dict[str, Any] = field(default_factory=dict)
    features_attrs: dict[str, Any] = field(default_factory=dict)
    file_attrs: dict[str, Any] = field(default_factory=dict)


def _plain(attrs: Any) -> dict[str, Any]:
    out = {}
    for key, value in attrs.items():
        if isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, np.generic):
            value = value.item()
        out[str(key)] = value
    return out


def read_features_h5(path: str | os.PathLike[str]) -> FeaturesFile:
    """Read a file written by :func:`write_features_h5` (or by TRIDENT).

    Raises
    ------
    ValueError
        The file lacks ``features`` or ``coords``, or their lengths differ.
    """
    import h5py

    with h5py.File(path, "r") as f:
        if "features" not in f or "coords" not in f:
            raise ValueError(f"{path}: no 'features' and 'coords' datasets; not a TRIDENT-style features file")
        out = FeaturesFile(
            np.asarray(f["features"][:]), np.asarray(f["coords"][:]),
            _plain(f["coords"].attrs), _plain(f["features"].attrs), _plain(f.attrs),
        )  # fmt: skip
    if out.features.shape[0] != out.coords.shape[0]:
        raise ValueError(f"{path}: {out.features.shape[0]} features but {out.coords.shape[0]} coords")
    return out


# --- heatmap TIFF -------------------------------------------------------------------------------


def _halve(data: np.ndarray) -> np.ndarray:
    """NaN-aware 2 × 2 mean (an odd last row/column is averaged with itself)."""
    h, w = data.shape
    padded = np.pad(data, ((0, h % 2), (0, w % 2)), mode="edge")
    blocks = padded.reshape(padded.shape[0] // 2, 2, padded.shape[1] // 2, 2)
    valid = np.isfinite(blocks)
    total = np.where(valid, blocks, 0).sum(axis=(1, 3))
    count = valid.sum(axis=(1, 3))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan).astype(np.float32)


def _encode(values: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "float32":
        return values.astype(np.float32)
    q = np.rint(np.clip(np.nan_to_num(values, nan=0.0), 0.0, 1.0) * 255).astype(np.uint8)
    q[~np.isfinite(values)] = HEATMAP_NODATA
    return q


def write_heatmap_tiff(
    path: str | os.PathLike[str],
    values_raster: np.ndarray,
    *,
    mpp_l0: float,
    tile_size_l0: float,
    slide_dims: tuple[int, int],
    dtype: str = "uint8",
    metadata: Mapping[str, Any] | None = None,
    tile: int = 256,
) -> Path:
    """Write a per-tile probability raster as a tiled, pyramidal TIFF aligned with the slide.

    Parameters
    ----------
    path : output ``.tif``.
    values_raster : (rows, cols) probabilities in [0, 1]; NaN where there is no value. Pixel
        ``(r, c)`` covers level-0 ``[c·T, (c+1)·T) × [r·T, (r+1)·T)`` with ``T = tile_size_l0``
        (the raster of :func:`~napari_virchow.analysis.rasters.tile_raster`, optionally upsampled).
    mpp_l0 : µm per level-0 pixel of the slide.
    tile_size_l0 : level-0 px per raster pixel (fractional after upsampling).
    slide_dims : level-0 (width, height); the raster must cover it to within one pixel (pixels
        wholly beyond it are cropped).
    dtype : ``"uint8"`` (round(p·255), :data:`HEATMAP_NODATA` = 0 where NaN; readable as a
        slide) or ``"float32"`` (NaN kept).
    metadata : extra JSON stored in the ImageDescription (provenance, head classes, ...); the raster's
        own keys (``mpp`` of a heatmap pixel, ``slide_mpp``, ``tile_size_l0``, ...) take precedence.
    tile : TIFF tile side (a multiple of 16; smaller images get one smaller tile).

    Returns
    -------
    Path
    """
    import tifffile

    data = np.asarray(values_raster, dtype=np.float32)
    if data.ndim != 2 or not data.size:
        raise ValueError(f"values_raster must be a non-empty 2-D array, got shape {data.shape}")
    if dtype not in ("uint8", "float32"):
        raise ValueError(f"dtype must be 'uint8' or 'float32', got {dtype!r}")
    if not (mpp_l0 > 0 and tile_size_l0 > 0):
        raise ValueError(f"mpp_l0 and tile_size_l0 must be positive, got {mpp_l0}, {tile_size_l0}")
    width, height = slide_dims
    # Pixels wholly beyond the slide edge (a smoothed raster ends on the lattice's last tile) are
    # cropped, so the image's physical size is the slide's to within one of its pixels.
    need = [math.ceil(side / tile_size_l0 - 1e-9) for side in (height, width)]
    for n, k, axis in ((data.shape[0], need[0], "height"), (data.shape[1], need[1], "width")):
        if n < k - 1:
            raise ValueError(
                f"a raster of {n} px × {tile_size_l0:g} level-0 px does not cover the slide {axis} "
                f"({k} px needed); is it the raster of another slide?"
            )
    data = data[: need[0], : need[1]]
    px_um = float(tile_size_l0) * float(mpp_l0)
    tile = int(tile)
    if tile % 16 or tile <= 0:
        raise ValueError(f"tile must be a positive multiple of 16, got {tile}")
    tile = min(tile, 16 * math.ceil(max(data.shape) / 16))
    levels = [data]
    while max(levels[-1].shape) > tile:
        levels.append(_halve(levels[-1]))
    description = json.dumps({  # provenance first: the raster's own keys (its mpp) are not overridden
        **dict(metadata or {}), "napari_virchow": "heatmap", "version": __version__, "values": "probability",
        "dtype": dtype, "scale": 1 / 255 if dtype == "uint8" else 1.0,
        "nodata": HEATMAP_NODATA if dtype == "uint8" else "NaN",
        "mpp": px_um, "slide_mpp": float(mpp_l0), "tile_size_l0": float(tile_size_l0),
        "slide_dims": [int(width), int(height)],
    })  # fmt: skip
    w0 = data.shape[1]

    def write(tmp: str) -> None:
        with tifffile.TiffWriter(tmp) as tw:
            for i, level in enumerate(levels):
                res = 1e4 / (px_um * w0 / level.shape[1])  # px per cm at this level's downsample
                tw.write(
                    _encode(level, dtype), tile=(tile, tile), photometric="minisblack",
                    compression="zlib", resolution=(res, res), resolutionunit="CENTIMETER",
                    # reduced-resolution pages after the first: OpenSlide's generic-TIFF pyramid
                    subfiletype=1 if i else 0, description=description if i == 0 else None,
                    metadata=None,
                )  # fmt: skip

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, write)


# --- GeoJSON regions ----------------------------------------------------------------------------


def threshold_features(
    values: np.ndarray,
    coords: np.ndarray,
    tile_size_l0: int,
    threshold: float,
    *,
    class_name: str,
    color: Color = (214, 39, 40),
    bounds: tuple[int, int] | None = None,
) -> list[dict[str, Any]]:
    """One QuPath annotation (polygon or multipolygon on tile borders) of tiles with value ≥ threshold.

    ``values`` has one entry per row of ``coords``; NaN (not computed) is never above. Returns an
    empty list when no tile reaches the threshold. ``bounds``: the slide's level-0 ``(width, height)``,
    where partial edge tiles are cut (:func:`~napari_virchow.io.geojson.tiles_to_features`).
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    with np.errstate(invalid="ignore"):
        above = np.isfinite(v) & (v >= threshold)
    if not above.any():
        return []
    return tiles_to_features(coords, tile_size_l0, above.astype(np.int64), {1: class_name}, {1: color},
                             bounds=bounds)


def cluster_features(labels: np.ndarray, coords: np.ndarray, tile_size_l0: int, *,
                     bounds: tuple[int, int] | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """One QuPath annotation per cluster id (1..k), classes ``Cluster i``; label 0 is skipped
    (``bounds``: as for :func:`threshold_features`)."""
    lab = np.asarray(labels, dtype=np.int64).reshape(-1)
    ids = sorted(int(i) for i in np.unique(lab) if i > 0)
    names = {i: f"Cluster {i}" for i in ids}
    colors = {i: PALETTE[(i - 1) % len(PALETTE)] for i in ids}
    return tiles_to_features(coords, tile_size_l0, lab, names, colors, bounds=bounds)
