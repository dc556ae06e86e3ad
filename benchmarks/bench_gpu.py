"""GPU figures in one short run (< 5 min): Virchow 2 throughput and MFU, feed rate, viewport latency.

    python benchmarks/bench_gpu.py [--device cuda] [--batches 32,64,128,256] [--peak-tflops X]

Without CUDA it prints why on stderr and ``{"skipped": "no CUDA"}`` on stdout, and exits 0.
With random weights (cost the same as real ones):

- ``encoder``: Virchow 2, fp16 and bf16 autocast (fp32 weights shared), at each batch size:
  tiles/s of ``Encoder.embed`` on uint8 tiles already on the GPU (preprocessing included), and
  MFU = tiles/s × FLOPs per tile (:func:`vit_flops_per_tile`) ÷ the device's dense fp16/bf16
  peak (:data:`PEAK_TFLOPS`, matched on the device name; ``--peak-tflops`` overrides; the value
  assumed is printed and in the JSON). Also the cosine of fp16/bf16 embeddings to fp32 ones.
- ``feed``: a synthetic 20× JPEG pyramid (0.5 µm/px, 256² tiles, levels /1 /4 /16) written with
  :func:`~napari_virchow.slides.synthetic.write_pyramid`; tiles/s the pipeline's readers deliver
  with ``TileGrid(decode_device="cuda")`` and with CPU decoding; then one ``iter_embed`` run
  in fp16 with its ``BatchResult`` feed and encoder rates and the seconds the encoder waited;
  ``pipeline_40x`` the same on a 40× slide (0.25 µm/px), whose 448² tiles the GPU resamples.
- ``viewport``: a 1920×1080 view at 20× (one screen px = 0.5 µm) at the slide's centre through
  ``SlideSession.compute``: cold (nothing stored; the grid is built first, as the viewer does on
  open) and warm (all stored: the call plus reading the view's embeddings).

The last printed line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from napari_virchow.models.encoder import Encoder

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: dense (no sparsity) fp16/bf16 tensor-core peaks in TFLOP/s, by a name fragment (vendor sheets)
PEAK_TFLOPS: dict[str, float] = {
    "H200": 989.4,
    "H100 SXM": 989.4,
    "H100 PCIe": 756.0,
    "H100": 989.4,
    "GH200": 989.4,
    "B200": 2250.0,
    "A100": 312.0,
    "L40S": 362.1,
    "L4": 121.0,
    "A10G": 125.0,
    "A10": 125.0,
    "V100": 125.0,
    "T4": 65.0,
    "RTX 4090": 165.2,
    "RTX 3090": 71.0,
}
SCREEN = (1920, 1080)  # px of the view
VIEW_MPP = 0.5  # µm per screen px: 20×


def peak_tflops(device_name: str, override: float | None = None) -> tuple[float | None, str]:
    """(dense fp16/bf16 peak TFLOP/s, what it was matched on) for a CUDA device name."""
    if override is not None:
        return float(override), "--peak-tflops"
    name = device_name.upper()
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):  # most specific first ("H100 PCIe" before "H100")
        if key.upper() in name:
            return PEAK_TFLOPS[key], key
    return None, "unknown device: pass --peak-tflops"


def mfu(tiles_per_s: float, flops_per_tile: float, peak: float | None) -> float | None:
    """Model-FLOP utilisation: achieved FLOP/s ÷ ``peak`` TFLOP/s (None without a peak)."""
    if not peak:
        return None
    return tiles_per_s * flops_per_tile / (peak * 1e12)


def view_bbox(
    slide_size: tuple[int, int], slide_mpp: float, screen: tuple[int, int] = SCREEN, view_mpp: float = VIEW_MPP
) -> tuple[float, float, float, float]:
    """Level-0 (x0, y0, x1, y1) of a ``screen``-px view at ``view_mpp`` µm/px centred on the slide,
    clipped to it."""
    w, h = slide_size
    vw, vh = (s * view_mpp / slide_mpp for s in screen)
    cx, cy = w / 2, h / 2
    return (max(0.0, cx - vw / 2), max(0.0, cy - vh / 2), min(float(w), cx + vw / 2), min(float(h), cy + vh / 2))


def parse_batches(text: str) -> list[int]:
    """``"32,64"`` -> ``[32, 64]``; each a positive int."""
    sizes = [int(t) for t in text.split(",") if t.strip()]
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes are positive ints, got {text!r}")
    return sizes


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())


def bench_encoder(enc: Encoder, batches: list[int], peak: float | None, timed: int = 3) -> dict[str, Any]:
    """tiles/s and MFU per precision and batch size, on uint8 tiles already on the device."""
    import torch

    from napari_virchow.models.flops import vit_flops_per_tile

    flops = vit_flops_per_tile(enc.model, enc.spec.input_size)
    rng = np.random.default_rng(0)
    host = rng.integers(0, 256, (max(batches), 224, 224, 3), dtype=np.uint8)
    tiles = torch.from_numpy(host).to(enc.device)
    ref = enc.with_dtype("fp32").embed(tiles[:8])
    rows, cosines = [], {}
    for dtype in ("fp16", "bf16"):
        low = enc.with_dtype(dtype)
        cosines[dtype] = round(_cosine(low.embed(tiles[:8]), ref), 5)
        for n in batches:
            x = tiles[:n]
            low.embed(x)  # warm-up: cuBLAS / SDPA kernel selection for this shape
            if enc.device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(timed):
                low.embed(x)  # returns host arrays: synchronised
            rate = n * timed / (time.perf_counter() - t)
            util = mfu(rate, flops, peak)
            row = {"dtype": dtype, "batch": n, "tiles_per_s": round(rate, 1),
                   "mfu": None if util is None else round(util, 3)}  # fmt: skip
            print(row, flush=True)
            rows.append(row)
    return {"flops_per_tile": flops, "results": rows, "cosine_vs_fp32": cosines}


def build_slide(folder: Path, side: int, magnification: int = 20) -> Path:
    """A 20× (0.5 µm/px) or 40× (0.25) JPEG pyramid, tissue everywhere but a margin: ``side``² px, levels /1 /4 /16."""
    from napari_virchow.slides.synthetic import PlantedSource, Region, write_pyramid

    margin = side // 16
    regions = [Region((margin, margin, side - margin, side - margin), "tissue")]
    return write_pyramid(folder / f"gpu_{magnification}x.tif", side, side, PlantedSource(regions),
                         mpp=10 / magnification, levels=3, downsample=4, tile=256, quality=90,
                         magnification=magnification)  # fmt: skip


def bench_feed(path: Path, batch: int, n_batches: int, device: str) -> dict[str, Any]:
    """Tiles/s the pipeline's readers deliver, GPU decode vs CPU decode (a fresh slide each)."""
    from napari_virchow.batching import FeedStats, resolve_readers, tile_batches
    from napari_virchow.slides.slide import Slide
    from napari_virchow.slides.tiling import TileGrid

    readers = resolve_readers("auto", device)
    out: dict[str, Any] = {"readers": readers, "batch": batch}
    for label, decode in (("gpu_decode", device), ("cpu_decode", None)):
        for threads in sorted({1, readers}):
            with Slide(path) as slide:
                grid = TileGrid(slide, decode_device=decode)
                idx = grid.tissue_indices[: batch * n_batches]
                stats = FeedStats(threads)
                chunks = [idx[i : i + batch] for i in range(0, len(idx), batch)]
                t = time.perf_counter()
                n = sum(len(tiles) for _, tiles in tile_batches(grid, chunks, threads, None, stats))
                out[f"{label}_{threads}_threads_tiles_per_s"] = round(n / (time.perf_counter() - t), 1)
    return out


