from __future__ import annotations

import json

import numpy as np
import pytest

from napari_virchow.analysis.rasters import rasterize_annotations
from napari_virchow.analysis.similarity import Hit
from napari_virchow.errors import VirchowError
from napari_virchow.io.geojson import (
    Annotation,
    AnnotationError,
    OutputPathError,
    check_inside,
    hits_to_features,
    read_annotations,
    safe_output_path,
    tiles_to_features,
    write_annotations,
)

T = 448


def tile_coords(cols: int, rows: int, origin: tuple[int, int] = (0, 0)) -> np.ndarray:
    i = np.arange(cols * rows)
    return np.stack([origin[0] + (i % cols) * T, origin[1] + (i // cols) * T], axis=1)


QUPATH = {
    "type": "FeatureCollection",
    "features": [
        {"type": "Feature", "id": "a",
         "geometry": {"type": "Polygon", "coordinates": [
             [[0, 0], [100, 0], [100, 50], [0, 50], [0, 0]],
             [[10, 10], [20, 10], [20, 20], [10, 10]]]},
         "properties": {"objectType": "annotation",
                        "classification": {"name": "Tumor", "color": [200, 0, 0]}}},
        {"type": "Feature",
         "geometry": {"type": "MultiPolygon", "coordinates": [
             [[[0, 100], [10, 100], [10, 110], [0, 100]]],
             [[[50, 100], [60, 100], [60, 110], [50, 100]]]]},
         "properties": {"classification": {"name": "Stroma", "colorRGB": -6895466}}},
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [5, 5]},
         "properties": {"classification": "Tumor"}},
        {"type": "Feature",
         "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 0]]]},
         "properties": {"classification": "Immune cells", "name": "TILs"}},
    ],
}


def test_read_qupath_feature_collection(tmp_path) -> None:
    path = tmp_path / "a.geojson"
    path.write_text(json.dumps(QUPATH))
    anns = read_annotations(path)
    assert [a.class_name for a in anns] == ["Tumor", "Stroma", "Stroma", "Immune cells"]
    np.testing.assert_array_equal(anns[0].polygon, [[0, 0], [100, 0], [100, 50], [0, 50]])
    assert len(anns[0].holes) == 1 and anns[0].color == (200, 0, 0)
    assert anns[1].color == ((-6895466 >> 16) & 255, (-6895466 >> 8) & 255, -6895466 & 255)
    assert anns[3].name == "TILs" and anns[3].color is None


def test_read_bare_feature_list(tmp_path) -> None:
    path = tmp_path / "list.geojson"
    path.write_text(json.dumps(QUPATH["features"][:1]))
    assert read_annotations(path)[0].class_name == "Tumor"


@pytest.mark.parametrize("content", ["{not json", json.dumps({"type": "FeatureCollection",
                                                                "features": []}), "42"])
def test_bad_files_raise_annotation_error_naming_file(tmp_path, content: str) -> None:
    path = tmp_path / "bad.geojson"
    path.write_text(content)
    with pytest.raises(AnnotationError, match="bad.geojson"):
        read_annotations(path)


def test_tiles_round_trip_geometry_and_classes(tmp_path) -> None:
    coords = tile_coords(6, 5, origin=(13, 7))
    labels = np.full(30, -1)
    grid = labels.reshape(5, 6)
    grid[0:4, 0:4] = 0  # a 4 × 4 tumour block ...
    grid[1:3, 1:3] = 1  # ... with a 2 × 2 stroma island (a hole in the tumour)
    grid[4, 5] = 1
    grid[0, 5] = 0
    feats = tiles_to_features(coords, T, labels, ["Tumour", "Stroma"], [(200, 0, 0), (0, 150, 0)])
    path = write_annotations(safe_output_path(tmp_path, "tiles.geojson"), feats)
    data = json.loads(path.read_text())
    assert all(f["properties"]["objectType"] == "annotation" for f in data["features"])
    anns = read_annotations(path)
    back, names = rasterize_annotations([a.polygon for a in anns], [a.class_name for a in anns],
                                        coords, T, holes=[a.holes for a in anns])
    recovered = np.array([names[i] if i >= 0 else "" for i in back])
    expected = np.array([["Tumour", "Stroma"][i] if i >= 0 else "" for i in labels])
    np.testing.assert_array_equal(recovered, expected)
    assert {a.class_name: a.color for a in anns} == {"Tumour": (200, 0, 0), "Stroma": (0, 150, 0)}


def test_tile_outlines_fall_on_tile_borders() -> None:
    coords = tile_coords(3, 3, origin=(13, 7))
    labels = np.array([0, 0, -1, 0, 0, -1, -1, -1, -1])  # a 2 × 2 block
    (feat,) = tiles_to_features(coords, T, labels, ["x"])
    ring = np.array(feat["geometry"]["coordinates"][0])
    assert feat["geometry"]["type"] == "Polygon"
    assert len(ring) == 5  # four corners, closed; collinear tile corners merged
    assert set(map(tuple, ring.tolist())) == {(13, 7), (13 + 2 * T, 7), (13 + 2 * T, 7 + 2 * T),
                                              (13, 7 + 2 * T)}


def test_diagonal_tiles_become_separate_polygons() -> None:
    coords = tile_coords(2, 2)
    (feat,) = tiles_to_features(coords, T, np.array([1, -1, -1, 1]), {1: "Cluster 1"})
    assert feat["geometry"]["type"] == "MultiPolygon"
    assert len(feat["geometry"]["coordinates"]) == 2
    assert feat["properties"]["classification"]["name"] == "Cluster 1"


def test_hits_become_boxes_with_scores(tmp_path) -> None:
    hits = [Hit(3, 896, 448, 0.93, slide="s.svs"), Hit(9, 0, 0, 0.8)]
    feats = hits_to_features(hits, T)
    ring = feats[0]["geometry"]["coordinates"][0]
    assert ring == [[896, 448], [1344, 448], [1344, 896], [896, 896], [896, 448]]
    props = feats[0]["properties"]
    assert (props["name"], props["score"], props["classification"]["name"]) == (
        "Hit 1", 0.93, "Similar")
    assert hits_to_features(hits, T, class_name=None)[1]["properties"]["classification"][
        "name"] == "Hit 2"
    path = write_annotations(safe_output_path(tmp_path, "hits.geojson"), feats)
    assert len(read_annotations(path)) == 2


def test_annotations_write_read_round_trip(tmp_path) -> None:
    ann = Annotation(np.array([[0.5, 0], [10, 0], [10, 10]]), "Tumor", (1, 2, 3), name="r1")
    path = write_annotations(tmp_path / "a.geojson", [ann])
    (back,) = read_annotations(path)
    np.testing.assert_array_equal(back.polygon, ann.polygon)
    assert (back.class_name, back.color, back.name) == ("Tumor", (1, 2, 3), "r1")


@pytest.mark.parametrize("name", ["../evil.geojson", "sub/x.geojson", "..", "", "a\\b.json",
                                  "/etc/passwd", "C:evil.json"])
def test_export_names_outside_folder_refused(tmp_path, name: str) -> None:
    with pytest.raises(OutputPathError):
        safe_output_path(tmp_path / "out", name)
    assert not (tmp_path / "evil.geojson").exists()


def test_symlink_target_refused(tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "link.geojson").symlink_to(tmp_path / "elsewhere.geojson")
    with pytest.raises(VirchowError, match="outside"):
        safe_output_path(out, "link.geojson")


def test_plain_name_accepted(tmp_path) -> None:
    assert safe_output_path(tmp_path / "new", "slide..v2.geojson") == (
        tmp_path / "new" / "slide..v2.geojson")


def test_edge_tiles_are_cut_at_the_slide_edge_and_read_back(tmp_path) -> None:
    """Partial edge tiles reach past the slide; exported regions stop at its edge, so QuPath shows
    them on the slide and Load GeoJSON (check_inside) takes them back."""
    width, height = 2 * T + 100, 2 * T + 30  # a 3 × 3 lattice, its last column and row partial
    coords = tile_coords(3, 3)
    labels = np.array([-1, 0, 0, -1, 0, 0, 0, 0, 0])  # an L of 7 tiles reaching both far edges
    uncut = tiles_to_features(coords, T, labels, ["Tumour"])
    with pytest.raises(VirchowError, match="outside the"):
        check_inside(read_annotations(write_annotations(safe_output_path(tmp_path, "uncut.geojson"), uncut)),
                     (width, height), "edge.tif")  # fmt: skip
    (feat,) = tiles_to_features(coords, T, labels, ["Tumour"], bounds=(width, height))
    ring = np.array(feat["geometry"]["coordinates"][0])
    assert ring[:, 0].max() == width and ring[:, 1].max() == height and ring.min() >= 0
    # the same outline, with the far edges moved in: the corners at T and 2T stay where they were
    assert set(map(tuple, ring.tolist())) == {(T, 0), (width, 0), (width, height), (0, height), (0, 2 * T),
                                              (T, 2 * T)}  # fmt: skip
    back = read_annotations(write_annotations(safe_output_path(tmp_path, "cut.geojson"), [feat]))
    check_inside(back, (width, height), "edge.tif")  # no error
    (hit,) = hits_to_features([Hit(8, 2 * T, 2 * T, 0.9)], T, bounds=(width, height))
    assert np.array(hit["geometry"]["coordinates"][0]).max(axis=0).tolist() == [width, height]
