"""The embedding store of one (slide, encoder, tile grid): its cache key, and opening it checked.

The key names the slide by content and lattice step (:func:`store_key`); :func:`open_store` creates
or reopens the store, refuses one recording another lattice, and lets a new store adopt what the
previous lattice version computed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from napari_virchow.errors import StoreError
from napari_virchow.models.encoder import Encoder
from napari_virchow.models.specs import get_spec
from napari_virchow.slides.slide import Slide
from napari_virchow.slides.tiling import TileGrid
from napari_virchow.store.cache import lattice_fingerprint
from napari_virchow.store.embeddings import EmbeddingStore, StoreKey
from napari_virchow.store.messages import mismatch
from napari_virchow.store.migrate import adopt_old_lattice

__all__ = ["check_store", "open_store", "store_key"]


def store_key(slide: Slide, encoder: Encoder | str, grid: TileGrid, *, weights_id: str | None = None) -> StoreKey:
    """Cache key of ``slide`` embedded by ``encoder`` (or an encoder name + ``weights_id``) on ``grid``.

    The lattice step is part of the slide's identity: the same file with another µm/px override
    is tiled differently, so it gets its own store rather than a "made by another encoder" refusal.
    """
    name = encoder if isinstance(encoder, str) else encoder.spec.name
    wid = weights_id if weights_id is not None else encoder.weights_id  # type: ignore[union-attr]
    return StoreKey(lattice_fingerprint(slide.fingerprint, grid.tile_size_l0), name, wid, grid.mpp, grid.size)


def open_store(
    slide: Slide,
    encoder: Encoder | str,
    grid: TileGrid,
    *,
    weights_id: str | None = None,
    cache_root: str | os.PathLike[str] | None = None,
    mode: Literal["a", "r", "w"] = "a",
    extra_attrs: Mapping[str, Any] | None = None,
) -> EmbeddingStore:
    """Create or reopen the store of (slide, encoder, grid); one row per lattice tile.

    ``encoder`` is a loaded encoder, or a registered name with ``weights_id`` (no model needed).
    The store records the grid's lattice (attr ``lattice``: version, ``edges: padded-white``, rows,
    cols, slide size; checksummed with the rest of its provenance), which flags its partial edge
    rows; a store recording another lattice is refused (StoreError), never read. A new store adopts
    the rows of the slide's store from 0.2 (:func:`~napari_virchow.store.migrate.adopt_old_lattice`).
    """
    dim = get_spec(encoder).dim if isinstance(encoder, str) else encoder.dim
    lattice = grid.lattice.as_attrs()
    store = EmbeddingStore.open(
        store_key(slide, encoder, grid, weights_id=weights_id), n_tiles=len(grid), dim=dim,
        root=None if cache_root is None else Path(cache_root), slide_path=str(slide.path.resolve()),
        coords=grid.coords, tile_size_l0=grid.tile_size_l0, mode=mode,
        extra_attrs={**(extra_attrs or {}), "lattice": lattice},
    )  # fmt: skip
    recorded = store.attrs.get("lattice")
    if recorded is not None and recorded != lattice:
        store.close()
        raise mismatch(store.path, f"its tile lattice {recorded} is not the slide's {lattice}")
    if store.mode == "a" and store.n_done == 0:  # a new store: keep what 0.2 computed (store/migrate.py)
        adopt_old_lattice(store, store.path.parent)
    return store


def check_store(store: EmbeddingStore, grid: TileGrid, encoder: Encoder) -> None:
    """Refuse a store whose shape is not ``grid`` × ``encoder.dim`` (StoreError naming both)."""
    if (store.n_tiles, store.dim) != (len(grid), encoder.dim):
        raise StoreError(
            f"store at {store.path} holds {store.n_tiles} tiles × {store.dim} dims, but this "
            f"grid has {len(grid)} tiles and {encoder.spec.name} {encoder.dim} dims"
        )
