"""Overlays end at the slide's edge: a partial edge tile's cell is split and cut there (clip_to_slide)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_virchow.analysis.rasters import clip_to_slide, labels_raster, tile_raster, upsample
from napari_virchow.analysis.token_rasters import token_raster

T = 224
MPP = 0.5


def grid(cols: int, rows: int, origin: tuple[int, int] = (0, 0)) -> np.ndarray:
    i = np.arange(cols * rows)
    return np.stack([origin[0] + (i % cols) * T, origin[1] + (i // cols) * T], axis=1)


def world_to_index(px: np.ndarray, translate: float, scale: float) -> np.ndarray:
    """napari's mapping of level-0 pixel centres (slide layer at scale mpp) to raster indices."""
    return np.floor((px * MPP - translate) / scale + 0.5).astype(int)


def drawn_edge_um(data: np.ndarray, translate: float, scale: float, axis: int) -> float:
    """World µm where the last drawn cell along ``axis`` ends."""
    drawn = np.isfinite(data) if data.dtype.kind == "f" else data != 0
    last = np.flatnonzero(drawn.any(axis=1 - axis)).max()
    return translate + (last + 0.5) * scale


@pytest.mark.parametrize(("right", "bottom", "split"), [(42, 0, 8), (112, 0, 2), (42, 56, 8), (0, 168, 4)])
def test_edge_cells_end_at_the_slide_edge(right: int, bottom: int, split: int) -> None:
    cols, rows = 3 + (right > 0), 2 + (bottom > 0)
    width, height = 3 * T + right, 2 * T + bottom
    values = np.arange(1.0, cols * rows + 1)
    r = tile_raster(values, grid(cols, rows), T, (width, height), mpp=MPP)
    assert r.data.shape == (rows, cols) and r.slide_l0 == (width, height)
    c = clip_to_slide(r)
    assert c.data.shape == (rows * split, cols * split) and c.scale_um == pytest.approx(r.scale_um / split)
    half = c.scale_um / 2
    for axis, extent in ((0, height), (1, width)):
        # the drawn overlay ends within half a sub-cell of the slide's edge (exactly where it falls on one)
        edge = drawn_edge_um(c.data, c.translate_um[axis], c.scale_um, axis)
        assert abs(edge - (extent - 0.5) * MPP) <= half + 1e-9
        if (right, bottom)[1 - axis] * split % T == 0:
            assert edge == pytest.approx((extent - 0.5) * MPP)
    # every slide pixel further than half a sub-cell from the edge shows its own tile's value
    ys = np.arange(0, height - int(half / MPP))
    xs = np.arange(0, width - int(half / MPP))
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    shown = c.data[world_to_index(yy, c.translate_um[0], c.scale_um), world_to_index(xx, c.translate_um[1], c.scale_um)]
    np.testing.assert_array_equal(shown, values[(yy // T) * cols + xx // T])
    # and nothing is drawn more than half a sub-cell past it
    far = c.data[:, world_to_index(np.array(width + half / MPP + 1), c.translate_um[1], c.scale_um):]
    assert np.isnan(far).all()


def test_a_raster_inside_the_slide_is_returned_as_is() -> None:
    r = tile_raster(np.ones(6), grid(3, 2), T, (3 * T, 2 * T), mpp=MPP)
    assert clip_to_slide(r) is r
    bare = tile_raster(np.ones(8), grid(4, 2), T, (3 * T + 10, 2 * T), mpp=MPP)
    from dataclasses import replace

    assert clip_to_slide(replace(bare, slide_l0=None)).data.shape == (2, 4)  # slide size unknown: not clipped


def test_labels_become_background_and_rgba_transparent_past_the_edge() -> None:
    width = 3 * T + 112
    lab = clip_to_slide(labels_raster(np.arange(1, 9), grid(4, 2), T, (width, 2 * T), mpp=MPP))
    assert lab.data.dtype == np.int32 and lab.data.shape == (4, 8)
    assert (lab.data[:, 7] == 0).all() and (lab.data[:2, 6] == 4).all() and (lab.data[2:, 6] == 8).all()
    rgba = np.tile(np.array([[0.2, 0.4, 0.6, 1.0]], np.float32), (8, 1))
    col = clip_to_slide(tile_raster(rgba, grid(4, 2), T, (width, 2 * T), mpp=MPP))
    assert col.data.shape == (4, 8, 4)
    assert (col.data[:, 7, 3] == 0).all() and (col.data[:, :7, 3] == 1).all()


def test_upsampled_and_large_rasters_split_less() -> None:
    width = 3 * T + 42
    r = tile_raster(np.ones(8), grid(4, 2), T, (width, 2 * T), mpp=MPP)
    up = clip_to_slide(upsample(r, 4, smooth=None))  # cells of 56 px (28 µm): the 42-px edge cuts at 3/4 of one
    assert up.data.shape == (8 * 2, 16 * 2)  # split 2×: 14-µm sub-cells are fine enough
    assert abs(drawn_edge_um(up.data, up.translate_um[1], up.scale_um, 1) - (width - 0.5) * MPP) <= up.scale_um / 2
    fine = upsample(r, 8, smooth=None)  # cells of 28 px = 14 µm (the viewer's embedded outlines): not split
    assert clip_to_slide(fine).data.shape == fine.data.shape
    capped = clip_to_slide(r, max_pixels=8 * 9)
    assert capped.data.shape == (6, 12)  # 3 × 3 split: the most that fits 72 pixels
    assert abs(drawn_edge_um(capped.data, capped.translate_um[1], capped.scale_um, 1)
               - (width - 0.5) * MPP) <= capped.scale_um / 2  # fmt: skip


def test_token_cells_past_the_edge_are_hidden() -> None:
    width = 3 * T + 42  # three 14-px token cells of the last tile column lie on the slide
    coords = grid(4, 1)
    tok = token_raster(np.ones((4, 16, 16), np.float32), coords, T, mpp=MPP, slide_l0=(width, T))
    clipped = clip_to_slide(tok)
    assert clipped.data.shape == tok.data.shape  # the edge falls on a token cell boundary: no split
    assert np.isfinite(clipped.data[:, : 3 * 16 + 3]).all() and np.isnan(clipped.data[:, 3 * 16 + 3 :]).all()
    assert np.isfinite(tok.data).all()  # the raster given is left untouched
