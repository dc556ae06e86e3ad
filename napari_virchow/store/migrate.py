"""Carry the embeddings of an old-lattice store (napari-virchow ≤ 0.2) into the current store.

Lattice 1 dropped the partial edge tiles; every tile it had is a whole tile of lattice 2 with the
same level-0 corner, read from the same pixels, so its embedding is the same number. Rather than
compute a slide again after an upgrade, :func:`adopt_old_lattice` copies the verified rows of the
old store (checksummed on read; a damaged old store is skipped, never trusted) into the new one at
the index of the tile with the same corner; only the edge tiles are left to compute. The old store
is left as it was (listed as old by ``cache ls``; ``cache clear`` or LRU eviction removes it).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from napari_virchow.errors import StoreError
from napari_virchow.store.cache import old_lattice_key, old_lattice_store
from napari_virchow.store.embeddings import EmbeddingStore

__all__ = ["adopt_old_lattice"]

log = logging.getLogger(__name__)


def adopt_old_lattice(store: EmbeddingStore, root: Path) -> int:
    """Copy the rows of the lattice-1 store of ``store``'s key (if cached under ``root``) into ``store``.

    Called on a store with nothing done yet (once: afterwards it holds the adopted rows). Rows are
    matched by their level-0 corner (both stores' verified ``coords``); the outcome is logged as a
    warning naming the old store. Returns the number of rows adopted (0 when there is no old store,
    it is damaged or of another key or width, or ``store`` is read-only).
    """
    old_key = old_lattice_key(store.key)
    old_path = old_lattice_store(Path(root), store.key)
    if old_key is None or old_path is None or store.mode != "a" or store.coords is None:
        return 0
    name = store.attrs.get("slide_path") or store.key.slide_fingerprint
    try:
        with EmbeddingStore.from_path(old_path, mode="r") as old:
            if old.key != old_key or old.dim != store.dim or old.coords is None:
                raise StoreError("made for another key or embedding width")
            idx, rows = old.read_done()
            corners = old.coords[idx]
    except StoreError as exc:
        log.warning("%s: the napari-virchow 0.2 store %s (its lattice dropped the partial edge tiles) is not "
                    "adopted (%s); the slide is embedded again. `napari-virchow cache clear` removes it.",
                    name, old_path, exc)  # fmt: skip
        return 0
    where = {(int(x), int(y)): i for i, (x, y) in enumerate(store.coords)}
    target = np.array([where.get((int(x), int(y)), -1) for x, y in corners], np.int64).reshape(-1)
    keep = target >= 0
    keep[keep] = ~store.done[target[keep]]
    if keep.any():
        store.write(target[keep], rows[keep])
    log.warning("%s: adopted %d embeddings from the napari-virchow 0.2 store %s (its lattice dropped the "
                "partial edge tiles): only the edge tiles are left to compute. `napari-virchow cache clear "
                "--slide %s` frees the old store.", name, int(keep.sum()), old_path, Path(str(name)).name)  # fmt: skip
    return int(keep.sum())
