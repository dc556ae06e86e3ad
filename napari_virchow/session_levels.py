"""The embedding pyramid of a session: one tile grid and one store per magnification (µm/px).

:class:`LevelsMixin` is the part of :class:`~napari_virchow.session.SlideSession` that knows
magnifications. The encoder's default magnification (``spec.mpp``, 0.5 µm/px for Virchow) keeps
the session's historic single-level API (``grid``, ``store()``, ``compute()``...); every method
takes ``mpp=`` for another level. Levels are those the encoder was trained on
(``spec.trained_mpps``, see :attr:`LevelsMixin.pyramid`); any other magnification needs the
explicit opt-in (``SessionConfig.allow_untrained_mpp`` or ``allow_untrained=True``), and is
recorded in the store's provenance attrs (``mpp_trained: false``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Literal

import numpy as np

from napari_virchow.errors import VirchowError
from napari_virchow.lod import ViewPlan
from napari_virchow.lod_pyramid import LodPyramid, MissingFn
from napari_virchow.store.key import canonical_mpp, mag_name

if TYPE_CHECKING:
    from napari_virchow.config import SessionConfig
    from napari_virchow.inference import BatchResult, Plan, TokenSink
    from napari_virchow.models.encoder import Encoder
    from napari_virchow.slides.slide import Slide
    from napari_virchow.slides.tiling import TileGrid
    from napari_virchow.store.embeddings import EmbeddingStore, StoreKey

__all__ = ["LevelsMixin"]

BBox = Sequence[float]
Indices = Sequence[int] | np.ndarray


class LevelsMixin:
    """Grids, stores and computing per magnification (mixed into SlideSession)."""

    slide: Slide
    config: SessionConfig
    _stores: dict[float, EmbeddingStore]
    _lock: threading.Lock
    _closed: bool
    last_tiles_per_s: float | None

    if TYPE_CHECKING:  # provided by SlideSession

        @property
        def grid(self) -> TileGrid:
            """Tiles at the encoder's own magnification."""

        @property
        def weights_id(self) -> str:
            """Id of the encoder's weights."""

        def encoder(self) -> Encoder:
            """The encoder, loaded on first call."""

        @property
        def decode_device(self) -> str | None:
            """Where JPEG stored tiles are decoded while computing."""

    # --- levels -------------------------------------------------------------------------------
    @property
    def default_mpp(self) -> float:
        """The encoder's own magnification (µm/px): the level of the single-level API."""
        return canonical_mpp(self.config.spec.mpp)

    def _mpp(self, mpp: float | None) -> float:
        return self.default_mpp if mpp is None else canonical_mpp(mpp)

    @cached_property
    def pyramid(self) -> LodPyramid:
        """The trained magnifications this slide can give, one lazily built TileGrid each."""
        spec = self.config.spec
        pyramid = LodPyramid(self.slide, spec.trained_mpps, size=spec.input_size,
                             tissue_threshold=self.config.tissue_threshold)  # fmt: skip
        if "grid" in self.__dict__:
            pyramid.adopt(self.grid)
        return pyramid

    @property
    def mpps(self) -> tuple[float, ...]:
        """The magnifications offered for this slide (trained and not upsampled), finest first."""
        return self.pyramid.mpps

    def check_mpp(self, mpp: float, *, allow_untrained: bool = False) -> bool:
        """Whether ``mpp`` is trained (True) or an opt-in (False); raises UntrainedMagnificationError."""
        return self.config.spec.check_mpp(mpp, allow_untrained=allow_untrained or self.config.allow_untrained_mpp)

    def grid_at(self, mpp: float | None = None) -> TileGrid:
        """The tile grid of level ``mpp`` (default: :attr:`grid`)."""
        m = self._mpp(mpp)
        if m != self.default_mpp:
            return self.pyramid.grid(m)
        if m not in self.pyramid.built:
            self.pyramid.adopt(self.grid)  # the pyramid plans with the session's own grid
        return self.grid

    def grids_ready(self, mpps: Sequence[float]) -> bool:
        """Whether the grids of these levels are built (each reads a thumbnail)."""
        built = self.pyramid.built
        return "grid" in self.__dict__ and all(self._mpp(m) in built for m in (*mpps, self.default_mpp))

    # --- stores -------------------------------------------------------------------------------
    def store_key(self, mpp: float | None = None) -> StoreKey:
        """The cache key of this slide + encoder + weights + lattice of level ``mpp``."""
        from napari_virchow.stores import store_key

        return store_key(self.slide, self.config.encoder, self.grid_at(mpp), weights_id=self.weights_id)

    def store(self, mode: Literal["a", "r"] = "a", *, mpp: float | None = None,
              allow_untrained: bool = False) -> EmbeddingStore:  # fmt: skip
        """The store of level ``mpp``: ``"a"`` creates or reopens it for writing, ``"r"`` opens it read-only.

        One open for writing serves reads too; ``"r"`` raises StoreError when nothing is cached.
        Creating a store at an untrained magnification needs the opt-in (recorded in its attrs).
        """
        if self._closed:
            raise VirchowError(f"the session of {self.slide.path.name} is closed; open a new one")
        m = self._mpp(mpp)
        have = self._stores.get(m)
        if have is not None and (mode == "r" or have.mode == "a"):
            return have
        from napari_virchow.stores import open_store

        extra = None
        if mode == "a":
            opt_in = allow_untrained or self.config.allow_untrained_mpp
            extra = self.config.spec.mpp_provenance(m, allow_untrained=opt_in)
        grid = self.grid_at(m)
        if have is not None:
            have.close()
            del self._stores[m]
        self._stores[m] = open_store(self.slide, self.config.encoder, grid, weights_id=self.weights_id,
                                     cache_root=self.config.cache_root, mode=mode, extra_attrs=extra)  # fmt: skip
        return self._stores[m]

    def _stored(self, mpp: float | None = None) -> EmbeddingStore | None:
        """The store of level ``mpp`` to read from, opened read-only if need be; None when nothing is cached."""
        m = self._mpp(mpp)
        if m in self._stores:
            return self._stores[m]
        from napari_virchow.store.embeddings import EmbeddingStore

        if EmbeddingStore.find(self.store_key(m), root=self.config.cache_root) is None:
            return None
        return self.store("r", mpp=m)

    def missing(self, indices: np.ndarray, *, mpp: float | None = None) -> np.ndarray:
        """Those of ``indices`` (tiles of level ``mpp``) whose embedding is not stored yet."""
        indices = np.asarray(indices, dtype=np.int64)
        store = self._stored(mpp)
        return indices if store is None else store.missing(indices)

    def missing_fn(self) -> MissingFn:
        """``missing(mpp, indices)`` over this session's stores (for ``LodPyramid``)."""
        return lambda m, idx: self.missing(idx, mpp=m)

    def done_at(self, mpp: float | None = None) -> np.ndarray:
        """Bool mask over level ``mpp``'s lattice: which tiles are stored."""
        store = self._stored(mpp)
        return np.zeros(len(self.grid_at(mpp)), bool) if store is None else np.asarray(store.done, bool)

    def open_levels(self) -> tuple[float, ...]:
        """Levels whose store this session has open (no file is touched), finest first."""
        return tuple(sorted(self._stores))

    def computed_mpps(self) -> tuple[float, ...]:
        """Levels (offered or opened) with at least one stored tile, finest first."""
        levels = sorted(set(self.mpps) | set(self._stores))
        return tuple(m for m in levels if (s := self._stored(m)) is not None and bool(np.any(s.done)))

    # --- computing ----------------------------------------------------------------------------
    def plan(self, bbox: BBox | None = None, *, indices: Indices | None = None, mpp: float | None = None) -> Plan:
        """What :meth:`compute` with these arguments would do: tiles requested, cached, to compute.

        Where only the slide's store from 0.2 is cached, the new store is made first (call it off
        the UI thread): it adopts the old rows (:mod:`~napari_virchow.store.migrate`), so they count
        as cached, and every later read finds them. In a read-only cache they count as to compute.
        """
        from napari_virchow.inference import plan

        store = self._stored(mpp)
        store = self._adopting(mpp) if store is None else store
        return plan(self.slide, self.encoder(), self.grid_at(mpp), bbox, indices=indices, store=store,
                    batch_size=self.config.batch_size, cache_root=self.config.cache_root)  # fmt: skip

    def _adopting(self, mpp: float | None) -> EmbeddingStore | None:
        """The new store of level ``mpp``, made now, where the cache holds its 0.2 store (else None)."""
        from napari_virchow.store.cache import old_lattice_store, resolve_cache_root

        if old_lattice_store(resolve_cache_root(self.config.cache_root), self.store_key(mpp)) is None:
            return None
        try:
            return self.store("a", mpp=mpp)
        except (VirchowError, OSError):  # a read-only cache, an untrained level: computed when asked
            return None

    def tiles_per_s(self) -> float:
        """Throughput of the last run, else of one timed batch of random tiles (for ETAs)."""
        if not self.last_tiles_per_s:
            from napari_virchow.inference import estimate_tiles_per_s

            self.last_tiles_per_s = estimate_tiles_per_s(self.encoder(), batch_size=self.config.batch_size)
        return self.last_tiles_per_s

    def compute(self, bbox: BBox | None = None, *, indices: Indices | None = None, mpp: float | None = None,
                allow_untrained: bool = False, cancel: threading.Event | None = None,
                token_sink: TokenSink | None = None,
                ) -> Iterator[BatchResult]:  # fmt: skip
        """Embed what is requested at level ``mpp`` (default: every tissue tile of the default level)
        and not stored, yielding per batch (``token_sink``: as :func:`~napari_virchow.inference.iter_embed`'s).

        Nothing is opened for writing when everything requested is stored already. A magnification
        outside the encoder's trained ones raises UntrainedMagnificationError without the opt-in.
        """
        from napari_virchow.inference import iter_embed

        m = self._mpp(mpp)
        self.check_mpp(m, allow_untrained=allow_untrained)
        with self._lock:
            if not self.plan(bbox, indices=indices, mpp=m).n_todo:
                return
            store = self.store("a", mpp=m, allow_untrained=allow_untrained)
            for batch in iter_embed(self.slide, self.encoder(), self.grid_at(m), store, bbox, indices=indices,
                                    batch_size=self.config.batch_size, cancel=cancel, threads=self.config.threads,
                                    decode_device=self.decode_device, token_sink=token_sink):  # fmt: skip
                self.last_tiles_per_s = batch.tiles_per_s
                yield batch

    def plan_view(self, bbox: BBox, canvas_px: tuple[int, int], *, pinned: float | None = None,
                  budget: int | None = None) -> ViewPlan:  # fmt: skip
        """The level and tiles of a view (:meth:`LodPyramid.plan_view`); builds the grids it needs."""
        if pinned is not None:
            self.check_mpp(pinned)
            self.grid_at(pinned)
        for m in self.mpps:
            self.grid_at(m)
        return self.pyramid.plan_view(bbox, canvas_px, pinned=pinned, budget=budget)

    def view_todo(self, plan: ViewPlan) -> np.ndarray:
        """Tiles of ``plan.mpp`` in view not stored yet, centre-out, at most ``plan.budget``."""
        return self.pyramid.todo(plan, self.missing_fn())

    def compute_view(self, plan: ViewPlan, *, cancel: threading.Event | None = None) -> Iterator[BatchResult]:
        """Embed :meth:`view_todo` of ``plan`` at its level (never a stored tile)."""
        todo = self.view_todo(plan)
        if len(todo):
            yield from self.compute(indices=todo, mpp=plan.mpp, cancel=cancel)

    # --- reading ------------------------------------------------------------------------------
    def embedded(self, *, tissue_only: bool = False, mpp: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Indices and float32 embeddings of every stored tile (or stored tissue tile) of level ``mpp``."""
        store = self._stored(mpp)
        if store is None:
            return np.zeros(0, np.int64), np.zeros((0, self.config.spec.dim), np.float32)
        if not tissue_only:
            return store.read_done()
        idx = self.grid_at(mpp).tissue_indices
        idx = idx[store.done[idx]]
        return idx, store.read(idx)

    def read(self, indices: np.ndarray, *, mpp: float | None = None) -> np.ndarray:
        """Stored float32 embeddings of ``indices`` (level ``mpp``); refuses tiles not embedded yet."""
        idx = np.asarray(indices, np.int64)
        store = self._stored(mpp)
        missing = idx if store is None else store.missing(idx)
        if len(missing):
            raise VirchowError(f"{len(missing)} tile(s) of {self.slide.path.name} are not embedded yet at "
                               f"{mag_name(self._mpp(mpp))}: compute them first")  # fmt: skip
        return store.read(idx) if store is not None else np.zeros((0, self.config.spec.dim), np.float32)

    def _close_stores(self) -> None:
        for store in self._stores.values():
            store.close()
        self._stores.clear()
