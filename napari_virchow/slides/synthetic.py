"""Write pyramidal tiled-JPEG TIFFs that OpenSlide and this package read, tile by tile.

Used to build ``sample_data/cmu_small_region_pyramid.tif`` from the real sample, and synthetic
slides of any size for tests and benchmarks (``scripts/make_pyramid.py`` is the command line).
Tiles are generated on demand, so a 50,000 × 50,000 px slide never exists in memory.

A *source* is a callable ``source(x, y, w, h, downsample) -> (h, w, 3) uint8`` returning the
pixels of the level with that downsample, ``(x, y)`` being that level's pixel coordinates.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

__all__ = ["PlantedSource", "Region", "SampleSource", "Source", "write_planted_blocks", "write_pyramid"]

Source = Callable[[int, int, int, int, float], np.ndarray]


def write_pyramid(
    path: str | Path,
    width: int,
    height: int,
    source: Source,
    *,
    mpp: float | None = 0.5,
    levels: int = 3,
    downsample: int = 2,
    tile: int = 256,
    quality: int = 90,
    magnification: float | None = None,
) -> Path:
    """Write a tiled JPEG pyramid, one top-level page per level, levels marked reduced.

    Parameters
    ----------
    path
        Output ``.tif``.
    width, height
        Level-0 size in pixels.
    source
        Pixel source (see module docstring).
    mpp
        µm/px of level 0, stored as a CENTIMETER resolution (what OpenSlide reads);
        ``None`` writes no resolution (a slide that needs an override).
    levels, downsample
        Number of levels and the factor between consecutive levels.
    tile, quality
        Tile edge in pixels (multiple of 16) and JPEG quality.
    magnification
        Objective power written into the description (e.g. 20), optional.
    """
    path = Path(path)
    description = f"napari-virchow synthetic pyramid|MPP = {mpp}" + (
        f"|AppMag = {magnification}" if magnification else ""
    )
    with tifffile.TiffWriter(path, bigtiff=width * height > 2**31) as tw:
        for level in range(levels):
            ds = downsample**level
            w, h = max(width // ds, 1), max(height // ds, 1)
            extra: dict[str, Any] = {}
            if mpp is not None:
                res = 1e4 / (mpp * ds)
                extra = {"resolution": (res, res), "resolutionunit": "CENTIMETER"}
            tw.write(
                _tiles(source, w, h, ds, tile),
                shape=(h, w, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                photometric="rgb",
                compression="jpeg",
                compressionargs={"level": quality},
                subfiletype=1 if level else 0,
                description=description if level == 0 else None,
                metadata=None,
                **extra,
            )
    return path


def _tiles(source: Source, w: int, h: int, ds: float, tile: int) -> Iterator[np.ndarray]:
    for y in range(0, h, tile):
        for x in range(0, w, tile):
            out = np.full((tile, tile, 3), 255, np.uint8)
            th, tw = min(tile, h - y), min(tile, w - x)
            out[:th, :tw] = source(x, y, tw, th, ds)
            yield out


def _downscale(rgb: np.ndarray, factor: int) -> np.ndarray:
    h, w = rgb.shape[0] // factor * factor, rgb.shape[1] // factor * factor
    blocks = rgb[:h, :w].reshape(h // factor, factor, w // factor, factor, 3)
    return (blocks.mean(axis=(1, 3)) + 0.5).astype(np.uint8)


class SampleSource:
    """Real tissue: an RGB image repeated by mirroring to fill any slide size."""

    def __init__(self, rgb: np.ndarray, *, mirror: bool = True) -> None:
        self._base = np.ascontiguousarray(rgb[..., :3])
        self._mirror = mirror
        self._scaled: dict[int, np.ndarray] = {1: self._base}

    def _at(self, ds: float) -> np.ndarray:
        factor = max(int(round(ds)), 1)
        if factor not in self._scaled:
            self._scaled[factor] = _downscale(self._base, factor)
        return self._scaled[factor]

    def __call__(self, x: int, y: int, w: int, h: int, ds: float) -> np.ndarray:
        """RGB pixels of the ``w`` × ``h`` block at ``(x, y)`` of the level with downsample ``ds``."""
        img = self._at(ds)
        ih, iw = img.shape[:2]
        ys, xs = np.arange(y, y + h), np.arange(x, x + w)
        if self._mirror:
            ys, xs = _mirror_index(ys, ih), _mirror_index(xs, iw)
        else:  # outside the image is background
            out = np.full((h, w, 3), 255, np.uint8)
            vy, vx = ys[ys < ih], xs[xs < iw]
            out[: vy.size, : vx.size] = img[np.ix_(vy, vx)]
            return out
        return img[np.ix_(ys, xs)]


def _mirror_index(idx: np.ndarray, n: int) -> np.ndarray:
    m = idx % (2 * n)
    return np.where(m < n, m, 2 * n - 1 - m)


@dataclass(frozen=True)
class Region:
    """A rectangle of one texture, in level-0 pixels: ``(x0, y0, x1, y1)``."""

    box: tuple[int, int, int, int]
    kind: str = "tissue"  # "tissue" (pink, eosin-like), "planted" (purple stripes) or "solid" (dense purple)


@dataclass
class PlantedSource:
    """Procedural slide: white background, textured tissue rectangles, planted patterns.

    Textures are functions of level-0 coordinates, so every level shows the same layout and
    tests know exactly where tissue and planted patterns are.
    """

    regions: Sequence[Region] = field(default_factory=list)
    seed: int = 0

    def __call__(self, x: int, y: int, w: int, h: int, ds: float) -> np.ndarray:
        """RGB pixels of the ``w`` × ``h`` block at ``(x, y)`` of the level with downsample ``ds``."""
        gy, gx = np.mgrid[y : y + h, x : x + w].astype(np.float32) * ds  # level-0 coordinates
        out = np.full((h, w, 3), 255, np.float32)
        for region in self.regions:
            x0, y0, x1, y1 = region.box
            inside = (gx >= x0) & (gx < x1) & (gy >= y0) & (gy < y1)
            if not inside.any():
                continue
            out[inside] = self._texture(region.kind, gx[inside], gy[inside])
        return np.clip(out, 0, 255).astype(np.uint8)

    def _texture(self, kind: str, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
        # smooth deterministic "noise" from incommensurate sines: same pixels at every level
        n = (np.sin(gx * 0.071 + self.seed) * np.cos(gy * 0.053) + np.sin((gx + gy) * 0.031)) * 0.5
        if kind == "planted":  # dark purple nuclei-like stripes: unmistakable for an encoder
            stripes = (np.sin(gx * 0.35) > 0.2) | (np.sin(gy * 0.35) > 0.6)
            base = np.where(stripes[:, None], [[70, 30, 120]], [[200, 150, 210]])
            return base + n[:, None] * 15
        if kind == "solid":  # dense purple, homogeneous at 7 µm (a 14-px token anywhere looks the same)
            return np.array([[110, 50, 150]], np.float32) + n[:, None] * 15
        base = np.array([[225, 150, 185]], np.float32)  # eosin pink
        return base + n[:, None] * np.array([[25, 35, 25]], np.float32)


def write_planted_blocks(
    path: str | Path,
    size: int,
    boxes: Sequence[tuple[int, int, int, int]],
    kind: str = "solid",
    *,
    mpp: float = 0.5,
    levels: int = 3,
    quality: int = 90,
) -> Path:
    """A ``size`` × ``size`` slide of pink tissue everywhere with sharp-edged rectangles of ``kind``.

    The planted-block slide of the token-map tests and ``benchmarks/bench_token_maps.py``: ``boxes``
    are level-0 ``(x0, y0, x1, y1)`` (pixels ``x0 .. x1 - 1``), ``kind`` ``"solid"`` (homogeneous
    at 7 µm) or ``"planted"`` (stripes of 18-px period).
    """
    if kind not in ("solid", "planted"):
        raise ValueError(f"kind must be 'solid' or 'planted', got {kind!r}")
    blocks = [Region((int(x0), int(y0), int(x1), int(y1)), kind) for x0, y0, x1, y1 in boxes]
    source = PlantedSource([Region((0, 0, size, size), "tissue"), *blocks])
    return write_pyramid(path, size, size, source, mpp=mpp, levels=levels, quality=quality)
