"""``index``/``search`` from the index alone: recorded provenance, moved archives, changed slides, --add/--remove."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from napari_virchow.cli import app as cli
from napari_virchow.slides.synthetic import PlantedSource, Region, write_pyramid

TINY = ["--encoder", "virchow2-tiny", "--weights", "random", "--no-progress"]


def _run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _slide(path: Path, seed: int) -> Path:
    regions = [Region((224, 224, 896, 896)), Region((448, 448, 672, 672), "planted")]
    return write_pyramid(path, 1120, 1120, PlantedSource(regions, seed=seed), mpp=0.5, levels=2)


@pytest.fixture
def archive(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    root = tmp_path / "archive"
    (root / "slides").mkdir(parents=True)
    slides = [_slide(root / "slides" / f"s{i}.tif", seed=i) for i in range(3)]
    rc, _, err = _run(capsys, "embed", *slides, *TINY, "--cache", root / "cache")
    assert rc == 0, err
    rc, out, err = _run(capsys, "index", *slides[:2], *TINY, "--cache", root / "cache", "--out", root / "index")
    assert rc == 0 and "virchow2-tiny" in out, err
    return root


def _search(capsys: pytest.CaptureFixture[str], index: Path, slide: Path, *extra: object) -> tuple[int, dict, str]:
    rc, out, err = _run(capsys, "search", index, "--slide", slide, "--x", 560, "--y", 560, "--json",
                        "--min-distance", 0, "--no-progress", *extra)  # fmt: skip
    return rc, (json.loads(out) if rc == 0 else {}), err


@pytest.mark.timeout(120)
def test_search_needs_only_the_index_and_survives_a_move(archive: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    meta = json.loads((archive / "index" / "INDEX.json").read_text())
    assert meta["weights"] == "random" and meta["mpp"] == 0.5 and meta["tile_size"] == 224
    assert meta["cache_root"] == str((archive / "cache").resolve())
    assert [s["rel_index"] for s in meta["slides"]] == ["../slides/s0.tif", "../slides/s1.tif"]
    # No --weights, --cache or --encoder: all come from the index.
    rc, doc, err = _search(capsys, archive / "index", archive / "slides" / "s0.tif", "-k", 3, "--other-slides")
    assert rc == 0, err
    assert doc["encoder"] == "virchow2-tiny" and doc["hits"] and all(h["slide"].endswith("s1.tif") for h in doc["hits"])
    moved = tmp_path / "moved"
    shutil.move(archive, moved)  # the whole archive: found from the index's own place
    rc, doc, err = _search(capsys, moved / "index", moved / "slides" / "s2.tif", "-k", 2)  # not indexed: cached
    assert rc == 0, err
    assert all(h["exists"] and h["slide"].startswith(str(moved.resolve())) for h in doc["hits"])
    shutil.copytree(moved / "index", tmp_path / "lone")  # the index alone: the archive given by --root
    rc, doc, err = _search(capsys, tmp_path / "lone", moved / "slides" / "s0.tif", "--root", moved / "slides")
    assert rc == 0 and doc["hits"] and all(h["exists"] for h in doc["hits"]), err
    assert doc["missing_slides"] == []


@pytest.mark.timeout(120)
def test_box_query_changed_slide_add_and_remove(archive: Path, capsys: pytest.CaptureFixture[str]) -> None:
    index, slides = archive / "index", archive / "slides"
    rc, doc, err = _search(capsys, index, slides / "s0.tif", "--box", 448, 448, 896, 896)
    assert rc == 0 and doc["query"]["n_tiles"] == 4, err
    rc, out, err = _run(capsys, "index", slides / "s2.tif", slides / "s0.tif", *TINY, "--cache", archive / "cache",
                        "--out", index, "--add")  # fmt: skip
    assert rc == 0 and "s0.tif: already indexed" in out, err
    rc, doc, _ = _search(capsys, index, slides / "s0.tif", "-k", 50)
    assert {Path(h["slide"]).name for h in doc["hits"]} == {"s0.tif", "s1.tif", "s2.tif"}
    n_all = doc["n_indexed"]
    rc, out, err = _run(capsys, "index", "--out", index, "--remove", slides / "s1.tif")
    assert rc == 0 and "removed" in out, err
    rc, doc, _ = _search(capsys, index, slides / "s0.tif", "-k", 50)
    assert doc["n_indexed"] < n_all and "s1.tif" not in {Path(h["slide"]).name for h in doc["hits"]}
    shutil.copy(slides / "s0.tif", slides / "s2.tif")  # s2's file now holds another scan
    rc, doc, err = _search(capsys, index, slides / "s0.tif", "-k", 50)
    assert rc == 0 and doc["changed_slides"] == [str((slides / "s2.tif").resolve())]
    warnings = [line for line in err.splitlines() if ": warning: " in line]
    assert len(warnings) == 1 and "s2.tif" in warnings[0] and "changed" in warnings[0]
    assert {Path(h["slide"]).name for h in doc["hits"]} == {"s0.tif"}  # s2's stale tiles are not used


@pytest.mark.timeout(60)
def test_add_or_remove_without_an_index_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = _run(capsys, "index", "--out", tmp_path / "none", "--remove", "x.tif")
    assert rc == 2 and "no index there" in err and "Traceback" not in err


@pytest.mark.timeout(180)
def test_one_index_per_magnification_and_a_mismatched_query_refused(archive: Path, capsys: pytest.CaptureFixture[str]
                                                                    ) -> None:  # fmt: skip
    slides, cohort = archive / "slides", archive / "cohort"
    for name, mpp in (("x10.faiss", 1.0), ("x20.faiss", 0.5)):
        rc, out, err = _run(capsys, "index", slides / "s0.tif", slides / "s1.tif", *TINY, "--cache", archive / "cache",
                            "--out", cohort / name, "--mpp", mpp)  # fmt: skip
        assert rc == 0 and f"at {10 / mpp:g}× ({mpp:g} µm/px)" in out, err
    meta = json.loads((cohort / "x10.json").read_text())
    assert meta["mpp"] == 1.0 and {s["tile_size_l0"] for s in meta["slides"]} == {448}
    # A 10x query searches the 10x index of the folder; its tiles are the 10x lattice (448 level-0 px).
    rc, doc, err = _search(capsys, cohort, slides / "s0.tif", "--mpp", 1, "--other-slides")
    assert rc == 0 and doc["index"].endswith("x10.faiss") and doc["hits"], err
    assert all(h["x"] % 448 == 0 and h["y"] % 448 == 0 for h in doc["hits"]) and doc["query"]["x"] % 448 == 0
    assert {h["tile_size_l0"] for h in doc["hits"]} == {448}  # each hit's tile, in its slide's level-0 px
    rc, doc, err = _search(capsys, cohort, slides / "s0.tif", "--mpp", 0.5)
    assert rc == 0 and doc["index"].endswith("x20.faiss"), err
    # A query at another magnification than the one index given: refused in one line naming both.
    rc, _, err = _search(capsys, cohort / "x10.faiss", slides / "s0.tif", "--mpp", 0.5)
    assert rc == 2 and "1 µm/px" in err and "0.5 µm/px" in err and "not comparable" in err and "Traceback" not in err
    rc, _, err = _search(capsys, cohort, slides / "s0.tif")  # two indexes, no magnification: which one?
    assert rc == 2 and "x10.faiss at 10× (1 µm/px)" in err and "x20.faiss at 20× (0.5 µm/px)" in err
    rc, _, err = _run(capsys, "index", slides / "s2.tif", *TINY, "--cache", archive / "cache",
                      "--out", cohort / "x10.faiss", "--add", "--mpp", 0.5)  # fmt: skip
    assert rc == 2 and "holds tiles at 10× (1 µm/px)" in err
