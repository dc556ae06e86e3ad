"""benchmarks/bench_gpu.py: its pure helpers, and a clean skip where there is no CUDA."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "bench_gpu.py"
_spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
assert _spec is not None and _spec.loader is not None
bench_gpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_gpu)


def test_peak_is_matched_on_the_most_specific_device_name() -> None:
    assert bench_gpu.peak_tflops("NVIDIA H200") == (989.4, "H200")
    assert bench_gpu.peak_tflops("NVIDIA H100 PCIe") == (756.0, "H100 PCIe")
    assert bench_gpu.peak_tflops("NVIDIA H100 80GB HBM3") == (989.4, "H100")
    assert bench_gpu.peak_tflops("NVIDIA A100-SXM4-80GB") == (312.0, "A100")
    assert bench_gpu.peak_tflops("NVIDIA L4") == (121.0, "L4")
    assert bench_gpu.peak_tflops("NVIDIA L40S") == (362.1, "L40S")
    assert bench_gpu.peak_tflops("Some Future GPU")[0] is None
    assert bench_gpu.peak_tflops("NVIDIA H200", override=500.0) == (500.0, "--peak-tflops")


def test_mfu_is_achieved_flops_over_peak() -> None:
    assert bench_gpu.mfu(1000.0, 0.34e12, 989.4) == pytest.approx(340 / 989.4)
    assert bench_gpu.mfu(1000.0, 0.34e12, None) is None


def test_view_bbox_is_a_centred_screen_at_20x() -> None:
    assert bench_gpu.view_bbox((8192, 8192), 0.5) == (3136.0, 3556.0, 5056.0, 4636.0)  # 1920×1080 px of 0.5 µm
    x0, y0, x1, y1 = bench_gpu.view_bbox((16384, 16384), 0.25)  # 40×: twice the level-0 px
    assert (x1 - x0, y1 - y0) == (3840.0, 2160.0)
    assert bench_gpu.view_bbox((1000, 800), 0.5) == (0.0, 0.0, 1000.0, 800.0)  # clipped to the slide


def test_batch_sizes_parse_and_refuse_nonsense() -> None:
    assert bench_gpu.parse_batches("32, 64,256") == [32, 64, 256]
    for bad in ("", "0,32", "-1"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench_gpu.parse_batches(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: the benchmark would run")
def test_without_cuda_the_benchmark_skips_with_json() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout.strip().splitlines()[-1]) == {"skipped": "no CUDA"}
    assert "no CUDA" in run.stderr


@pytest.mark.timeout(120)
def test_sections_run_end_to_end_on_cpu_with_the_tiny_model(tmp_path: Path) -> None:
    # The GPU run cannot happen here: its code paths run on the CPU, small, so a GPU run fails
    # only for GPU reasons.
    import warnings

    from napari_virchow.models.encoder import load_encoder

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        enc = load_encoder("virchow2-tiny", "random", device="cpu", dtype="fp32")
    out = bench_gpu.bench_encoder(enc, [2], peak=1e-6, timed=1)  # a tiny "peak": MFU > 0 after rounding
    assert [(r["dtype"], r["batch"]) for r in out["results"]] == [("fp16", 2), ("bf16", 2)]
    assert all(r["tiles_per_s"] > 0 and r["mfu"] > 0 for r in out["results"])
    assert set(out["cosine_vs_fp32"]) == {"fp16", "bf16"}
    path = bench_gpu.build_slide(tmp_path, 1792)
    feed = bench_gpu.bench_feed(path, batch=8, n_batches=2, device="cpu")
    assert feed["gpu_decode_1_threads_tiles_per_s"] > 0 and feed["cpu_decode_1_threads_tiles_per_s"] > 0
    run = bench_gpu.bench_pipeline(path, enc, tmp_path / "cache", batch=8)
    assert run["tiles"] > 0 and run["feed_tiles_per_s"] > 0 and run["encoder_tiles_per_s"] > 0
    view = bench_gpu.bench_viewport(path, tmp_path / "cache2", "cpu", encoder="virchow2-tiny")
    assert view["tiles"] > 0 and view["cold_s"] > 0 and view["bbox_l0"] == [0, 356, 1792, 1436]
