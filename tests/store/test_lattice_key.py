"""A store of the old lattice (≤ 0.2: partial edge tiles dropped) is never read as one of the new."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from napari_virchow.cli.app import main
from napari_virchow.errors import StoreError
from napari_virchow.inference import open_store, store_key
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

ENC, WID = "virchow2-tiny", "random:virchow2-tiny"


def _old_store(slide: Slide, grid: TileGrid, root: Path) -> EmbeddingStore:
    """What 0.2 wrote: the floor lattice (rows = height // t) under the ``-step<N>`` slide field."""
    t = grid.tile_size_l0
    w, h = slide.dimensions
    rows, cols = h // t, w // t
    r, c = np.divmod(np.arange(rows * cols), cols)
    coords = np.stack([c, r], axis=1) * t
    key = StoreKey(lattice_fingerprint(slide.fingerprint, t, edges=False), ENC, WID, grid.mpp, grid.size)
    store = EmbeddingStore.open(key, n_tiles=rows * cols, dim=1280 * 2, root=root, slide_path=str(slide.path),
                                coords=coords, tile_size_l0=t)  # fmt: skip
    store.write(np.arange(5), np.full((5, store.dim), 0.5, np.float32))
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
            assert new.path != old_path and new.n_tiles == len(grid) and not new.done.any()  # recomputed
            assert new.attrs["lattice"] == grid.lattice.as_attrs()
            np.testing.assert_array_equal(new.coords, grid.coords)
        assert str(old_path) in caplog.text and "cache clear" in caplog.text and "edge tiles" in caplog.text
        infos = {i.path: i for i in list_stores(tmp_path)}
        assert infos[old_path].old_lattice and not infos[new.path].old_lattice
        # the old store is intact (a downgrade still reads it) and found by the slide's name for clearing
        with EmbeddingStore.from_path(old_path) as again:
            assert again.done.nonzero()[0].tolist() == [0, 1, 2, 3, 4]


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
    assert out.count("old lattice, not read") == 1
    assert main(["cache", "clear", "--slide", "planted.tif", "--cache", str(tmp_path)]) == 0
    assert list_stores(tmp_path) == []
