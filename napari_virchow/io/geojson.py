"""QuPath-compatible GeoJSON: read drawn annotations, write tile regions and search hits.

Coordinates are level-0 pixels ``(x, y)`` with pixel edges on integers, as QuPath uses, so a tile
at ``(x0, y0)`` of side ``T`` is the rectangle ``[x0, x0 + T] × [y0, y0 + T]``.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_virchow.analysis.rasters import grid_indices
from napari_virchow.errors import VirchowError
from napari_virchow.io.files import atomic_write

if TYPE_CHECKING:
    from napari_virchow.analysis.similarity import Hit

__all__ = [
    "Annotation",
    "AnnotationError",
    "OutputPathError",
    "annotation_to_feature",
    "check_inside",
    "hits_to_features",
    "read_annotations",
    "safe_output_path",
    "tiles_to_features",
    "write_annotations",
]

Color = tuple[int, int, int]
# Distinct colours for classes without one (a tab10-like palette).
PALETTE: list[Color] = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40),
                        (148, 103, 189), (140, 86, 75), (227, 119, 194), (127, 127, 127),
                        (188, 189, 34), (23, 190, 207)]


class AnnotationError(VirchowError, ValueError):
    """An annotation file cannot be read or holds no usable polygons."""


class OutputPathError(VirchowError, ValueError):
    """An export file name would write outside the chosen output folder."""


@dataclass
class Annotation:
    """One polygon: exterior ring ``(m, 2)`` level-0 ``(x, y)`` (not repeating its first vertex)."""

    polygon: np.ndarray
    class_name: str | None = None
    color: Color | None = None
    holes: list[np.ndarray] = field(default_factory=list)
    name: str | None = None
    #: position of the feature (GeoJSON) or Annotation element (ASAP) in its file, for messages
    index: int | None = None
    #: the file it was read from, for messages
    source: str | None = None

    def describe(self) -> str:
        """``feature 3 ("Tumor 1", class Tumor)``: how messages name this annotation."""
        label = ", ".join(x for x in (f'"{self.name}"' if self.name else "",
                                      f"class {self.class_name}" if self.class_name else "") if x)
        where = f"feature {self.index}" if self.index is not None else "an annotation"
        where = f"{self.source}: {where}" if self.source else where
        return f"{where} ({label})" if label else where


def check_inside(annotations: Sequence[Annotation], dimensions: tuple[int, int], slide: str,
                 *, slack: float = 1.0) -> None:  # fmt: skip
    """Raise :class:`AnnotationError` naming the first annotation with a vertex off the slide.

    ``dimensions`` is the slide's level-0 ``(width, height)``; ``slack`` level-0 px of rounding are
    tolerated. Coordinates far outside usually mean the file belongs to another slide or was
    saved at another level.
    """
    w, h = dimensions
    for a in annotations:
        for ring in (a.polygon, *a.holes):
            pts = np.asarray(ring, dtype=np.float64).reshape(-1, 2)
            lo, hi = pts.min(axis=0), pts.max(axis=0)
            if lo[0] < -slack or lo[1] < -slack or hi[0] > w + slack or hi[1] > h + slack:
                raise AnnotationError(
                    f"{a.describe()} spans ({lo[0]:.0f}, {lo[1]:.0f})–({hi[0]:.0f}, {hi[1]:.0f}) level-0 px, "
                    f"outside the {w}×{h} px slide {slide}; is it the annotation file of this slide "
                    "(and exported in level-0 pixel coordinates)?"
                )


def safe_output_path(out_dir: str | os.PathLike[str], name: str, *, create: bool = True) -> Path:
    """``out_dir / name``, refusing names that could land outside ``out_dir``.

    Rejected: empty names, ``.``/``..``, path separators (``/`` or ``\\``), drive letters, NUL,
    and an existing symlink at the target (it could point anywhere).
    """
    bad = (not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name
           or bool(PureWindowsPath(name).drive) or os.path.isabs(name))
    if bad:
        raise OutputPathError(
            f"export file name {name!r} is not a plain file name; use a name without folders, "
            f"'..' or separators (it is written inside {out_dir})"
        )
    folder = Path(out_dir)
    if create:
        folder.mkdir(parents=True, exist_ok=True)
    target = folder / name
    if target.is_symlink() or target.resolve().parent != folder.resolve():
        raise OutputPathError(f"{target} would be written outside {folder}; choose another name")
    return target


def _color(value: Any) -> Color | None:
    if isinstance(value, (list, tuple)) and len(value) >= 3:
        return (int(value[0]), int(value[1]), int(value[2]))
    if isinstance(value, int) and not isinstance(value, bool):  # QuPath ≤ 0.2 "colorRGB"
        return ((value >> 16) & 255, (value >> 8) & 255, value & 255)
    return None


def _ring(coords: Any) -> np.ndarray:
    arr = np.asarray(coords, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] < 2:
        raise ValueError(f"a ring must be a list of [x, y] positions, got shape {arr.shape}")
    arr = arr[:, :2]
    if len(arr) > 1 and np.array_equal(arr[0], arr[-1]):
        arr = arr[:-1]
    return arr


def _polygons(geometry: Mapping[str, Any]) -> list[list[Any]]:
    kind = geometry.get("type")
    if kind == "Polygon":
        return [geometry["coordinates"]]
    if kind == "MultiPolygon":
        return list(geometry["coordinates"])
    if kind == "GeometryCollection":
        return [p for g in geometry.get("geometries", []) for p in _polygons(g)]
    return []  # points, lines: not regions


def _features(data: Any) -> list[Any]:
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        if data.get("type") == "FeatureCollection":
            return list(data.get("features") or [])
        if data.get("type") == "Feature":
            return [data]
        if "coordinates" in data or data.get("type") == "GeometryCollection":
            return [{"type": "Feature", "geometry": data, "properties": {}}]
    raise ValueError("expected a FeatureCollection, a Feature or a list of Features")


def read_annotations(path: str | os.PathLike[str]) -> list[Annotation]:
    """Polygons (and MultiPolygon parts) of a QuPath GeoJSON export, holes kept.

    Reads ``properties.classification`` as ``{"name", "color" | "colorRGB"}`` or a plain string.
    Points and lines are skipped; a file without any polygon raises :class:`AnnotationError`.
    An ``.xml`` file is read as ASAP XML (Camelyon16/17, :func:`~napari_virchow.io.asap.read_asap`).
    """
    path = Path(path)
    if path.suffix.lower() == ".xml":
        from napari_virchow.io.asap import read_asap  # asap imports this module

        return read_asap(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        features = _features(data)
    except (OSError, ValueError) as exc:
        raise AnnotationError(
            f"{path}: cannot read annotations ({exc}); export them from QuPath with "
            "File > Export objects as GeoJSON"
        ) from exc
    out: list[Annotation] = []
    for i, feature in enumerate(features):
        try:
            props = feature.get("properties") or {}
            cls = props.get("classification")
            name = cls.get("name") if isinstance(cls, dict) else cls
            color = _color(cls.get("color", cls.get("colorRGB"))) if isinstance(cls, dict) else None
            for rings in _polygons(feature.get("geometry") or {}):
                outer = _ring(rings[0])
                if len(outer) >= 3:
                    out.append(Annotation(outer, str(name) if name else None, color,
                                          [_ring(h) for h in rings[1:]], props.get("name"), index=i,
                                          source=path.name))
        except (AttributeError, KeyError, IndexError, TypeError, ValueError) as exc:
            raise AnnotationError(f"{path}: feature {i} is malformed ({exc})") from exc
    if not out:
        raise AnnotationError(
            f"{path}: no polygon annotations found; draw areas (rectangle, polygon, brush), "
            "not points or lines, and export them as GeoJSON"
        )
    return out


def _ring_out(ring: np.ndarray) -> list[list[float | int]]:
    arr = np.asarray(ring, dtype=np.float64)
    closed = np.concatenate([arr, arr[:1]])
    if np.all(closed == np.round(closed)):
        return closed.astype(np.int64).tolist()  # tile borders: keep integers exact
    return closed.tolist()


def _feature(rings_list: list[list[np.ndarray]], class_name: str | None, color: Color | None,
             **properties: Any) -> dict[str, Any]:
    polys = [[_ring_out(r) for r in rings] for rings in rings_list]
    geometry = ({"type": "Polygon", "coordinates": polys[0]} if len(polys) == 1
                else {"type": "MultiPolygon", "coordinates": polys})
    props: dict[str, Any] = {"objectType": "annotation"}
    if class_name:
        props["classification"] = {"name": class_name,
                                   "color": list(color or PALETTE[0])}
    props.update({k: v for k, v in properties.items() if v is not None})
    return {"type": "Feature", "id": str(uuid.uuid4()), "geometry": geometry, "properties": props}


def annotation_to_feature(a: Annotation) -> dict[str, Any]:
    """A QuPath annotation Feature for ``a``."""
    return _feature([[a.polygon, *a.holes]], a.class_name, a.color, name=a.name)


def write_annotations(
    path: str | os.PathLike[str], annotations: Sequence[Annotation | Mapping[str, Any]],
    *, provenance: Mapping[str, Any] | None = None,
) -> Path:
    """Write Annotations and/or ready Features as a FeatureCollection (atomically).

    Build ``path`` with :func:`safe_output_path` so exports stay in the chosen folder.
    ``provenance`` (:func:`~napari_virchow.io.provenance.provenance`) is stored as the collection's
    foreign member ``"napari_virchow"`` (QuPath ignores it).
    """
    path = Path(path)
    feats = [dict(a) if isinstance(a, Mapping) else annotation_to_feature(a) for a in annotations]
    collection: dict[str, Any] = {"type": "FeatureCollection", "features": feats}
    if provenance:
        collection["napari_virchow"] = dict(provenance)
    text = json.dumps(collection)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _trace(mask: np.ndarray) -> list[list[np.ndarray]]:
    """Outline each 4-connected region of a grid mask: ``[[exterior, *holes], ...]``.

    Vertices are grid corners ``(col, row)``, so edges fall exactly on tile borders. Every cell
    contributes its edges not shared with a masked neighbour, oriented with the region on the
    right (on screen); following them, always turning right first where two regions touch at a
    corner, splits the edges into simple rings. Exteriors get positive shoelace area.
    """
    from scipy.ndimage import find_objects, label

    lab, _ = label(mask)
    regions = []
    for i, sl in enumerate(find_objects(lab), start=1):
        p = np.pad(lab[sl] == i, 1)
        core = p[1:-1, 1:-1]
        out: dict[tuple[int, int], dict[tuple[int, int], tuple[int, int]]] = {}
        sides = ((p[:-2, 1:-1], (0, 0), (1, 0)), (p[1:-1, 2:], (1, 0), (0, 1)),
                 (p[2:, 1:-1], (1, 1), (-1, 0)), (p[1:-1, :-2], (0, 1), (0, -1)))
        for neighbour, (sx, sy), d in sides:
            rr, cc = np.nonzero(core & ~neighbour)
            for r, c in zip((rr + sl[0].start).tolist(), (cc + sl[1].start).tolist(),
                            strict=True):
                out.setdefault((c + sx, r + sy), {})[d] = (c + sx + d[0], r + sy + d[1])
        seen: set[tuple[tuple[int, int], tuple[int, int]]] = set()
        rings = []
        for v0, dirs in out.items():
            for d0 in dirs:
                if (v0, d0) in seen:
                    continue
                ring, v, d = [], v0, d0
                while (v, d) not in seen:
                    seen.add((v, d))
                    ring.append((v, d))
                    w = out[v][d]
                    right, left = (-d[1], d[0]), (d[1], -d[0])
                    d = next(nd for nd in (right, d, left) if nd in out[w])
                    v = w
                # Keep corners only: drop vertices where the direction does not change.
                pts = np.asarray([v for k, (v, dd) in enumerate(ring) if dd != ring[k - 1][1]],
                                 dtype=np.float64)
                area = 0.5 * np.sum(pts[:, 0] * np.roll(pts[:, 1], -1)
                                    - np.roll(pts[:, 0], -1) * pts[:, 1])
                rings.append((area, pts))
        rings.sort(key=lambda ar: -ar[0])  # the exterior has the largest (positive) area
        regions.append([pts for _, pts in rings])
    return regions


def _within(ring: np.ndarray, bounds: tuple[int, int] | None) -> np.ndarray:
    """``ring``'s vertices clamped to ``[0, width] × [0, height]``. For rings on the tile lattice whose
    last row and column the slide edge cuts, that is exactly the ring cut at the edge: the clamp keeps
    the order of every vertex coordinate, so the outline stays simple."""
    if bounds is None:
        return ring
    return np.minimum(np.maximum(ring, 0), np.asarray(bounds, dtype=ring.dtype))


def tile_box(x: int, y: int, tile_size_l0: int, bounds: tuple[int, int] | None = None) -> np.ndarray:
    """The (4, 2) level-0 corners of the tile at ``(x, y)``, cut at ``bounds`` (the slide's
    ``(width, height)``) where a partial edge tile reaches past it."""
    t = int(tile_size_l0)
    return _within(np.asarray([[x, y], [x + t, y], [x + t, y + t], [x, y + t]]), bounds)


def tiles_to_features(
    coords: np.ndarray,
    tile_size_l0: int,
    labels: np.ndarray,
    class_names: Sequence[str] | Mapping[int, str],
    colors: Sequence[Color] | Mapping[int, Color] | None = None,
    *,
    bounds: tuple[int, int] | None = None,
) -> list[dict[str, Any]]:
    """One QuPath annotation per class: the union of its tiles, traced on tile borders.

    ``labels[i]`` is looked up in ``class_names`` (a sequence indexed from 0, or a mapping such as
    ``{1: "Cluster 1", ...}`` for cluster ids); labels without a name (e.g. -1 or 0) are skipped.
    ``bounds``: the slide's level-0 ``(width, height)``; partial edge tiles, which reach past it, are
    cut there (QuPath, and :func:`check_inside` on reading them back, expect annotations on the slide).
    """
    names = dict(class_names) if isinstance(class_names, Mapping) else dict(enumerate(class_names))
    cols_map = (dict(colors) if isinstance(colors, Mapping)
                else dict(enumerate(colors)) if colors is not None else {})
    lab = np.asarray(labels).reshape(-1)
    rows, cols, (ox, oy) = grid_indices(coords, tile_size_l0)
    if lab.shape[0] != rows.shape[0]:
        raise ValueError(f"{lab.shape[0]} labels for {rows.shape[0]} tiles")
    t = int(tile_size_l0)
    feats = []
    order = sorted(names)  # palette slot by class, stable whichever classes are present
    for value in sorted(set(lab.tolist()) & set(names)):
        sel = lab == value
        mask = np.zeros((int(rows.max()) + 1, int(cols.max()) + 1), dtype=bool)
        mask[rows[sel], cols[sel]] = True
        polys = [[_within(ring * t + (ox, oy), bounds) for ring in region] for region in _trace(mask)]
        color = cols_map.get(value, PALETTE[order.index(value) % len(PALETTE)])
        feats.append(_feature(polys, names[value], color, n_tiles=int(sel.sum())))
    return feats


def hits_to_features(
    hits: Sequence[Hit],
    tile_size_l0: int,
    *,
    class_name: str | None = "Similar",
    color: Color = (255, 0, 255),
    bounds: tuple[int, int] | None = None,
) -> list[dict[str, Any]]:
    """One square annotation per hit, named ``Hit 1..k`` with ``score`` (and ``slide``) properties.

    With ``class_name=None`` each hit is its own class ``Hit i`` instead of one shared class.
    ``bounds``: the level-0 ``(width, height)`` of the slide the hits are on, as for :func:`tiles_to_features`.
    """
    feats = []
    for rank, h in enumerate(hits, start=1):
        box = tile_box(h.x, h.y, tile_size_l0, bounds)
        feats.append(_feature([[box]], class_name or f"Hit {rank}", color, name=f"Hit {rank}",
                              score=float(h.score), rank=rank, tile_index=int(h.index),
                              slide=h.slide))
    return feats