def bench_pipeline(path: Path, enc: Encoder, cache: Path, batch: int) -> dict[str, Any]:
    """One iter_embed run over the slide's tissue: its last BatchResult's rates."""
    from napari_virchow.inference import iter_embed
    from napari_virchow.slides.slide import Slide
    from napari_virchow.slides.tiling import TileGrid

    with Slide(path) as slide:
        grid = TileGrid(slide, decode_device=str(enc.device))
        last = list(iter_embed(slide, enc, grid, cache_root=cache, batch_size=batch))[-1]
    return {
        "tiles": last.n_computed,
        "tiles_per_s": round(last.tiles_per_s, 1),
        "feed_tiles_per_s": round(last.feed_tiles_per_s, 1),
        "encoder_tiles_per_s": round(last.encoder_tiles_per_s, 1),
        "feed_wait_s": round(last.feed_wait_s, 3),
        "elapsed_s": round(last.elapsed, 2),
    }


def bench_viewport(path: Path, cache: Path, device: str, encoder: str = "virchow2") -> dict[str, Any]:
    """A 1920×1080 view at 20× through SlideSession.compute: cold, then warm."""
    from napari_virchow.config import SessionConfig
    from napari_virchow.session import SlideSession

    config = SessionConfig(encoder=encoder, weights="random", device=device, dtype="auto", cache_root=cache)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        session = SlideSession(path, config)
        session.encoder()  # loaded (shared with the encoder benchmark through the encoder cache)
    try:
        grid = session.grid  # built on open in the viewer
        bbox = view_bbox(session.slide.dimensions, session.slide.require_mpp())
        t = time.perf_counter()
        n = sum(len(b.indices) for b in session.compute(bbox))
        cold = time.perf_counter() - t
        t = time.perf_counter()
        list(session.compute(bbox))
        session.read(grid.tiles_in(bbox))
        warm = time.perf_counter() - t
    finally:
        session.close()
    return {"view_px": list(SCREEN), "view_mpp": VIEW_MPP, "bbox_l0": [round(v) for v in bbox],
            "tiles": n, "cold_s": round(cold, 3), "warm_s": round(warm, 4)}  # fmt: skip


