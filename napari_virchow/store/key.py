"""The identity of an embedding store: embeddings are never mixed across any of its fields."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import numpy as np

__all__ = ["StoreKey"]


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
            "mpp": round(float(self.mpp), 6),
            "tile_size": int(self.tile_size),
        }

    @property
    def digest(self) -> str:
        """SHA-256 (hex) of the canonical JSON of the key."""
        blob = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()
