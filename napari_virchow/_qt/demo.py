"""``napari-virchow demo``: the real sample, the widget docked, all three overlays in a minute.

Virchow 2 is used when its weights are found locally (``--weights PATH`` or the Hugging Face
cache); otherwise a small random-weights ViT with the same structure, which is fast on a laptop CPU
and says loudly — in the terminal and in a banner in the widget — that its overlays are not those
of the real model.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from napari_virchow import jobs as _jobs
from napari_virchow._sample_data import sample_path
from napari_virchow.session import SlideSession

__all__ = ["QUERY_POINT", "choose_encoder", "demo_job", "run_demo", "start_demo", "wait_for"]

#: preset query: a tile of epidermis in the CMU-1 small region (level-0 px)
QUERY_POINT = (1230.0, 2000.0)
FALLBACK_ENCODER = "virchow2-tiny"
DEMO_K = 6
HOW_TO_GET_WEIGHTS = (
    "accept the licence at https://huggingface.co/paige-ai/Virchow2, log in with `hf auth login` "
    "(the weights are then cached on first use), or pass --weights PATH"
)


def choose_encoder(weights: str | None) -> tuple[str, str | None, bool]:
    """``(encoder, weights, real)``: Virchow 2 if its weights are found locally, else the fallback."""
    from napari_virchow.models.encoder import weights_status

    if weights and weights != "random":
        return "virchow2", weights, True
    if weights != "random" and weights_status("virchow2")["found"]:
        return "virchow2", None, True
    return FALLBACK_ENCODER, "random", False


@_jobs.cancellable
def demo_job(session: SlideSession, polygons: list[np.ndarray], classes: list[str], *, k: int = DEMO_K,
             cancel: threading.Event | None = None) -> Iterator[object]:  # fmt: skip
    """The whole-slide overview at 5× first, a probe from the example annotations drawn on it, then
    the 20× refinement, clusters and a query: one worker.

    The heatmap is a pyramid: on screen from the 5× overview as soon as the probe is trained, and
    refined batch by batch where 20× tiles arrive.
    """
    w, h = session.slide.dimensions
    yield from _jobs.overview_job(session, cancel=cancel)
    yield from _jobs.train_job(session, polygons, classes, cancel=cancel)
    yield from _jobs.compute_job(session, (0, 0, w, h), force=True, cancel=cancel)
    yield from _jobs.cluster_job(session, k, cancel=cancel)
    yield from _jobs.query_job(session, *QUERY_POINT, k=10, cancel=cancel)
    yield _jobs.Stage("demo ready: the heatmap is shown; clusters and similar regions are in the layer list "
                      "(click their eye icons)", final=True)


def _drawn_edges_um(layer: Any, drawn: np.ndarray) -> list[float]:
    """``[x0, y0, x1, y1]`` world µm the layer's drawn pixels (``drawn``) cover."""
    rows, cols = np.flatnonzero(drawn.any(axis=1)), np.flatnonzero(drawn.any(axis=0))
    if not len(rows):
        return []
    (sy, sx), (ty, tx) = np.asarray(layer.scale)[-2:], np.asarray(layer.translate)[-2:]
    return [round(float(v), 2) for v in (tx + (cols[0] - 0.5) * sx, ty + (rows[0] - 0.5) * sy,
                                         tx + (cols[-1] + 0.5) * sx, ty + (rows[-1] + 0.5) * sy)]  # fmt: skip


def _edges_um(layer: Any) -> list[float]:
    """``[x0, y0, x1, y1]`` world µm the layer's pixels cover (napari's extent is pixel centres)."""
    (y0, x0), (y1, x1) = np.asarray(layer.extent.world)[:, -2:]
    sy, sx = np.asarray(layer.scale)[-2:] / 2
    return [round(float(v), 2) for v in (x0 - sx, y0 - sy, x1 + sx, y1 + sy)]


