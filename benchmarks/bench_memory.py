"""Memory stays bounded while panning a huge slide and computing what is visible.

    xvfb-run -a python benchmarks/bench_memory.py [--size 50000] [--steps 40]

Builds (once, cached in benchmarks/_data/) a 50,000 × 50,000 px pyramidal JPEG slide, tile by
tile: white background with a diagonal band of the sample's real tissue, so it stays small on disk.
Then a headless viewer pans along the band for ``--steps`` views; at each one the widget computes
the visible tissue tiles with a tiny random ViT and waits for it. RSS is sampled throughout.
Prints a JSON object as its last line with ``rss_start_mb``, ``rss_peak_mb``, ``rss_end_mb``, the
slope of RSS over the second half (MB per step) and the tiles computed. Goals: peak − start <
1,500 MB, and no growth trend in the second half.

The same pan is also run without computing (``viewer_only``, a separate process): napari + vispy
on Mesa's software GL grow by themselves while panning (measured here: ~20 MB per view, with our
dask levels read alone staying flat), so ``plugin_added_*`` = with compute − viewer only is what
this plugin adds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def build_slide(path: Path, size: int) -> Path:
    """White slide with a diagonal band of real tissue (the sample, mirrored)."""
    from make_pyramid import sample_pixels

    from napari_virchow.slides.synthetic import SampleSource, write_pyramid

    rgb, mpp = sample_pixels()
    tissue = SampleSource(rgb)
    band = size // 20  # half-width of the band, level-0 px

    def source(x: int, y: int, w: int, h: int, ds: float) -> np.ndarray:
        # level-0 centre of this tile: inside the band → tissue, else background
        cx, cy = (x + w / 2) * ds, (y + h / 2) * ds
        if abs(cx - cy) > band + w * ds:
            return np.full((h, w, 3), 255, np.uint8)
        return tissue(x, y, w, h, ds)

    return write_pyramid(path, size, size, source, mpp=mpp, levels=5, downsample=4)


def compare(argv: list[str]) -> None:
    """Run the pan with and without computing, each in a fresh process, and compare."""
    import subprocess

    runs = {}
    for mode, extra in (("compute", []), ("viewer_only", ["--no-compute"])):
        out = subprocess.run([sys.executable, __file__, "--single", *argv, *extra], capture_output=True, text=True)
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
        if out.returncode or not lines:
            raise SystemExit(f"{mode} run failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
        runs[mode] = json.loads(lines[-1])
        print(f"{mode}: {lines[-1]}")
    c, v = runs["compute"], runs["viewer_only"]
    result = {**c, "viewer_only": v,
              "plugin_added_peak_mb": round(c["peak_minus_start_mb"] - v["peak_minus_start_mb"], 1),
              "plugin_added_slope_mb_per_step": round(c["second_half_slope_mb_per_step"]
                                                      - v["second_half_slope_mb_per_step"], 2)}  # fmt: skip
    print(json.dumps(result))


def main() -> None:
    if "--single" not in sys.argv:
        compare(sys.argv[1:])
        return
    sys.argv.remove("--single")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=50_000)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--encoder", default="virchow2-tiny")
    p.add_argument("--no-compute", action="store_true", help="pan only: napari's own memory, for comparison")
    p.add_argument("--napari-cache-mb", type=float, default=256.0,
                   help="napari's opportunistic dask cache (its default is 25%% of RAM, which would "
                        "dominate RSS here); -1 keeps napari's default")  # fmt: skip
    a = p.parse_args()
    data = ROOT / "benchmarks" / "_data"
    data.mkdir(parents=True, exist_ok=True)
    slide_path = data / f"band_{a.size}.tif"
    if not slide_path.exists():
        t = time.perf_counter()
        build_slide(slide_path, a.size)
        print(f"built {slide_path.name}: {slide_path.stat().st_size / 1e6:.0f} MB in {time.perf_counter() - t:.0f} s")

    import napari
    from qtpy.QtWidgets import QApplication

    from napari_virchow._qt.viewport import camera
    from napari_virchow._qt.widget import VirchowWidget

    if a.napari_cache_mb >= 0:
        from napari.utils import resize_dask_cache

        resize_dask_cache(int(a.napari_cache_mb * 1e6))
    proc = psutil.Process()
    samples: list[tuple[float, float]] = []
    stop = threading.Event()

    def sampler() -> None:
        while not stop.is_set():
            samples.append((time.perf_counter(), proc.memory_info().rss / 1e6))
            time.sleep(0.05)

    with tempfile.TemporaryDirectory() as cache:
        os.environ["NAPARI_VIRCHOW_CACHE"] = cache
        viewer = napari.Viewer(show=True)
        viewer.window.resize(1200, 900)
        viewer.open(str(slide_path), plugin="napari-virchow")
        widget = VirchowWidget(viewer)
        viewer.window.add_dock_widget(widget)
        widget.encoder_combo.setCurrentText(a.encoder)
        widget.random_check.setChecked(True)
        widget.limit_spin.setValue(100_000)
        layer = widget._slide_layer()
        cam = camera(viewer)
        span = 2500  # level-0 px across the view: ~120 tiles of 224 px at 0.5 µm/px
        widget.session().encoder()  # model loaded before the baseline
        QApplication.processEvents()
        rss_start = proc.memory_info().rss / 1e6
        threading.Thread(target=sampler, daemon=True).start()
        per_step: list[float] = []
        for step in range(a.steps):
            t = (step + 0.5) / a.steps
            x = y = a.size * (0.05 + 0.9 * t)
            cam.center = tuple(layer.data_to_world((y, x)))
            cam.zoom = viewer.canvas.size[1] / (span * float(np.asarray(layer.scale)[-1]))
            for _ in range(5):
                QApplication.processEvents()
            if not a.no_compute:
                widget.compute_visible(force=True)
            for _ in range(20):  # let napari load and paint the view
                QApplication.processEvents()
                time.sleep(0.005)
            while widget._worker is not None:
                QApplication.processEvents()
                time.sleep(0.005)
            per_step.append(proc.memory_info().rss / 1e6)
            print(f"step {step + 1}/{a.steps}: {widget.session().store().n_done} tiles, rss {per_step[-1]:.0f} MB")
        stop.set()
        tiles = int(widget.session().store().n_done)
        widget.session().close()
        viewer.close()
    half = per_step[len(per_step) // 2 :]
    slope = float(np.polyfit(np.arange(len(half)), half, 1)[0]) if len(half) > 1 else 0.0
    peak = max([r for _, r in samples] + per_step)
    print(json.dumps({
        "slide_px": a.size, "steps": a.steps, "tiles": tiles, "napari_dask_cache_mb": a.napari_cache_mb,
        "rss_start_mb": round(rss_start, 1), "rss_peak_mb": round(peak, 1), "rss_end_mb": round(per_step[-1], 1),
        "peak_minus_start_mb": round(peak - rss_start, 1),
        "second_half_slope_mb_per_step": round(slope, 2),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
