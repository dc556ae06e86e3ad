"""Provenance on every export, and `import-features`: features computed elsewhere reused, not recomputed."""

from __future__ import annotations

import json
import re
from pathlib import Path

import h5py
import numpy as np
import pytest

from napari_virchow.cli import app as cli
from napari_virchow.config import SessionConfig
from napari_virchow.io.export import read_features_h5
from napari_virchow.io.provenance import PROVENANCE_KEYS, weights_origin
from napari_virchow.session import SlideSession

TINY = ["--encoder", "virchow2-tiny", "--weights", "random", "--no-progress"]


def _run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _stored(slide: Path, cache: Path) -> tuple[np.ndarray, np.ndarray]:
    config = SessionConfig(encoder="virchow2-tiny", weights="random", cache_root=cache, device="cpu")
    with SlideSession(slide, config) as session:
        return session.embedded(tissue_only=True)


@pytest.fixture(scope="module")
def exported(planted_slide: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The planted slide embedded once and exported: (cache, features .h5)."""
    root = tmp_path_factory.mktemp("exported")
    cache, out = root / "cache", root / "out"
    assert cli.main(["export", str(planted_slide), *TINY, "--cache", str(cache), "--out", str(out)]) == 0
    return cache, out / f"{planted_slide.stem}.h5"


def test_h5_export_carries_provenance(exported: tuple[Path, Path], planted_slide: Path) -> None:
    f = read_features_h5(exported[1])
    assert set(PROVENANCE_KEYS) <= set(f.file_attrs)
    assert f.file_attrs["encoder"] == "virchow2-tiny" and f.file_attrs["weights_source"] == "random"
    assert f.file_attrs["weights_id"].startswith("random-seed")
    assert f.file_attrs["tile_size"] == 224 and f.file_attrs["target_mpp"] == 0.5 and f.file_attrs["mpp"] == 0.5
    assert f.file_attrs["tissue_threshold"] > 0 and f.file_attrs["slide_name"] == planted_slide.name
    assert len(f.file_attrs["slide_fingerprint"]) >= 16
    assert f.attrs["patch_size"] == 224 and f.attrs["patch_size_level0"] == 224  # TRIDENT's coords attrs
    assert weights_origin("hf-cache:paige-ai/Virchow2@abc") == ("paige-ai/Virchow2", "abc")


def test_geojson_export_carries_provenance(exported: tuple[Path, Path], planted_slide: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    rc, _, err = _run(capsys, "export", planted_slide, *TINY, "--cache", exported[0], "--out", tmp_path,
                      "--clusters", 2)  # fmt: skip
    assert rc == 0, err
    data = json.loads((tmp_path / f"{planted_slide.stem}.clusters.geojson").read_text())
    assert data["napari_virchow"]["encoder"] == "virchow2-tiny"
    assert set(PROVENANCE_KEYS) <= set(data["napari_virchow"])


def test_import_our_export_into_an_empty_cache(exported: tuple[Path, Path], planted_slide: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    cache = tmp_path / "fresh"
    rc, out, err = _run(capsys, "import-features", exported[1], "--slide", planted_slide, *TINY, "--cache", cache)
    assert rc == 0, err
    f = read_features_h5(exported[1])
    assert f"imported {len(f.coords)} of {len(f.coords)} tiles" in out
    idx, emb = _stored(planted_slide, cache)
    idx0, emb0 = _stored(planted_slide, exported[0])
    np.testing.assert_array_equal(idx, idx0)
    np.testing.assert_array_equal(emb, emb0)
    rc, out, err = _run(capsys, "embed", planted_slide, *TINY, "--cache", cache)
    assert rc == 0 and f"{len(f.coords)} tissue tiles, all cached" in out, out  # nothing recomputed
    rc, out, _ = _run(capsys, "import-features", exported[1], "--slide", planted_slide, *TINY, "--cache", cache)
    assert rc == 0 and f"imported 0 of {len(f.coords)}" in out and f"{len(f.coords)} were already cached" in out


def _trident_copy(src: Path, folder: Path, *, dim: int | None = None, patch: int = 224) -> Path:
    """The same features as TRIDENT writes them: no root provenance, encoder in the folder name."""
    f = read_features_h5(src)
    folder.mkdir(parents=True)
    path = folder / src.name
    feats = f.features if dim is None else np.zeros((len(f.features), dim), np.float32)
    with h5py.File(path, "w") as h:
        h.create_dataset("features", data=feats).attrs.update({"name": src.stem, "savetodir": str(folder)})
        c = h.create_dataset("coords", data=f.coords)
        c.attrs.update({"patch_size": patch, "patch_size_level0": patch, "level0_magnification": 20,
                        "target_magnification": 20, "overlap": 0, "name": src.stem, "savetodir": str(folder)})
    return path


def test_import_a_trident_file(exported: tuple[Path, Path], planted_slide: Path, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    path = _trident_copy(exported[1], tmp_path / "20x_224px_0px_overlap" / "features_virchow2-tiny")
    cache = tmp_path / "c"
    rc, out, err = _run(capsys, "import-features", path, "--slide", planted_slide, *TINY, "--cache", cache)
    assert rc == 0 and "(trident)" in out, err
    np.testing.assert_array_equal(_stored(planted_slide, cache)[1], _stored(planted_slide, exported[0])[1])


@pytest.mark.parametrize(("folder", "dim", "patch", "match"), [
    ("features_virchow2", None, 224, "holds virchow2 features, not virchow2-tiny"),
    ("features_virchow2-tiny", 7, 224, r"have \(7,\) values per tile"),
    ("features_virchow2-tiny", None, 256, "its tiles are 256 px.*span 256 level-0 px"),
])  # fmt: skip
def test_mismatched_files_are_refused_in_one_message(exported: tuple[Path, Path], planted_slide: Path,
                                                     tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     folder: str, dim: int | None, patch: int, match: str) -> None:
    path = _trident_copy(exported[1], tmp_path / folder, dim=dim, patch=patch)
    cache = tmp_path / "c"
    rc, _, err = _run(capsys, "import-features", path, "--slide", planted_slide, *TINY, "--cache", cache)
    assert rc == 2 and err.count("error:") == 1 and "Traceback" not in err
    assert f"{path.name} does not fit {planted_slide.name}" in err
    assert re.search(match, err), err
    assert not cache.exists() or not any(cache.rglob("*.json"))  # nothing was written
