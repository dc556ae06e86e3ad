"""``fit-head`` at each magnification the annotations cover; ``heatmap --mpp`` uses that level's probe (#15)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_virchow.analysis.head_files import load_head
from napari_virchow.analysis.heads import MultiScaleHead
from napari_virchow.cli.analysis import MIN_LEVEL_TILES
from napari_virchow.config import SessionConfig
from napari_virchow.io.geojson import Annotation, write_annotations
from napari_virchow.session import SlideSession
from napari_virchow.slides.synthetic import PlantedSource, Region, write_pyramid
from tests.cli.test_cli import TINY, _errors, _run

pytestmark = [pytest.mark.filterwarnings("ignore:.*random weights:UserWarning"), pytest.mark.timeout(300)]

SIDE = 3584  # 16 × 16 tiles at 0.5 µm/px, 8 × 8 at 1.0, 4 × 4 at 2.0
PLANTED = (448, 448, 1792, 3136)  # the left of the tissue
PLAIN = (1792, 448, 3136, 3136)  # the right


def _box(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], float)


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A slide whose annotations cover ≥ 10 tiles per class at 0.5 and 1 µm/px, fewer at 2 µm/px."""
    root = tmp_path_factory.mktemp("levels")
    regions = [Region((224, 224, SIDE - 224, SIDE - 224), "tissue"), Region(PLANTED, "planted")]
    slide = write_pyramid(root / "wide.tif", SIDE, SIDE, PlantedSource(regions, seed=5), mpp=0.5, levels=4)
    ann = write_annotations(root / "wide.geojson", [Annotation(_box(*PLANTED), "Tumor"),
                                                     Annotation(_box(*PLAIN), "Normal")])  # fmt: skip
    return slide, ann, root


def _aucs(out: str) -> dict[float, float]:
    found = re.findall(r"\(([0-9.]+) µm/px\): cross-validated .*?ROC AUC ([0-9.]+)", out)
    return {float(m): float(a) for m, a in found}


def test_default_fits_each_covered_magnification_and_heatmap_uses_its_probe(
        wide: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    slide, ann, _ = wide
    cache, head = tmp_path / "cache", tmp_path / "head.safetensors"
    rc, out, err = _run(capsys, "fit-head", slide, "--annotations", ann, *TINY, "--cache", cache, "--out", head)
    assert rc == 0, err
    # the rule is said: the encoder's own level, plus those with enough tiles per class; 2 µm/px has too few
    assert "fitting at 20× (0.5 µm/px), 10× (1 µm/px):" in out and f"at least {MIN_LEVEL_TILES} annotated" in out
    assert "skipped 5× (2 µm/px): Normal 6, Tumor 6" in out
    assert "144 annotated tiles (144 embedded now) at 20× (0.5 µm/px)" in out  # 72 of each class
    assert "36 annotated tiles (36 embedded now) at 10× (1 µm/px)" in out
    assert "(Normal 72, Tumor 72)" in out and "(Normal 18, Tumor 18)" in out
    aucs = _aucs(out)
    assert set(aucs) == {0.5, 1.0} and min(aucs.values()) >= 0.9, out  # each level's own cross-validated AUC
    loaded = load_head(head, encoder="virchow2-tiny")
    assert isinstance(loaded, MultiScaleHead) and loaded.mpps == (0.5, 1.0)
    assert loaded.cv_aucs == pytest.approx(aucs, abs=5e-4)

    rc, out, err = _run(capsys, "heatmap", slide, "--head", head, *TINY, "--cache", cache, "--out", tmp_path,
                        "--mpp", "1.0", "--tiff-dtype", "float32")  # fmt: skip
    assert rc == 0, err
    assert "warning" not in err  # the head has a probe at 1 µm/px
    with tifffile.TiffFile(tmp_path / "wide.heatmap.tif") as tif:
        shown = tif.pages[0].asarray()
    shown = np.sort(shown[np.isfinite(shown)])
    config = SessionConfig(encoder="virchow2-tiny", weights="random", cache_root=cache)
    with SlideSession(slide, config) as session:
        _, emb = session.embedded(tissue_only=True, mpp=1.0)
        n_tissue = session.grid_at(1.0).n_tissue
    assert len(shown) == len(emb) == n_tissue > 36  # every tissue tile at 10×, not only the annotated ones
    np.testing.assert_allclose(shown, np.sort(loaded.for_mpp(1.0).positive_proba(emb)), rtol=1e-5, atol=1e-6)
    other = np.sort(loaded.for_mpp(0.5).positive_proba(emb))
    assert np.abs(other - shown).max() > 1e-3  # not the 20× probe's values

    rc, _, err = _run(capsys, "heatmap", slide, "--head", head, *TINY, "--cache", cache, "--out", tmp_path,
                      "--mpp", "2.0")  # fmt: skip
    assert rc == 0, err
    assert "no probe fitted at 2 µm/px" in err and "using its 1 µm/px probe" in err  # the nearest, said


def test_asked_magnifications_are_fitted_or_refused_by_name(wide: tuple[Path, Path, Path], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    slide, ann, root = wide
    cache, head = tmp_path / "cache", tmp_path / "head.json"
    base = [*TINY, "--cache", cache, "--out", head]
    rc, out, err = _run(capsys, "fit-head", slide, "--annotations", ann, *base, "--mpp", "0.5,2.0")
    assert rc == 0, err
    assert 0.5 in _aucs(out) and "at 5× (2 µm/px): " in out  # a line per probe
    assert load_head(head, encoder="virchow2-tiny").mpps == (0.5, 2.0)
    rc, _, err = _run(capsys, "fit-head", slide, "--annotations", ann, *base, "--mpp", "2.0")
    assert rc == 0, err
    one = load_head(head, encoder="virchow2-tiny")  # one level: a plain one-probe head, fitted at 5×
    assert not isinstance(one, MultiScaleHead) and one.mpp == pytest.approx(2.0)

    small = write_annotations(root / "small.geojson", [Annotation(_box(448, 448, 896, 896), "Tumor"),
                                                       Annotation(_box(2016, 448, 2464, 896), "Normal")])  # fmt: skip
    rc, _, err = _run(capsys, "fit-head", slide, "--annotations", small, *base, "--mpp", "0.5,2")
    assert rc == 2 and len(_errors(err)) == 1 and "--mpp 2: at 5× (2 µm/px) the annotations cover" in err
    rc, _, err = _run(capsys, "fit-head", slide, "--annotations", small, *base, "--mpp", "0.7")
    assert rc == 2 and len(_errors(err)) == 1 and "0.7 µm/px" in err
