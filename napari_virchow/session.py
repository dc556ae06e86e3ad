"""One slide under analysis, without Qt: the application object of the viewer, the demo, the CLI and notebooks.

A :class:`SlideSession` holds the slide, its tile grid, the encoder (shared per process, loaded on
first use), the embedding store, and turns what is stored into overlays (heatmap, clusters,
similarity). The napari widget calls its slow methods from worker threads and only draws what
they return; each CLI command runs one session per slide (also inside a dask task). Reading
never needs write access: the store is opened read-only until something must be computed.

>>> config = SessionConfig(encoder="virchow2", weights="random")
>>> with SlideSession("slide.svs", config) as session:
...     for batch in session.compute(bbox=(0, 0, 4000, 3000)):
...         print(batch.n_done, "/", batch.n_total)
...     probability = session.set_head(head)
...     heatmap = session.heatmap()
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import replace
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np

from napari_virchow.config import SessionConfig
from napari_virchow.errors import WeightsError
from napari_virchow.results import ClusterResult, TrainResult
from napari_virchow.session_levels import LevelsMixin
from napari_virchow.session_overlays import OverlaysMixin
from napari_virchow.slides.slide import Slide
from napari_virchow.slides.tiling import TileGrid

if TYPE_CHECKING:
    from napari_virchow.models.encoder import Encoder
    from napari_virchow.store.embeddings import EmbeddingStore

__all__ = ["ClusterResult", "SessionConfig", "SlideSession", "TrainResult"]

BBox = Sequence[float]


class SlideSession(LevelsMixin, OverlaysMixin):
    """Grid, encoder, stores (one per magnification) and overlays of one slide.

    The single-level API (``grid``, ``store()``, ``compute()``, ``embedded()`` ...) works at the
    encoder's own magnification (``spec.mpp``); each of those methods takes ``mpp=`` for another
    level of the embedding pyramid (:mod:`napari_virchow.session_levels`), and the overlays are
    drawn from the finest level computed at each place (:mod:`napari_virchow.session_overlays`).

    Parameters
    ----------
    slide
        An open :class:`Slide` (shared: the session never closes it) or a path (opened, and
        closed by :meth:`close`, with ``mpp`` or ``config.mpp_override`` as µm/px override).
    config
        Encoder, weights, device, cache.
    mpp
        µm/px override for slides that do not record it (takes precedence over the config's).
    weights_id
        The weights' id when known (e.g. from a dask worker): stores are read without loading the encoder.
    """

    def __init__(self, slide: Slide | str | os.PathLike[str], config: SessionConfig | None = None,
                 *, mpp: float | None = None, weights_id: str | None = None) -> None:  # fmt: skip
        self.config = config or SessionConfig()
        self._weights_id = weights_id
        override = mpp if mpp is not None else self.config.mpp_override
        if isinstance(slide, Slide):
            if override is not None and slide.mpp != override:
                raise ValueError(f"{slide.path.name} is open at {slide.mpp} µm/px; open it with mpp={override} "
                                 "to use that override, or pass the path instead")  # fmt: skip
            self.slide, self.owns_slide = slide, False
        else:
            self.slide, self.owns_slide = Slide(slide, mpp=override), True
        self._encoder: Encoder | None = None
        self._stores: dict[float, EmbeddingStore] = {}  # µm/px → open store
        self._lock = threading.Lock()  # one writer at a time: compute runs in one worker
        self._closed = False
        self._init_overlays()
        self.last_tiles_per_s: float | None = None  # measured by the last run: ETA of the next

    @property
    def slide_path(self) -> str:
        """The slide file's absolute path (how stores, exports and indexes name it)."""
        return str(self.slide.path.resolve())

    # --- geometry ----------------------------------------------------------------------------
    @cached_property
    def grid(self) -> TileGrid:
        """Tiles at the encoder's µm/px and input size (raises SlideError without µm/px)."""
        spec = self.config.spec
        return TileGrid(self.slide, mpp=spec.mpp, size=spec.input_size,
                        tissue_threshold=self.config.tissue_threshold)  # fmt: skip

    @property
    def grid_ready(self) -> bool:
        """Whether the grid (thumbnail + tissue mask, slow on big slides) is built."""
        return "grid" in self.__dict__

    def set_tissue_threshold(self, threshold: float | None) -> TileGrid:
        """Re-flag tissue tiles with another saturation threshold (the store is unaffected)."""
        self.config = replace(self.config, tissue_threshold=threshold)
        self.grid = self.grid.with_tissue(tissue_threshold=threshold)
        if "pyramid" in self.__dict__:
            self.pyramid.retissue(tissue_threshold=threshold, keep=self.grid)
        return self.grid

    def tiles_in(self, bbox: BBox) -> np.ndarray:
        """Tissue tiles intersecting a level-0 box ``(x0, y0, x1, y1)``, centre-out."""
        return self.grid.tiles_in(bbox)

    @property
    def _store(self) -> EmbeddingStore | None:
        """The open store of the default level, if any."""
        return self._stores.get(self.default_mpp)

    # --- encoder and store ---------------------------------------------------------------------
    @property
    def encoder_loaded(self) -> bool:
        """Whether this session holds its encoder (else :meth:`encoder` may take seconds)."""
        return self._encoder is not None

    def encoder(self) -> Encoder:
        """The encoder, shared per process and loaded on first use (call it from a worker thread)."""
        if self._encoder is None:
            from napari_virchow.encoder_cache import get_encoder

            c = self.config
            self._encoder = get_encoder(c.encoder, weights=c.weights, device=c.device, dtype=c.dtype,
                                        compile=c.compile)
        return self._encoder

    @property
    def decode_device(self) -> str | None:
        """The torch device JPEG stored tiles are decoded on while computing (None: imagecodecs, CPU).

        ``config.decode_device="auto"`` is the encoder's device when that is CUDA (nvJPEG, checked
        against imagecodecs on each level's first batch, which falls back to the CPU if they
        disagree), else None; loads the encoder.
        """
        from napari_virchow.slides.jpeg_batch import decoder_for, decoder_works

        wanted = self.config.decode_device
        if wanted is None or wanted == "none":
            return None
        if wanted != "auto":
            try:
                decoder_for(wanted)
            except (ValueError, RuntimeError) as exc:
                raise WeightsError(f"decode device {wanted!r}: {exc}") from exc
            return wanted
        device = self.encoder().device
        return str(device) if device.type == "cuda" and decoder_works(str(device)) else None

    @property
    def weights_id(self) -> str:
        """Id of the encoder's weights (part of the store key); loads the encoder unless known."""
        if self._weights_id is None:
            self._weights_id = self.encoder().weights_id
        return self._weights_id

    # --- lifetime ------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Close the store, and the slide if the session opened it; calling it again does nothing."""
        if self._closed:
            return
        self._closed = True
        self._close_stores()
        if self.owns_slide:
            self.slide.close()

    def __enter__(self) -> SlideSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SlideSession({self.slide.path.name!r}, encoder={self.config.encoder!r})"
