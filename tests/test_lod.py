"""Level-of-detail planning: view → magnification → tiles, and refinement that never recomputes.

Planning needs only the slide's size and µm/px (a 65536² description, no pixels); where tiles,
tissue and stores matter, a real synthetic pyramid, real TileGrids and real zarr stores are used.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from napari_virchow.errors import SlideError
from napari_virchow.lod import ViewPlan, canvas_tiles, plan_view, usable_mpps, view_box
from napari_virchow.lod_pyramid import LodPyramid, missing_from_done, missing_from_stores
from napari_virchow.models.specs import get_spec
from napari_virchow.slides.lattice import Lattice, SlideGeometry
from napari_virchow.slides.slide import Slide
from napari_virchow.slides.tiling import TileGrid
from napari_virchow.store.embeddings import EmbeddingStore
from napari_virchow.stores import store_key

V2 = (0.25, 0.5, 1.0, 2.0)
BIG = SlideGeometry(65536, 65536, 0.25)  # a 16 mm slide scanned at 40×
CANVAS = (1600, 1000)
CENTRE = (32768.0, 32768.0)


def plan_at(um_per_px: float, **kw: object) -> ViewPlan:
    return plan_view(BIG, view_box(BIG, CENTRE, um_per_px, CANVAS), CANVAS, V2, **kw)  # type: ignore[arg-type]


# --- choosing the magnification --------------------------------------------------------------


@pytest.mark.parametrize(
    ("um_per_screen_px", "expected"),
    [(16.384, 2.0), (2.0, 2.0), (1.0, 1.0), (0.5, 0.5), (0.25, 0.25)],
    ids=["whole-slide", "5x", "10x", "20x", "40x"],
)
def test_magnification_chosen_per_zoom(um_per_screen_px: float, expected: float) -> None:
    plan = plan_at(um_per_screen_px)
    assert plan.mpp == expected
    assert len(plan.tiles) <= plan.budget == 2 * canvas_tiles(CANVAS) == 56
    assert plan.fits == (um_per_screen_px != 16.384)  # only the whole-slide view is over budget


def test_whole_slide_view_keeps_the_coarsest_level_and_caps_the_tiles() -> None:
    plan = plan_at(16.384)
    # ceil(65536 / t)² tiles, partial edge tiles included: about 1/16 of 20× at 5×
    assert plan.counts == {0.25: 293**2, 0.5: 147**2, 1.0: 74**2, 2.0: 37**2}
    assert plan.truncated and len(plan.tiles) == plan.budget and not plan.underneath
    # the capped tiles are the ones nearest the view's centre
    lat = Lattice.at(BIG, 2.0)
    centres = lat.coords[plan.in_view] + lat.tile_size_l0 / 2
    dist = np.hypot(*(centres - np.array(CENTRE)).T)
    assert dist[: plan.budget].max() <= dist[plan.budget :].min()


def test_chosen_level_is_the_finest_that_fits() -> None:
    rng = np.random.default_rng(0)
    for _ in range(40):
        s = float(np.exp(rng.uniform(np.log(0.2), np.log(20))))
        centre = (float(rng.uniform(0, 65536)), float(rng.uniform(0, 65536)))
        plan = plan_view(BIG, view_box(BIG, centre, s, CANVAS), CANVAS, V2)
        finer = [m for m in V2 if m < plan.mpp]
        for m in finer:  # every finer level was examined and is over budget
            assert plan.counts[m] > plan.budget
        assert plan.fits or plan.mpp == max(V2)
        assert len(plan.tiles) <= plan.budget


def test_a_magnification_between_levels_rounds_to_the_coarser() -> None:
    assert plan_at(0.7).mpp == 1.0  # 0.5 µm/px would need more than the budget


def test_pinned_magnification_is_always_used() -> None:
    plan = plan_at(16.384, pinned=0.5)
    assert (plan.mpp, plan.pinned, plan.fits) == (0.5, True, False)
    assert len(plan.tiles) == plan.budget and len(plan.in_view) == 147**2
    assert set(plan.underneath) == {1.0, 2.0}


def test_budget_can_be_set() -> None:
    assert plan_at(0.5, budget=1000).mpp == 0.25
    with pytest.raises(ValueError, match="budget"):
        plan_at(0.5, budget=0)


def test_coarser_levels_cover_the_view_underneath() -> None:
    plan = plan_at(0.25)
    assert plan.levels == (2.0, 1.0, 0.5, 0.25)
    box = plan.bbox
    for m, idx in plan.underneath.items():
        lat = Lattice.at(BIG, m)
        xy = lat.coords[idx]
        t = lat.tile_size_l0
        assert xy[:, 0].min() <= box[0] and xy[:, 0].max() + t >= box[2]  # the view is covered
        assert xy[:, 1].min() <= box[1] and xy[:, 1].max() + t >= box[3]
        assert np.all((xy[:, 0] < box[2]) & (xy[:, 0] + t > box[0]))  # and nothing outside it


def test_levels_the_slide_cannot_give_are_skipped() -> None:
    assert usable_mpps(SlideGeometry(50000, 40000, 0.5), V2) == (0.5, 1.0, 2.0)  # 0.25 would upsample
    assert usable_mpps(SlideGeometry(50000, 40000, 0.2527), V2) == V2
    assert usable_mpps(SlideGeometry(800, 800, 0.5), V2) == (0.5, 1.0)  # no whole tile at 2.0
    geo = SlideGeometry(50000, 40000, 0.5)
    assert plan_view(geo, (0, 0, 500, 500), CANVAS, V2).mpp == 0.5
    with pytest.raises(SlideError, match="pick a coarser"):
        plan_view(geo, (0, 0, 500, 500), CANVAS, V2, pinned=0.25)


def test_a_slide_coarser_than_every_level_is_refused() -> None:
    with pytest.raises(SlideError, match=r"4 µm/px.*0.25, 0.5, 1, 2 µm/px"):
        plan_view(SlideGeometry(5000, 5000, 4.0), (0, 0, 5000, 5000), CANVAS, V2)


def test_view_outside_the_slide_plans_nothing() -> None:
    plan = plan_view(BIG, (70000, 70000, 80000, 80000), CANVAS, V2)
    assert plan.mpp == 0.25 and len(plan.tiles) == 0 and plan.fits


@pytest.mark.parametrize("bad", [(0, 1000), (-5, 5), (float("nan"), 10)])
def test_bad_canvas_is_refused(bad: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="canvas size"):
        canvas_tiles(bad)


def test_canvas_tiles_counts_whole_tiles() -> None:
    assert canvas_tiles((1600, 1000)) == 28 and canvas_tiles((1920, 1080)) == 32 and canvas_tiles((100, 50)) == 1


def test_geometry_validates() -> None:
    with pytest.raises(ValueError, match="µm/px"):
        SlideGeometry(100, 100, 0.0)
    with pytest.raises(ValueError, match="size"):
        SlideGeometry(0, 100, 0.5)


# --- TileGrid's lattice is the planner's -------------------------------------------------------


@pytest.mark.parametrize("mpp", [0.5, 1.0, 2.0])
def test_tilegrid_uses_the_one_lattice(planted_slide: Path, mpp: float) -> None:
    """The planner's lattice (no pixels) is the grid's: same object value, coords and tiles_in."""
    rng = np.random.default_rng(1)
    with Slide(planted_slide) as slide:
        grid = TileGrid(slide, mpp=mpp)
        lat = Lattice.at(SlideGeometry.of(slide), mpp)
        assert grid.lattice == lat and len(lat) == len(grid) and grid.grid_shape == (lat.rows, lat.cols)
        np.testing.assert_array_equal(lat.coords, grid.coords)
        for _ in range(20):
            x0, y0 = rng.uniform(-200, 2048, 2)
            box = (x0, y0, x0 + rng.uniform(1, 1500), y0 + rng.uniform(1, 1500))
            np.testing.assert_array_equal(lat.tiles_in(box, grid.tissue), grid.tiles_in(box))
            np.testing.assert_array_equal(lat.tiles_in(box), grid.tiles_in(box, tissue_only=False))


# --- refinement over real grids and stores ----------------------------------------------------


def test_pyramid_plans_tissue_tiles_of_each_levels_grid(planted_slide: Path) -> None:
    with Slide(planted_slide) as slide:
        pyr = LodPyramid.for_spec(slide, get_spec("virchow2-tiny"))
        assert pyr.mpps == (0.5, 1.0, 2.0)  # the 0.5 µm/px slide cannot give 0.25
        box = (0.0, 0.0, 2048.0, 2048.0)
        plan = pyr.plan_view(box, (448, 448))  # 4 canvas tiles, budget 8
        assert plan.mpp == 2.0 and plan.budget == 8
        np.testing.assert_array_equal(plan.in_view, pyr.grid(2.0).tiles_in(box))
        zoomed = pyr.plan_view((900, 900, 1300, 1300), (448, 448))
        assert zoomed.mpp == 0.5
        np.testing.assert_array_equal(zoomed.in_view, pyr.grid(0.5).tiles_in(zoomed.bbox))
        assert pyr.grid(0.5) is pyr.grid(0.5000000001)  # one grid per level, built once


def _store(slide: Slide, grid: TileGrid, root: Path) -> EmbeddingStore:
    key = store_key(slide, "virchow2-tiny", grid, weights_id="random:virchow2-tiny")
    return EmbeddingStore.open(key, n_tiles=len(grid), dim=8, root=root, coords=grid.coords,
                               tile_size_l0=grid.tile_size_l0)  # fmt: skip


def test_refinement_never_plans_a_stored_tile(planted_slide: Path, tmp_path: Path) -> None:
    with Slide(planted_slide) as slide:
        pyr = LodPyramid(slide, V2)
        stores = {m: _store(slide, pyr.grid(m), tmp_path) for m in (0.5, 1.0)}  # none at 2.0 yet
        try:
            missing = missing_from_stores(stores)
            plan = pyr.plan_view((300, 300, 1800, 1800), (448, 448), pinned=0.5)
            assert plan.truncated  # 36 tissue tiles in view, budget 8
            stored = plan.in_view[[0, 3, 5, 11]]
            stores[0.5].write(stored, np.ones((len(stored), 8), np.float32))
            seen: list[int] = []
            while len(todo := pyr.todo(plan, missing)):
                assert len(todo) <= plan.budget
                assert not np.isin(todo, stored).any() and not np.isin(todo, seen).any()
                seen += todo.tolist()
                stores[0.5].write(todo, np.ones((len(todo), 8), np.float32))  # "computed"
            # one budget at a time, centre-out, the whole view got computed exactly once
            assert sorted(seen + stored.tolist()) == sorted(plan.in_view.tolist())
            assert not len(stores[0.5].missing(plan.in_view))
            per_level = pyr.missing_in_view(plan, missing)
            assert list(per_level) == [2.0, 1.0, 0.5]  # coarse to fine
            assert not len(per_level[0.5])
            np.testing.assert_array_equal(per_level[2.0], plan.underneath[2.0])  # no store: all missing
        finally:
            for s in stores.values():
                s.close()


def test_done_mask_callback_keeps_the_centre_out_order() -> None:
    plan = plan_at(0.5)
    done = np.zeros(len(Lattice.at(BIG, 0.5)), bool)
    done[plan.in_view[::2]] = True
    missing = missing_from_done({0.5: done})
    np.testing.assert_array_equal(missing(0.5, plan.in_view), plan.in_view[1::2])
    np.testing.assert_array_equal(missing(2.0, plan.in_view[:3]), plan.in_view[:3])  # unknown level: all missing


def test_planning_and_drawing_import_neither_qt_nor_torch() -> None:
    code = ("import sys, napari_virchow.lod, napari_virchow.lod_pyramid, napari_virchow.analysis.lod_rasters; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'timm', 'qtpy', 'PyQt6', 'napari'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    assert out.stdout.strip() == "[]"
