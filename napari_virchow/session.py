"""One slide under analysis, without Qt: the state the viewer, the demo and notebooks share.

A :class:`SlideSession` owns the slide, its tile grid, the encoder (loaded on first use), the
embedding store, and turns what is stored into overlays (heatmap, clusters, similarity). The napari
widget calls its slow methods from worker threads and only draws what they return.

>>> session = SlideSession("slide.svs", SessionConfig(encoder="virchow2", weights="random"))
>>> for batch in session.compute(bbox=(0, 0, 4000, 3000)):
...     print(batch.n_done, "/", batch.n_total)
>>> raster = session.heatmap(head)
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import numpy as np

from napari_virchow.analysis.clusters import ClusterModel, fit_clusters, pca_rgb
from napari_virchow.analysis.heads import LinearHead, fit_head
from napari_virchow.analysis.rasters import Raster, labels_raster, rasterize_annotations, tile_raster, upsample
from napari_virchow.analysis.similarity import Hit, cosine_similarity, top_k_hits
from napari_virchow.errors import VirchowError
from napari_virchow.models.specs import EncoderSpec, get_spec
from napari_virchow.slides.slide import Slide
from napari_virchow.slides.tiling import TileGrid

__all__ = ["ClusterResult", "SessionConfig", "SlideSession", "TrainResult"]

BBox = Sequence[float]


@dataclass(frozen=True)
class SessionConfig:
    """How to embed: encoder, weights, device and where the cache lives."""

    encoder: str = "virchow2"
    weights: str | None = None  # file, "random", or None (Hugging Face cache / hub)
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int | None = None
    cache_root: Path | None = None
    tissue_threshold: float | None = None
    threads: int | None = None  # torch threads while embedding (the widget leaves the UI a core)

    @property
    def spec(self) -> EncoderSpec:
        """The encoder's spec (input size, µm/px) without loading any weights."""
        return get_spec(self.encoder)


@dataclass(frozen=True)
class TrainResult:
    """A head fitted on annotated tiles, with how many tiles of each class it saw."""

    head: LinearHead
    counts: dict[str, int]


@dataclass(frozen=True)
class ClusterResult:
    """Cluster id per lattice tile (0 = not embedded), the model, tiles per cluster, PCA colours."""

    labels: np.ndarray = field(repr=False)
    model: ClusterModel
    counts: dict[int, int]
    rgb: np.ndarray | None = field(default=None, repr=False)  # (n_tiles, 3) float in [0, 1], NaN


