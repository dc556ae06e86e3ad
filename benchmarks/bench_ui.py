"""Does inference freeze napari? Event-loop gaps while panning, idle vs computing the view.

    xvfb-run -a python benchmarks/bench_ui.py [--encoder timm:vit_small_patch16_224] [--runs 3]

A 5 ms QTimer records how late the Qt event loop gets back to it while a second timer pans the
camera across the real sample slide. Twice: with no inference (idle: what painting costs), and
while the widget computes the visible tiles with a small random-weights ViT (busy). Then the same
view is computed again, served from the embedding store (warm). The magnification is pinned at
20×, so the first job computes the whole view. Median of ``--runs`` runs each.
Prints a JSON object as its last line; goals: ``added_gap_ms`` < 50, ``warm_s`` < 0.2,
``warm_encoder_calls`` == 0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import napari
import numpy as np
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QApplication

from napari_virchow._qt.viewport import camera
from napari_virchow._qt.widget import VirchowWidget
from napari_virchow._sample_data import sample_path

TICK_MS, PAN_MS, PAN_STEPS = 5, 40, 75


def pump_until(done, timeout: float = 600.0) -> None:
    t0 = time.perf_counter()
    while not done():
        QApplication.processEvents()
        time.sleep(0.001)
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError("benchmark step did not finish")


def record_gaps(viewer: napari.Viewer, during=None) -> list[float]:
    """Pan for PAN_STEPS × PAN_MS while measuring event-loop gaps (ms); ``during()`` starts work."""
    stamps: list[float] = []
    ticker = QTimer()
    ticker.setInterval(TICK_MS)
    ticker.timeout.connect(lambda: stamps.append(time.perf_counter()))
    cam = camera(viewer)
    start = np.asarray(cam.center, float)
    steps = {"n": 0}

    def pan() -> None:
        steps["n"] += 1
        offset = 120.0 * np.sin(steps["n"] / 12.0)  # µm, back and forth
        cam.center = tuple(start + np.array([0.0] * (len(start) - 1) + [offset]))

    panner = QTimer()
    panner.setInterval(PAN_MS)
    panner.timeout.connect(pan)
    ticker.start()
    panner.start()
    if during is not None:
        during()
    pump_until(lambda: steps["n"] >= PAN_STEPS)
    panner.stop()
    ticker.stop()
    cam.center = tuple(start)
    return list(np.diff(stamps) * 1000.0)


def one_run(encoder: str, cache: Path) -> dict:
    os.environ["NAPARI_VIRCHOW_CACHE"] = str(cache)
    viewer = napari.Viewer(show=True)
    viewer.window.resize(1200, 900)
    viewer.open(str(sample_path("cmu_small_region_pyramid.tif")), plugin="napari-virchow")
    widget = VirchowWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.encoder_combo.setCurrentText(encoder)
    widget.random_check.setChecked(True)
    widget.limit_spin.setValue(100_000)
    # pinned at 20×: the view's every missing tile is computed in one job, so the second job is a
    # true revisit (auto computes at most one budget of the view per job, and the rest on the next)
    widget.compute.mag_combo.setCurrentIndex(widget.compute.mag_combo.findData(0.5))
    layer = widget._slide_layer()
    cam = camera(viewer)
    cam.center = tuple(layer.data_to_world((1500, 1100)))
    cam.zoom = viewer.canvas.size[1] / (1400 * layer.scale[-1])  # ~1400 level-0 px across
    pump_until(lambda: True)
    for _ in range(50):
        QApplication.processEvents()
        time.sleep(0.01)
    session = widget.session()
    session.encoder()  # load the model before timing (loading is not what we measure)
    idle = record_gaps(viewer)

    t_cold = {}

    def start_compute() -> None:
        t_cold["t0"] = time.perf_counter()
        widget.compute_visible(force=True)

    busy = record_gaps(viewer, during=start_compute)
    pump_until(lambda: widget._worker is None)
    cold_s = time.perf_counter() - t_cold["t0"]
    tiles = int(session.store().n_done)

    calls = []
    real = session.encoder().embed_tensor
    session.encoder().embed_tensor = lambda x: calls.append(len(x)) or real(x)
    t0 = time.perf_counter()
    widget.compute_visible(force=True)
    pump_until(lambda: widget._worker is None)
    warm_s = time.perf_counter() - t0
    viewer.close()
    return {"idle": idle, "busy": busy, "tiles": tiles, "cold_s": cold_s, "warm_s": warm_s,
            "warm_encoder_calls": len(calls)}  # fmt: skip


def p95(gaps: list[float]) -> float:
    return float(np.percentile(gaps, 95))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", default="timm:vit_small_patch16_224")
    p.add_argument("--runs", type=int, default=3)
    a = p.parse_args()
    runs = []
    for i in range(a.runs):
        with tempfile.TemporaryDirectory() as tmp:
            runs.append(one_run(a.encoder, Path(tmp)))
        r = runs[-1]
        print(f"run {i + 1}: idle p95 {p95(r['idle']):.1f} ms, busy p95 {p95(r['busy']):.1f} ms, "
              f"{r['tiles']} tiles cold {r['cold_s']:.1f} s, warm {r['warm_s']:.3f} s")  # fmt: skip
    med = statistics.median
    idle_p95, busy_p95 = med(p95(r["idle"]) for r in runs), med(p95(r["busy"]) for r in runs)
    result = {
        "encoder": a.encoder,
        "runs": a.runs,
        "idle_p95_gap_ms": round(idle_p95, 1),
        "busy_p95_gap_ms": round(busy_p95, 1),
        "added_gap_ms": round(busy_p95 - idle_p95, 1),
        "idle_max_gap_ms": round(med(max(r["idle"]) for r in runs), 1),
        "busy_max_gap_ms": round(med(max(r["busy"]) for r in runs), 1),
        "tiles": int(med(r["tiles"] for r in runs)),
        "cold_s": round(med(r["cold_s"] for r in runs), 2),
        "warm_s": round(med(r["warm_s"] for r in runs), 3),
        "warm_encoder_calls": max(r["warm_encoder_calls"] for r in runs),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
