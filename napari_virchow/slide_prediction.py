"""A slide head applied to one slide of a session, without Qt: probabilities, and where it attended.

:func:`predict_slide` reads the session's embeddings of every tissue tile at the head's
magnification (through the session's store: checksummed, never a missing row read as zeros),
checks that the head fits (encoder, weights, µm/px, tile size), and returns a :class:`SlideResult`
whose attention values belong to ``result.indices`` (tiles of the grid at ``result.mpp``).
:func:`embed_missing` embeds what is missing first (the CLI runs it; the viewer runs its embed job).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from napari_virchow.errors import VirchowError

if TYPE_CHECKING:
    from napari_virchow.analysis.mil import SlideHead, SlidePrediction
    from napari_virchow.analysis.rasters import Raster
    from napari_virchow.inference import BatchResult
    from napari_virchow.session import SlideSession

__all__ = ["NotEmbeddedError", "SlideResult", "embed_missing", "missing_tiles", "predict_slide", "slide_bag"]


class NotEmbeddedError(VirchowError):
    """Tissue tiles a slide head needs are not embedded yet."""


@dataclass
class SlideResult:
    """A slide head's prediction on one slide, and the tiles its attention values belong to."""

    prediction: SlidePrediction
    indices: np.ndarray  # (n,) int64 tiles of the grid at ``mpp``, in the order of ``prediction.attention``
    mpp: float
    n_tiles: int  # tiles of the grid at ``mpp`` (tissue or not)
    slide_path: str

    @property
    def probabilities(self) -> dict[str, float]:
        """Class → probability."""
        return self.prediction.probabilities

    @property
    def attention(self) -> np.ndarray:
        """(n,) float32, sums to 1, one value per tile of ``indices``."""
        return self.prediction.attention

    def tile_values(self, *, normalize: bool = True) -> np.ndarray:
        """Attention per tile of the whole grid at ``mpp`` (NaN off tissue); ``normalize`` divides by the maximum
        (so the most attended tile is 1, what an overlay colormap wants)."""
        values = np.full(self.n_tiles, np.nan, np.float32)
        a = self.attention
        values[self.indices] = a / a.max() if normalize and a.max() > 0 else a
        return values

    def top_tiles(self, k: int = 20) -> np.ndarray:
        """The ``k`` most attended tiles (indices of the grid at ``mpp``), most attended first."""
        order = np.argsort(-self.attention, kind="stable")[:k]
        return self.indices[order]

    def raster(self, session: SlideSession, *, smooth: int = 0, normalize: bool = True) -> Raster:
        """The attention map as a raster aligned with the slide in µm (``session.raster`` at ``mpp``)."""
        return session.raster(self.tile_values(normalize=normalize), smooth=smooth, mpp=self.mpp)


def _check(session: SlideSession, head: SlideHead) -> None:
    spec = session.config.spec
    head.check_compatible(encoder=session.config.encoder, weights_digest=session.weights_id, mpp=head.mpp,
                          tile_size=spec.input_size)  # fmt: skip
    if head.mpp not in session.mpps and head.mpp != session.default_mpp:
        from napari_virchow.errors import SlideError

        have = ", ".join(f"{m:g}" for m in session.mpps) or "none"
        raise SlideError(f"{session.slide.path.name} cannot give {head.mpp:g} µm/px embeddings (it is scanned at "
                         f"{session.slide.require_mpp():g} µm/px; it offers {have} µm/px): this slide head was trained "
                         f"at {head.mpp:g} µm/px; use a slide scanned at that magnification or a head fitted at one "
                         "it offers")  # fmt: skip
    session.check_mpp(head.mpp)


def missing_tiles(session: SlideSession, head: SlideHead) -> np.ndarray:
    """Tissue tiles at the head's µm/px not embedded yet (indices of the grid at ``head.mpp``)."""
    return session.missing(session.grid_at(head.mpp).tissue_indices, mpp=head.mpp)


def embed_missing(session: SlideSession, head: SlideHead) -> Iterator[BatchResult]:
    """Embed the missing tissue tiles at the head's µm/px (after checking the head fits), yielding per batch."""
    _check(session, head)
    todo = missing_tiles(session, head)
    if len(todo):
        yield from session.compute(indices=todo, mpp=head.mpp)


def slide_bag(session: SlideSession, mpp: float) -> tuple[np.ndarray, np.ndarray]:
    """(tissue tile indices, float32 embeddings) at ``mpp``, read verified from the store; NotEmbeddedError
    saying how many are missing otherwise."""
    idx = session.grid_at(mpp).tissue_indices
    if not len(idx):
        raise NotEmbeddedError(f"{session.slide.path.name} has no tissue tile at {mpp:g} µm/px: check its tissue "
                               "threshold, or leave this slide out")  # fmt: skip
    missing = session.missing(idx, mpp=mpp)
    if len(missing):
        raise NotEmbeddedError(f"{len(missing)} of {len(idx)} tissue tiles of {session.slide.path.name} are not "
                               f"embedded at {mpp:g} µm/px: embed them first (napari-virchow embed --mpp {mpp:g}, "
                               "or Embed in the viewer)")  # fmt: skip
    return idx, session.read(idx, mpp=mpp)


def predict_slide(session: SlideSession, head: SlideHead) -> SlideResult:
    """Apply ``head`` to every tissue tile of ``session``'s slide at ``head.mpp`` (all must be embedded).

    Raises HeadError when the head does not fit the session's encoder / weights / tile size,
    SlideError when the slide cannot give the head's µm/px, NotEmbeddedError (with the count)
    when tissue tiles are not embedded yet.
    """
    _check(session, head)
    idx, emb = slide_bag(session, head.mpp)
    prediction = head.predict(emb)
    return SlideResult(prediction, idx, head.mpp, len(session.grid_at(head.mpp)), session.slide_path)
