"""The embedding pyramid of a session: one store per magnification, view plans, refinement.

Real planted TIFF (2048² at 0.5 µm/px, 3 file levels), the tiny random Virchow 2, real zarr stores.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_virchow.config import SessionConfig
from napari_virchow.models.specs import UntrainedMagnificationError
from napari_virchow.session import SlideSession
from napari_virchow.store.cache import list_stores
from tests.conftest import PLANTED_SIZE

pytestmark = pytest.mark.filterwarnings("ignore:.*random weights:UserWarning", "ignore:.*opted in:UserWarning")

WHOLE = (0, 0, PLANTED_SIZE, PLANTED_SIZE)


def _config(cache: Path, **kw: object) -> SessionConfig:
    return SessionConfig(encoder="virchow2-tiny", weights="random", device="cpu", dtype="fp32", batch_size=8,
                         cache_root=cache, **kw)  # type: ignore[arg-type]  # fmt: skip


def test_levels_offered_are_the_trained_ones_the_slide_gives_without_upsampling(planted_slide: Path,
                                                                               tmp_path: Path) -> None:  # fmt: skip
    with SlideSession(planted_slide, _config(tmp_path)) as s:
        assert s.mpps == (0.5, 1.0, 2.0)  # 0.25 would upsample a 0.5 µm/px scan
        assert s.default_mpp == 0.5 and s.grid_at() is s.grid and s.grid_at(0.5) is s.grid
        assert s.grid_at(2.0).tile_size_l0 == 896 and s.grid_at(1.0).tile_size_l0 == 448


def test_one_store_per_magnification_and_the_default_api_unchanged(planted_slide: Path, tmp_path: Path) -> None:
    with SlideSession(planted_slide, _config(tmp_path)) as s:
        coarse = list(s.compute(mpp=2.0))
        g2 = s.grid_at(2.0)
        assert coarse and coarse[-1].n_done == g2.n_tissue
        assert s.store_key(2.0).mpp == 2.0 and s.store(mpp=2.0).attrs["mpp_trained"] is True
        # the default level is untouched: nothing stored there yet
        assert len(s.missing(s.grid.tissue_indices)) == s.grid.n_tissue
        assert s.computed_mpps() == (2.0,)
        list(s.compute(WHOLE))  # the historic call: 0.5 µm/px
        assert s.store_key().mpp == 0.5 and not len(s.missing(s.grid.tissue_indices))
        assert s.computed_mpps() == (0.5, 2.0)
        idx, emb = s.embedded(mpp=2.0)
        assert set(idx.tolist()) == set(g2.tissue_indices.tolist()) and emb.shape == (len(idx), 96)
    assert sorted(st.mpp for st in list_stores(tmp_path)) == [0.5, 2.0]


def test_an_untrained_magnification_needs_the_opt_in_and_is_recorded(planted_slide: Path, tmp_path: Path) -> None:
    with SlideSession(planted_slide, _config(tmp_path)) as s:
        with pytest.raises(UntrainedMagnificationError, match="0.7 µm/px"):
            list(s.compute(mpp=0.7))
        assert not list_stores(tmp_path)  # refused before anything was created
        list(s.compute(indices=[0, 1], mpp=0.7, allow_untrained=True))
        attrs = s.store(mpp=0.7).attrs
        assert attrs["mpp_trained"] is False and attrs["trained_mpps"] == [0.25, 0.5, 1.0, 2.0]
    with SlideSession(planted_slide, _config(tmp_path, allow_untrained_mpp=True)) as s:
        assert s.check_mpp(0.7) is False  # the config's opt-in


def test_whole_slide_view_picks_a_coarse_level_and_zooming_in_refines(planted_slide: Path, tmp_path: Path) -> None:
    with SlideSession(planted_slide, _config(tmp_path)) as s:
        canvas = (896, 448)  # 8 canvas tiles: budget 16
        whole = s.plan_view(WHOLE, canvas)
        assert whole.mpp == 1.0 and whole.fits  # 0.5 has 49 tissue tiles in view, 1.0 has 16
        assert len(list(s.compute_view(whole))) > 0
        done_coarse = s.done_at(1.0).copy()
        assert not list(s.compute_view(whole))  # seen before: nothing recomputed
        zoom = s.plan_view((512, 512, 1024, 1024), canvas)
        assert zoom.mpp == 0.5 and 1.0 in zoom.underneath
        todo = s.view_todo(zoom)
        assert len(todo) and not np.isin(todo, np.flatnonzero(s.done_at(0.5))).any()
        list(s.compute_view(zoom))
        assert np.array_equal(s.done_at(1.0), done_coarse)  # the coarser level stays as it was
        assert not len(s.view_todo(zoom))
        pinned = s.plan_view(WHOLE, canvas, pinned=2.0)
        assert pinned.mpp == 2.0 and pinned.pinned


def test_overlays_are_drawn_from_the_finest_level_at_each_place_aligned_in_um(planted_slide: Path,
                                                                             tmp_path: Path) -> None:  # fmt: skip
    from napari_virchow.analysis.heads import fit_head
    from napari_virchow.analysis.lod_rasters import cell_at_um

    with SlideSession(planted_slide, _config(tmp_path)) as s:
        list(s.compute(mpp=2.0))  # whole tissue at 5×
        list(s.compute((448, 448, 1344, 1344), mpp=1.0))  # a region at 10×
        list(s.compute((448, 448, 896, 896), mpp=0.5))  # a smaller one at 20×
        idx, emb = s.embedded(mpp=0.5)
        labels = np.where(np.arange(len(idx)) % 2 == 0, "a", "b")  # any real probe will do: we test placement
        head = fit_head(emb, labels, encoder="virchow2-tiny", weights_id=s.weights_id)
        s.set_head(head)
        assert set(s.probabilities) == {0.5, 1.0, 2.0}
        raster = s.heatmap()
        mpp = s.slide.require_mpp()
        # a point under each level's region: the value drawn is that of the finest level computed there
        for (x, y), level in (((600, 600), 0.5), ((1200, 1200), 1.0), ((1700, 300), 2.0)):
            i = s.grid_at(level).index_at(x, y)
            assert i is not None and s.done_at(level)[i]
            for finer in (m for m in (0.5, 1.0) if m < level):
                j = s.grid_at(finer).index_at(x, y)
                assert j is None or not s.done_at(finer)[j]
            cell = cell_at_um(raster, y * mpp, x * mpp)
            assert cell is not None
            assert raster.data[cell] == pytest.approx(s.probabilities[level][i], abs=1e-6), (x, y, level)
        # clusters and similarity belong to the level they were asked at
        clusters = s.set_clusters(2, mpp=2.0)
        assert clusters.mpp == 2.0 and len(clusters.labels) == len(s.grid_at(2.0))
        q = s.query_indices(1700, 300, mpp=2.0)
        sim = s.set_query(q, mpp=2.0)
        assert s.query_mpp == 2.0 and len(sim) == len(s.grid_at(2.0)) and sim[q[0]] == pytest.approx(1.0, abs=1e-5)
        sim_raster = s.overlay_raster("similarity")
        cell = cell_at_um(sim_raster, 300 * mpp, 1700 * mpp)
        assert sim_raster.scale_um == pytest.approx(896 * mpp) and sim_raster.data[cell] == pytest.approx(1.0, abs=1e-5)
        # a new batch at 5× updates the 5× overlays; one at 20× leaves the 5× clusters alone
        changed = s.absorb(q, s.read(q, mpp=2.0), mpp=2.0)
        assert set(changed) == {"probability", "clusters", "similarity"}
        assert s.absorb(idx[:1], emb[:1], mpp=0.5) == ["probability"]
