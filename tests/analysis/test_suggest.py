"""Tiles to label next: uncertain, far from the labelled ones, spread out."""

from __future__ import annotations

import numpy as np
import pytest

from napari_virchow.analysis.similarity import AnalysisError
from napari_virchow.analysis.suggest import distance_factor, suggest_tiles, uncertainty

TILE = 224


def grid(side: int) -> np.ndarray:
    i = np.arange(side * side)
    return np.stack([(i % side) * TILE, (i // side) * TILE], axis=1).astype(np.int64)


def at(side: int, col: int, row: int) -> int:
    return row * side + col


def test_uncertainty_peaks_at_one_half_and_is_the_margin_for_many_classes() -> None:
    np.testing.assert_allclose(uncertainty(np.array([0.0, 0.25, 0.5, 0.9, 1.0])), [0, 0.5, 1, 0.2, 0])
    # three classes: one minus the gap between the two most likely
    np.testing.assert_allclose(uncertainty(np.array([[0.4, 0.4, 0.2], [0.9, 0.05, 0.05]])), [1.0, 0.15])
    # two columns give the same number as the positive column alone
    p = np.array([0.1, 0.45, 0.8])
    np.testing.assert_allclose(uncertainty(np.stack([1 - p, p], axis=1)), uncertainty(p))
    with pytest.raises(AnalysisError, match="shape"):
        uncertainty(np.zeros((3, 1)))


def test_the_most_uncertain_tile_comes_first_and_labelled_ones_never() -> None:
    side = 10
    p = np.full(side * side, 0.02)
    best, second = at(side, 2, 2), at(side, 7, 7)
    p[best], p[second] = 0.5, 0.4
    out = suggest_tiles(p, grid(side), TILE, labelled=np.array([], np.int64), k=5)
    assert [s.index for s in out[:2]] == [best, second]
    assert out[0].probability == 0.5 and out[0].uncertainty == 1.0 and out[0].distance_tiles == np.inf
    assert (out[0].x, out[0].y) == (2 * TILE, 2 * TILE)
    again = suggest_tiles(p, grid(side), TILE, labelled=np.array([best]), k=5)
    assert best not in [s.index for s in again] and again[0].index == second


def test_a_tile_next_to_a_labelled_one_loses_to_an_as_uncertain_one_far_away() -> None:
    side = 12
    p = np.full(side * side, 0.01)
    labelled = at(side, 1, 1)
    near, far = at(side, 3, 1), at(side, 10, 10)  # both equally uncertain
    p[near] = p[far] = 0.5
    out = suggest_tiles(p, grid(side), TILE, labelled=np.array([labelled]), k=2)
    assert out[0].index == far and out[1].index == near
    assert out[1].distance_tiles == pytest.approx(2.0) and out[1].score == pytest.approx(1 - np.exp(-1.0))
    d, factor = distance_factor(grid(side), TILE, np.array([labelled]))
    assert d[labelled] == 0 and factor[labelled] == 0 and factor[far] > factor[near]


def test_suggestions_are_spread_out_by_spatial_suppression() -> None:
    side = 12
    p = np.full(side * side, 0.0)
    block = [at(side, c, r) for c in range(4, 7) for r in range(4, 7)]  # one uncertain 3 × 3 block
    p[block] = 0.5
    p[at(side, 10, 1)] = 0.3  # a less uncertain tile elsewhere
    spread = suggest_tiles(p, grid(side), TILE, labelled=np.array([], np.int64), k=3, min_distance_tiles=2)
    assert [s.index in block for s in spread[:2]] == [True, False]  # one from the block, then elsewhere
    crowded = suggest_tiles(p, grid(side), TILE, labelled=np.array([], np.int64), k=3, min_distance_tiles=0)
    assert all(s.index in block for s in crowded)


def test_tiles_not_embedded_or_not_candidates_are_skipped_and_fewer_are_returned() -> None:
    side = 4
    p = np.full(side * side, np.nan)
    p[[0, 15]] = 0.5
    tissue = np.ones(side * side, bool)
    tissue[15] = False
    out = suggest_tiles(p, grid(side), TILE, labelled=np.array([], np.int64), k=10, candidates=tissue)
    assert [s.index for s in out] == [0]


def test_bad_inputs_are_one_clear_message() -> None:
    with pytest.raises(AnalysisError, match="coords must be"):
        suggest_tiles(np.zeros(4), grid(3), TILE, labelled=np.array([], np.int64))
    with pytest.raises(AnalysisError, match="labelled tile indices"):
        suggest_tiles(np.zeros(9), grid(3), TILE, labelled=np.array([9]))
    with pytest.raises(AnalysisError, match="candidates"):
        suggest_tiles(np.zeros(9), grid(3), TILE, labelled=np.array([], np.int64), candidates=np.ones(3, bool))


@pytest.mark.filterwarnings("ignore:.*random weights:UserWarning")
def test_suggest_job_runs_without_qt_on_a_real_session(planted_slide, tmp_path) -> None:
    """The labelling job on a real session: suggestions are embedded tissue tiles off the annotations."""
    from napari_virchow.errors import VirchowError
    from napari_virchow.jobs_labelling import Suggested, suggest_job
    from napari_virchow.session import SessionConfig, SlideSession

    config = SessionConfig(encoder="virchow2-tiny", weights="random", device="cpu", dtype="fp32", batch_size=16,
                           cache_root=tmp_path)  # fmt: skip
    tumour = np.array([[448, 448], [896, 448], [896, 896], [448, 896]], float)  # level-0 (x, y)
    normal = np.array([[300, 1100], [1000, 1100], [1000, 1700], [300, 1700]], float)
    with SlideSession(planted_slide, config) as session:
        with pytest.raises(VirchowError, match="Train from annotations"):
            list(suggest_job(session, [], []))
        list(session.compute())
        session.set_head(session.train_head([tumour, normal], ["tumour", "normal"]).head)
        [event] = [e for e in suggest_job(session, [tumour, normal], ["tumour", "normal"], k=5)
                   if isinstance(e, Suggested)]  # fmt: skip
        labelled = set(session.annotated_tiles([tumour, normal], ["tumour", "normal"])[0].tolist())
        g = session.grid
        assert 0 < len(event.suggestions) <= 5 and event.n_labelled == len(labelled)
        assert len(event.thumbnails) == len(event.suggestions) and event.thumbnails[0].shape == (64, 64, 3)
        for s in event.suggestions:
            assert s.index not in labelled and g.tissue[s.index]
            assert s.probability == pytest.approx(float(session.probabilities[0.5][s.index]))
