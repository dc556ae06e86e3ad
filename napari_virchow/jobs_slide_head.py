"""The viewer's slide-level head job (Qt-free, in the style of :mod:`napari_virchow.jobs`).

Check that a slide head (:class:`~napari_virchow.analysis.mil.SlideHead`) fits the session's
encoder, weights and a magnification the slide gives, embed the tissue tiles at the head's µm/px
that are not stored yet (per batch: progress and cancel as for any job), then predict the slide
(:func:`~napari_virchow.slide_prediction.predict_slide`) and place its attention map in µm.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from napari_virchow.analysis.rasters import Raster
from napari_virchow.jobs import Stage, _embed, _load, _stop_if_cancelled, cancellable
from napari_virchow.session import SlideSession
from napari_virchow.slide_prediction import SlideResult, _check, missing_tiles, predict_slide
from napari_virchow.store.key import mag_name

if TYPE_CHECKING:
    from napari_virchow.analysis.mil import SlideHead

__all__ = ["SlidePredicted", "check_encoder", "slide_head_job"]


@dataclass(frozen=True)
class SlidePredicted:
    """A slide's prediction by a slide head, and its attention map aligned with the slide in µm."""

    result: SlideResult
    raster: Raster = field(repr=False)  # attention / its maximum: 1 on the most attended tile, NaN off tissue


def check_encoder(session: SlideSession, head: SlideHead) -> None:
    """HeadError when the head is for another encoder: the check that needs no model loaded (UI thread)."""
    encoder = session.config.encoder
    if head.encoder != encoder:
        head.check_compatible(encoder=encoder, weights_digest=head.weights_digest, mpp=head.mpp)


@cancellable
def slide_head_job(session: SlideSession, head: SlideHead, *,
                   cancel: threading.Event | None = None) -> Iterator[object]:  # fmt: skip
    """Embed what the slide head needs (the tissue tiles at its µm/px), then predict the slide."""
    check_encoder(session, head)  # a foreign head costs no model load
    yield from _load(session, cancel)
    _check(session, head)  # weights, tile size, and a magnification this slide gives: before any embedding
    session.grid_at(head.mpp)
    _stop_if_cancelled(cancel)
    todo = missing_tiles(session, head)
    if len(todo):
        yield Stage(f"embedding {len(todo)} tissue tiles at {mag_name(head.mpp)} for the slide head …")
        yield from _embed(session, todo, cancel, head.mpp)
    yield Stage("predicting the slide …")
    result = predict_slide(session, head)
    yield SlidePredicted(result, result.raster(session))
