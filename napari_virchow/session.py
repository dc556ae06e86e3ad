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

import math
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import replace
from functools import cached_property
from typing import TYPE_CHECKING, Literal

import numpy as np

from napari_virchow.analysis.clusters import ClusterModel, fit_clusters, pca_rgb
from napari_virchow.analysis.heads import LinearHead, fit_head
from napari_virchow.analysis.rasters import Raster, labels_raster, rasterize_annotations, tile_raster, upsample
from napari_virchow.analysis.similarity import Hit, cosine_similarity, top_k_hits
from napari_virchow.config import SessionConfig
from napari_virchow.errors import HeadError, VirchowError
from napari_virchow.results import ClusterResult, TrainResult, tile_counts
from napari_virchow.slides.slide import Slide
from napari_virchow.slides.tiling import TileGrid

if TYPE_CHECKING:
    from napari_virchow.inference import BatchResult, Plan
    from napari_virchow.models.encoder import Encoder
    from napari_virchow.store.embeddings import EmbeddingStore, StoreKey

__all__ = ["ClusterResult", "SessionConfig", "SlideSession", "TrainResult"]

BBox = Sequence[float]
Indices = Sequence[int] | np.ndarray
Polygons = Sequence[np.ndarray]  # level-0 (x, y) vertices, one array per region
Holes = Sequence[Sequence[np.ndarray]] | None  # per region, its holes' vertices


