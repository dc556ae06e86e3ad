"""Reader throughput, the way napari reads: view-sized blocks of level 0, each fetched once.

    python benchmarks/bench_reader.py [--size 16384] [--blocks 24]

Builds (once, cached in benchmarks/_data/) a synthetic pyramidal tiled-JPEG slide of the sample's
real tissue, then reads the same 2048 × 1024 px blocks at fixed random positions three ways:
OpenSlide's ``read_region`` in a single-thread loop of 256² regions, our dask level 0, and a raw
decode of the stored tiles (pread + imagecodecs: the limit on this CPU). Median of 3 repeats, each
with fresh handles so no cache carries over. Prints a JSON object as its last line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import imagecodecs
import numpy as np
import openslide
import tifffile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from make_pyramid import make_tissue  # noqa: E402

from napari_virchow.slides.slide import Slide  # noqa: E402

BLOCK_W, BLOCK_H, TILE = 2048, 1024, 256


def blocks_for(size: int, n: int) -> list[tuple[int, int]]:
    rng = np.random.default_rng(42)
    return [(int(rng.integers(0, size - BLOCK_W)), int(rng.integers(0, size - BLOCK_H))) for _ in range(n)]


def openslide_loop(path: Path, blocks: list[tuple[int, int]]) -> float:
    osr = openslide.OpenSlide(str(path))
    t = time.perf_counter()
    for x, y in blocks:
        for ty in range(y, y + BLOCK_H, TILE):
            for tx in range(x, x + BLOCK_W, TILE):
                np.asarray(osr.read_region((tx, ty), 0, (TILE, TILE)))
    dt = time.perf_counter() - t
    osr.close()
    return dt


def dask_level0(path: Path, blocks: list[tuple[int, int]]) -> float:
    with Slide(path) as slide:
        level = slide.levels[0]
        t = time.perf_counter()
        for x, y in blocks:
            np.asarray(level[y : y + BLOCK_H, x : x + BLOCK_W])
        return time.perf_counter() - t


def raw_decode(path: Path, blocks: list[tuple[int, int]]) -> tuple[float, int]:
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        offsets, counts, tables = page.dataoffsets, page.databytecounts, page.jpegtables
        cols = -(-page.imagewidth // page.tilewidth)
    fd = os.open(path, os.O_RDONLY)
    decoded = 0
    t = time.perf_counter()
    for x, y in blocks:
        for r in range(y // TILE, (y + BLOCK_H - 1) // TILE + 1):
            for c in range(x // TILE, (x + BLOCK_W - 1) // TILE + 1):
                i = r * cols + c
                imagecodecs.jpeg_decode(os.pread(fd, counts[i], offsets[i]), tables=tables)
                decoded += 1
    dt = time.perf_counter() - t
    os.close(fd)
    return dt, decoded


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=16384)
    p.add_argument("--blocks", type=int, default=24)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    data = ROOT / "benchmarks" / "_data"
    data.mkdir(parents=True, exist_ok=True)
    path = data / f"tissue_{a.size}.tif"
    if not path.exists():
        t = time.perf_counter()
        make_tissue(path, a.size, levels=4)
        print(f"built {path.name} ({path.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t:.0f} s")
    blocks = blocks_for(a.size, a.blocks)
    tiles = len(blocks) * BLOCK_W * BLOCK_H / TILE**2  # in 256² tile equivalents

    os_t = statistics.median(openslide_loop(path, blocks) for _ in range(a.repeats))
    dk_t = statistics.median(dask_level0(path, blocks) for _ in range(a.repeats))
    raw = [raw_decode(path, blocks) for _ in range(a.repeats)]
    raw_t = statistics.median(r[0] for r in raw)
    result = {
        "slide_px": a.size,
        "blocks": len(blocks),
        "block_px": [BLOCK_W, BLOCK_H],
        "openslide_loop_tiles_per_s": round(tiles / os_t, 1),
        "dask_level0_tiles_per_s": round(tiles / dk_t, 1),
        "tifffile_decode_tiles_per_s": round(raw[0][1] / raw_t, 1),
        "ratio_vs_openslide": round(os_t / dk_t, 2),
        "ratio_decode_vs_openslide": round((raw[0][1] / raw_t) / (tiles / os_t), 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
