"""The embedding pyramid of a session: one store per magnification, view plans, refinement.

Real planted TIFF (2048² at 0.5 µm/px, 3 file levels), the tiny random Virchow 2, real zarr stores.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_virchow.config import SessionConfig
from napari_virchow.errors import VirchowError
from napari_virchow.models.specs import UntrainedMagnificationError
from napari_virchow.session import SlideSession
from napari_virchow.slides.synthetic import PlantedSource, Region, write_pyramid
from napari_virchow.store.cache import list_stores
from tests.conftest import PLANTED_SIZE, PLANTED_TISSUE

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


# Planted copies as large as one 10× tile or more, so that both 20× and 10× have several tiles mostly inside one.
BIG_PATTERNS = [Region((448, 448, 1344, 896), "planted"), Region((1344, 1344, 1792, 1792), "planted")]


@pytest.fixture(scope="module")
def big_planted_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The planted slide (same generator, tissue and size) with larger planted copies."""
    path = tmp_path_factory.mktemp("slides") / "big_planted.tif"
    return write_pyramid(path, PLANTED_SIZE, PLANTED_SIZE, PlantedSource([PLANTED_TISSUE, *BIG_PATTERNS]), mpp=0.5,
                         levels=3)  # fmt: skip


def _planted_truth(s: SlideSession, mpp: float) -> np.ndarray:
    """Per tile of level ``mpp``: whether its centre lies in a planted copy."""
    g = s.grid_at(mpp)
    centre = g.coords + g.tile_size_l0 / 2
    truth = np.zeros(len(g), bool)
    for x0, y0, x1, y1 in (r.box for r in BIG_PATTERNS):
        truth |= (centre[:, 0] > x0) & (centre[:, 0] < x1) & (centre[:, 1] > y0) & (centre[:, 1] < y1)
    return truth


def test_a_head_trained_at_two_magnifications_finds_the_planted_copies_at_each(big_planted_slide: Path,
                                                                              tmp_path: Path) -> None:  # fmt: skip
    from sklearn.metrics import roc_auc_score

    from napari_virchow.analysis.head_files import load_head, save_head
    from napari_virchow.analysis.heads import MultiScaleHead
    from napari_virchow.errors import HeadError

    square = lambda a, b, c, d: np.array([[a, b], [c, b], [c, d], [a, d]], float)  # noqa: E731
    polygons = [square(*r.box) for r in BIG_PATTERNS] + [square(256, 1100, 1000, 1792), square(1350, 256, 1792, 1000)]
    classes = ["tumour", "tumour", "normal", "normal"]
    with SlideSession(big_planted_slide, _config(tmp_path)) as s:
        assert set(s.annotated_levels(polygons, classes)) == {0.5, 1.0}  # 2 µm/px: too few tiles under them
        result = s.train_head_levels(polygons, classes)  # embeds what it needs
        head = result.head
        assert isinstance(head, MultiScaleHead) and head.mpps == (0.5, 1.0) and set(result.levels) == {0.5, 1.0}
        assert result.counts == result.levels[0.5] and result.levels[1.0]["tumour"] >= 2
        assert all(a is not None and a > 0.5 for a in head.cv_aucs.values())
        path = save_head(head, tmp_path / "head.safetensors")
        loaded = load_head(path, encoder="virchow2-tiny")
        assert isinstance(loaded, MultiScaleHead) and loaded.cv_aucs == head.cv_aucs
        for m in (0.5, 1.0):
            list(s.compute(mpp=m))  # every tissue tile of the level
            idx, emb = s.embedded(tissue_only=True, mpp=m)
            probe = loaded.for_mpp(m)
            assert probe.mpp == m
            np.testing.assert_allclose(probe.positive_proba(emb), head.probes[m].positive_proba(emb), atol=1e-6)
            truth = _planted_truth(s, m)[idx]
            assert truth.any() and not truth.all()
            auc = roc_auc_score(truth, probe.positive_proba(emb))
            assert auc >= 0.9, (m, auc)
        assert not np.allclose(loaded.for_mpp(0.5).weights, loaded.for_mpp(1.0).weights)  # one probe per level
        with pytest.raises(HeadError, match=r"2 µm/px \(it has 0.5, 1 µm/px\)"):
            loaded.for_mpp(2.0)
        # drawn at each level with that level's probe; at 2 µm/px (no probe) with the nearest one's, 1 µm/px
        s.set_head(loaded)
        list(s.compute(mpp=2.0))
        s.set_head(loaded)
        for m, probe_mpp in ((0.5, 0.5), (1.0, 1.0), (2.0, 1.0)):
            idx, emb = s.embedded(mpp=m)
            expected = loaded.for_mpp(probe_mpp).positive_proba(emb)
            np.testing.assert_allclose(s.probabilities[m][idx], expected, atol=1e-6)
        with pytest.raises(VirchowError, match=r"at 5× \(2 µm/px\) the annotations cover"):
            s.train_head_levels(polygons, classes, mpps=[1.0, 2.0])
