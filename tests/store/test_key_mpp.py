"""The magnification is part of a store's key: one slide at two µm/px gives two stores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_virchow.errors import StoreError
from napari_virchow.slides.slide import Slide
from napari_virchow.slides.tiling import TileGrid
from napari_virchow.store.embeddings import EmbeddingStore
from napari_virchow.store.key import StoreKey, canonical_mpp
from napari_virchow.stores import store_key

DIM = 8


def test_key_digest_is_frozen() -> None:
    # Stores written before level-of-detail inference must be found by the same digest:
    # changing the canonical JSON would orphan every cached embedding.
    key = StoreKey("abc-step224", "virchow2", "random:virchow2", 0.5, 224)
    assert key.as_dict() == {"slide_fingerprint": "abc-step224", "encoder": "virchow2",
                             "weights_id": "random:virchow2", "mpp": 0.5, "tile_size": 224}
    assert key.digest == "f67c0bd033e15a95a691f090b32a27a60708fc72dd9370b4e9cff7affa5e12ba"


def test_mpp_noise_maps_to_one_key_and_levels_to_distinct_keys() -> None:
    a = StoreKey("fp", "virchow2", "w", 0.5, 224)
    assert a.digest == StoreKey("fp", "virchow2", "w", 0.5 + 1e-9, 224).digest
    assert a.digest != StoreKey("fp", "virchow2", "w", 2.0, 224).digest
    assert canonical_mpp(0.50000001) == 0.5 and canonical_mpp(2) == 2.0
    assert a.magnification == "20× (0.5 µm/px)"
    assert StoreKey("fp", "virchow2", "w", 2.0, 224).magnification == "5× (2 µm/px)"


def _open(slide: Slide, grid: TileGrid, root: Path, mode: str = "a") -> EmbeddingStore:
    key = store_key(slide, "virchow2-tiny", grid, weights_id="random:virchow2-tiny")
    return EmbeddingStore.open(key, n_tiles=len(grid), dim=DIM, root=root, slide_path=str(slide.path),
                               coords=grid.coords, tile_size_l0=grid.tile_size_l0, mode=mode)  # type: ignore[arg-type]


def test_two_magnifications_of_one_slide_give_two_stores(planted_slide: Path, tmp_path: Path) -> None:
    with Slide(planted_slide) as slide:
        fine, coarse = TileGrid(slide, mpp=0.5), TileGrid(slide, mpp=2.0)
        assert (fine.tile_size_l0, coarse.tile_size_l0) == (224, 896)
        with _open(slide, fine, tmp_path) as s_fine, _open(slide, coarse, tmp_path) as s_coarse:
            assert s_fine.path != s_coarse.path
            assert (s_fine.n_tiles, s_coarse.n_tiles) == (len(fine), len(coarse))
            assert (s_fine.key.mpp, s_coarse.key.mpp) == (0.5, 2.0)
            rows = np.full((2, DIM), 0.25, np.float32)
            s_fine.write(np.array([0, 1]), rows)
            s_coarse.write(np.array([3]), rows[:1])
        # Reopened read-only by key, each level holds only what was written at it.
        with _open(slide, fine, tmp_path, "r") as s_fine, _open(slide, coarse, tmp_path, "r") as s_coarse:
            assert s_fine.done.nonzero()[0].tolist() == [0, 1]
            assert s_coarse.done.nonzero()[0].tolist() == [3]
            np.testing.assert_array_equal(s_coarse.read([3]), rows[:1])
        assert len(list(tmp_path.iterdir())) == 2


def test_a_level_never_opens_another_levels_store(planted_slide: Path, tmp_path: Path) -> None:
    with Slide(planted_slide) as slide:
        fine, coarse = TileGrid(slide, mpp=0.5), TileGrid(slide, mpp=2.0)
        _open(slide, fine, tmp_path).close()
        with pytest.raises(StoreError, match="no embeddings cached"):
            _open(slide, coarse, tmp_path, "r")
