"""The viewer's overlay export writes each overlay on the lattice it was made at (real planted slide,
tiny random Virchow 2, real stores): clusters and a query made at 5× while the encoder's own level
is 20×, and a heatmap whose places come from two magnifications, as the screen shows it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_virchow.config import SessionConfig
from napari_virchow.io.overlay_export import OverlaySnapshot, write_overlays
from napari_virchow.session import SlideSession
from tests.conftest import PLANTED_SIZE

pytestmark = pytest.mark.filterwarnings("ignore:.*random weights:UserWarning")


def _area(rings: list) -> float:
    """Area of a GeoJSON polygon (exterior minus holes), shoelace."""
    def one(ring: list) -> float:
        xy = np.asarray(ring, float)
        return abs(float(np.dot(xy[:-1, 0], xy[1:, 1]) - np.dot(xy[1:, 0], xy[:-1, 1]))) / 2
    return one(rings[0]) - sum(one(r) for r in rings[1:])


def _polygons(feature: dict) -> list:
    geom = feature["geometry"]
    return [geom["coordinates"]] if geom["type"] == "Polygon" else geom["coordinates"]


def _corners(feature: dict) -> np.ndarray:
    return np.concatenate([np.asarray(r, float) for poly in _polygons(feature) for r in poly])


def test_clusters_and_hits_at_5x_keep_their_lattice(planted_slide: Path, tmp_path: Path) -> None:
    config = SessionConfig(encoder="virchow2-tiny", weights="random", device="cpu", dtype="fp32", batch_size=8,
                           cache_root=tmp_path / "cache")  # fmt: skip
    with SlideSession(planted_slide, config) as s:
        list(s.compute(mpp=2.0))
        s.use_clusters(s.fit_clusters(3, mpp=2.0))
        s.set_query(s.query_indices(1000, 1000, mpp=2.0), mpp=2.0)
        g5 = s.grid_at(2.0)
        assert len(s.cluster_labels) == len(g5) != len(s.grid)  # the export used the 20× lattice: ValueError
        snap = OverlaySnapshot.of(s, n_hits=3)
        n = write_overlays(tmp_path / "o.geojson", snap, 0.5)
    feats = snap.features(0.5)
    assert n == len(feats) and feats
    clusters = [f for f in feats if f["properties"]["classification"]["name"].startswith("Cluster ")]
    hits = [f for f in feats if f["properties"]["classification"]["name"] == "Similar"]
    step = g5.tile_size_l0
    assert step == 896 and clusters and hits
    for f in clusters:  # corners on the 5× lattice (or cut at the slide's edge)
        c = _corners(f)
        assert np.all((c % step == 0) | (c == PLANTED_SIZE)), c
    labelled = (s.cluster_labels > 0).sum()
    covered = sum(_area(poly) for f in clusters for poly in _polygons(f))
    assert covered == pytest.approx(labelled * step**2, rel=0.3)  # edge tiles are cut at the slide's edge
    for f in hits:  # each hit is a 5× tile, not a 20× one
        c = _corners(f)
        assert np.ptp(c[:, 0]) == step or c[:, 0].max() == PLANTED_SIZE


def test_the_heatmap_exported_is_the_one_drawn_from_two_magnifications(planted_slide: Path, tmp_path: Path) -> None:
    config = SessionConfig(encoder="virchow2-tiny", weights="random", device="cpu", dtype="fp32", batch_size=8,
                           cache_root=tmp_path / "cache")  # fmt: skip
    box = np.array([[256, 256], [1024, 256], [1024, 1024], [256, 1024]], float)
    other = np.array([[1024, 1024], [1792, 1024], [1792, 1792], [1024, 1792]], float)
    with SlideSession(planted_slide, config) as s:
        list(s.compute(mpp=2.0))  # the whole tissue at 5×
        idx, _ = s.annotated_tiles([box, other], ["tumour", "normal"])
        list(s.compute(indices=idx))  # and the 20× tiles under the two regions
        s.set_head(s.train_head([box, other], ["tumour", "normal"]).head)
        assert set(s.overlay_levels("probability")) == {0.5, 2.0}
        raster = s.overlay_raster("probability")
        snap = OverlaySnapshot.of(s, n_hits=3)
        only_20x = np.isfinite(s.probability).sum()
    drawn = np.isfinite(raster.data).sum()
    assert drawn * raster.tile_size_l0**2 > only_20x * 224**2  # the 5× places are drawn too
    every = snap.features(-1.0)  # below every probability: every place drawn
    area = sum(_area(poly) for f in every for poly in _polygons(f))
    cell = raster.tile_size_l0
    assert cell == 224 and area == pytest.approx(drawn * cell**2, rel=0.02)  # cut at the slide's edge only
