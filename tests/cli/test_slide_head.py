"""Slide heads end to end on a synthetic cohort: 24 slides from the slide generator, half with a planted
region, embedded by the tiny random Virchow 2 through ``fit-slide-head`` (real OpenSlide / tifffile reads,
real zarr stores), then ``predict`` and :func:`predict_slide` on the same cache.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_virchow import cli
from napari_virchow.analysis.mil_io import load_slide_head, save_slide_head
from napari_virchow.config import SessionConfig
from napari_virchow.errors import HeadError, SlideError
from napari_virchow.session import SlideSession
from napari_virchow.slide_cohort import CohortError, read_cohort_csv
from napari_virchow.slide_prediction import NotEmbeddedError, missing_tiles, predict_slide
from napari_virchow.slides.synthetic import PlantedSource, Region, write_pyramid

pytestmark = pytest.mark.filterwarnings("ignore:.*random weights:UserWarning")

SIZE = 896  # 4 × 4 tiles of 224 px at 0.5 µm/px
PLANT = 448  # a 2 × 2-tile planted region, on the tile lattice
TINY = ["--encoder", "virchow2-tiny", "--weights", "random", "--device", "cpu", "--dtype", "fp32", "--no-progress",
        "--batch-size", "16"]  # fmt: skip


@dataclass
class Fitted:
    root: Path
    csv: Path
    cache: Path
    head: Path
    out: str
    slides: list[Path]
    labels: list[str]
    boxes: list[tuple[int, int, int, int] | None]


def _run(*argv: object) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def _one_error(rc: int, err: str, *words: str) -> str:
    assert rc == 2, err
    errors = [line for line in err.splitlines() if line.startswith("napari-virchow: error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert all(w in errors[0] for w in words), errors[0]
    return errors[0]


def _write_csv(path: Path, rows: list[tuple[str, ...]], header: tuple[str, ...] = ("slide", "label")) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def _slides(folder: Path, n: int) -> tuple[list[Path], list[str], list[tuple[int, int, int, int] | None]]:
    """``n`` slides, every second one with a planted region at a random place of the tile lattice."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(19)
    slides, labels, boxes = [], [], []
    for i in range(n):
        regions = [Region((0, 0, SIZE, SIZE), "tissue")]
        box = None
        if i % 2:
            x0, y0 = (int(v) * 224 for v in rng.integers(0, (SIZE - PLANT) // 224 + 1, 2))
            box = (x0, y0, x0 + PLANT, y0 + PLANT)
            regions.append(Region(box, "planted"))
        slides.append(write_pyramid(folder / f"s{i:02d}.tif", SIZE, SIZE, PlantedSource(regions, seed=i),
                                    mpp=0.5, levels=2))  # fmt: skip
        labels.append("tumour" if box else "normal")
        boxes.append(box)
    return slides, labels, boxes


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> Fitted:
    """The cohort written, embedded and fitted once through the CLI (relative paths in the CSV)."""
    root = tmp_path_factory.mktemp("mil")
    slides, labels, boxes = _slides(root / "slides", 24)
    table = _write_csv(root / "cohort.csv", [(f"slides/{p.name}", lab) for p, lab in zip(slides, labels, strict=True)])
    head = root / "head.safetensors"
    rc, out, err = _run("fit-slide-head", table, "--out", head, "--folds", 4, "--epochs", 10, *TINY,
                        "--cache", root / "cache")  # fmt: skip
    assert rc == 0, err
    return Fitted(root, table, root / "cache", head, out, slides, labels, boxes)


def _config(cache: Path, **kw: object) -> SessionConfig:
    return SessionConfig(encoder="virchow2-tiny", weights="random", device="cpu", dtype="fp32", batch_size=16,
                         cache_root=cache, **kw)  # type: ignore[arg-type]  # fmt: skip


def _planted_fraction(session: SlideSession, idx: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    g = session.grid_at(0.5)
    c, t = g.coords[idx], g.tile_size_l0
    ox = np.clip(np.minimum(c[:, 0] + t, box[2]) - np.maximum(c[:, 0], box[0]), 0, None)
    oy = np.clip(np.minimum(c[:, 1] + t, box[3]) - np.maximum(c[:, 1], box[1]), 0, None)
    return ox * oy / (t * t)


def test_fit_reports_cross_validated_auc_with_interval(fitted: Fitted) -> None:
    import re

    m = re.search(r"cross-validated AUC ([0-9.]+) \(95% CI ([0-9.]+)–([0-9.]+), bootstrap over slides; 4 folds, "
                  r"24 slides\)", fitted.out)  # fmt: skip
    assert m, fitted.out
    auc, lo, hi = (float(v) for v in m.groups())
    assert auc >= 0.95 and lo <= auc <= hi <= 1
    assert fitted.out.count("16 tissue tiles, 16 embedded now") == 24  # the CLI embedded every slide
    head = load_slide_head(fitted.head)
    assert head.encoder == "virchow2-tiny" and head.mpp == 0.5 and head.tile_size == 224
    assert head.classes == ("normal", "tumour") and head.metrics["cv_value"] == pytest.approx(auc, abs=1e-3)
    assert head.weights_digest.startswith("random-seed") and head.metrics["class_counts"] == {"normal": 12,
                                                                                              "tumour": 12}


def test_attention_ranks_planted_tiles_first(fitted: Fitted) -> None:
    from sklearn.metrics import roc_auc_score

    head = load_slide_head(fitted.head)
    aucs = []
    with contextlib.ExitStack() as stack:
        for path, label, box in zip(fitted.slides, fitted.labels, fitted.boxes, strict=True):
            session = stack.enter_context(SlideSession(path, _config(fitted.cache)))
            result = predict_slide(session, head)
            assert result.prediction.label == label
            assert result.attention.sum() == pytest.approx(1, abs=1e-5) and len(result.indices) == 16
            raster = result.raster(session)
            assert raster.data.shape == (4, 4) and np.nanmax(raster.data) == 1  # one pixel per tile, max 1
            if box is not None:
                planted = _planted_fraction(session, result.indices, box) >= 0.5
                assert planted.sum() == 4
                aucs.append(roc_auc_score(planted, result.attention))
                assert set(result.top_tiles(4)) & set(result.indices[planted])  # the top tiles are planted ones
    assert np.mean(aucs) >= 0.9 and min(aucs) >= 0.75, aucs


def test_predict_cli_table_json_and_attention_files(fitted: Fitted) -> None:
    pos, neg = fitted.slides[1], fitted.slides[0]
    rc, out, err = _run("predict", fitted.head, pos, neg, *TINY[2:], "--cache", fitted.cache)  # encoder from the head
    assert rc == 0, err
    lines = [line.split() for line in out.splitlines()]
    assert lines[-3][:3] == ["slide", "normal", "tumour"]
    assert lines[-2][0] == pos.name and lines[-2][-1] == "tumour" and lines[-1][-1] == "normal"
    # --head as `heatmap --head` takes one: the same predictions
    rc, again, err = _run("predict", pos, neg, "--head", fitted.head, *TINY[2:], "--cache", fitted.cache)
    assert rc == 0 and again.splitlines()[-3:] == out.splitlines()[-3:], err
    rc, _, err = _run("predict", fitted.head, *TINY[2:], "--cache", fitted.cache)
    _one_error(rc, err, "no slide to predict", fitted.head.name)
    rc, out, err = _run("predict", fitted.head, pos, neg, *TINY, "--cache", fitted.cache, "--json",
                        "--out", fitted.root / "maps", "--top", 4)  # fmt: skip
    assert rc == 0, err
    doc = json.loads(out.splitlines()[-1])
    assert doc["classes"] == ["normal", "tumour"] and doc["mpp"] == 0.5
    by_name = {Path(s["slide"]).name: s for s in doc["slides"]}
    assert by_name[pos.name]["probabilities"]["tumour"] > 0.5 > by_name[neg.name]["probabilities"]["tumour"]
    tif = Path(by_name[pos.name]["attention_tiff"])
    with tifffile.TiffFile(tif) as f:
        data = f.pages[0].asarray()
        description = f.pages[0].description
    assert data.shape[:2] == (4, 4) and data.max() == 255  # uint8: round(attention / max · 255)
    assert "virchow2-tiny" in description and "slide_head" in description
    gj = json.loads(Path(by_name[pos.name]["attention_geojson"]).read_text())
    assert gj["napari_virchow"]["encoder"] == "virchow2-tiny" and gj["napari_virchow"]["slide_head"]
    assert [f["properties"]["classification"]["name"] for f in gj["features"]] == ["Attention"]
    box = fitted.boxes[1]
    assert box is not None
    xs = [x for ring in gj["features"][0]["geometry"]["coordinates"] for x, _ in ring]
    ys = [y for ring in gj["features"][0]["geometry"]["coordinates"] for _, y in ring]
    overlap = max(0, min(max(xs), box[2]) - max(min(xs), box[0])) * max(0, min(max(ys), box[3]) - max(min(ys), box[1]))
    assert overlap > 0  # the top-attention region covers the planted one
    assert not [p for p in (fitted.root / "maps").iterdir() if p.name.startswith(".")]  # no temporary left


def test_fits_are_deterministic_given_the_seed(fitted: Fitted) -> None:
    heads = []
    for name in ("a", "b"):  # another seed gives other weights: tests/analysis/test_mil.py
        path = fitted.root / f"{name}.safetensors"
        rc, out, err = _run("fit-slide-head", fitted.csv, "--out", path, "--folds", 2, "--epochs", 1, "--seed", 5,
                            *TINY, "--cache", fitted.cache)  # fmt: skip
        assert rc == 0 and out.count("all cached") == 24, err  # resumable: nothing embedded again
        heads.append(load_slide_head(path))
    a, b = heads
    assert all(np.array_equal(a.state[k], b.state[k]) for k in a.state) and a.metrics == b.metrics
    with SlideSession(fitted.slides[3], _config(fitted.cache)) as session:
        pa, pb = predict_slide(session, a).prediction, predict_slide(session, b).prediction
    assert pa.probabilities == pb.probabilities and np.array_equal(pa.attention, pb.attention)


def test_head_for_another_encoder_weights_or_magnification_is_refused(fitted: Fitted) -> None:
    head = load_slide_head(fitted.head)
    rc, _, err = _run("predict", fitted.head, fitted.slides[0], *TINY, "--encoder", "virchow-tiny",
                      "--cache", fitted.cache)  # fmt: skip
    _one_error(rc, err, "trained on 'virchow2-tiny' embeddings", "'virchow-tiny'")
    other = fitted.root / "other-weights.safetensors"
    head.weights_digest = "abc123"
    save_slide_head(head, other)
    rc, _, err = _run("predict", other, fitted.slides[0], *TINY, "--cache", fitted.cache)
    _one_error(rc, err, "weights abc123", "load those weights")
    head = load_slide_head(fitted.head)
    head.mpp = 0.25  # finer than the slides are scanned
    fine = fitted.root / "fine.safetensors"
    save_slide_head(head, fine)
    with SlideSession(fitted.slides[0], _config(fitted.cache)) as session, pytest.raises(SlideError,
                                                                                           match="cannot give 0.25"):
        predict_slide(session, head)
    with pytest.raises(HeadError, match="trained at 0.25 µm/px .* 0.5 µm/px"):
        head.check_compatible(encoder="virchow2-tiny", weights_digest=head.weights_digest, mpp=0.5)


def test_tiles_not_embedded_are_counted(fitted: Fitted, tmp_path: Path) -> None:
    head = load_slide_head(fitted.head)
    with SlideSession(fitted.slides[0], _config(tmp_path / "empty")) as session:
        assert len(missing_tiles(session, head)) == 16
        with pytest.raises(NotEmbeddedError, match="16 of 16 tissue tiles of s00.tif are not embedded at 0.5"):
            predict_slide(session, head)


@pytest.mark.parametrize(("rows", "words"), [
    ([("slides/s00.tif", "normal"), ("slides/gone.tif", "tumour")], ["1 slide file(s) not found", "gone.tif"]),
    ([("slides/s00.tif", "normal"), ("slides/s01.tif", "normal")], ["every slide is labelled 'normal'"]),
    ([("slides/s00.tif", "normal"), ("slides/../slides/s00.tif", "tumour")], ["s00.tif is listed twice"]),
    ([("slides/s00.tif", "normal"), ("slides/s01.tif", "")], ["empty label"]),
])  # fmt: skip
def test_bad_cohort_csv_is_one_line_and_writes_nothing(fitted: Fitted, rows: list, words: list[str]) -> None:
    table = _write_csv(fitted.root / "bad.csv", rows)
    out = fitted.root / "bad-head.safetensors"
    rc, _, err = _run("fit-slide-head", table, "--out", out, *TINY, "--cache", fitted.cache)
    _one_error(rc, err, "bad.csv", *words)
    assert not out.exists()


def test_cohort_csv_forms_and_head_classes(fitted: Fitted) -> None:
    plain = fitted.root / "plain.csv"  # no header, a fold column, absolute paths
    plain.write_text("\n".join(f"{p},{lab},{i % 3}" for i, (p, lab) in
                               enumerate(zip(fitted.slides, fitted.labels, strict=True))) + "\n")  # fmt: skip
    rows = read_cohort_csv(plain, classes=("normal", "tumour"))
    assert [r.slide for r in rows] == fitted.slides and rows[4].fold == "1" and rows[0].label == "normal"
    with pytest.raises(CohortError, match=r"labels \['tumour'\] are not among the head's classes"):
        read_cohort_csv(plain, classes=("normal", "benign"))
    with pytest.raises(CohortError, match="names no label column"):
        read_cohort_csv(_write_csv(fitted.root / "h.csv", [("a", "b")], header=("slide", "diag")))


def test_fold_column_and_too_few_slides_per_fold(fitted: Fitted) -> None:
    rows = [(f"slides/{p.name}", lab, str(i % 3)) for i, (p, lab) in enumerate(zip(fitted.slides, fitted.labels,
                                                                                   strict=True))]  # fmt: skip
    table = _write_csv(fitted.root / "folds.csv", rows[:6], header=("slide", "label", "fold"))
    rc, out, err = _run("fit-slide-head", table, "--out", fitted.root / "f.safetensors", "--epochs", 1, *TINY,
                        "--cache", fitted.cache)  # fmt: skip
    assert rc == 0 and "3 folds, 6 slides" in out, err
    table = _write_csv(fitted.root / "few.csv", [r[:2] for r in rows[:4]])
    rc, _, err = _run("fit-slide-head", table, "--out", fitted.root / "g.safetensors", *TINY, "--cache", fitted.cache)
    _one_error(rc, err, "4 slides for 5-fold cross-validation", "use at most 4 folds")
    assert not (fitted.root / "g.safetensors").exists()


def test_commands_are_registered_with_the_cohort_options() -> None:
    from napari_virchow.cli.app import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    for name in ("fit-slide-head", "predict"):
        flags = {s for a in sub[name]._actions for s in a.option_strings}
        assert {"--scheduler", "--encoder", "--weights", "--cache", "--out"} <= flags, name


@pytest.mark.timeout(180)
def test_scheduler_embeds_the_cohort_on_the_cluster(tmp_path: Path) -> None:
    from distributed import LocalCluster

    slides, labels, _ = _slides(tmp_path / "slides", 4)
    table = _write_csv(tmp_path / "four.csv", [(str(p), lab) for p, lab in zip(slides, labels, strict=True)])
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        rc, out, err = _run("fit-slide-head", table, "--out", tmp_path / "h.safetensors", "--folds", 2, "--epochs", 1,
                            *TINY, "--cache", tmp_path / "cache", "--scheduler", cluster.scheduler_address)  # fmt: skip
    assert rc == 0, err
    assert out.count("16 tissue tiles, 16 embedded now") == 4 and " on " in out  # embedded by the worker
    assert "2 folds, 4 slides" in out and load_slide_head(tmp_path / "h.safetensors").classes == ("normal", "tumour")
