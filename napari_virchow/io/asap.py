"""ASAP XML annotations (the Camelyon16/17 layout), read and written like QuPath GeoJSON.

::

    <ASAP_Annotations>
      <Annotations>
        <Annotation Name="Annotation 0" Type="Polygon" PartOfGroup="Tumor" Color="#F4FA58">
          <Coordinates><Coordinate Order="0" X="1.5" Y="2.0"/>...</Coordinates>
        </Annotation>
      </Annotations>
      <AnnotationGroups><Group Name="Tumor" PartOfGroup="None" Color="#FF0000"/></AnnotationGroups>
    </ASAP_Annotations>

Coordinates are level-0 pixels ``(x, y)``. The group is the class. Polygons of an exclusion group
(Camelyon16's ``_2``, or ``Exclusion``) are not classes of their own: they become holes of the
polygon that contains them, as Camelyon's evaluation treats them.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from napari_virchow.io.files import atomic_write
from napari_virchow.io.geojson import PALETTE, Annotation, AnnotationError, Color

__all__ = ["EXCLUSION_GROUPS", "read_asap", "write_asap"]

#: groups whose polygons cut holes into the annotations around them
EXCLUSION_GROUPS = ("_2", "Exclusion")
#: region types (ASAP's Dot and PointSet are points, not regions)
_REGION_TYPES = {"polygon", "rectangle", "spline"}


def _hex(color: str | None) -> Color | None:
    if not color or not color.startswith("#") or len(color) != 7:
        return None
    try:
        return (int(color[1:3], 16), int(color[3:5], 16), int(color[5:7], 16))
    except ValueError:
        return None


def _parse(path: Path) -> ET.Element:
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise AnnotationError(f"{path}: cannot read annotations ({exc})") from exc
    if b"<!DOCTYPE" in text or b"<!ENTITY" in text:  # entity expansion is not something ASAP writes
        raise AnnotationError(f"{path}: XML with a DOCTYPE or entities is refused; save it again from ASAP")
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise AnnotationError(f"{path}: not valid ASAP XML ({exc}); save the annotations again from ASAP") from exc
    if root.tag != "ASAP_Annotations":
        raise AnnotationError(f"{path}: the root element is <{root.tag}>, not <ASAP_Annotations>; "
                              "is this an ASAP / Camelyon annotation file?")  # fmt: skip
    return root


def _contains(outer: np.ndarray, inner: np.ndarray) -> bool:
    from skimage.measure import points_in_poly

    return bool(points_in_poly(inner[:1], outer)[0])


def read_asap(path: str | os.PathLike[str], *, exclusion_groups: Sequence[str] = EXCLUSION_GROUPS) -> list[Annotation]:
    """Polygons of an ASAP XML file (Camelyon16/17), class = ``PartOfGroup``, exclusions as holes.

    Raises :class:`AnnotationError` naming the file (and the annotation) when it is not ASAP XML,
    a coordinate is not a number, or it holds no polygon.
    """
    path = Path(path)
    root = _parse(path)
    group_colors = {g.get("Name"): _hex(g.get("Color")) for g in root.iter("Group")}
    regions: list[Annotation] = []
    exclusions: list[Annotation] = []
    for i, el in enumerate(root.iter("Annotation")):
        if (el.get("Type") or "Polygon").lower() not in _REGION_TYPES:
            continue
        group = el.get("PartOfGroup")
        group = None if group in (None, "", "None") else group
        try:
            pts = sorted(((int(c.get("Order", k)), float(c.get("X", "")), float(c.get("Y", "")))
                          for k, c in enumerate(el.iter("Coordinate"))))  # fmt: skip
        except ValueError as exc:
            raise AnnotationError(f"{path}: annotation {i} ({el.get('Name')!r}) has a coordinate that is not "
                                  f"a number ({exc})") from exc  # fmt: skip
        ring = np.asarray([(x, y) for _, x, y in pts], dtype=np.float64).reshape(-1, 2)
        if len(ring) > 1 and np.array_equal(ring[0], ring[-1]):
            ring = ring[:-1]
        if len(ring) < 3:
            continue
        color = _hex(el.get("Color")) or group_colors.get(group)
        item = Annotation(ring, group, color, [], el.get("Name"), index=i, source=path.name)
        (exclusions if group in exclusion_groups else regions).append(item)
    for hole in exclusions:
        owner = next((r for r in regions if _contains(r.polygon, hole.polygon)), None)
        if owner is not None:
            owner.holes.append(hole.polygon)
    if not regions:
        raise AnnotationError(f"{path}: no polygon annotations found (ASAP Polygon, Rectangle or Spline "
                              "annotations in a group other than an exclusion group)")  # fmt: skip
    return regions


def _color_hex(color: Color) -> str:
    return "#{:02X}{:02X}{:02X}".format(*color)


def write_asap(path: str | os.PathLike[str], annotations: Sequence[Annotation],
               *, exclusion_group: str = "Exclusion") -> Path:  # fmt: skip
    """Write ``annotations`` as ASAP XML (atomically); holes go to ``exclusion_group``.

    Build ``path`` with :func:`~napari_virchow.io.geojson.safe_output_path` for exports.
    """
    root = ET.Element("ASAP_Annotations")
    items = ET.SubElement(root, "Annotations")
    classes: dict[str, Color] = {}
    n = 0

    def add(ring: np.ndarray, group: str, color: Color, name: str | None) -> None:
        nonlocal n
        el = ET.SubElement(items, "Annotation", Name=name or f"Annotation {n}", Type="Polygon",
                           PartOfGroup=group, Color=_color_hex(color))  # fmt: skip
        coords = ET.SubElement(el, "Coordinates")
        for k, (x, y) in enumerate(np.asarray(ring, dtype=np.float64).reshape(-1, 2)):
            ET.SubElement(coords, "Coordinate", Order=str(k), X=repr(float(x)), Y=repr(float(y)))
        n += 1

    for a in annotations:
        group = a.class_name or "None"
        color = a.color or classes.get(group) or PALETTE[len(classes) % len(PALETTE)]
        classes.setdefault(group, color)
        add(a.polygon, group, color, a.name)
        for hole in a.holes:
            classes.setdefault(exclusion_group, (0, 0, 0))
            add(hole, exclusion_group, (0, 0, 0), None)
    groups = ET.SubElement(root, "AnnotationGroups")
    for name, color in classes.items():
        if name != "None":
            g = ET.SubElement(groups, "Group", Name=name, PartOfGroup="None", Color=_color_hex(color))
            ET.SubElement(g, "Attributes")
    ET.indent(root)
    text = ET.tostring(root, encoding="unicode", xml_declaration=True)
    return atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text + "\n", encoding="utf-8"))
