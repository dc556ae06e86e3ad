"""Pipeline efficiency: ``iter_embed`` end to end vs the encoder alone on the same tiles.

    python benchmarks/bench_pipeline.py [--tiles 300] [--repeats 3] [--encoder NAME] [--dtype fp32]

Builds (once, cached in benchmarks/_data/) a 6720² px pyramid of the sample's real tissue,
mirrored, and takes its first ``--tiles`` tissue tiles (row-major, as the CLI embeds a slide).
Default encoder: ``timm:vit_small_patch16_224`` in fp32 (random weights cost the same as real ones).
This machine is shared and its load swings within seconds, so runs of each mode minutes apart
compare poorly. Throughput is therefore measured *paired*, in one child process per repeat:

- ``encoder`` (encoder only): the same tiles read into memory first, then ``Encoder.embed`` on
  each batch of the pipeline's default size; only the embedding is timed.
- ``pipeline`` (end to end): ``iter_embed`` with default options and a fresh store (created,
  read, written, closed within the timed span), one ``next()`` per batch. The grid (thumbnail +
  tissue mask, built once per slide) is built before and reported as ``grid_s``.

batch k of one mode runs right after batch k of the other (alternating which goes first), so
load from other processes hits both alike. ``naive`` (read one tile, embed one tile, no store)
runs in its own child per repeat. Peak RSS (``ru_maxrss``) is measured once per mode in a child
running only that mode, whose timing is reported too (``standalone_efficiency``). Every child
warms the model up with one batch first (oneDNN picks kernels on the first call).

The last line is a JSON object: medians over repeats of ``encoder_only_tiles_per_s``,
``end_to_end_tiles_per_s``, ``efficiency`` (end to end / encoder only, per repeat),
``naive_loop_tiles_per_s``; ``peak_rss_mb`` (pipeline), ``encoder_only_peak_rss_mb``,
``rss_ratio``; the settings and the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "benchmarks" / "_data"
SIZE = 6720
MODES = ("paired", "naive", "encoder", "pipeline")


def slide_path() -> Path:
    path = DATA / f"tissue_{SIZE}.tif"
    if not path.exists():
        sys.path.insert(0, str(ROOT / "scripts"))
        from make_pyramid import make_tissue

        DATA.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.tif")
        make_tissue(tmp, SIZE, levels=3)
        tmp.rename(path)
    return path


def child(mode: str, path: Path, n_tiles: int, encoder_name: str, dtype: str) -> dict[str, float]:
    """One run of ``mode`` in this process: seconds per mode, tiles and this process's peak RSS."""
    from napari_virchow.inference import default_batch_size, iter_embed
    from napari_virchow.models.encoder import load_encoder
    from napari_virchow.slides.slide import Slide
    from napari_virchow.slides.tiling import TileGrid

    with warnings.catch_warnings():  # random weights are the point here
        warnings.simplefilter("ignore", UserWarning)
        enc = load_encoder(encoder_name, "random", device="cpu", dtype=dtype)
    slide = Slide(path)
    t = time.perf_counter()
    grid = TileGrid(slide, mpp=enc.spec.mpp, size=enc.spec.input_size)
    grid_s = time.perf_counter() - t
    if grid.n_tissue < n_tiles + 8:
        raise SystemExit(f"only {grid.n_tissue} tissue tiles; ask for fewer with --tiles")
    idx = grid.tissue_indices[:n_tiles]
    bs = default_batch_size(enc.device)
    enc.embed(grid.read_tiles(grid.tissue_indices[-bs:]))  # warm-up on tiles outside the run
    out = {"tiles": n_tiles, "grid_s": grid_s, "batch_size": bs, "dtype": str(enc.dtype)}
    with tempfile.TemporaryDirectory() as cache:
        run = iter_embed(slide, enc, grid, indices=idx, cache_root=cache)
        if mode == "paired":
            # Batch k of each mode back to back (alternating which goes first): load from other
            # processes hits both alike, which separate runs minutes apart cannot promise.
            tiles = grid.read_tiles(idx)
            t_enc = t_pipe = 0.0
            for k, i in enumerate(range(0, n_tiles, bs)):
                for which in ("enc", "pipe") if k % 2 else ("pipe", "enc"):
                    t = time.perf_counter()
                    _ = enc.embed(tiles[i : i + bs]) if which == "enc" else next(run)
                    dt = time.perf_counter() - t
                    t_enc, t_pipe = (t_enc + dt, t_pipe) if which == "enc" else (t_enc, t_pipe + dt)
            t = time.perf_counter()
            assert next(run, None) is None  # the generator's close-out (store close) counts too
            out.update(encoder_s=t_enc, pipeline_s=t_pipe + time.perf_counter() - t)
        elif mode == "encoder":
            tiles = grid.read_tiles(idx)
            t = time.perf_counter()
            for i in range(0, n_tiles, bs):
                enc.embed(tiles[i : i + bs])
            out["encoder_s"] = time.perf_counter() - t
        elif mode == "pipeline":
            t = time.perf_counter()
            assert sum(len(r.indices) for r in run) == n_tiles
            out["pipeline_s"] = time.perf_counter() - t
        else:
            t = time.perf_counter()
            for i in idx:
                enc.embed(grid.read_tile(int(i))[None])
            out["naive_s"] = time.perf_counter() - t
    out["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiles", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--encoder", default="timm:vit_small_patch16_224")
    parser.add_argument("--dtype", default="fp32", help="autocast dtype (fp32: the reference 81 ms/tile)")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    path = slide_path()
    if args.child:
        print(json.dumps(child(args.child, path, args.tiles, args.encoder, args.dtype)))
        return

    def spawn(mode: str) -> dict[str, float]:
        cmd = [sys.executable, __file__, "--child", mode, "--tiles", str(args.tiles),
               "--encoder", args.encoder, "--dtype", args.dtype]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"child {mode} failed:\n{proc.stderr[-3000:]}")
        out = proc.stdout
        run = json.loads(out.strip().splitlines()[-1])
        rates = {k[:-2]: round(run["tiles"] / v, 2) for k, v in run.items() if k.endswith("_s") and k != "grid_s"}
        print(f"{mode:8s} tiles/s {rates}  peak RSS {run['rss_mb']:.0f} MB", flush=True)
        return run

    load_before = os.getloadavg()[0]
    paired, naive = [], []
    for _ in range(args.repeats):
        paired.append(spawn("paired"))
        naive.append(spawn("naive"))
    alone = {mode: spawn(mode) for mode in ("encoder", "pipeline")}  # peak RSS, one mode each
    n = args.tiles
    enc_rate = statistics.median(n / r["encoder_s"] for r in paired)
    pipe_rate = statistics.median(n / r["pipeline_s"] for r in paired)
    rss_pipe, rss_enc = alone["pipeline"]["rss_mb"], alone["encoder"]["rss_mb"]
    summary = {
        "encoder": args.encoder,
        "tiles": n,
        "repeats": args.repeats,
        "batch_size": paired[0]["batch_size"],
        "dtype": paired[0]["dtype"],
        "encoder_only_tiles_per_s": round(enc_rate, 3),
        "end_to_end_tiles_per_s": round(pipe_rate, 3),
        "efficiency": round(statistics.median(r["encoder_s"] / r["pipeline_s"] for r in paired), 3),
        "efficiency_per_repeat": [round(r["encoder_s"] / r["pipeline_s"], 3) for r in paired],
        "naive_loop_tiles_per_s": round(statistics.median(n / r["naive_s"] for r in naive), 3),
        "peak_rss_mb": round(rss_pipe, 1),
        "encoder_only_peak_rss_mb": round(rss_enc, 1),
        "rss_ratio": round(rss_pipe / rss_enc, 3),
        "naive_peak_rss_mb": round(max(r["rss_mb"] for r in naive), 1),
        "standalone_efficiency": round(alone["encoder"]["encoder_s"] / alone["pipeline"]["pipeline_s"], 3),
        "grid_s": round(statistics.median(r["grid_s"] for r in paired), 3),
        "load_avg_before": round(load_before, 2),
        "load_avg_after": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
