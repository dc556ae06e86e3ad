"""ASAP XML (Camelyon16/17) annotations; holes and MultiPolygons honoured; off-slide coordinates refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from napari_virchow.analysis.rasters import rasterize_annotations
from napari_virchow.io.asap import read_asap, write_asap
from napari_virchow.io.geojson import Annotation, AnnotationError, check_inside, read_annotations

#: a Camelyon16-style file: two tumour polygons (group _0), an exclusion (_2) inside the first
CAMELYON = """<?xml version="1.0"?>
<ASAP_Annotations>
  <Annotations>
    <Annotation Name="Annotation 0" Type="Polygon" PartOfGroup="_0" Color="#F4FA58">
      <Coordinates>
        <Coordinate Order="0" X="0" Y="0" /><Coordinate Order="1" X="1000" Y="0" />
        <Coordinate Order="2" X="1000" Y="1000" /><Coordinate Order="3" X="0" Y="1000" />
      </Coordinates>
    </Annotation>
    <Annotation Name="Annotation 1" Type="Spline" PartOfGroup="_0" Color="#F4FA58">
      <Coordinates>
        <Coordinate Order="2" X="1500.5" Y="1600" /><Coordinate Order="0" X="1500.5" Y="1500" />
        <Coordinate Order="1" X="1600" Y="1500" />
      </Coordinates>
    </Annotation>
    <Annotation Name="Annotation 2" Type="Polygon" PartOfGroup="_2" Color="#000000">
      <Coordinates>
        <Coordinate Order="0" X="200" Y="200" /><Coordinate Order="1" X="600" Y="200" />
        <Coordinate Order="2" X="600" Y="600" /><Coordinate Order="3" X="200" Y="600" />
      </Coordinates>
    </Annotation>
    <Annotation Name="Point" Type="Dot" PartOfGroup="_0"><Coordinates>
      <Coordinate Order="0" X="5" Y="5" /></Coordinates></Annotation>
  </Annotations>
  <AnnotationGroups>
    <Group Name="_0" PartOfGroup="None" Color="#FF0000"><Attributes /></Group>
    <Group Name="_2" PartOfGroup="None" Color="#00FF00"><Attributes /></Group>
  </AnnotationGroups>
</ASAP_Annotations>
"""


def _lattice(n: int, t: int) -> np.ndarray:
    return np.array([(x * t, y * t) for y in range(n) for x in range(n)], np.int64)


def test_camelyon_file_reads_groups_and_exclusions(tmp_path: Path) -> None:
    path = tmp_path / "tumor_001.xml"
    path.write_text(CAMELYON)
    items = read_annotations(path)  # an .xml goes to the ASAP reader
    assert [a.name for a in items] == ["Annotation 0", "Annotation 1"]  # the Dot is not a region
    assert [a.class_name for a in items] == ["_0", "_0"]
    assert items[0].color == (244, 250, 88)
    np.testing.assert_array_equal(items[1].polygon, [[1500.5, 1500], [1600, 1500], [1500.5, 1600]])  # by Order
    assert len(items[0].holes) == 1 and not items[1].holes  # the _2 exclusion cut into its container
    labels, names = rasterize_annotations([a.polygon for a in items], [a.class_name for a in items],
                                          _lattice(10, 100), 100, holes=[a.holes for a in items])  # fmt: skip
    grid = labels.reshape(10, 10)
    assert names == ["_0"]
    assert (grid[:2, :10] == 0).all() and (grid[2:6, 2:6] == -1).all()  # tiles inside the hole unlabelled
    assert grid[6, 6] == 0 and grid[9, 9] == 0


def test_round_trip_keeps_polygons_classes_and_holes(tmp_path: Path) -> None:
    outer = np.array([[0, 0], [800, 0], [800, 800], [0, 800]], float)
    hole = np.array([[100, 100], [300, 100], [300, 300]], float)
    other = np.array([[900.25, 900], [1000, 900], [1000, 1000]], float)
    src = [Annotation(outer, "Tumor", (255, 0, 0), [hole], "T1"), Annotation(other, "Normal", None, [], None)]
    path = write_asap(tmp_path / "out.xml", src)
    back = read_asap(path)
    assert [(a.class_name, a.name) for a in back] == [("Tumor", "T1"), ("Normal", "Annotation 2")]
    np.testing.assert_array_equal(back[0].polygon, outer)
    np.testing.assert_array_equal(back[0].holes[0], hole)
    np.testing.assert_array_equal(back[1].polygon, other)
    assert back[0].color == (255, 0, 0)


@pytest.mark.parametrize(("text", "match"), [
    ("<ASAP_Annotations><Annotations/></ASAP_Annotations>", "no polygon annotations"),
    ("<Annotations/>", "not <ASAP_Annotations>"),
    ("<ASAP_Annotations><Annotations", "not valid ASAP XML"),
    ('<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x "y">]><ASAP_Annotations/>', "DOCTYPE"),
    ('<ASAP_Annotations><Annotations><Annotation Name="A" Type="Polygon"><Coordinates>'
     '<Coordinate Order="0" X="a" Y="1"/></Coordinates></Annotation></Annotations></ASAP_Annotations>',
     "annotation 0 .'A'. has a coordinate that is not a number"),
])  # fmt: skip
def test_bad_asap_files_get_one_clear_message(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "bad.xml"
    path.write_text(text)
    with pytest.raises(AnnotationError, match=rf"bad\.xml.*{match}"):
        read_asap(path)


def test_geojson_multipolygon_with_holes_is_honoured(tmp_path: Path) -> None:
    square = [[0, 0], [600, 0], [600, 600], [0, 600], [0, 0]]
    hole = [[200, 200], [400, 200], [400, 400], [200, 400], [200, 200]]
    far = [[700, 700], [1000, 700], [1000, 1000], [700, 1000], [700, 700]]
    feature = {"type": "Feature", "properties": {"classification": {"name": "Tumor"}, "name": "T"},
               "geometry": {"type": "MultiPolygon", "coordinates": [[square, hole], [far]]}}
    path = tmp_path / "a.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    items = read_annotations(path)
    assert len(items) == 2 and len(items[0].holes) == 1 and not items[1].holes
    labels, _ = rasterize_annotations([a.polygon for a in items], [a.class_name for a in items],
                                      _lattice(10, 100), 100, holes=[a.holes for a in items])  # fmt: skip
    grid = labels.reshape(10, 10)
    assert (grid[2:4, 2:4] == -1).all() and grid[1, 1] == 0 and grid[5, 5] == 0  # the hole is not tumour
    assert (grid[7:10, 7:10] == 0).all() and grid[6, 6] == -1  # the second part counts too


def test_coordinates_outside_the_slide_name_the_feature(tmp_path: Path) -> None:
    inside = [[10, 10], [100, 10], [100, 100], [10, 10]]
    outside = [[10, 10], [5000, 10], [5000, 300], [10, 10]]
    feats = [{"type": "Feature", "properties": {"name": n, "classification": {"name": "Tumor"}},
              "geometry": {"type": "Polygon", "coordinates": [ring]}}
             for n, ring in (("ok", inside), ("Big one", outside))]  # fmt: skip
    path = tmp_path / "cases.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    items = read_annotations(path)
    check_inside(items[:1], (2220, 2967), "slide.svs")
    with pytest.raises(AnnotationError, match=r'cases\.geojson: feature 1 \("Big one", class Tumor\).*'
                                              r"outside the 2220×2967 px slide slide\.svs"):  # fmt: skip
        check_inside(items, (2220, 2967), "slide.svs")
