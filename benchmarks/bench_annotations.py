"""How long loading QuPath annotations holds napari's UI thread.

    xvfb-run -a python benchmarks/bench_annotations.py [--regions 500] [--runs 3]

Writes a QuPath GeoJSON of ``--regions`` polygon annotations (24 vertices each, two classes
alternating, as QuPath exports them in drawing order) over the real sample slide, then times
``Load GeoJSON`` of the dock widget (``HeadPanel.load_geojson``: read, one layer, every shape with
its class and colour) against adding the same shapes one at a time with their class (how 0.2 loaded
them). Median of ``--runs``. Prints a JSON object as its last line; goal: ``speedup_vs_one_by_one``
≥ 5 and ``load_s_per_100`` < 0.5.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import napari
import numpy as np
from qtpy.QtWidgets import QApplication

from napari_virchow._qt.annotation_shapes import shapes_of
from napari_virchow._qt.widget import VirchowWidget
from napari_virchow._sample_data import sample_path
from napari_virchow.io.geojson import read_annotations


def write_regions(path: Path, n: int, width: int, height: int) -> None:
    rng = np.random.default_rng(0)
    t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    feats = []
    for i in range(n):
        cx, cy = rng.uniform(100, width - 100), rng.uniform(100, height - 100)
        r = rng.uniform(10, 60)
        ring = np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1).round(1).tolist()
        feats.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[*ring, ring[0]]]},
                      "properties": {"objectType": "annotation",
                                     "classification": {"name": ("Tumor", "Stroma")[i % 2]}}})  # fmt: skip
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))


def one_by_one(widget: VirchowWidget, path: Path) -> None:
    """The 0.2 way: each shape added on its own, its class set first."""
    head = widget.head
    layer = head.new_annotation_layer()
    for polygon, name in shapes_of(read_annotations(path)):
        head._use_class(layer, name)
        layer.add_polygons([polygon[:, ::-1]])


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    QApplication.processEvents()
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--regions", type=int, default=500)
    p.add_argument("--runs", type=int, default=3)
    a = p.parse_args()
    viewer = napari.Viewer(show=True)
    viewer.open(str(sample_path("cmu_small_region.svs")), plugin="napari-virchow")
    widget = VirchowWidget(viewer)
    viewer.window.add_dock_widget(widget)
    QApplication.processEvents()
    height, width = viewer.layers[0].level_shapes[0][:2]
    runs: dict[str, list[float]] = {"load": [], "one_by_one": []}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "regions.geojson"
        write_regions(path, a.regions, int(width), int(height))
        for _ in range(a.runs):
            runs["load"].append(timed(lambda: widget.head.load_geojson(path)))
            runs["one_by_one"].append(timed(lambda: one_by_one(widget, path)))
            for layer in [lyr for lyr in viewer.layers if lyr.name.startswith("annotations")]:
                viewer.layers.remove(layer)
    med = {k: statistics.median(v) for k, v in runs.items()}
    result = {
        "regions": a.regions,
        "load_s": round(med["load"], 3),
        "load_s_per_100": round(100 * med["load"] / a.regions, 3),
        "one_by_one_s": round(med["one_by_one"], 3),
        "speedup_vs_one_by_one": round(med["one_by_one"] / med["load"], 1),
    }
    result["goals_met"] = result["speedup_vs_one_by_one"] >= 5 and result["load_s_per_100"] < 0.5
    viewer.close()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
