"""Encoder throughput (tiles/s) on this machine, fp32 vs bf16, random weights; MFU against a matmul.

    python benchmarks/bench_encoder.py [--device cpu] [--threads N] [--only NAME|mfu] [--compile] [--mfu-dtype auto]

Runs ``Encoder.embed`` on random uint8 224² tiles: one warm-up batch, then timed batches, for
``timm:vit_small_patch16_224`` (batch 8, 3 batches) and ``virchow2`` (batch 4, 2 batches: the
full ViT-H, ~12 s to initialise on 2 cores). Both precisions share one model (``with_dtype``), so
the ratio compares like with like. The whole run takes ~2-3 min on a 2-core CPU. Random weights
cost the same as real ones. The last printed line is a JSON object::

    {"device", "threads", "cpu_native_bf16", "torch", "timm",
     "results": [{"encoder", "dtype", "batch", "batches", "tiles_per_s", "s_per_tile"}],
     "bf16_speedup": {encoder: tiles/s bf16 / tiles/s fp32},
     "mfu_vs_matmul": {...}}

``mfu_vs_matmul`` (CPU): Virchow 2 in the precision ``load_encoder`` picks here by default
(``--mfu-dtype auto``: bf16 with weights cast once on a CPU with native bf16, fp32 on one without,
where bf16 is emulated and nobody runs it), batch 8, ``tiles/s × FLOPs per tile``
(:func:`vit_flops_per_tile`) ÷ the FLOP/s of a 4096² matmul in that dtype on the same threads,
measured interleaved with the encoder batches in the same run (the machine may be shared: the
ratio is what counts). In bf16 it also reports the bf16-autocast rate over fp32 weights (the path
before weights were cast) and the cosine of bf16 embeddings to fp32 ones. Goal: ≥ 0.7. About 2 min
on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from collections.abc import Callable

import numpy as np
import timm
import torch

from napari_virchow.models.encoder import Encoder, cpu_has_native_bf16, load_encoder
from napari_virchow.models.flops import vit_flops_per_tile
from napari_virchow.models.precision import resolve_dtype

#: (encoder, batch size, timed batches)
PLAN = [("timm:vit_small_patch16_224", 8, 3), ("virchow2", 4, 2)]


def tiles_per_s(enc: Encoder, tiles: np.ndarray, n_batches: int) -> float:
    enc.embed(tiles)  # warm-up: allocator, oneDNN kernel selection
    t = time.perf_counter()
    for _ in range(n_batches):
        enc.embed(tiles)
    return len(tiles) * n_batches / (time.perf_counter() - t)


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process's threads) of ``fn()``."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def matmul_flops(n: int = 4096, reps: int = 4, dtype: torch.dtype = torch.bfloat16) -> tuple[float, float, float]:
    """(FLOPs, wall s, CPU s) of ``reps`` square ``n``² matmuls in ``dtype`` (after one warm-up)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b

    def run() -> None:
        for _ in range(reps):
            a @ b

    return (2 * n**3 * reps, *_timed(run))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Smallest row-wise cosine similarity of ``a`` and ``b``."""
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())


def mfu_vs_matmul(device: str = "cpu", batch: int = 8, rounds: int = 3, compile: bool = False,
                  dtype: str = "auto") -> dict:  # fmt: skip
    """Virchow 2 tiles/s × FLOPs per tile ÷ matmul FLOP/s in the same dtype, measured interleaved.

    ``dtype``: ``"auto"`` (what :func:`load_encoder` runs here by default: bf16 on a CPU with
    native bf16, else fp32), ``"bf16"`` or ``"fp32"``.

    Each round times a matmul, then one encoder batch; the ratio is taken per round (both saw
    the same load) and the median reported, by wall time and by this process's CPU time (which
    other processes' load on a shared machine blurs least).
    """
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, size=(batch, 224, 224, 3), dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        t = time.perf_counter()
        fp32 = load_encoder("virchow2", "random", device=device, dtype="fp32")
        load_s = time.perf_counter() - t
    for block in fp32.model.blocks:  # layer-scale gammas start at 1e-5: open them, so the
        block.ls1.gamma.data.fill_(1.0)  # blocks matter to the cosine below (same FLOPs)
        block.ls2.gamma.data.fill_(1.0)
    reduced = resolve_dtype(dtype, fp32.device)
    if reduced not in (None, torch.bfloat16):
        raise SystemExit(f"--mfu-dtype {dtype}: the CPU MFU is measured in bf16 or fp32")
    # what load_encoder builds for that dtype: bf16 weights cast once on a CPU with native bf16
    enc = fp32 if reduced is None else fp32.with_dtype("bf16")
    mm_dtype = torch.float32 if reduced is None else torch.bfloat16
    flops = vit_flops_per_tile(enc.model, enc.spec.input_size)
    if compile:  # load_encoder(compile=True): inductor with freezing on a CPU (~5 min to compile on 2 cores)
        enc = Encoder(enc.spec, enc.model, device=enc.device, dtype=enc.dtype, weights_id=enc.weights_id,
                      weights_source=enc.weights_source, compile=True)  # fmt: skip
    t = time.perf_counter()
    enc.embed(tiles)  # warm-up: oneDNN kernel selection (and compiling)
    warmup_s = time.perf_counter() - t
    wall, cpu, rates, tflops = [], [], [], []
    for _ in range(rounds):  # interleaved: both see the same load from other processes
        mm_flops, mm_wall, mm_cpu = matmul_flops(dtype=mm_dtype)
        enc_wall, enc_cpu = _timed(lambda: enc.embed(tiles))
        rates.append(batch / enc_wall)
        tflops.append(mm_flops / mm_wall / 1e12)
        wall.append(batch * flops / enc_wall / (mm_flops / mm_wall))
        cpu.append(batch * flops / enc_cpu / (mm_flops / mm_cpu))
    peak = float(np.median(tflops)) * 1e12
    out = {
        "encoder": "virchow2",
        "dtype": "fp32" if reduced is None else "bf16",
        "cpu_native_bf16": cpu_has_native_bf16(),
        "weights_dtype": str(enc.input_dtype).removeprefix("torch."),
        "autocast": enc.autocast,
        "batch": batch,
        "rounds": rounds,
        "load_s": round(load_s, 1),
        "compiled": enc.compiled,
        "warmup_s": round(warmup_s, 1),
        "flops_per_tile": flops,
        "tiles_per_s": round(float(np.median(rates)), 3),
        "tiles_per_s_each": [round(r, 3) for r in rates],
        "matmul_tflops": round(peak / 1e12, 3),
        "matmul_tflops_each": [round(m, 3) for m in tflops],
        "bound_tiles_per_s": round(peak / flops, 3),
        "mfu_vs_matmul": round(float(np.median(wall)), 3),
        "mfu_vs_matmul_each": [round(r, 3) for r in wall],
        "mfu_vs_matmul_cpu_time": round(float(np.median(cpu)), 3),
        "goal": 0.7,
    }
    if reduced is not None:  # the same weights in fp32: the embeddings' agreement, and the autocast path
        few = tiles[:2]
        ref = fp32.embed(few)
        autocast = Encoder(fp32.spec, fp32.model, device=fp32.device, dtype=torch.bfloat16,
                           weights_id=fp32.weights_id, weights_source=fp32.weights_source)  # fmt: skip
        out["cosine_bf16_vs_fp32"] = round(cosine(enc.embed(few), ref), 5)
        out["cosine_autocast_vs_fp32"] = round(cosine(autocast.embed(few), ref), 5)
        mm_flops, mm_wall, _ = matmul_flops(dtype=torch.bfloat16)
        enc_wall, _ = _timed(lambda: autocast.embed(tiles))
        out["autocast_tiles_per_s"] = round(batch / enc_wall, 3)
        out["autocast_mfu_vs_matmul"] = round(batch * flops / enc_wall / (mm_flops / mm_wall), 3)
    print(out, flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--only", choices=[*(name for name, _, _ in PLAN), "mfu"], help="one encoder, or mfu")
    parser.add_argument("--compile", action="store_true", help="mfu with torch.compile (inductor, freezing)")
    parser.add_argument("--mfu-dtype", choices=["auto", "bf16", "fp32"], default="auto",
                        help="mfu precision; auto: what the encoder runs here (bf16 where native)")  # fmt: skip
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
    wants_mfu = args.device == "cpu" and args.only in (None, "mfu")
    mfu = mfu_vs_matmul(args.device, compile=args.compile, dtype=args.mfu_dtype) if wants_mfu else None
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
        "mfu_vs_matmul": mfu,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
