"""The labelling loop's job (Qt-free, in the style of :mod:`napari_virchow.jobs`): tiles to label next."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from napari_virchow.analysis.suggest import Suggestion, suggest_tiles
from napari_virchow.errors import VirchowError
from napari_virchow.jobs import Stage, _tile_picture, cancellable
from napari_virchow.session import SlideSession

__all__ = ["Suggested", "suggest_job"]


@dataclass(frozen=True)
class Suggested:
    """Tiles to label next, best first, with small RGB thumbnails; all at level ``mpp``."""

    suggestions: list[Suggestion]
    thumbnails: list[np.ndarray] = field(repr=False)
    mpp: float
    tile_size_l0: int
    positive_class: str
    n_labelled: int


def _level(session: SlideSession) -> float:
    """The level whose probabilities the suggestions come from: the probe's own, else the encoder's."""
    head = session.head
    if head is not None and head.mpp in session.probabilities:
        return head.mpp
    if session.default_mpp in session.probabilities:
        return session.default_mpp
    if session.probabilities:
        return max(session.probabilities, key=lambda m: int(np.isfinite(session.probabilities[m]).sum()))
    raise VirchowError("no embedded tile has a probability yet: compute tiles (Compute visible) and "
                       "train the probe first")  # fmt: skip


@cancellable
def suggest_job(session: SlideSession, polygons: Sequence[np.ndarray], classes: Sequence[str], *, k: int = 10,
                min_distance_tiles: int = 2, cancel: threading.Event | None = None) -> Iterator[object]:  # fmt: skip
    """The ``k`` embedded tissue tiles the probe is least sure of, far from the annotated ones
    (:func:`~napari_virchow.analysis.suggest.suggest_tiles`); ``polygons`` are level-0 (x, y) px."""
    if session.head is None:
        raise VirchowError("no probe to ask: draw regions of two classes and press 'Train from annotations' "
                           "(or load a head) first")  # fmt: skip
    yield Stage("choosing tiles to label …")
    m = _level(session)
    grid = session.grid_at(m)
    labelled = session.annotated_tiles(polygons, classes, mpp=m)[0] if len(polygons) else np.zeros(0, np.int64)
    found = suggest_tiles(session.probabilities[m], grid.coords, grid.tile_size_l0, labelled, k,
                          min_distance_tiles=min_distance_tiles, candidates=grid.tissue)  # fmt: skip
    thumbs = []
    for s in found:
        if cancel is not None and cancel.is_set():
            break
        thumbs.append(_tile_picture(session.slide, s.x, s.y, grid.tile_size_l0))
    found = found[: len(thumbs)]
    yield Suggested(found, thumbs, m, grid.tile_size_l0, str(session.head.positive_class), len(labelled))
