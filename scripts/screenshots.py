"""Make the pictures in README.md and docs/guide.md from the real sample, headless (Xvfb).

    xvfb-run -a .venv/bin/python scripts/screenshots.py [--out docs/images]

Pictures are made by code so they never go stale: rerun after a UI change. The overlays come
from the demo's encoder (Virchow 2 when its weights are cached, else a random-weights ViT).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import napari
import numpy as np
from qtpy.QtWidgets import QApplication

from napari_virchow._qt.demo import QUERY_POINT, start_demo, wait_for
from napari_virchow._qt.layers import overlay_kind
from napari_virchow._qt.viewport import camera

OUT = Path(__file__).resolve().parents[1] / "docs" / "images"
SIZE = (1400, 900)


def settle(rounds: int = 40) -> None:
    """Let Qt paint and napari load the visible chunks before a screenshot."""
    for _ in range(rounds):
        QApplication.processEvents()
        time.sleep(0.02)


def only(viewer: napari.Viewer, *visible: str) -> None:
    """Show the slide and the named overlays (kinds: the first part of their names), hide the rest."""
    for layer in viewer.layers:
        keep = layer is viewer.layers[0] or overlay_kind(layer) in visible
        layer.visible = keep


def save(viewer: napari.Viewer, out: Path, name: str, *, canvas_only: bool = False) -> Path:
    settle()
    path = out / name
    viewer.screenshot(str(path), canvas_only=canvas_only, flash=False)
    print(path)
    return path


def shot_sample(out: Path) -> None:
    viewer = napari.Viewer(show=True)
    viewer.window.resize(*SIZE)
    viewer.open_sample("napari-virchow", "cmu_small_region")
    viewer.scale_bar.visible = True
    viewer.reset_view()
    save(viewer, out, "sample_slide.png")
    viewer.close()


def shot_overlays(out: Path) -> None:
    viewer, widget, _ = start_demo()
    viewer.window.resize(*SIZE)
    viewer.scale_bar.visible = True
    wait_for(widget)
    viewer.reset_view()
    only(viewer, "annotations")
    save(viewer, out, "annotations.png", canvas_only=True)
    only(viewer, "probability")
    save(viewer, out, "heatmap.png")
    widget.threshold_slider.setValue(50)
    widget.smooth_check.setChecked(True)
    save(viewer, out, "heatmap_threshold.png", canvas_only=True)
    only(viewer, "clusters")
    save(viewer, out, "clusters.png", canvas_only=True)
    only(viewer, "embedded")
    save(viewer, out, "embedded.png", canvas_only=True)
    only(viewer, "similarity", "hits", "query")
    save(viewer, out, "similarity.png")
    widget.tissue_check.setChecked(True)
    only(viewer, "tissue")
    save(viewer, out, "tissue_mask.png", canvas_only=True)
    # a close-up at the query, as a pathologist would look at it
    layer = widget._slide_layer()
    only(viewer, "probability")
    camera(viewer).center = tuple(layer.data_to_world(QUERY_POINT[::-1]))
    camera(viewer).zoom = viewer.canvas.size[1] / (900 * float(np.asarray(layer.scale)[-1]))
    save(viewer, out, "closeup.png", canvas_only=True)
    viewer.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    shot_sample(args.out)
    shot_overlays(args.out)


if __name__ == "__main__":
    main()
