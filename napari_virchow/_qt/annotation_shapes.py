"""Annotations with holes on a napari Shapes layer, which has no holes.

A hole is drawn as a shape of its own, of the reserved class :data:`HOLE_CLASS` (``"hole"``; the
user may draw more with that class). It belongs to the smallest region (shape of any other class)
that holds most of its vertices; training leaves the tiles inside it unlabelled, as the CLI does
with GeoJSON holes, and saving writes it as a hole of that region's polygon, so a GeoJSON
save → load round trip keeps the holes. A hole inside no region labels nothing and is saved as a
polygon of class ``hole`` (which loads back as a hole shape).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from napari_virchow.io.geojson import Annotation

__all__ = ["HOLE_CLASS", "HOLE_COLOR", "regions_with_holes", "shapes_of"]

#: class name of the shapes that are holes of the region around them
HOLE_CLASS = "hole"
#: their one colour: dark grey, distinct from every class colour
HOLE_COLOR = "#505050"


def _area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def regions_with_holes(polygons: Sequence[np.ndarray],
                       classes: Sequence[str]) -> tuple[list[Annotation], list[np.ndarray]]:  # fmt: skip
    """Regions (an :class:`Annotation` per shape not of :data:`HOLE_CLASS`, its holes attached) and
    the hole shapes inside no region; polygons are level-0 ``(x, y)``."""
    from skimage.measure import points_in_poly

    regions = [Annotation(np.asarray(p, np.float64), c) for p, c in zip(polygons, classes, strict=True)
               if c != HOLE_CLASS]  # fmt: skip
    areas = [_area(r.polygon) for r in regions]
    orphans: list[np.ndarray] = []
    for p, c in zip(polygons, classes, strict=True):
        if c != HOLE_CLASS:
            continue
        hole = np.asarray(p, np.float64)
        inside = [k for k, r in enumerate(regions)
                  if points_in_poly(hole, r.polygon).mean() >= 0.5 and areas[k] > _area(hole)]  # fmt: skip
        if inside:
            regions[min(inside, key=lambda k: areas[k])].holes.append(hole)
        else:
            orphans.append(hole)
    return regions, orphans


def shapes_of(items: Sequence[Annotation]) -> list[tuple[np.ndarray, str]]:
    """(polygon, class) per shape to draw for ``items``: each region, then each of its holes."""
    out: list[tuple[np.ndarray, str]] = []
    for item in items:
        out.append((np.asarray(item.polygon), item.class_name or "unclassified"))
        out.extend((np.asarray(h), HOLE_CLASS) for h in item.holes if len(h) >= 3)
    return out
