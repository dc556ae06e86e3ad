"""Slide fingerprint cost: first open (full content hash) and repeated open (memo) of a 2 GB slide.

    python benchmarks/bench_fingerprint.py [--gb 2] [--keep]

Writes (once) an uncompressed tiled RGB TIFF of about ``--gb`` GB under ``benchmarks/_data/``
(gitignored; random 512² tiles from a pool, so writing is I/O bound, not RNG bound), then with an
empty fingerprint memo:

- first open: ``Slide(path).fingerprint`` hashing every byte. Measured twice: "cold" after asking
  the kernel to drop the file's pages (``posix_fadvise(DONTNEED)``, no root needed), and "warm"
  with the file in the page cache (memo emptied again);
- repeated open: a fresh ``Slide(path)`` and its fingerprint, answered from the memo, median of 20
  (the fingerprint lookup alone, and the whole open).

The last printed line is a JSON object::

    {"file_gb", "threads", "first_open_s_per_gb_cold", "first_open_s_per_gb_warm",
     "repeat_fingerprint_ms", "repeat_open_ms", "goal": {...}}
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile

from napari_virchow.slides import fingerprint as fp_mod
from napari_virchow.slides.slide import Slide

DATA = Path(__file__).resolve().parent / "_data"
TILE = 512


def make_slide(gb: float) -> Path:
    side = int((gb * 1e9 / 3) ** 0.5) // TILE * TILE
    path = DATA / f"fingerprint_{side}.tif"
    if path.is_file():
        return path
    DATA.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    pool = rng.integers(0, 256, (64, TILE, TILE, 3), dtype=np.uint8)
    n = (side // TILE) ** 2
    tiles = (pool[i % len(pool)] for i in range(n))
    tmp = path.with_suffix(".tmp")
    tifffile.imwrite(tmp, tiles, shape=(side, side, 3), dtype=np.uint8, tile=(TILE, TILE), photometric="rgb",
                     resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")  # fmt: skip
    os.replace(tmp, path)
    return path


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def first_open(path: Path, memo: Path) -> float:
    shutil.rmtree(memo, ignore_errors=True)
    t = time.perf_counter()
    with Slide(path) as slide:
        slide.fingerprint  # noqa: B018 - the cost measured
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gb", type=float, default=2.0)
    parser.add_argument("--keep", action="store_true", help="keep the generated slide")
    args = parser.parse_args()
    path = make_slide(args.gb)
    size_gb = path.stat().st_size / 1e9
    memo = Path(tempfile.mkdtemp(prefix="nv-fp-memo-"))
    os.environ[fp_mod.ENV_MEMO] = str(memo)
    try:
        drop_cache(path)
        cold = first_open(path, memo)
        warm = first_open(path, memo)
        lookups, opens = [], []
        for _ in range(20):
            t0 = time.perf_counter()
            with Slide(path) as slide:
                t1 = time.perf_counter()
                slide.fingerprint  # noqa: B018
                t2 = time.perf_counter()
            lookups.append((t2 - t1) * 1e3)
            opens.append((t2 - t0) * 1e3)
    finally:
        shutil.rmtree(memo, ignore_errors=True)
        if not args.keep:
            path.unlink()
    result = {
        "file_gb": round(size_gb, 3),
        "threads": min(4, os.cpu_count() or 1),
        "first_open_s_per_gb_cold": round(cold / size_gb, 3),
        "first_open_s_per_gb_warm": round(warm / size_gb, 3),
        "repeat_fingerprint_ms": round(statistics.median(lookups), 3),
        "repeat_open_ms": round(statistics.median(opens), 3),
        "goal": {"first_open_s_per_gb": 2.0, "repeat_ms": 10.0},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
