"""Reuse features computed elsewhere: load a features HDF5 (ours or TRIDENT's) into the cache.

The file's rows become rows of the slide's :class:`~napari_virchow.store.embeddings.EmbeddingStore`
(with their done flags) for the lattice tiles at its coordinates, so embedding the slide later
computes only what the file lacked. A file made with another encoder, dimension, µm/px, tile
size, weights or slide is refused with one message listing every mismatch.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_virchow.errors import VirchowError
from napari_virchow.io.export import FEATURES_FORMAT, read_features_h5

if TYPE_CHECKING:
    from napari_virchow.session import SlideSession

__all__ = ["FeaturesImportError", "ImportReport", "import_features"]

#: µm/px of a 1× objective (TRIDENT records magnifications: 20× = 0.5 µm/px)
_MPP_AT_1X = 10.0


class FeaturesImportError(VirchowError, ValueError):
    """A features file does not fit this slide, encoder or tile lattice."""


@dataclass(frozen=True)
class ImportReport:
    """What :func:`import_features` did."""

    kind: str  # "napari-virchow" or "trident"
    n_rows: int  # rows in the file
    n_written: int  # rows written into the store
    n_kept: int  # rows the store already had (left as they were)


def _trident_encoder(path: Path) -> str | None:
    # TRIDENT writes <job>/<mag>x_<size>px_<overlap>px_overlap/features_<encoder>/<slide>.h5
    parent = path.parent.name
    return parent[len("features_"):] if parent.startswith("features_") else None


def _file_target_mpp(attrs: dict[str, Any], file_attrs: dict[str, Any], ours: bool) -> float | None:
    if ours and file_attrs.get("target_mpp") not in (None, "None"):
        return float(file_attrs["target_mpp"])
    mag = attrs.get("target_magnification")
    return _MPP_AT_1X / float(mag) if mag not in (None, "None") and float(mag) > 0 else None


def _problems(session: SlideSession, path: Path, f: Any, ours: bool) -> list[str]:
    spec, grid, slide = session.config.spec, session.grid, session.slide
    attrs, file_attrs = f.attrs, f.file_attrs
    found: list[str] = []
    encoder = file_attrs.get("encoder") if ours else _trident_encoder(path)
    if encoder not in (None, "None") and encoder != session.config.encoder:
        found.append(f"it holds {encoder} features, not {session.config.encoder}")
    if f.features.ndim != 2 or f.features.shape[1] != spec.dim:
        found.append(f"its features have {f.features.shape[1:]} values per tile, {spec.name} gives {spec.dim}")
    target = _file_target_mpp(attrs, file_attrs, ours)
    if target is None or not math.isclose(target, grid.mpp, rel_tol=0.05):
        found.append(f"its tiles are at {target if target is not None else 'unknown'} µm/px, "
                     f"{spec.name} reads {grid.mpp:g}")  # fmt: skip
    size, size0 = attrs.get("patch_size"), attrs.get("patch_size_level0")
    if size is None or int(size) != grid.size:
        found.append(f"its tiles are {size} px, {spec.name} reads {grid.size}")
    if size0 is None or int(size0) != grid.tile_size_l0:
        found.append(f"its tiles span {size0} level-0 px, this slide's span {grid.tile_size_l0} "
                     f"(at {slide.mpp} µm/px)")  # fmt: skip
    dims = (attrs.get("level0_width"), attrs.get("level0_height"))
    if None not in dims and (int(dims[0]), int(dims[1])) != slide.dimensions:
        found.append(f"it was made from a {dims[0]}×{dims[1]} px slide, this one is "
                     f"{slide.dimensions[0]}×{slide.dimensions[1]}")  # fmt: skip
    if ours:
        fp = file_attrs.get("slide_fingerprint")
        if fp not in (None, "None") and fp != slide.fingerprint:
            found.append("it was made from another slide file (its slide_fingerprint differs)")
        weights = file_attrs.get("weights_id")
        if weights not in (None, "None") and weights != session.weights_id:
            found.append(f"it was made with weights {weights}, these are {session.weights_id}")
    return found


def _lattice_indices(session: SlideSession, coords: np.ndarray, name: str) -> np.ndarray:
    grid = session.grid
    index = {(int(x), int(y)): i for i, (x, y) in enumerate(np.asarray(grid.coords))}
    xy = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    idx = np.array([index.get((int(x), int(y)), -1) for x, y in xy], dtype=np.int64)
    off = int((idx < 0).sum())
    if off:
        first = xy[np.argmax(idx < 0)]
        raise FeaturesImportError(
            f"{name}: {off} of {len(xy)} coords (the first ({first[0]}, {first[1]})) are not on this slide's "
            f"tile lattice (multiples of {grid.tile_size_l0} level-0 px from (0, 0)); the file was tiled "
            "differently (overlap, another origin): embed the slide here instead"
        )
    if len(np.unique(idx)) != len(idx):
        raise FeaturesImportError(f"{name}: the same tile appears twice in coords; the file is damaged")
    return idx


def import_features(session: SlideSession, path: str | os.PathLike[str]) -> ImportReport:
    """Load ``path`` (TRIDENT-style HDF5: ``features``, ``coords`` + attrs) into the session's store.

    Rows the store already holds are kept; the others are written with their done flags.

    Raises
    ------
    FeaturesImportError
        The file is unreadable, does not match (encoder, dim, µm/px, tile size, slide, weights;
        all listed in one message), holds non-finite values, or its coords are off the lattice.
    """
    path = Path(path)
    try:
        f = read_features_h5(path)
    except (OSError, ValueError) as exc:
        raise FeaturesImportError(f"{path.name}: cannot read features ({exc})") from exc
    ours = f.file_attrs.get("format") == FEATURES_FORMAT
    found = _problems(session, path, f, ours)
    if found:
        raise FeaturesImportError(
            f"{path.name} does not fit {session.slide.path.name} with {session.config.encoder}: "
            + "; ".join(found) + ". Import features made by the same encoder at the same µm/px and tile size "
            "from this slide, or embed the slide here (`napari-virchow embed`)."
        )
    feats = np.asarray(f.features, dtype=np.float32)
    bad = ~np.isfinite(feats).all(axis=1)
    if bad.any():
        raise FeaturesImportError(f"{path.name}: {int(bad.sum())} rows hold NaN or infinite values; "
                                  "the file is damaged: export or extract it again")  # fmt: skip
    idx = _lattice_indices(session, f.coords, path.name)
    store = session.store("a")
    new = ~store.done[idx]
    order = np.argsort(idx[new])
    if new.any():
        store.write(idx[new][order], feats[new][order])
    return ImportReport("napari-virchow" if ours else "trident", len(idx), int(new.sum()), int((~new).sum()))
