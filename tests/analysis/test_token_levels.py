"""Token maps of a session at each magnification, the compressed store of a level, token clusters.

A planted slide (2240² at 0.5 µm/px) whose planted block has its edges on multiples of 28 level-0 px
and off the tile lattice of both 0.5 and 1.0 µm/px: every token cell of both levels is wholly inside
or wholly outside it, so the truth at token resolution is exact at either level. The block is dense
purple, homogeneous at 7 µm (the striped planted texture is not: a token on a light band looks like
tissue to the random-weights model, whose tokens see only their own patch; see bench_token_maps).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_virchow.analysis.heads import fit_head
from napari_virchow.analysis.rasters import tile_raster
from napari_virchow.analysis.token_levels import (
    summary,
    token_clusters,
    token_map,
    token_similarity_at,
    token_store,
    token_store_path,
)
from napari_virchow.config import SessionConfig
from napari_virchow.session import SlideSession
from napari_virchow.slides.synthetic import write_planted_blocks
from napari_virchow.store.cache import list_stores

pytestmark = pytest.mark.filterwarnings("ignore:.*random weights:UserWarning")

SIZE = 2240
BOX = (420, 476, 1764, 1820)  # x0, y0, x1, y1: multiples of 28, not of 224 or 448


@pytest.fixture(scope="module")
def slide28(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_planted_blocks(tmp_path_factory.mktemp("slides") / "box28.tif", SIZE, [BOX], "solid")


def _session(path: Path, cache: Path) -> SlideSession:
    return SlideSession(path, SessionConfig(encoder="virchow2-tiny", weights="random", device="cpu", dtype="fp32",
                                            batch_size=8, cache_root=cache))  # fmt: skip


def _head(s: SlideSession, mpp: float):
    """A probe at level ``mpp``: tiles wholly inside the box vs wholly outside it."""
    list(s.compute(indices=np.arange(len(s.grid_at(mpp))), mpp=mpp))
    idx, emb = s.embedded(mpp=mpp)
    g = s.grid_at(mpp)
    x, y, t = g.coords[idx, 0], g.coords[idx, 1], g.tile_size_l0
    inside = (x >= BOX[0]) & (x + t <= BOX[2]) & (y >= BOX[1]) & (y + t <= BOX[3])
    outside = (x + t <= BOX[0]) | (x >= BOX[2]) | (y + t <= BOX[1]) | (y >= BOX[3])
    keep = inside | outside
    return fit_head(emb[keep], inside[keep].astype(int), ["tissue", "tumour"], encoder="virchow2-tiny",
                    positive_class="tumour")  # fmt: skip


def _truth(raster) -> np.ndarray:
    """Whether each cell of ``raster`` (level-0 cell side ``raster.tile_size_l0``) lies in the box."""
    c = raster.tile_size_l0
    ox, oy = raster.origin_l0
    rows, cols = raster.data.shape
    cy, cx = oy + (np.arange(rows) + 0.5) * c, ox + (np.arange(cols) + 0.5) * c
    return ((cy[:, None] > BOX[1]) & (cy[:, None] < BOX[3])) & ((cx[None] > BOX[0]) & (cx[None] < BOX[2]))


def _accuracy(values: np.ndarray, truth: np.ndarray, dy: int = 0, dx: int = 0) -> float:
    shifted = np.roll(truth, (dy, dx), axis=(0, 1))
    return float(((values > 0.5) == shifted)[2:-2, 2:-2].mean())  # the roll's wrapped border left out


@pytest.mark.parametrize("mpp", [0.5, 1.0])
def test_token_map_at_each_magnification_is_aligned_with_the_slide(slide28: Path, tmp_path: Path, mpp: float) -> None:
    with _session(slide28, tmp_path) as s:
        head = _head(s, mpp)
        g = s.grid_at(mpp)
        idx = np.arange(len(g))
        r = token_map(s, head, idx, mpp=mpp)
        cell = g.tile_size_l0 / 16
        assert r.tile_size_l0 == cell == 14 * mpp / 0.5 and r.scale_um == pytest.approx(cell * 0.5)
        assert r.data.shape == (SIZE / cell, SIZE / cell) and r.origin_l0 == (0, 0)
        assert r.translate_um == pytest.approx(((cell - 1) / 2 * 0.5,) * 2)  # pixel-centre convention
        truth = _truth(r)
        acc = _accuracy(r.data, truth)
        # each token cell lies under its patch: one cell off in any direction is worse
        for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            assert acc > _accuracy(r.data, truth, dy, dx)
        # and it resolves the box edges the tile map of that level cannot (they are off its lattice)
        tile = tile_raster(head.positive_proba(s.read(idx, mpp=mpp)), g.coords, g.tile_size_l0, s.slide.dimensions,
                           mpp=0.5).data.repeat(16, 0).repeat(16, 1)  # fmt: skip
        assert acc > _accuracy(tile, truth) and acc > 0.9


def test_compressed_store_of_a_level_is_created_reopened_and_summarised(slide28: Path, tmp_path: Path) -> None:
    with _session(slide28, tmp_path) as s:
        assert token_store(s, 1.0) is None  # nothing without a sample: enabling it creates it
        head = _head(s, 1.0)
        idx = np.arange(len(s.grid_at(1.0)))
        store = token_store(s, 1.0, sample_tiles=idx, k=16)  # the PCA on the tiles of the first view
        assert store is not None and store.path == token_store_path(s, 1.0, 16) and store.attrs["mpp"] == 1.0
        assert token_store_path(s, 0.5, 16) != store.path  # one per lattice
        assert token_store(s, 1.0) is None and token_store_path(s, 1.0) != store.path  # and one per k
        exact = token_map(s, head, idx, mpp=1.0)
        via = token_map(s, head, idx, mpp=1.0, store=store)  # fills the store with every tile it computes
        info = summary(store)
        assert info.k == 16 and info.n_stored == len(idx) and 0.5 < info.explained_variance <= 1
        assert "k = 16" in info.text() and "explained variance" in info.text()
        again = token_store(s, 1.0, k=16)  # reopened, not refitted
        assert again is not None and summary(again).n_stored == len(idx)
        np.testing.assert_allclose(via.data, exact.data, atol=1e-6)  # computed tiles: exact tokens
        from_codes = token_map(s, head, idx, mpp=1.0, store=again)  # now from the k = 16 codes
        assert not np.array_equal(from_codes.data, exact.data)
        assert np.abs(from_codes.data - exact.data).mean() < 0.01
    assert sorted(st.mpp for st in list_stores(tmp_path)) == [1.0]  # the token folder is not listed as a store


def test_attributed_view_keeps_the_tile_means(slide28: Path, tmp_path: Path) -> None:
    with _session(slide28, tmp_path) as s:
        head = _head(s, 0.5)
        idx = np.arange(len(s.grid))
        plain = token_map(s, head, idx).data
        moved = token_map(s, head, idx, attributed=True).data
        logit = lambda p: np.log(p / (1 - p))  # noqa: E731
        mean = lambda a: logit(np.clip(a, 1e-6, 1 - 1e-6)).reshape(SIZE // 224, 16, SIZE // 224, 16).mean(axis=(1, 3))  # noqa: E731
        np.testing.assert_allclose(mean(moved), mean(plain), atol=2e-2)
        assert not np.allclose(moved, plain)


def test_token_clusters_and_similarity_find_the_block_not_the_tiles(slide28: Path, tmp_path: Path) -> None:
    with _session(slide28, tmp_path) as s:
        idx = np.arange(len(s.grid))
        tc = token_clusters(s, idx, 2)
        assert tc.raster.data.dtype == np.int32 and set(np.unique(tc.raster.data)) == {1, 2}
        assert sum(tc.counts.values()) == len(idx) * 256 and tc.mpp == 0.5
        truth = _truth(tc.raster)
        # one cluster is the block, at token resolution (also in tiles the block only partly covers)
        label_in = np.bincount(tc.raster.data[truth]).argmax()
        assert ((tc.raster.data == label_in) == truth).mean() > 0.9
        q = int(np.flatnonzero((s.grid.coords == (672, 672)).all(axis=1))[0])  # a tile wholly inside the box
        sim = token_similarity_at(s, q, idx).data
        assert sim[truth].mean() > sim[~truth].mean() + 0.1
