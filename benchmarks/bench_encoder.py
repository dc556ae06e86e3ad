"""Encoder throughput (tiles/s) on this machine, fp32 vs bf16 autocast, random weights.

    python benchmarks/bench_encoder.py [--device cpu] [--threads N]

Runs ``Encoder.embed`` on random uint8 224² tiles: one warm-up batch, then timed batches, for
``timm:vit_small_patch16_224`` (batch 8, 3 batches) and ``virchow2`` (batch 4, 2 batches: the
full ViT-H, ~12 s to initialise on 2 cores). Both precisions share one model (``with_dtype``), so
the ratio compares like with like. The whole run takes ~2-3 min on a 2-core CPU. Random weights
cost the same as real ones. The last printed line is a JSON object::

    {"device", "threads", "cpu_native_bf16", "torch", "timm",
     "results": [{"encoder", "dtype", "batch", "batches", "tiles_per_s", "s_per_tile"}],
     "bf16_speedup": {encoder: tiles/s bf16 / tiles/s fp32}}
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings

import numpy as np
import timm
import torch

from napari_virchow.models.encoder import Encoder, cpu_has_native_bf16, load_encoder

#: (encoder, batch size, timed batches)
PLAN = [("timm:vit_small_patch16_224", 8, 3), ("virchow2", 4, 2)]


def tiles_per_s(enc: Encoder, tiles: np.ndarray, n_batches: int) -> float:
    enc.embed(tiles)  # warm-up: allocator, oneDNN kernel selection
    t = time.perf_counter()
    for _ in range(n_batches):
        enc.embed(tiles)
    return len(tiles) * n_batches / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--only", choices=[name for name, _, _ in PLAN], help="one encoder")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    results = []
    for name, batch, n_batches in PLAN:
        if args.only and name != args.only:
            continue
        with warnings.catch_warnings():  # random weights are the point here
            warnings.simplefilter("ignore", UserWarning)
            base = load_encoder(name, "random", device=args.device, dtype="fp32")
        tiles = rng.integers(0, 256, size=(batch, 224, 224, 3), dtype=np.uint8)
        for dtype in ("fp32", "bf16"):
            rate = tiles_per_s(base.with_dtype(dtype), tiles, n_batches)
            row = {
                "encoder": name,
                "dtype": dtype,
                "batch": batch,
                "batches": n_batches,
                "tiles_per_s": round(rate, 3),
                "s_per_tile": round(1 / rate, 3),
            }
            print(row, flush=True)
            results.append(row)
        del base
    speedup = {
        name: round(
            next(r["tiles_per_s"] for r in results if r["encoder"] == name and r["dtype"] == "bf16")
            / next(r["tiles_per_s"] for r in results if r["encoder"] == name and r["dtype"] == "fp32"),
            2,
        )
        for name in dict.fromkeys(r["encoder"] for r in results)
    }
    summary = {
        "device": args.device,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "results": results,
        "bf16_speedup": speedup,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
