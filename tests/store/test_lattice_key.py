"""A store of the old lattice (≤ 0.2: partial edge tiles dropped) is never read as one of the new;
a new store adopts its rows by tile corner, so only the edge tiles are computed again."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from napari_virchow.cli.app import main
from napari_virchow.config import SessionConfig
from napari_virchow.errors import StoreError
from napari_virchow.models.specs import get_spec
from napari_virchow.session import SlideSession
from napari_virchow.slides.slide import Slide
from napari_virchow.slides.tiling import TileGrid
from napari_virchow.store.cache import (
    lattice_fingerprint,
    lattice_version_of,
    list_stores,
    slide_fingerprint_of,
)
from napari_virchow.store.embeddings import EmbeddingStore
from napari_virchow.store.key import StoreKey
from napari_virchow.stores import open_store, store_key
from tests.conftest import run_as_nobody

ENC, WID = "virchow2-tiny", "random:virchow2-tiny"
#: rows 0.2 computed on the 2048-px slide's 9 × 9 lattice, and where they are on the 10 × 10 one
OLD_DONE, NEW_INDEX = np.array([0, 1, 9, 80]), np.array([0, 1, 10, 88])


def _old_store(slide: Slide, grid: TileGrid, root: Path, dim: int | None = None, wid: str = WID) -> EmbeddingStore:
    """What 0.2 wrote: the floor lattice (rows = height // t) under the ``-step<N>`` slide field."""
    t = grid.tile_size_l0
    w, h = slide.dimensions
    rows, cols = h // t, w // t
    r, c = np.divmod(np.arange(rows * cols), cols)
    coords = np.stack([c, r], axis=1) * t
    key = StoreKey(lattice_fingerprint(slide.fingerprint, t, edges=False), ENC, wid, grid.mpp, grid.size)
    store = EmbeddingStore.open(key, n_tiles=rows * cols, dim=dim or get_spec(ENC).dim, root=root,
                                slide_path=str(slide.path), coords=coords, tile_size_l0=t)  # fmt: skip
    emb = np.arange(len(OLD_DONE), dtype=np.float32)[:, None] + np.linspace(0, 1, store.dim, dtype=np.float32)
    store.write(OLD_DONE, emb)
    return store


def test_lattice_field_round_trips() -> None:
    assert lattice_fingerprint("fp", 224) == "fp-step224-edges" and lattice_version_of("fp-step224-edges") == 2
    assert lattice_fingerprint("fp", 224, edges=False) == "fp-step224" and lattice_version_of("fp-step224") == 1
    assert slide_fingerprint_of("fp-step224-edges") == slide_fingerprint_of("fp-step224") == "fp"
    assert lattice_version_of("fp") is None and slide_fingerprint_of("fp-stepx") == "fp-stepx"


@pytest.mark.timeout(60)
def test_an_old_lattice_store_is_not_read_and_is_reported(planted_slide: Path, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    with Slide(planted_slide) as slide:
        grid = TileGrid(slide)
        assert grid.lattice.partial.any()  # 2048 px: a partial last row and column
        with _old_store(slide, grid, tmp_path) as old:
            old_path, old_n = old.path, old.n_tiles
        assert old_n < len(grid)
        with caplog.at_level(logging.WARNING), open_store(slide, ENC, grid, weights_id=WID, cache_root=tmp_path) as new:
            assert new.path != old_path and new.n_tiles == len(grid)
            assert new.attrs["lattice"] == grid.lattice.as_attrs()
            np.testing.assert_array_equal(new.coords, grid.coords)
            # the old rows are adopted at the tiles with the same corners; the rest is to compute
            np.testing.assert_array_equal(np.flatnonzero(new.done), NEW_INDEX)
            with EmbeddingStore.from_path(old_path) as again:
                np.testing.assert_array_equal(new.read(NEW_INDEX), again.read(OLD_DONE))
                np.testing.assert_array_equal(again.coords[OLD_DONE], grid.coords[NEW_INDEX])
        assert str(old_path) in caplog.text and "adopted 4 embeddings" in caplog.text and "cache clear" in caplog.text
        caplog.clear()
        with caplog.at_level(logging.WARNING), open_store(slide, ENC, grid, weights_id=WID, cache_root=tmp_path):
            assert "adopted" not in caplog.text  # once, when the new store is made
        infos = {i.path: i for i in list_stores(tmp_path)}
        assert infos[old_path].old_lattice and not infos[new.path].old_lattice
        with EmbeddingStore.from_path(old_path) as again:  # the old store is left intact
            assert again.done.nonzero()[0].tolist() == OLD_DONE.tolist()


@pytest.mark.timeout(60)
def test_an_old_store_under_the_new_name_is_refused(planted_slide: Path, tmp_path: Path) -> None:
    """Even moved to the new key's folder name, the old store's key and shape say it is another lattice."""
    with Slide(planted_slide) as slide:
        grid = TileGrid(slide)
        with _old_store(slide, grid, tmp_path) as old:
            old_path = old.path
        digest = store_key(slide, ENC, grid, weights_id=WID).digest[:16]
        shutil.move(old_path, tmp_path / f"planted--{ENC}--{digest}")
        with pytest.raises(StoreError, match="slide_fingerprint"):
            open_store(slide, ENC, grid, weights_id=WID, cache_root=tmp_path)


@pytest.mark.timeout(60)
def test_cache_list_marks_old_stores_and_clear_removes_them(planted_slide: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    with Slide(planted_slide) as slide:
        grid = TileGrid(slide)
        _old_store(slide, grid, tmp_path).close()
        open_store(slide, ENC, grid, weights_id=WID, cache_root=tmp_path).close()
    assert main(["cache", "ls", "--cache", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("old lattice (0.2), superseded: clear it") == 1
    assert main(["cache", "clear", "--slide", "planted.tif", "--cache", str(tmp_path)]) == 0
    assert list_stores(tmp_path) == []


@pytest.mark.timeout(60)
def test_an_old_store_of_another_width_is_not_adopted(planted_slide: Path, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    with Slide(planted_slide) as slide:
        grid = TileGrid(slide)
        _old_store(slide, grid, tmp_path, dim=get_spec(ENC).dim + 2).close()
        with caplog.at_level(logging.WARNING), open_store(slide, ENC, grid, weights_id=WID, cache_root=tmp_path) as new:
            assert not new.done.any()
        assert "not adopted" in caplog.text and "embedded again" in caplog.text



@pytest.mark.timeout(60)
def test_a_plan_counts_the_tiles_a_new_store_will_adopt(planted_slide: Path, tmp_path: Path) -> None:
    """Plans and ETAs right after an upgrade do not count 0.2's tiles as to compute, and the tiles a
    plan counts as cached are readable: the plan makes the new store, which adopts them."""
    config = SessionConfig(encoder=ENC, weights="random", device="cpu", dtype="fp32", cache_root=tmp_path)
    with SlideSession(planted_slide, config) as session:
        grid = session.grid
        everything = np.arange(len(grid))
        assert session.plan(indices=everything).n_todo == len(grid)  # nothing cached
        _old_store(session.slide, grid, tmp_path, wid=session.weights_id).close()
        p = session.plan(indices=everything)
        assert (p.n_cached, p.n_todo) == (len(NEW_INDEX), len(grid) - len(NEW_INDEX))
        p = session.plan(indices=[0, 2, 10, 99])  # 0 and 10 are adopted
        assert (p.n_total, p.n_cached, p.n_todo) == (4, 2, 2)
        np.testing.assert_array_equal(np.flatnonzero(session.done_at()), NEW_INDEX)  # and read back
        idx, emb = session.embedded(tissue_only=False)
        np.testing.assert_array_equal(idx, NEW_INDEX)
        assert np.isfinite(emb).all() and not (emb == 0).all(axis=1).any()


@pytest.mark.timeout(60)
def test_a_read_only_cache_plans_the_old_tiles_as_to_compute(planted_slide: Path) -> None:
    """Where the new store cannot be made, nothing is adopted, and the plan says so."""
    root = Path(tempfile.mkdtemp(prefix="nv-adopt-"))  # pytest's tmp_path sits below a 0700 folder
    config = SessionConfig(encoder=ENC, weights="random", device="cpu", dtype="fp32", cache_root=root)
    try:
        with SlideSession(planted_slide, config) as session:
            _old_store(session.slide, session.grid, root, wid=session.weights_id).close()
            session.encoder(), session.store_key()  # loaded and fingerprinted before dropping root
            root.chmod(0o555)
            out = run_as_nobody(lambda: str(session.plan(indices=np.arange(len(session.grid))).n_todo))
            assert out == str(len(session.grid)), out
    finally:
        root.chmod(0o755)
        shutil.rmtree(root, ignore_errors=True)