class SlideSession:
    """Grid, encoder, store and overlays of one slide.

    Parameters
    ----------
    slide
        An open :class:`Slide` or a path (opened with ``mpp`` as override).
    config
        Encoder, weights, device, cache.
    mpp
        µm/px override for slides that do not record it.
    """

    def __init__(self, slide: Slide | str | os.PathLike[str], config: SessionConfig | None = None,
                 *, mpp: float | None = None) -> None:  # fmt: skip
        self.slide = slide if isinstance(slide, Slide) else Slide(slide, mpp=mpp)
        self.config = config or SessionConfig()
        self._encoder = None
        self._store = None
        self._lock = threading.Lock()  # one writer at a time: compute runs in one worker
        self.head: LinearHead | None = None
        self.probability: np.ndarray | None = None
        self.cluster_model: ClusterModel | None = None
        self.cluster_labels: np.ndarray | None = None
        self.query_vector: np.ndarray | None = None
        self.query_idx: np.ndarray | None = None
        self.similarity: np.ndarray | None = None
        self.last_tiles_per_s: float | None = None  # measured by the last run: ETA of the next

    # --- geometry ----------------------------------------------------------------------------
    @cached_property
    def grid(self) -> TileGrid:
        """Tiles at the encoder's µm/px and input size (raises SlideError without µm/px)."""
        spec = self.config.spec
        return TileGrid(self.slide, mpp=spec.mpp, size=spec.input_size,
                        tissue_threshold=self.config.tissue_threshold)  # fmt: skip

    def set_tissue_threshold(self, threshold: float | None) -> TileGrid:
        """Re-flag tissue tiles with another saturation threshold (the store is unaffected)."""
        self.config = replace(self.config, tissue_threshold=threshold)
        self.grid = self.grid.with_tissue(threshold)
        return self.grid

    def tiles_in(self, bbox: BBox) -> np.ndarray:
        """Tissue tiles intersecting a level-0 box ``(x0, y0, x1, y1)``, centre-out."""
        return self.grid.tiles_in(bbox)

    # --- encoder and store ---------------------------------------------------------------------
    @property
    def encoder_loaded(self) -> bool:
        return self._encoder is not None

    def encoder(self):  # noqa: ANN201 - Encoder, imported lazily (torch is slow to import)
        """The encoder, loaded on first call (slow: call it from a worker thread)."""
        if self._encoder is None:
            from napari_virchow.models.encoder import load_encoder

            c = self.config
            self._encoder = load_encoder(c.encoder, weights=c.weights, device=c.device, dtype=c.dtype)
        return self._encoder

    def store(self):  # noqa: ANN201 - EmbeddingStore
        """The embedding store of this slide + encoder + weights (created on first call)."""
        if self._store is None:
            from napari_virchow.inference import open_store

            self._store = open_store(self.slide, self.encoder(), self.grid, cache_root=self.config.cache_root)
        return self._store

    def missing(self, indices: np.ndarray) -> np.ndarray:
        """Those of ``indices`` whose embedding is not stored yet."""
        return self.store().missing(np.asarray(indices, dtype=np.int64))

    def compute(self, bbox: BBox | None = None, *, indices: Sequence[int] | None = None,
                cancel: threading.Event | None = None) -> Iterator:  # fmt: skip
        """Embed what is requested and not stored, yielding a ``BatchResult`` per batch."""
        from napari_virchow.inference import iter_embed

        with self._lock:
            yield from iter_embed(self.slide, self.encoder(), self.grid, self.store(), bbox,
                                  indices=indices, batch_size=self.config.batch_size, cancel=cancel,
                                  threads=self.config.threads)  # fmt: skip

    def embedded(self) -> tuple[np.ndarray, np.ndarray]:
        """Indices and float32 embeddings of every stored tile."""
        return self.store().read_done()

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

    def set_head(self, head: LinearHead | None) -> np.ndarray | None:
        """Use ``head`` for the probability overlay; returns its value per tile (NaN = not computed)."""
        if head is not None and head.encoder != self.config.encoder:
            from napari_virchow.errors import HeadError

            raise HeadError(f"this head was trained on {head.encoder!r} embeddings, but the slide is "
                            f"embedded with {self.config.encoder!r}: train or load a head for {self.config.encoder!r}")
        self.head = head
        if head is None:
            self.probability = None
            return None
        idx, emb = self.embedded()
        self.probability = self._blank()
        if len(idx):
            self.probability[idx] = head.positive_proba(emb)
        return self.probability

    def set_clusters(self, k: int = 8, *, with_rgb: bool = False) -> ClusterResult:
        """Fit k-means on the embedded tiles; later batches are predicted with the same model."""
        idx, emb = self.embedded()
        if not len(idx):
            raise VirchowError("no tiles are embedded yet: compute the visible tiles first")
        self.cluster_model = fit_clusters(emb, k=k)
        self.cluster_labels = self._blank(np.int32)
        self.cluster_labels[idx] = self.cluster_model.predict(emb)
        rgb = None
        if with_rgb:
            rgb = np.full((len(self.grid), 3), np.nan, np.float32)
            rgb[idx] = pca_rgb(emb) / np.float32(255)
        return ClusterResult(self.cluster_labels, self.cluster_model, self.cluster_counts(), rgb)

    def cluster_counts(self) -> dict[int, int]:
        """Tiles per cluster id (1..k) among embedded tiles."""
        if self.cluster_labels is None or self.cluster_model is None:
            return {}
        counts = np.bincount(self.cluster_labels, minlength=self.cluster_model.k + 1)[1:]
        return {i + 1: int(c) for i, c in enumerate(counts)}

    def query_indices(self, x: float, y: float, box: BBox | None = None) -> np.ndarray:
        """The tile under level-0 ``(x, y)``, or every tissue tile under ``box``."""
        if box is not None:
            idx = self.grid.tiles_in(box)
        else:
            i = self.grid.index_at(x, y)
            idx = np.array([], np.int64) if i is None else np.array([i], np.int64)
        if not len(idx):
            w, h = self.slide.dimensions
            raise VirchowError(f"({x:.0f}, {y:.0f}) is outside the slide ({w}×{h} px) or its tile grid")
        return idx

    def set_query(self, query_idx: np.ndarray | None) -> np.ndarray | None:
        """Similarity of every embedded tile to the mean embedding of ``query_idx`` (embedded)."""
        if query_idx is None:
            self.query_vector = self.similarity = self.query_idx = None
            return None
        store = self.store()
        missing = store.missing(query_idx)
        if len(missing):
            raise VirchowError(f"{len(missing)} query tile(s) are not embedded yet: compute them first")
        self.query_idx = np.asarray(query_idx, np.int64)
        self.query_vector = store.read(self.query_idx).mean(axis=0)
        idx, emb = self.embedded()
        self.similarity = self._blank()
        self.similarity[idx] = cosine_similarity(self.query_vector, emb)
        return self.similarity

    def hits(self, k: int = 20, *, min_distance_tiles: int = 2) -> list[Hit]:
        """Best distinct tiles by similarity to the query (query tiles excluded)."""
        if self.similarity is None:
            return []
        g = self.grid
        exclude = self.query_idx if self.query_idx is not None else None
        return top_k_hits(self.similarity, g.coords, g.tile_size_l0, k=k,
                          min_distance_tiles=min_distance_tiles, exclude=exclude,
                          slide=str(self.slide.path))  # fmt: skip

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

    def train_head(self, polygons: Sequence[np.ndarray], classes: Sequence[str], *,
                   min_overlap: float = 0.5) -> TrainResult:  # fmt: skip
        """Fit a probe on the embedded tiles under annotation polygons (level-0 (x, y) px).

        Embed the annotated tiles first (:meth:`annotated_tiles` + :meth:`compute`).
        """
        idx, labels = self.annotated_tiles(polygons, classes, min_overlap=min_overlap)
        keep = self.store().done[idx]
        idx, labels = idx[keep], labels[keep]
        if not len(idx):
            raise VirchowError("no annotated tile is embedded yet: compute the annotated tiles first")
        emb = self.store().read(idx)
        head = fit_head(emb, labels, encoder=self.config.encoder, weights_id=self.encoder().weights_id)
        names, counts = np.unique(labels, return_counts=True)
        return TrainResult(head, {str(n): int(c) for n, c in zip(names, counts, strict=True)})

    def annotated_tiles(self, polygons: Sequence[np.ndarray], classes: Sequence[str], *,
                        min_overlap: float = 0.5) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """Tiles mostly inside an annotation, and their class names."""
        g = self.grid
        labels, names = rasterize_annotations(polygons, classes, g.coords, g.tile_size_l0, min_overlap=min_overlap)
        idx = np.flatnonzero(labels >= 0)
        return idx.astype(np.int64), np.asarray(names, dtype=object)[labels[idx]].astype(str)

    def close(self) -> None:
        """Close the store and the slide."""
        if self._store is not None:
            self._store.close()
            self._store = None
        self.slide.close()
