"""The identity of an embedding store: embeddings are never mixed across any of its fields.

The magnification is part of the key (``mpp``, the µm/px tiles were read at), together with the
lattice step in level-0 px (the ``-step<N>`` suffix :func:`napari_virchow.stores.store_key` puts
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

__all__ = ["StoreKey", "canonical_mpp", "mag_name", "lattice_fingerprint", "lattice_version_of", "old_lattice_key",
           "slide_fingerprint_of"]

#: decimals of µm/px kept in a key: float noise (0.5 vs 0.50000001) maps to one store
MPP_DECIMALS = 6


def canonical_mpp(mpp: float) -> float:
    """``mpp`` as keys hold it (rounded to :data:`MPP_DECIMALS`); use it to index stores per level."""
    return round(float(mpp), MPP_DECIMALS)


def mag_name(mpp: float) -> str:
    """``"20× (0.5 µm/px)"``: a magnification as every read-out and message names it (10 µm/px ≈ 1×)."""
    return f"{10 / mpp:.3g}× ({canonical_mpp(mpp):g} µm/px)"


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
        """Objective power of ``mpp`` for people, e.g. ``"20× (0.5 µm/px)"`` (:func:`mag_name`)."""
        return mag_name(self.mpp)

    @property
    def digest(self) -> str:
        """SHA-256 (hex) of the canonical JSON of the key."""
        blob = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


#: separates a slide's fingerprint from its lattice step in the store key's slide field
_STEP = "-step"
#: ends the slide field of lattice 2 (partial edge tiles kept, padded white; see slides/lattice.py)
_EDGES = "-edges"


def lattice_fingerprint(fingerprint: str, step_l0: int, *, edges: bool = True) -> str:
    """The store key's slide field: the slide fingerprint, its lattice step (tile side in level-0 px)
    and the lattice version.

    The same file tiled with another µm/px override has another lattice, so another store.
    ``edges``: lattice 2, whose partial edge tiles are rows of the store (``<fp>-step<N>-edges``);
    ``False`` gives lattice 1's field (``<fp>-step<N>``, napari-virchow ≤ 0.2, edge tiles dropped),
    so a store of the old lattice has another digest and is never opened as one of the new.
    """
    return f"{fingerprint}{_STEP}{int(step_l0)}{_EDGES if edges else ''}"


def _split(key_fingerprint: str) -> tuple[str, int | None]:
    body = key_fingerprint.removesuffix(_EDGES)
    head, sep, step = body.rpartition(_STEP)
    if not (sep and step.isdigit()):
        return key_fingerprint, None
    return head, 2 if body != key_fingerprint else 1


def slide_fingerprint_of(key_fingerprint: str) -> str:
    """The bare slide fingerprint of a store key's slide field (inverse of :func:`lattice_fingerprint`)."""
    return _split(key_fingerprint)[0]


def lattice_version_of(key_fingerprint: str) -> int | None:
    """The lattice version of a store key's slide field: 2 (edge tiles kept), 1 (dropped), None (no step)."""
    return _split(key_fingerprint)[1]


def old_lattice_key(key: StoreKey) -> StoreKey | None:
    """The key 0.2 gave the store of ``key`` (lattice 1: ``-step<N>`` without ``-edges``), or None."""
    if lattice_version_of(key.slide_fingerprint) != 2:
        return None
    return dataclasses.replace(key, slide_fingerprint=key.slide_fingerprint.removesuffix(_EDGES))
