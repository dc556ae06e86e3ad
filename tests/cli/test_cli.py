"""The command line, in process (``cli.main``) on planted slides with the tiny random encoder.

One session cache holds the embeddings of two planted slides; most tests only read it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile

from napari_virchow.analysis.head_files import load_head, save_head
from napari_virchow.analysis.heads import LinearHead
from napari_virchow.cli import app as cli
from napari_virchow.cli import cluster as _cluster_run
from napari_virchow.io.geojson import Annotation, read_annotations, write_annotations
from napari_virchow.slides.slide import Slide
from napari_virchow.slides.synthetic import PlantedSource, Region, write_pyramid
from napari_virchow.slides.tiling import TileGrid
from napari_virchow.store.cache import list_stores
from tests.cli.conftest import remount_read_only, tmpfs
from tests.conftest import PLANTED_PATTERNS

TINY = ["--encoder", "virchow2-tiny", "--weights", "random", "--no-progress"]
T = 224  # level-0 px per tile at 0.5 µm/px
#: slide B: another layout, texture seed and planted place than the conftest's planted slide
B_SIZE, B_TISSUE, B_PLANTED = (1792, 1568), Region((224, 224, 1568, 1344)), Region((896, 448, 1344, 896), "planted")


@dataclass
class Cohort:
    a: Path  # conftest planted slide, 2048², patterns at PLANTED_PATTERNS
    b: Path
    cache: Path
    root: Path


def _box(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], float)


def _run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _errors(err: str) -> list[str]:
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("napari-virchow") and ": error: " in line]


def _small_slide(path: Path, seed: int) -> Path:
    regions = [Region((224, 224, 896, 896)), Region((448, 448, 672, 672), "planted")]
    return write_pyramid(path, 1120, 1120, PlantedSource(regions, seed=seed), mpp=0.5, levels=2)


def _inside(x: int, y: int, region: Region) -> bool:
    x0, y0, x1, y1 = region.box
    return x0 <= x + T / 2 < x1 and y0 <= y + T / 2 < y1


@pytest.fixture(scope="session")
def cohort(tmp_path_factory: pytest.TempPathFactory, planted_slide: Path) -> Cohort:
    root = tmp_path_factory.mktemp("cli")
    b = write_pyramid(root / "other.tif", *B_SIZE, PlantedSource([B_TISSUE, B_PLANTED], seed=3), mpp=0.5, levels=2)
    cache = root / "cache"
    assert cli.main(["embed", str(planted_slide), str(b), *TINY, "--cache", str(cache)]) == 0
    return Cohort(planted_slide, b, cache, root)


@pytest.fixture(scope="session")
def head_file(cohort: Cohort) -> tuple[Path, str]:
    """fit-head on slide A: Tumor over both planted patterns, Stroma over plain tissue."""
    ann = write_annotations(cohort.root / "a.geojson", [
        Annotation(_box(*PLANTED_PATTERNS[0].box), "Tumor"), Annotation(_box(*PLANTED_PATTERNS[1].box), "Tumor"),
        Annotation(_box(256, 1344, 1120, 1792), "Stroma"), Annotation(_box(1344, 256, 1792, 1120), "Stroma"),
    ])  # fmt: skip
    out = cohort.root / "heads" / "tumor.safetensors"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):  # a cache of its own: the annotated tiles are embedded here
        rc = cli.main(["fit-head", str(cohort.a), "--annotations", str(ann), *TINY, "--cache",
                       str(cohort.root / "head-cache"), "--out", str(out)])  # fmt: skip
    assert rc == 0, buf.getvalue()
    return out, buf.getvalue()


# --- options and messages -----------------------------------------------------------------------


def test_common_options_are_shared() -> None:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    model = {"--encoder", "--weights", "--device", "--dtype", "--batch-size", "--mpp-override", "--cache"}
    for name in ("embed", "export", "fit-head", "heatmap", "index", "search"):
        flags = {s for a in sub[name]._actions for s in a.option_strings}
        assert model <= flags, name
    helps = {next(a.help for a in sub[n]._actions if "--encoder" in a.option_strings) for n in ("embed", "search")}
    assert len(helps) == 1  # one definition, not copies
    for name in ("embed", "export", "heatmap", "index"):
        assert "--scheduler" in {s for a in sub[name]._actions for s in a.option_strings}
    cache_actions = next(a for a in sub["cache"]._actions if a.dest == "action").choices
    assert all("--cache" in {s for a in p._actions for s in a.option_strings} for p in cache_actions.values())


@pytest.mark.timeout(30)
def test_usage_errors_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = _run(capsys, "embed")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "SLIDE" in err
    rc, _, err = _run(capsys, "embed", "x.svs", "--batch-size", "0")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "--batch-size" in err
    rc, out, _ = _run(capsys, "cache", "--help")
    assert rc == 0 and "NAPARI_VIRCHOW_CACHE_MAX_GB" in out


@pytest.mark.timeout(60)
def test_bad_encoder_weights_and_out_are_one_line(cohort: Cohort, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    base = ["embed", cohort.a, "--cache", cohort.cache, "--no-progress"]
    rc, _, err = _run(capsys, *base, "--encoder", "virchow3")
    assert rc == 2 and len(_errors(err)) == 1 and "unknown encoder" in err
    rc, _, err = _run(capsys, *base, "--encoder", "virchow2-tiny", "--weights", tmp_path / "none.safetensors")
    assert rc == 2 and len(_errors(err)) == 1 and "none.safetensors" in err
    (tmp_path / "file").write_text("x")
    rc, _, err = _run(capsys, "export", cohort.a, *TINY, "--cache", cohort.cache, "--out", tmp_path / "file" / "o")
    assert rc == 2 and "cannot write to the output folder" in _errors(err)[0]


@pytest.mark.timeout(60)
def test_broken_slides_fail_alone(cohort: Cohort, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "broken.svs"
    broken.write_bytes(b"definitely not a slide" * 20)
    rc, out, err = _run(capsys, "embed", cohort.a, broken, tmp_path / "gone.svs", cohort.b, *TINY,
                        "--cache", cohort.cache)  # fmt: skip
    assert rc == 1
    errors = _errors(err)
    assert len(errors) == 2
    assert "broken.svs" in errors[0] and "not a slide" in errors[0]
    assert "gone.svs" in errors[1] and "no such file" in errors[1]
    assert f"{cohort.a.name}: " in out and f"{cohort.b.name}: " in out and "all cached" in out
    assert "2 of 4 slides done, 2 failed" in out


@pytest.mark.timeout(60)
def test_a_mistyped_slide_is_named_before_the_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # default weights (Virchow 2 from the hub) are not on this machine, and the hub is offline:
    # a typo in the only slide's path must say so, not send the user to log in to Hugging Face
    rc, out, err = _run(capsys, "embed", tmp_path / "typo.svs", "--cache", tmp_path / "c", "--no-progress")
    assert rc == 1
    [error] = _errors(err)
    assert "typo.svs" in error and "no such file" in error and "hugging" not in err.lower()
    assert "0 of 1 slides done, 1 failed" in out


@pytest.mark.timeout(60)
def test_missing_mpp_needs_override(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    slide = write_pyramid(tmp_path / "nompp.tif", 672, 672, PlantedSource([Region((0, 0, 672, 672))]), mpp=None,
                          levels=1)  # fmt: skip
    rc, _, err = _run(capsys, "embed", slide, *TINY, "--cache", tmp_path / "c")
    assert rc == 1 and "--mpp-override" in _errors(err)[0]
    rc, out, err = _run(capsys, "embed", slide, *TINY, "--cache", tmp_path / "c", "--mpp-override", "0.5")
    assert rc == 0 and "9 tissue tiles, 9 embedded now" in out, err


@pytest.mark.timeout(60)
def test_unwritable_cache_is_one_line(cohort: Cohort, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A read-only file system (EROFS) rather than a dropped uid: a forked child of this process
    # would deadlock in dask's thread pool while building the tissue grid.
    with tmpfs(tmp_path / "ro", "1m") as cache:
        remount_read_only(cache)
        rc, out, err = _run(capsys, "embed", cohort.a, *TINY, "--cache", cache)
    # the slide fails, named, with the fix (other slides would go on: see test_cli_faults.py)
    assert rc == 1 and len(_errors(err)) == 1 and cohort.a.name in _errors(err)[0]
    assert "cannot write to the embedding cache folder" in err and "--cache DIR" in err


@pytest.mark.timeout(90)
def test_console_script_exit_status(cohort: Cohort, tmp_path: Path) -> None:
    exe = shutil.which("napari-virchow") or str(Path(sys.executable).with_name("napari-virchow"))
    broken = tmp_path / "broken.ndpi"
    broken.write_bytes(b"\x00" * 64)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([exe, "embed", str(cohort.b), str(broken), *TINY, "--cache", str(cohort.cache)],
                          capture_output=True, text=True, timeout=80, env=env)  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert len(_errors(proc.stderr)) == 1 and "broken.ndpi" in proc.stderr
    assert "all cached" in proc.stdout
    proc = subprocess.run([exe, "fit-head", str(cohort.b), "--annotations", "a.geojson", "--out", "h.pt"],
                          capture_output=True, text=True, timeout=60, env=env)  # fmt: skip
    assert proc.returncode == 2 and len(_errors(proc.stderr)) == 1 and ".safetensors or .json" in proc.stderr


# --- dask.distributed ---------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_scheduler_runs_one_task_per_slide(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from distributed import Client, LocalCluster

    slides = [_small_slide(tmp_path / "s1.tif", 1), _small_slide(tmp_path / "s2.tif", 2)]
    broken = tmp_path / "broken.svs"
    broken.write_bytes(b"nope" * 40)
    cache = tmp_path / "cache"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster:  # fmt: skip
        rc, out, err = _run(capsys, "embed", *slides, broken, *TINY, "--cache", cache,
                            "--scheduler", cluster.scheduler_address)  # fmt: skip
        with Client(cluster, set_as_default=False) as client:
            loaded = client.run(_cluster_run.loaded_encoders)
    assert rc == 1
    errors = _errors(err)
    assert len(errors) == 1 and "broken.svs" in errors[0]
    for s in slides:
        assert re.search(rf"{s.name}: 9 tissue tiles, 9 embedded now .* on \S+:\d+", out), out
    assert sum(loaded.values()) >= 1 and max(loaded.values()) == 1  # one encoder per worker process
    rc, out, _ = _run(capsys, "embed", *slides, *TINY, "--cache", cache)  # the stores are where --cache says
    assert rc == 0 and out.count("all cached") == 2


@pytest.mark.timeout(30)
def test_unreachable_scheduler_is_one_line(cohort: Cohort, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    monkeypatch.setattr(_cluster_run, "CONNECT_TIMEOUT_S", 1)
    rc, _, err = _run(capsys, "embed", cohort.a, *TINY, "--cache", cohort.cache, "--scheduler", "tcp://127.0.0.1:9")
    assert rc == 2 and "cannot reach the dask scheduler" in _errors(err)[0]


# --- export -------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_export_h5_holds_embedded_tissue_tiles(cohort: Cohort, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    cache = tmp_path / "cache"
    shutil.copytree(cohort.cache, cache)
    # a background tile embedded on demand (a query) must not reach the features file
    rc, _, err = _run(capsys, "export", cohort.a, *TINY, "--cache", cache, "--out", tmp_path, "--query", "10,10")
    assert rc == 0, err
    rc, out, err = _run(capsys, "export", cohort.a, *TINY, "--cache", cache, "--out", tmp_path / "h5")
    assert rc == 0, err
    grid = TileGrid(Slide(cohort.a))
    assert not grid.tissue[0]
    with h5py.File(tmp_path / "h5" / f"{cohort.a.stem}.h5", "r") as f:
        feats, coords, ca, fa = f["features"][:], f["coords"][:], dict(f["coords"].attrs), dict(f.attrs)
    assert feats.dtype == np.float32 and feats.shape == (grid.n_tissue, 96) and np.isfinite(feats).all()
    assert coords.dtype == np.int64
    np.testing.assert_array_equal(coords, grid.coords[grid.tissue_indices])
    assert (ca["patch_size"], ca["patch_size_level0"], ca["level0_magnification"], ca["target_magnification"]) == (
        224, 224, 20, 20)  # fmt: skip
    assert ca["name"] == cohort.a.stem and ca["overlap"] == 0
    assert fa["encoder"] == "virchow2-tiny" and fa["mpp"] == pytest.approx(0.5)


@pytest.mark.timeout(60)
def test_export_geojson_round_trip(cohort: Cohort, head_file: tuple[Path, str], tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    qx, qy = 560, 560  # inside the first planted pattern
    rc, out, err = _run(capsys, "export", cohort.a, *TINY, "--cache", cohort.cache, "--out", tmp_path, "--geojson",
                        "--clusters", 2, "--query", f"{qx},{qy}", "-k", 3, "--head", head_file[0])  # fmt: skip
    assert rc == 0, err
    stem, n_tissue = cohort.a.stem, TileGrid(Slide(cohort.a)).n_tissue

    clusters = read_annotations(tmp_path / f"{stem}.clusters.geojson")
    assert sorted({a.class_name for a in clusters}) == ["Cluster 1", "Cluster 2"]
    area = sum(_area(a.polygon) - sum(_area(h) for h in a.holes) for a in clusters)
    assert area == n_tissue * T * T  # the clusters tile the embedded tissue exactly
    assert all((a.polygon % T == 0).all() for a in clusters)

    similar = read_annotations(tmp_path / f"{stem}.similar.geojson")
    query = [a for a in similar if a.class_name == "Query"]
    hits = [a for a in similar if a.class_name == "Similar"]
    assert len(query) == 1 and (query[0].polygon.min(axis=0) == (448, 448)).all() and len(hits) == 3
    best = next(a for a in hits if a.name == "Hit 1").polygon.min(axis=0)
    assert _inside(*best, PLANTED_PATTERNS[1]), best  # the other planted copy
    assert all(_area(a.polygon) == T * T for a in hits)

    regions = read_annotations(tmp_path / f"{stem}.heatmap.geojson")
    assert {a.class_name for a in regions} == {"Tumor"}
    corners = [(x, y) for a in regions for x in range(0, 2048, T) for y in range(0, 2048, T)
               if _point_in(a.polygon, x + T / 2, y + T / 2)]  # fmt: skip
    assert corners and all(any(_inside(x, y, p) for p in PLANTED_PATTERNS) for x, y in corners)


def _area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return abs(float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))) / 2


def _point_in(ring: np.ndarray, x: float, y: float) -> bool:
    from skimage.measure import points_in_poly

    return bool(points_in_poly(np.array([[x, y]]), ring)[0])


# --- fit-head and heatmap -----------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_fit_head_reports_auc(head_file: tuple[Path, str]) -> None:
    path, out = head_file
    auc = float(re.search(r"ROC AUC ([0-9.]+)", out).group(1))
    assert auc >= 0.9, out
    assert "24 annotated tiles (24 embedded now)" in out  # only the annotated tiles, embedded first
    assert "Stroma 16, Tumor 8" in out and "positive class: Tumor" in out
    head = load_head(path, encoder="virchow2-tiny")
    assert head.classes == ["Stroma", "Tumor"] and head.metrics["cv_roc_auc"] >= 0.9


@pytest.mark.timeout(60)
def test_fit_head_needs_two_classes_and_matching_files(cohort: Cohort, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    one = write_annotations(tmp_path / "one.geojson", [Annotation(_box(*PLANTED_PATTERNS[0].box), "Tumor")])
    base = [*TINY, "--cache", cohort.cache, "--out", tmp_path / "h.json"]
    rc, _, err = _run(capsys, "fit-head", cohort.a, "--annotations", one, *base)
    assert rc == 2 and len(_errors(err)) == 1 and "only one class ('Tumor')" in err
    rc, _, err = _run(capsys, "fit-head", cohort.a, cohort.b, "--annotations", one, *base)
    assert rc == 2 and "one annotation file per slide" in _errors(err)[0]
    assert not (tmp_path / "h.json").exists()


@pytest.mark.timeout(60)
def test_heatmap_tiff_lines_up_with_the_slide(cohort: Cohort, head_file: tuple[Path, str], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    rc, out, err = _run(capsys, "heatmap", cohort.a, cohort.b, "--head", head_file[0], *TINY, "--cache",
                        cohort.cache, "--out", tmp_path, "--smooth", 2)  # fmt: skip
    assert rc == 0, err
    for path in (cohort.a, cohort.b):
        tif = tmp_path / f"{path.stem}.heatmap.tif"
        with tifffile.TiffFile(tif) as t:
            data = t.pages[0].asarray()
            assert t.pages[0].is_tiled and data.dtype == np.uint8
        with Slide(path) as slide, Slide(tif) as heat:
            assert heat.mpp == pytest.approx(T / 2 * slide.mpp)
            for d_heat, d_slide in zip(heat.dimensions, slide.dimensions, strict=True):
                assert abs(d_heat * heat.mpp - d_slide * slide.mpp) < T * slide.mpp
        assert read_annotations(tmp_path / f"{path.stem}.heatmap.geojson")
    # brightest pixel of slide B's heatmap lies on its planted pattern (pixel = 112 level-0 px)
    data = tifffile.imread(tmp_path / f"{cohort.b.stem}.heatmap.tif")
    r, c = np.unravel_index(int(np.argmax(data)), data.shape)
    assert _inside(int(c * T / 2 - T / 4), int(r * T / 2 - T / 4), B_PLANTED)


@pytest.mark.timeout(60)
def test_heatmap_refuses_a_head_of_another_encoder(cohort: Cohort, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    other = save_head(LinearHead(np.ones((1, 96)), np.zeros(1), ["a", "b"], encoder="virchow-tiny"),
                      tmp_path / "other.json")  # fmt: skip
    rc, _, err = _run(capsys, "heatmap", cohort.a, "--head", other, *TINY, "--cache", cohort.cache,
                      "--out", tmp_path / "out")  # fmt: skip
    assert rc == 2 and len(_errors(err)) == 1 and "'virchow-tiny'" in err
    assert not (tmp_path / "out").exists()


# --- index and search ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def index_dir(cohort: Cohort) -> Path:
    out = cohort.root / "index"
    assert cli.main(["index", str(cohort.a), str(cohort.b), *TINY, "--cache", str(cohort.cache), "--out",
                     str(out)]) == 0  # fmt: skip
    return out


@pytest.mark.timeout(60)
def test_search_finds_the_pattern_in_the_other_slide(cohort: Cohort, index_dir: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    rc, out, err = _run(capsys, "search", index_dir, "--slide", cohort.a, "--x", 560, "--y", 560, "-k", 5, "--json",
                        "--cache", cohort.cache, "--weights", "random", "--no-progress")  # fmt: skip
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["encoder"] == "virchow2-tiny" and doc["query"]["x"] == 448
    hits = doc["hits"]
    assert len(hits) == 5 and all(h["exists"] for h in hits)
    assert not any(h["slide"] == str(cohort.a.resolve()) and (h["x"], h["y"]) == (448, 448) for h in hits)
    on_b = [h for h in hits if h["slide"] == str(cohort.b.resolve())]
    assert on_b and _inside(on_b[0]["x"], on_b[0]["y"], B_PLANTED), on_b
    rc, out, _ = _run(capsys, "search", index_dir, "--slide", cohort.a, "--x", 560, "--y", 560, "-k", 2,
                      "--other-slides", "--cache", cohort.cache, *TINY)  # fmt: skip
    assert rc == 0 and "score" in out.splitlines()[1] and out.count(str(cohort.b.resolve())) == 2


@pytest.mark.timeout(60)
def test_search_refuses_an_index_of_another_encoder(cohort: Cohort, index_dir: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    rc, _, err = _run(capsys, "search", index_dir, "--slide", cohort.a, "--x", 560, "--y", 560, "--encoder",
                      "virchow-tiny", "--weights", "random", "--cache", cohort.cache)  # fmt: skip
    assert rc == 2 and len(_errors(err)) == 1 and "built from 'virchow2-tiny'" in err


@pytest.mark.timeout(60)
def test_search_with_moved_slides_and_large_k(cohort: Cohort, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    moved = tmp_path / "moved.tif"
    shutil.copy(cohort.b, moved)  # same content: its cached store is found by fingerprint
    rc, _, err = _run(capsys, "index", cohort.a, moved, *TINY, "--cache", cohort.cache, "--out", tmp_path / "i.faiss")
    assert rc == 0, err
    moved.rename(tmp_path / "elsewhere.tif")
    fresh = tmp_path / "fresh-cache"  # the query tile is not cached there: embedded on demand
    rc, out, err = _run(capsys, "search", tmp_path / "i.faiss", "--slide", cohort.a, "--x", 560, "--y", 560, "-k",
                        1000, "--min-distance", 0, "--json", "--cache", fresh, *TINY)  # fmt: skip
    assert rc == 0, err
    assert [s.n_done for s in list_stores(fresh)] == [1]
    warnings = [line for line in err.splitlines() if ": warning: " in line and "moved" in line]
    assert len(warnings) == 1 and "moved.tif" in warnings[0]
    doc = json.loads(out)
    n_indexed = TileGrid(Slide(cohort.a)).n_tissue + TileGrid(Slide(cohort.b)).n_tissue
    assert len(doc["hits"]) == n_indexed - 1  # everything but the query tile itself
    assert any(not h["exists"] for h in doc["hits"]) and doc["missing_slides"] == [str(moved.resolve())]


# --- cache --------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_cache_ls_and_clear(cohort: Cohort, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(cohort.cache, cache)
    rc, out, _ = _run(capsys, "cache", "ls", "--cache", cache)
    n_a = TileGrid(Slide(cohort.a)).n_tissue
    assert rc == 0 and "2 stores" in out and "NAPARI_VIRCHOW_CACHE_MAX_GB" in out
    # 10 × 10, edges in; the magnification tells a slide's stores apart
    assert re.search(rf"{cohort.a.name}\s+virchow2-tiny\s+20× \(0.5 µm/px\)\s+{n_a}/100\s+\d", out), out
    rc, out, _ = _run(capsys, "cache", "ls", "--cache", cache, "--json")
    doc = json.loads(out)
    assert rc == 0 and {Path(s["slide"]).name for s in doc["stores"]} == {cohort.a.name, cohort.b.name}
    assert all(s["size_bytes"] > 0 and s["encoder"] == "virchow2-tiny" for s in doc["stores"])
    rc, out, _ = _run(capsys, "cache", "clear", "--cache", cache, "--mpp", "2")
    assert rc == 0 and "nothing to remove" in out  # both stores are at 0.5 µm/px
    rc, out, _ = _run(capsys, "cache", "clear", "--cache", cache, "--slide", cohort.a.name, "--mpp", "0.5")
    assert rc == 0 and out.count("removed ") == 1 and cohort.a.stem in out
    rc, out, _ = _run(capsys, "cache", "clear", "--cache", cache, "--encoder", "virchow-tiny")
    assert rc == 0 and "nothing to remove" in out
    rc, out, _ = _run(capsys, "cache", "clear", "--cache", cache)
    assert rc == 0 and out.count("removed ") == 1
    rc, out, _ = _run(capsys, "cache", "ls", "--cache", cache, "--json")
    assert json.loads(out)["stores"] == []


def test_help_texts_match_the_code() -> None:
    from napari_virchow.analysis.index import AUTO_FLAT_MAX
    from napari_virchow.cli.options import MAX_UPSAMPLING

    sub = next(a for a in cli.build_parser()._actions if a.dest == "command").choices
    kind = next(a for a in sub["index"]._actions if "--kind" in a.option_strings)
    assert f"{AUTO_FLAT_MAX:,}" in kind.help
    force = next(a for a in sub["embed"]._actions if "--force" in a.option_strings)
    assert f"{MAX_UPSAMPLING:g}×" in force.help


def test_verbose_embed_reports_feed_and_encoder_rates(capsys, sample_svs: Path, tmp_path: Path) -> None:
    """``-v``: both rates of the run and whether the encoder waited for pixels (#16), from a real run."""
    rc, out, err = _run(capsys, "embed", sample_svs, *TINY, "--cache", tmp_path / "cache", "-v")
    assert rc == 0 and "embedded now" in out
    line = next(x for x in err.splitlines() if "feed " in x)
    m = re.search(r"feed ([\d,]+) tiles/s · encoder ([\d,.]+) tiles/s · waited ([\d.]+) s for pixels \(\d+ % of", line)
    assert m, line
    feed, encoder, waited = (float(g.replace(",", "")) for g in m.groups())
    assert sample_svs.name in line and feed > 0 and encoder > 0
    assert waited > 0  # on a CPU tiles are read between batches: the encoder waits for each batch's pixels
    rc, out, err = _run(capsys, "embed", sample_svs, *TINY, "--cache", tmp_path / "cache", "-v")
    assert rc == 0 and "all cached" in out and "feed " not in err  # nothing computed, no rates made up
