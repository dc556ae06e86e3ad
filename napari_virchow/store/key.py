"""The identity of an embedding store: embeddings are never mixed across any of its fields.

The magnification is part of the key (``mpp``, the µm/px tiles were read at), together with the
lattice step in level-0 px (the ``-step<N>`` suffix :func:`napari_virchow.inference.store_key` puts
on the slide fingerprint): one slide embedded at 0.5 and 2.0 µm/px has two stores, an *embedding
pyramid*. The canonical JSON and its digest are frozen (tests pin a digest). The slide field also
names the lattice version (``-edges``: partial edge tiles are rows, see
:mod:`napari_virchow.slides.lattice`), so a store of the ≤ 0.2 lattice, which dropped them, has
another digest and is never read as a current one (it is listed as old and recomputed).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import numpy as np

__all__ = ["StoreKey", "canonical_mpp"]

#: decimals of µm/px kept in a key: float noise (0.5 vs 0.50000001) maps to one store
MPP_DECIMALS = 6


def canonical_mpp(mpp: float) -> float:
    """``mpp`` as keys hold it (rounded to :data:`MPP_DECIMALS`); use it to index stores per level."""
    return round(float(mpp), MPP_DECIMALS)


@dataclasses.dataclass(frozen=True)
class StoreKey:
    """Identity of a store: embeddings are never mixed across any of these fields."""

    slide_fingerprint: str
    encoder: str
    weights_id: str
    mpp: float
    tile_size: int

    def __post_init__(self) -> None:
        for name in ("slide_fingerprint", "encoder", "weights_id"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"StoreKey.{name} must be a non-empty string")
        if not np.isfinite(self.mpp) or self.mpp <= 0:
            raise ValueError(f"StoreKey.mpp must be a positive number, got {self.mpp!r}")
        if int(self.tile_size) != self.tile_size or self.tile_size <= 0:
            raise ValueError(f"StoreKey.tile_size must be a positive int, got {self.tile_size!r}")

    def as_dict(self) -> dict[str, Any]:
        """The key as plain JSON types (mpp rounded to 1e-6 so float noise maps to one store)."""
        return {
            "slide_fingerprint": self.slide_fingerprint,
            "encoder": self.encoder,
            "weights_id": self.weights_id,
            "mpp": canonical_mpp(self.mpp),
            "tile_size": int(self.tile_size),
        }

    @property
    def magnification(self) -> str:
        """Objective power of ``mpp`` for people, e.g. ``"20× (0.5 µm/px)"`` (10 µm/px ≈ 1×)."""
        return f"{10 / self.mpp:.3g}× ({canonical_mpp(self.mpp):g} µm/px)"

    @property
    def digest(self) -> str:
        """SHA-256 (hex) of the canonical JSON of the key."""
        blob = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()
