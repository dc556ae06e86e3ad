"""Make pyramidal tiled-JPEG TIFFs: the committed sample pyramid, or synthetic slides of any size.

    python scripts/make_pyramid.py sample                      # sample_data/cmu_small_region_pyramid.tif
    python scripts/make_pyramid.py tissue OUT.tif --size 16384 # the sample's tissue, mirrored
    python scripts/make_pyramid.py planted OUT.tif --size 50000

Tiles are generated one at a time, so very large slides stay small in memory.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from napari_virchow.slides.slide import Slide
from napari_virchow.slides.synthetic import PlantedSource, Region, SampleSource, write_pyramid

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_SVS = ROOT / "sample_data" / "cmu_small_region.svs"
SAMPLE_PYRAMID = ROOT / "sample_data" / "cmu_small_region_pyramid.tif"


def sample_pixels() -> tuple[np.ndarray, float]:
    """Level 0 of the real sample slide and its µm/px."""
    with Slide(SAMPLE_SVS) as slide:
        return np.asarray(slide.levels[0].compute()), slide.require_mpp()


def make_sample(out: Path = SAMPLE_PYRAMID) -> Path:
    """The committed 3-level pyramid made from the real sample (same pixels at level 0, JPEG q90)."""
    rgb, mpp = sample_pixels()
    h, w = rgb.shape[:2]
    return write_pyramid(out, w, h, SampleSource(rgb, mirror=False), mpp=mpp, levels=3,
                         tile=256, quality=90, magnification=20)  # fmt: skip


def make_tissue(out: Path, size: int, levels: int) -> Path:
    """A ``size`` × ``size`` slide of the sample's tissue, mirrored (benchmarks)."""
    rgb, mpp = sample_pixels()
    return write_pyramid(out, size, size, SampleSource(rgb), mpp=mpp, levels=levels, magnification=20)


def make_planted(out: Path, size: int, levels: int) -> Path:
    """A ``size`` × ``size`` procedural slide: a tissue band with planted patterns."""
    t = size // 8
    regions = [Region((t, t, size - t, size - t), "tissue")]
    regions += [Region((x, y, x + t // 2, y + t // 2), "planted") for x, y in [(2 * t, 2 * t), (5 * t, 5 * t)]]
    return write_pyramid(out, size, size, PlantedSource(regions), mpp=0.5, levels=levels)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=["sample", "tissue", "planted"])
    p.add_argument("out", nargs="?", type=Path)
    p.add_argument("--size", type=int, default=16384, help="level-0 width and height in pixels")
    p.add_argument("--levels", type=int, default=4)
    a = p.parse_args()
    if a.kind == "sample":
        print(make_sample(a.out or SAMPLE_PYRAMID))
    elif a.out is None:
        p.error("OUT is required for synthetic slides")
    else:
        print((make_tissue if a.kind == "tissue" else make_planted)(a.out, a.size, a.levels))


if __name__ == "__main__":
    main()
