"""The planted-block slide of the token-map tests and benchmark (slides/synthetic.write_planted_blocks)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_virchow.slides.slide import Slide
from napari_virchow.slides.synthetic import write_planted_blocks


def test_planted_blocks_have_sharp_edges_where_asked(tmp_path: Path) -> None:
    box = (101, 67, 301, 233)  # off every lattice
    path = write_planted_blocks(tmp_path / "b.tif", 448, [box], "solid", levels=2)
    with Slide(path) as slide:
        rgb = np.asarray(slide.read_region((0, 0), 0, (448, 448)))[..., :3].astype(int)
    purple = rgb[..., 1] < 100  # solid block green ~50, pink tissue ~150 (JPEG may blur a px or two)
    x0, y0, x1, y1 = box
    assert purple[y0 + 3 : y1 - 3, x0 + 3 : x1 - 3].all() and not purple[:, : x0 - 3].any()
    assert not purple[: y0 - 3].any() and not purple[y1 + 3 :].any() and not purple[:, x1 + 3 :].any()
    inner = rgb[y0 + 3 : y1 - 3, x0 + 3 : x1 - 3]
    # homogeneous at token scale: 14-px means vary little across the block
    means = inner[: 14 * 11, : 14 * 13].reshape(11, 14, 13, 14, 3).mean(axis=(1, 3))
    assert means.std(axis=(0, 1)).max() < 12


def test_planted_blocks_refuse_an_unknown_texture(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'solid' or 'planted'"):
        write_planted_blocks(tmp_path / "b.tif", 448, [(0, 0, 10, 10)], "dots")