def _summary(viewer: Any, widget: Any, encoder: str, seconds: float) -> dict[str, Any]:
    from napari_virchow._qt.layers import overlay_name

    slide_layer = widget._slide_layer()
    layers = []
    for kind in ("probability", "clusters", "similarity"):
        name = overlay_name(slide_layer, kind)
        if name not in viewer.layers:
            continue
        layer = viewer.layers[name]
        data = np.asarray(layer.data)
        drawn = data != 0 if kind == "clusters" else np.isfinite(data)
        layers.append({"name": name, "kind": kind, "extent_um": _edges_um(layer),
                       "drawn_extent_um": _drawn_edges_um(layer, drawn), "drawn_px": int(drawn.sum()),
                       "visible": bool(layer.visible)})  # fmt: skip
    session = widget.session()
    levels = {f"{m:g}": int(session.done_at(m).sum()) for m in session.open_levels()}  # µm/px → tiles embedded
    return {"layers": layers, "slide_extent_um": _edges_um(slide_layer), "encoder": encoder,
            "seconds": round(seconds, 1), "tiles_per_mpp": levels}  # fmt: skip


def start_demo(*, weights: str | None = None, show: bool = True) -> tuple[Any, Any, str]:
    """Open the viewer with the sample and the docked widget, and start the demo job.

    Returns ``(viewer, widget, encoder name)``; the job runs in a worker thread.
    """
    import napari

    from napari_virchow._qt.widget import VirchowWidget

    encoder, weights, real = choose_encoder(weights)
    if not real:
        print(f"napari-virchow demo: Virchow 2 weights not found locally; using {encoder} with RANDOM "
              f"weights. The overlays show the pipeline, NOT the real model. To use Virchow 2: "
              f"{HOW_TO_GET_WEIGHTS}.", file=sys.stderr)  # fmt: skip
    viewer = napari.Viewer(title="napari-virchow demo", show=show)
    viewer.open(str(sample_path("cmu_small_region_pyramid.tif")), plugin="napari-virchow")
    widget = VirchowWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Virchow", area="right")
    widget.encoder_combo.setCurrentText(encoder)
    if weights == "random":
        widget.random_check.setChecked(True)
    elif weights:
        widget.weights_edit.setText(weights)
    widget._config_changed()
    annotations = widget.load_geojson(sample_path("cmu_small_region_annotations.geojson"))
    polygons, classes = widget.annotations()
    annotations.visible = True
    widget.clusters.k_spin.setValue(DEMO_K)  # the panel shows the k the legend is made with
    widget.run(demo_job, polygons, classes, k=DEMO_K)

    def tidy(busy: bool) -> None:  # once, when the demo's job ends
        if not busy:
            widget.runner.busy_changed.disconnect(tidy)
            _one_overlay_on_top(viewer, widget)

    widget.runner.busy_changed.connect(tidy)
    return viewer, widget, encoder


def _one_overlay_on_top(viewer: Any, widget: Any) -> None:
    """The demo's last view: the heatmap over the slide, the other overlays a click away."""
    from napari_virchow._qt.layers import overlay_name

    slide = widget.slide_layer()
    if slide is None:
        return
    for kind in ("clusters", "similarity", "query", "hits", "embedded"):
        name = overlay_name(slide, kind)
        if name in viewer.layers:
            viewer.layers[name].visible = False


def wait_for(widget: Any, timeout_s: float = 600.0) -> None:
    """Process Qt events until the widget's job is done (headless runs and scripts)."""
    from qtpy.QtWidgets import QApplication

    t0 = time.perf_counter()
    while widget._worker is not None and time.perf_counter() - t0 < timeout_s:
        QApplication.processEvents()
        time.sleep(0.01)
    for _ in range(20):  # let the last layer updates paint
        QApplication.processEvents()
        time.sleep(0.01)


def run_demo(*, weights: str | None = None, block: bool = True, timeout_s: float = 600.0) -> int:
    """Open napari with the sample and the widget, and draw the three overlays.

    With ``block=False`` wait for the overlays, print a JSON summary as the last line and exit
    (0 when all three overlays are drawn and not empty).
    """
    import napari

    t0 = time.perf_counter()
    viewer, widget, encoder = start_demo(weights=weights)
    if block:
        napari.run()
        return 0
    wait_for(widget, timeout_s)
    summary = _summary(viewer, widget, encoder, time.perf_counter() - t0)
    ok = len(summary["layers"]) == 3 and all(layer["drawn_px"] > 0 for layer in summary["layers"])
    viewer.close()
    print(json.dumps(summary))
    return 0 if ok else 1
