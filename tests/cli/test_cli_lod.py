"""``embed --mpp`` and ``heatmap --mpp``: the embedding pyramid from the command line (planted slide)."""

from __future__ import annotations

from pathlib import Path

import pytest

from napari_virchow.slides.slide import Slide
from napari_virchow.store.cache import list_stores
from tests.cli.test_cli import TINY, Cohort, _errors, _run, cohort, head_file  # noqa: F401 - fixtures

pytestmark = pytest.mark.filterwarnings("ignore:.*random weights:UserWarning")


@pytest.mark.timeout(120)
def test_embed_at_two_magnifications_keeps_one_store_each(cohort: Cohort, tmp_path: Path,  # noqa: F811
                                                          capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    cache = tmp_path / "cache"
    rc, out, err = _run(capsys, "embed", cohort.a, *TINY, "--cache", cache, "--mpp", "0.5,2.0")
    assert rc == 0, err
    assert "49 tissue tiles, 49 embedded now" in out and "at 20× (0.5 µm/px)" in out
    assert "4 tissue tiles, 4 embedded now" in out and "at 5× (2 µm/px)" in out  # 1/16 of the tiles, and fewer
    assert sorted((s.mpp, s.n_done) for s in list_stores(cache)) == [(0.5, 49), (2.0, 4)]
    rc, out, _ = _run(capsys, "embed", cohort.a, *TINY, "--cache", cache, "--mpp", "2")
    assert rc == 0 and "all cached" in out
    rc, _, err = _run(capsys, "embed", cohort.a, *TINY, "--cache", cache, "--mpp", "0.7")
    assert rc != 0 and len(_errors(err)) == 1 and "0.7 µm/px" in err
    assert "--allow-untrained-mpp" in err  # the fix, as the CLI spells it
    rc, _, err = _run(capsys, "embed", cohort.a, *TINY, "--cache", cache, "--mpp", "0.7", "--allow-untrained-mpp")
    assert rc == 0, err
    untrained = [s for s in list_stores(cache) if s.mpp == 0.7]
    assert len(untrained) == 1
    rc, _, err = _run(capsys, "embed", cohort.a, *TINY, "--cache", cache, "--mpp", "0,x")
    assert rc == 2 and "positive µm/px" in err


@pytest.mark.timeout(120)
def test_heatmap_at_5x_covers_the_slide_at_2_um_per_px_tiles(cohort: Cohort, head_file: tuple[Path, str],  # noqa: F811
                                                             tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    rc, out, err = _run(capsys, "heatmap", cohort.a, "--head", head_file[0], *TINY, "--cache", tmp_path / "c",
                        "--out", tmp_path, "--mpp", "2.0")  # fmt: skip
    assert rc == 0, err
    assert "4 tissue tiles" in out and "at 5×" in out
    with Slide(cohort.a) as slide, Slide(tmp_path / f"{cohort.a.stem}.heatmap.tif") as heat:
        assert heat.mpp == pytest.approx(224 * 2.0)  # one heatmap pixel per 5× tile: 448 µm
        for d_heat, d_slide in zip(heat.dimensions, slide.dimensions, strict=True):
            assert abs(d_heat * heat.mpp - d_slide * slide.mpp) < 448
    assert [s.mpp for s in list_stores(tmp_path / "c")] == [2.0]  # nothing computed at 20×