def main() -> int:
    """Run every section; the last printed line is JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batches", type=parse_batches, default=[32, 64, 128, 256])
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense fp16/bf16 peak of the device")
    parser.add_argument("--side", type=int, default=8192, help="level-0 px of the synthetic 20× slide")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here; skipped", file=sys.stderr)
        print(json.dumps({"skipped": "no CUDA"}))
        return 0
    from napari_virchow.encoder_cache import get_encoder

    t0 = time.perf_counter()
    name = torch.cuda.get_device_name(args.device)
    peak, matched = peak_tflops(name, args.peak_tflops)
    print(f"bench_gpu: {name}; assumed dense fp16/bf16 peak {peak} TFLOP/s ({matched})", flush=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        enc = get_encoder("virchow2", weights="random", device=args.device, dtype="auto")
    summary: dict[str, Any] = {
        "device": name, "peak_tflops": peak, "peak_matched": matched, "torch": torch.__version__,
        "load_s": round(time.perf_counter() - t0, 1), "auto_dtype": str(enc.dtype).removeprefix("torch."),
    }  # fmt: skip
    summary["encoder"] = bench_encoder(enc, args.batches, peak)
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        folder = Path(tmp)
        t = time.perf_counter()
        path = build_slide(folder, args.side)
        summary["slide"] = {"side": args.side, "mpp": 0.5, "write_s": round(time.perf_counter() - t, 1)}
        summary["feed"] = bench_feed(path, batch=128, n_batches=8, device=args.device)
        summary["pipeline"] = bench_pipeline(path, enc, folder / "cache_pipeline", batch=128)
        # a 40× slide: 448² tiles read, resampled on the GPU (the readers only read and decode)
        path40 = build_slide(folder, 2 * args.side, magnification=40)  # as many tiles as the 20× slide
        summary["pipeline_40x"] = bench_pipeline(path40, enc, folder / "cache_pipeline_40x", batch=128)
        summary["viewport"] = bench_viewport(path, folder / "cache_viewport", args.device)
    summary["total_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