class SlideSession:
    """Grid, encoder, store and overlays of one slide.

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
        self._store: EmbeddingStore | None = None
        self._lock = threading.Lock()  # one writer at a time: compute runs in one worker
        self._closed = False
        self.head: LinearHead | None = None
        self.probability: np.ndarray | None = None
        self.cluster_model: ClusterModel | None = None
        self.cluster_labels: np.ndarray | None = None
        self.query_vector: np.ndarray | None = None
        self.query_idx: np.ndarray | None = None
        self.similarity: np.ndarray | None = None
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
        return self.grid

    def tiles_in(self, bbox: BBox) -> np.ndarray:
        """Tissue tiles intersecting a level-0 box ``(x0, y0, x1, y1)``, centre-out."""
        return self.grid.tiles_in(bbox)

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
            self._encoder = get_encoder(c.encoder, weights=c.weights, device=c.device, dtype=c.dtype)
        return self._encoder

    @property
    def weights_id(self) -> str:
        """Id of the encoder's weights (part of the store key); loads the encoder unless known."""
        if self._weights_id is None:
            self._weights_id = self.encoder().weights_id
        return self._weights_id

    def store_key(self) -> StoreKey:
        """The cache key of this slide + encoder + weights + lattice."""
        from napari_virchow.inference import store_key

        return store_key(self.slide, self.config.encoder, self.grid, weights_id=self.weights_id)

    def store(self, mode: Literal["a", "r"] = "a") -> EmbeddingStore:
        """The embedding store: ``"a"`` creates it or reopens it for writing, ``"r"`` opens an existing one read-only.

        One open for writing serves reads too; ``"r"`` raises StoreError when nothing is cached.
        """
        if self._closed:
            raise VirchowError(f"the session of {self.slide.path.name} is closed; open a new one")
        if self._store is not None and (mode == "r" or self._store.mode == "a"):
            return self._store
        from napari_virchow.inference import open_store

        if self._store is not None:
            self._store.close()
            self._store = None
        self._store = open_store(self.slide, self.config.encoder, self.grid, weights_id=self.weights_id,
                                 cache_root=self.config.cache_root, mode=mode)  # fmt: skip
        return self._store

    def _stored(self) -> EmbeddingStore | None:
        """The store to read from, opened read-only if need be; None when nothing is cached."""
        if self._store is not None:
            return self._store
        from napari_virchow.store.embeddings import EmbeddingStore

        if EmbeddingStore.find(self.store_key(), root=self.config.cache_root) is None:
            return None
        return self.store("r")

    def missing(self, indices: np.ndarray) -> np.ndarray:
        """Those of ``indices`` whose embedding is not stored yet."""
        indices = np.asarray(indices, dtype=np.int64)
        store = self._stored()
        return indices if store is None else store.missing(indices)

    def plan(self, bbox: BBox | None = None, *, indices: Indices | None = None) -> Plan:
        """What :meth:`compute` with these arguments would do: tiles requested, cached, to compute."""
        from napari_virchow.inference import plan

        return plan(self.slide, self.encoder(), self.grid, bbox, indices=indices, store=self._stored(),
                    batch_size=self.config.batch_size, cache_root=self.config.cache_root)  # fmt: skip

    def tiles_per_s(self) -> float:
        """Throughput of the last run, else of one timed batch of random tiles (for ETAs)."""
        if not self.last_tiles_per_s:
            from napari_virchow.inference import estimate_tiles_per_s

            self.last_tiles_per_s = estimate_tiles_per_s(self.encoder(), batch_size=self.config.batch_size)
        return self.last_tiles_per_s

    def compute(self, bbox: BBox | None = None, *, indices: Indices | None = None,
                cancel: threading.Event | None = None) -> Iterator[BatchResult]:  # fmt: skip
        """Embed what is requested (default: every tissue tile) and not stored, yielding per batch.

        Nothing is opened for writing when everything requested is stored already.
        """
        from napari_virchow.inference import iter_embed

        with self._lock:
            if not self.plan(bbox, indices=indices).n_todo:
                return
            for batch in iter_embed(self.slide, self.encoder(), self.grid, self.store("a"), bbox, indices=indices,
                                    batch_size=self.config.batch_size, cancel=cancel,
                                    threads=self.config.threads):  # fmt: skip
                self.last_tiles_per_s = batch.tiles_per_s
                yield batch

    def embedded(self, *, tissue_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Indices and float32 embeddings of every stored tile (or stored tissue tile)."""
        store = self._stored()
        if store is None:
            return np.zeros(0, np.int64), np.zeros((0, self.config.spec.dim), np.float32)
        if not tissue_only:
            return store.read_done()
        idx = self.grid.tissue_indices
        idx = idx[store.done[idx]]
        return idx, store.read(idx)

    def read(self, indices: np.ndarray) -> np.ndarray:
        """Stored float32 embeddings of ``indices``; refuses tiles not embedded yet."""
        idx = np.asarray(indices, np.int64)
        store = self._stored()
        missing = idx if store is None else store.missing(idx)
        if len(missing):
            raise VirchowError(f"{len(missing)} tile(s) of {self.slide.path.name} are not embedded yet: "
                               "compute them first")  # fmt: skip
        return store.read(idx) if store is not None else np.zeros((0, self.config.spec.dim), np.float32)

    # --- overlays: one value per lattice tile, updated incrementally as batches arrive ---------
    def _blank(self, dtype: type = np.float32) -> np.ndarray:
        return np.full(len(self.grid), np.nan if dtype is np.float32 else 0, dtype=dtype)

    def raster(self, values: np.ndarray, *, smooth: int = 0) -> Raster:
        """Per-tile ``values`` (one per lattice tile) as a raster aligned with the slide in µm."""
        g = self.grid
        dtype_float = np.issubdtype(values.dtype, np.floating)
        place = tile_raster if dtype_float else labels_raster
        raster = place(values, g.coords, g.tile_size_l0, self.slide.dimensions, mpp=self.slide.require_mpp())
        return upsample(raster, smooth, smooth="bilinear") if smooth > 1 and dtype_float else raster

    def set_head(self, head: LinearHead | None, *, tissue_only: bool = False) -> np.ndarray | None:
        """Use ``head`` for the probability overlay; returns its value per tile (NaN = not computed)."""
        if head is None:
            self.head = self.probability = None
            return None
        return self.apply_head(head, tissue_only=tissue_only)

    def apply_head(self, head: LinearHead, *, tissue_only: bool = False) -> np.ndarray:
        """:meth:`set_head` with a head: its positive-class probability per lattice tile (NaN = not embedded)."""
        if head.encoder != self.config.encoder:
            raise HeadError(f"this head was trained on {head.encoder!r} embeddings, but the slide is "
                            f"embedded with {self.config.encoder!r}: train or load a head for {self.config.encoder!r}")
        idx, emb = self.embedded(tissue_only=tissue_only)
        probability = self._blank()
        if len(idx):
            probability[idx] = head.positive_proba(emb)
        self.head, self.probability = head, probability
        return probability

    def heatmap(self, *, smooth: int = 0) -> Raster | None:
        """The head's probability as a raster aligned with the slide (None without a head)."""
        return None if self.probability is None else self.raster(self.probability, smooth=smooth)

    def fit_clusters(self, k: int = 8, *, with_rgb: bool = False, tissue_only: bool = False) -> ClusterResult:
        """K-means on the embedded tiles, not applied to the overlay (see :meth:`use_clusters`)."""
        idx, emb = self.embedded(tissue_only=tissue_only)
        if not len(idx):
            raise VirchowError("no tiles are embedded yet: compute the visible tiles first")
        model = fit_clusters(emb, k=k)
        labels = self._blank(np.int32)
        labels[idx] = model.predict(emb)
        rgb = None
        if with_rgb:
            rgb = np.full((len(self.grid), 3), np.nan, np.float32)
            rgb[idx] = pca_rgb(emb) / np.float32(255)
        return ClusterResult(labels, model, tile_counts(labels, model.k), rgb)

    def use_clusters(self, result: ClusterResult | None) -> None:
        """Draw ``result`` as the cluster overlay (later batches are predicted with its model); None clears it."""
        self.cluster_model = None if result is None else result.model
        self.cluster_labels = None if result is None else result.labels

    def set_clusters(self, k: int = 8, *, with_rgb: bool = False) -> ClusterResult:
        """Fit k-means on the embedded tiles and use it for the cluster overlay."""
        result = self.fit_clusters(k, with_rgb=with_rgb)
        self.use_clusters(result)
        return result

    def cluster_counts(self) -> dict[int, int]:
        """Tiles per cluster id (1..k) among embedded tiles."""
        if self.cluster_labels is None or self.cluster_model is None:
            return {}
        return tile_counts(self.cluster_labels, self.cluster_model.k)

    def query_indices(self, x: float, y: float, box: BBox | None = None) -> np.ndarray:
        """The tile under level-0 ``(x, y)``, or every tissue tile under ``box``."""
        if box is None and not (math.isfinite(x) and math.isfinite(y)):
            raise VirchowError(f"query point ({x}, {y}) is not a number: give level-0 pixel coordinates")
        if box is not None:
            idx = self.grid.tiles_in(box)
        else:
            i = self.grid.index_at(x, y)
            idx = np.array([], np.int64) if i is None else np.array([i], np.int64)
        if not len(idx):
            w, h = self.slide.dimensions
            raise VirchowError(f"({x:g}, {y:g}) is outside {self.slide.path.name} ({w}×{h} px) or its tile grid")
        return idx

    def set_query(self, query_idx: np.ndarray | None, *, tissue_only: bool = False) -> np.ndarray | None:
        """Similarity of every embedded tile to the mean embedding of ``query_idx`` (embedded)."""
        if query_idx is None:
            self.query_vector = self.similarity = self.query_idx = None
            return None
        query_idx = np.asarray(query_idx, np.int64)
        vector = self.read(query_idx).mean(axis=0)
        self.query_idx, self.query_vector = query_idx, vector
        idx, emb = self.embedded(tissue_only=tissue_only)
        self.similarity = self._blank()
        self.similarity[idx] = cosine_similarity(self.query_vector, emb)
        return self.similarity

    def hits(self, k: int = 20, *, min_distance_tiles: int = 2) -> list[Hit]:
        """Best distinct tiles by similarity to the query (query tiles excluded)."""
        if self.similarity is None:
            return []
        g = self.grid
        return top_k_hits(self.similarity, g.coords, g.tile_size_l0, k=k, min_distance_tiles=min_distance_tiles,
                          exclude=self.query_idx, slide=self.slide_path)  # fmt: skip

    def absorb(self, indices: np.ndarray, embeddings: np.ndarray) -> list[str]:
        """Update every active overlay with a new batch; returns the names that changed."""
        changed = []
        if self.head is not None and self.probability is not None:
            self.probability[indices] = self.head.positive_proba(embeddings)
            changed.append("probability")
        if self.cluster_model is not None and self.cluster_labels is not None:
            self.cluster_labels[indices] = self.cluster_model.predict(embeddings)
            changed.append("clusters")
        if self.query_vector is not None and self.similarity is not None:
            self.similarity[indices] = cosine_similarity(self.query_vector, embeddings)
            changed.append("similarity")
        return changed

    # --- annotations -> labelled tiles -> head -----------------------------------------------------------
    def annotated_tiles(self, polygons: Polygons, classes: Sequence[str | None], *, min_overlap: float = 0.5,
                        holes: Holes = None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """Tiles mostly inside an annotation (level-0 (x, y) polygons, minus ``holes``), and their class names."""
        g = self.grid
        labels, names = rasterize_annotations(polygons, classes, g.coords, g.tile_size_l0, min_overlap=min_overlap,
                                              holes=holes)  # fmt: skip
        idx = np.flatnonzero(labels >= 0)
        return idx.astype(np.int64), np.asarray(names, dtype=object)[labels[idx]].astype(str)

    def labelled_embeddings(self, polygons: Polygons, classes: Sequence[str | None], *, min_overlap: float = 0.5,
                            holes: Holes = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
        """The embedded annotated tiles: (indices, float32 embeddings, class names)."""
        idx, labels = self.annotated_tiles(polygons, classes, min_overlap=min_overlap, holes=holes)
        keep = np.isin(idx, self.missing(idx), invert=True)
        idx, labels = idx[keep], labels[keep]
        emb = self.read(idx) if len(idx) else np.zeros((0, self.config.spec.dim), np.float32)
        return idx, emb, labels

    def train_head(self, polygons: Polygons, classes: Sequence[str], *, min_overlap: float = 0.5) -> TrainResult:
        """Fit a probe on the embedded tiles under annotation polygons (level-0 (x, y) px).

        Embed the annotated tiles first (:meth:`annotated_tiles` + :meth:`compute`).
        """
        _, emb, labels = self.labelled_embeddings(polygons, classes, min_overlap=min_overlap)
        if not len(labels):
            raise VirchowError("no annotated tile is embedded yet: compute the annotated tiles first")
        head = fit_head(emb, labels, encoder=self.config.encoder, weights_id=self.weights_id)
        names, counts = np.unique(labels, return_counts=True)
        return TrainResult(head, {str(n): int(c) for n, c in zip(names, counts, strict=True)})

    # --- lifetime ------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Close the store, and the slide if the session opened it; calling it again does nothing."""
        if self._closed:
            return
        self._closed = True
        if self._store is not None:
            self._store.close()
            self._store = None
        if self.owns_slide:
            self.slide.close()

    def __enter__(self) -> SlideSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SlideSession({self.slide.path.name!r}, encoder={self.config.encoder!r})"
