"""Overlays of a session, per magnification: heatmap, clusters, similarity, annotations → head.

:class:`OverlaysMixin` is the analysis part of :class:`~napari_virchow.session.SlideSession`.
The probability of a head is kept per level (``probabilities``: µm/px → one value per tile of
that level, NaN where not embedded) and drawn from the finest level computed at each place
(:meth:`OverlaysMixin.overlay_raster`, via :func:`~napari_virchow.analysis.lod_rasters.finest_raster`).
Clusters and similarity belong to one level each (``cluster_mpp``, ``query_mpp``): the one in
view when they were asked for, so a query picked at 5× searches 5× embeddings.
``probability``, ``cluster_labels`` and ``similarity`` keep their single-level meaning (the
default level for ``probability``; the level of the clusters / query for the other two).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np

from napari_virchow.analysis.clusters import ClusterModel, fit_clusters, pca_rgb
from napari_virchow.analysis.heads import LinearHead, MultiScaleHead, fit_head
from napari_virchow.analysis.lod_rasters import finest_raster
from napari_virchow.analysis.rasters import Raster, labels_raster, rasterize_annotations, tile_raster, upsample
from napari_virchow.analysis.similarity import Hit, cosine_similarity, top_k_hits
from napari_virchow.errors import HeadError, VirchowError
from napari_virchow.lod import SlideGeometry
from napari_virchow.results import ClusterResult, TrainResult, tile_counts
from napari_virchow.store.key import canonical_mpp, mag_name

if TYPE_CHECKING:
    from napari_virchow.config import SessionConfig
    from napari_virchow.inference import BatchResult
    from napari_virchow.slides.slide import Slide
    from napari_virchow.slides.tiling import TileGrid

__all__ = ["OverlaysMixin"]

BBox = Sequence[float]
Polygons = Sequence[np.ndarray]  # level-0 (x, y) vertices, one array per region
Holes = Sequence[Sequence[np.ndarray]] | None  # per region, its holes' vertices


class OverlaysMixin:
    """Per-tile overlays over the embedding pyramid (mixed into SlideSession)."""

    slide: Slide
    config: SessionConfig
    head: LinearHead | None
    probabilities: dict[float, np.ndarray]
    cluster_model: ClusterModel | None
    cluster_labels: np.ndarray | None
    cluster_mpp: float
    query_vector: np.ndarray | None
    query_idx: np.ndarray | None
    query_mpp: float
    similarity: np.ndarray | None

    if TYPE_CHECKING:  # provided by SlideSession and its levels

        @property
        def default_mpp(self) -> float:
            """The encoder's own magnification (µm/px)."""

        @property
        def weights_id(self) -> str:
            """Id of the encoder's weights."""

        @property
        def slide_path(self) -> str:
            """The slide file's absolute path."""

        def _mpp(self, mpp: float | None) -> float: ...
        def grid_at(self, mpp: float | None = None) -> TileGrid: ...  # noqa: D102
        def computed_mpps(self) -> tuple[float, ...]: ...  # noqa: D102
        def embedded(self, *, tissue_only: bool = False, mpp: float | None = None) -> tuple[np.ndarray, np.ndarray]: ...  # noqa: D102
        def read(self, indices: np.ndarray, *, mpp: float | None = None) -> np.ndarray: ...  # noqa: D102
        def missing(self, indices: np.ndarray, *, mpp: float | None = None) -> np.ndarray: ...  # noqa: D102
        def check_mpp(self, mpp: float, *, allow_untrained: bool = False) -> bool: ...  # noqa: D102
        def compute(self, bbox: Sequence[float] | None = None, *, indices: np.ndarray | None = None,  # noqa: D102
                    mpp: float | None = None) -> Iterator[BatchResult]: ...  # fmt: skip

        @property
        def mpps(self) -> tuple[float, ...]:
            """The magnifications offered for this slide, finest first."""

    def _init_overlays(self) -> None:
        self.head = None
        self.probabilities = {}
        self.cluster_model = self.cluster_labels = None
        self.query_vector = self.query_idx = self.similarity = None
        self.cluster_mpp = self.query_mpp = self.default_mpp

    # --- rasters --------------------------------------------------------------------------------
    def _blank(self, dtype: type = np.float32, mpp: float | None = None) -> np.ndarray:
        return np.full(len(self.grid_at(mpp)), np.nan if dtype is np.float32 else 0, dtype=dtype)

    def raster(self, values: np.ndarray, *, smooth: int = 0, mpp: float | None = None) -> Raster:
        """Per-tile ``values`` (one per tile of level ``mpp``) as a raster aligned with the slide in µm."""
        g = self.grid_at(mpp)
        dtype_float = np.issubdtype(values.dtype, np.floating)
        place = tile_raster if dtype_float else labels_raster
        raster = place(values, g.coords, g.tile_size_l0, self.slide.dimensions, mpp=self.slide.require_mpp())
        return upsample(raster, smooth, smooth="bilinear") if smooth > 1 and dtype_float else raster

    def overlay_levels(self, name: str) -> dict[float, np.ndarray]:
        """The per-tile values of overlay ``name`` ("probability", "clusters", "similarity") by level."""
        if name == "probability":
            return dict(self.probabilities)
        if name == "clusters":
            return {} if self.cluster_labels is None else {self.cluster_mpp: self.cluster_labels}
        if name == "similarity":
            return {} if self.similarity is None else {self.query_mpp: self.similarity}
        raise ValueError(f"no overlay {name!r}: use 'probability', 'clusters' or 'similarity'")

    def overlay_raster(self, name: str, *, transform: Callable[[np.ndarray], np.ndarray] | None = None,
                       smooth: int = 0) -> Raster | None:  # fmt: skip
        """Overlay ``name`` drawn from the finest level computed at each place (None when empty).

        ``transform`` maps each level's values before they are combined (e.g. a threshold).
        """
        levels = self.overlay_levels(name)
        if not levels:
            return None
        size = self.config.spec.input_size
        pairs = {}
        for m, values in levels.items():
            v = transform(values) if transform is not None else values
            done = np.isfinite(v) if np.issubdtype(v.dtype, np.floating) else v > 0
            pairs[m] = (v, done)
        if len(pairs) == 1:
            (m, (v, _)), = pairs.items()
            return self.raster(v, smooth=smooth, mpp=m)
        raster, _ = finest_raster(pairs, SlideGeometry.of(self.slide), size=size)
        floats = np.issubdtype(raster.data.dtype, np.floating)
        return upsample(raster, smooth, smooth="bilinear") if smooth > 1 and floats else raster

    # --- head ---------------------------------------------------------------------------------
    def set_head(self, head: LinearHead | None, *, tissue_only: bool = False) -> np.ndarray | None:
        """Use ``head`` for the probability overlay at every computed level; returns the default
        level's value per tile (NaN = not computed)."""
        if head is None:
            self.head = None
            self.probabilities = {}
            return None
        probability = self.apply_head(head, tissue_only=tissue_only)
        for m in self.computed_mpps():
            if m != self.default_mpp:
                self.apply_head(head, tissue_only=tissue_only, mpp=m)
        return probability

    def apply_head(self, head: LinearHead, *, tissue_only: bool = False, mpp: float | None = None) -> np.ndarray:
        """The head's positive-class probability per tile of level ``mpp`` (NaN = not embedded)."""
        if head.encoder != self.config.encoder:
            raise HeadError(f"this head was trained on {head.encoder!r} embeddings, but the slide is "
                            f"embedded with {self.config.encoder!r}: train or load a head for {self.config.encoder!r}")
        m = self._mpp(mpp)
        idx, emb = self.embedded(tissue_only=tissue_only, mpp=m)
        probability = self._blank(mpp=m)
        if len(idx):
            probability[idx] = _proba(head, emb, m)
        if self.head is not head:
            self.probabilities = {}
        self.head = head
        self.probabilities[m] = probability
        return probability

    @property
    def probability(self) -> np.ndarray | None:
        """The head's probability per tile of the default level (None without a head)."""
        return self.probabilities.get(self.default_mpp)

    @probability.setter
    def probability(self, values: np.ndarray | None) -> None:
        if values is None:
            self.probabilities.pop(self.default_mpp, None)
        else:
            self.probabilities[self.default_mpp] = values

    def heatmap(self, *, smooth: int = 0) -> Raster | None:
        """The head's probability as a raster aligned with the slide, finest level on top (None without a head)."""
        return None if self.head is None else self.overlay_raster("probability", smooth=smooth)

    # --- clusters -----------------------------------------------------------------------------
    def fit_clusters(self, k: int = 8, *, with_rgb: bool = False, tissue_only: bool = False,
                     mpp: float | None = None) -> ClusterResult:  # fmt: skip
        """K-means on the embedded tiles of level ``mpp``, not applied to the overlay (see :meth:`use_clusters`)."""
        m = self._mpp(mpp)
        idx, emb = self.embedded(tissue_only=tissue_only, mpp=m)
        if not len(idx):
            raise VirchowError(f"no tiles are embedded yet at {mag_name(m)}: compute the visible tiles first")
        model = fit_clusters(emb, k=k)
        labels = self._blank(np.int32, mpp=m)
        labels[idx] = model.predict(emb)
        rgb = None
        if with_rgb:
            rgb = np.full((len(labels), 3), np.nan, np.float32)
            rgb[idx] = pca_rgb(emb) / np.float32(255)
        return ClusterResult(labels, model, tile_counts(labels, model.k), rgb, mpp=m)

    def use_clusters(self, result: ClusterResult | None) -> None:
        """Draw ``result`` as the cluster overlay (later batches of its level are predicted with its model)."""
        self.cluster_model = None if result is None else result.model
        self.cluster_labels = None if result is None else result.labels
        if result is not None:
            self.cluster_mpp = self.default_mpp if result.mpp is None else canonical_mpp(result.mpp)

    def set_clusters(self, k: int = 8, *, with_rgb: bool = False, mpp: float | None = None) -> ClusterResult:
        """Fit k-means on the embedded tiles of level ``mpp`` and use it for the cluster overlay."""
        result = self.fit_clusters(k, with_rgb=with_rgb, mpp=mpp)
        self.use_clusters(result)
        return result

    def cluster_counts(self) -> dict[int, int]:
        """Tiles per cluster id (1..k) among embedded tiles."""
        if self.cluster_labels is None or self.cluster_model is None:
            return {}
        return tile_counts(self.cluster_labels, self.cluster_model.k)

    # --- similarity ---------------------------------------------------------------------------
    def query_indices(self, x: float, y: float, box: BBox | None = None, *, mpp: float | None = None) -> np.ndarray:
        """The tile of level ``mpp`` under level-0 ``(x, y)``, or every tissue tile under ``box``."""
        if box is None and not (math.isfinite(x) and math.isfinite(y)):
            raise VirchowError(f"query point ({x}, {y}) is not a number: give level-0 pixel coordinates")
        grid = self.grid_at(mpp)
        if box is not None:
            idx = grid.tiles_in(box)
        else:
            i = grid.index_at(x, y)
            idx = np.array([], np.int64) if i is None else np.array([i], np.int64)
        if not len(idx):
            w, h = self.slide.dimensions
            raise VirchowError(f"({x:g}, {y:g}) is outside {self.slide.path.name} ({w}×{h} px) or its tile grid")
        return idx

    def set_query(self, query_idx: np.ndarray | None, *, tissue_only: bool = False,
                  mpp: float | None = None) -> np.ndarray | None:  # fmt: skip
        """Similarity of every embedded tile of level ``mpp`` to the mean embedding of ``query_idx`` (embedded)."""
        if query_idx is None:
            self.query_vector = self.similarity = self.query_idx = None
            return None
        m = self._mpp(mpp)
        query_idx = np.asarray(query_idx, np.int64)
        vector = self.read(query_idx, mpp=m).mean(axis=0)
        self.query_idx, self.query_vector, self.query_mpp = query_idx, vector, m
        idx, emb = self.embedded(tissue_only=tissue_only, mpp=m)
        self.similarity = self._blank(mpp=m)
        self.similarity[idx] = cosine_similarity(self.query_vector, emb)
        return self.similarity

    def hits(self, k: int = 20, *, min_distance_tiles: int = 2) -> list[Hit]:
        """Best distinct tiles by similarity to the query (query tiles excluded), at the query's level."""
        if self.similarity is None:
            return []
        g = self.grid_at(self.query_mpp)
        return top_k_hits(self.similarity, g.coords, g.tile_size_l0, k=k, min_distance_tiles=min_distance_tiles,
                          exclude=self.query_idx, slide=self.slide_path)  # fmt: skip

    def absorb(self, indices: np.ndarray, embeddings: np.ndarray, *, mpp: float | None = None) -> list[str]:
        """Update every active overlay of level ``mpp`` with a new batch; returns the names that changed."""
        m = self._mpp(mpp)
        changed = []
        if self.head is not None:
            if m not in self.probabilities:
                self.probabilities[m] = self._blank(mpp=m)
            self.probabilities[m][indices] = _proba(self.head, embeddings, m)
            changed.append("probability")
        if self.cluster_model is not None and self.cluster_labels is not None and m == self.cluster_mpp:
            self.cluster_labels[indices] = self.cluster_model.predict(embeddings)
            changed.append("clusters")
        if self.query_vector is not None and self.similarity is not None and m == self.query_mpp:
            self.similarity[indices] = cosine_similarity(self.query_vector, embeddings)
            changed.append("similarity")
        return changed

    # --- annotations -> labelled tiles -> head -------------------------------------------------
    def annotated_tiles(self, polygons: Polygons, classes: Sequence[str | None], *, min_overlap: float = 0.5,
                        holes: Holes = None, mpp: float | None = None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """Tiles of level ``mpp`` mostly inside an annotation (level-0 (x, y) polygons, minus ``holes``),
        and their class names."""
        g = self.grid_at(mpp)
        labels, names = rasterize_annotations(polygons, classes, g.coords, g.tile_size_l0, min_overlap=min_overlap,
                                              holes=holes)  # fmt: skip
        idx = np.flatnonzero(labels >= 0)
        return idx.astype(np.int64), np.asarray(names, dtype=object)[labels[idx]].astype(str)

    def labelled_embeddings(self, polygons: Polygons, classes: Sequence[str | None], *, min_overlap: float = 0.5,
                            holes: Holes = None, mpp: float | None = None
                            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
        """The embedded annotated tiles of level ``mpp``: (indices, float32 embeddings, class names)."""
        idx, labels = self.annotated_tiles(polygons, classes, min_overlap=min_overlap, holes=holes, mpp=mpp)
        keep = np.isin(idx, self.missing(idx, mpp=mpp), invert=True)
        idx, labels = idx[keep], labels[keep]
        emb = self.read(idx, mpp=mpp) if len(idx) else np.zeros((0, self.config.spec.dim), np.float32)
        return idx, emb, labels

    def train_head(self, polygons: Polygons, classes: Sequence[str], *, min_overlap: float = 0.5,
                   mpp: float | None = None, holes: Holes = None) -> TrainResult:  # fmt: skip
        """Fit a probe on the embedded tiles of level ``mpp`` under annotation polygons (level-0 (x, y) px,
        minus ``holes``). Embed the annotated tiles first (:meth:`annotated_tiles` + :meth:`compute`)."""
        _, emb, labels = self.labelled_embeddings(polygons, classes, min_overlap=min_overlap, mpp=mpp, holes=holes)
        if not len(labels):
            raise VirchowError("no annotated tile is embedded yet: compute the annotated tiles first")
        head = fit_head(emb, labels, encoder=self.config.encoder, weights_id=self.weights_id, mpp=self._mpp(mpp))
        names, counts = np.unique(labels, return_counts=True)
        return TrainResult(head, {str(n): int(c) for n, c in zip(names, counts, strict=True)})

    def annotated_levels(self, polygons: Polygons, classes: Sequence[str], *, mpps: Sequence[float] | None = None,
                         min_overlap: float = 0.5, holes: Holes = None) -> dict[float, np.ndarray]:  # fmt: skip
        """The annotated tiles of every level a probe can be fitted at: at least 2 tiles of each of 2+ classes.

        ``mpps=None``: every level the session offers, skipping those the annotations do not cover
        enough; levels named in ``mpps`` must be covered (VirchowError naming the level otherwise).
        """
        out: dict[float, np.ndarray] = {}
        for m in self.mpps if mpps is None else [self._mpp(x) for x in mpps]:
            if mpps is not None:
                self.check_mpp(m)
            idx, labels = self.annotated_tiles(polygons, classes, min_overlap=min_overlap, mpp=m, holes=holes)
            names, counts = np.unique(labels, return_counts=True)
            if int((counts >= 2).sum()) >= 2 and len(names) == int((counts >= 2).sum()):
                out[m] = idx
            elif mpps is not None:
                have = ", ".join(f"{n}: {c}" for n, c in zip(names, counts, strict=True)) or "no tile"
                raise VirchowError(f"at {mag_name(m)} the annotations cover {have}; a probe needs at least 2 tiles "
                                   "of each of two classes: draw larger regions or leave this level out")  # fmt: skip
        return out

    def train_head_levels(self, polygons: Polygons, classes: Sequence[str], *, mpps: Sequence[float] | None = None,
                          min_overlap: float = 0.5, holes: Holes = None) -> TrainResult:  # fmt: skip
        """One probe per level of :meth:`annotated_levels` (embedding the annotated tiles not stored yet),
        as a :class:`~napari_virchow.analysis.heads.MultiScaleHead`; ``levels`` holds the class counts per level."""
        levels = self.annotated_levels(polygons, classes, mpps=mpps, min_overlap=min_overlap, holes=holes)
        if not levels:
            raise VirchowError("the annotations cover no magnification with at least 2 tiles of each of two "
                               "classes: draw larger regions of at least two classes")  # fmt: skip
        results = {}
        for m, idx in levels.items():
            for _ in self.compute(indices=self.missing(idx, mpp=m), mpp=m):
                pass
            results[m] = self.train_head(polygons, classes, min_overlap=min_overlap, mpp=m, holes=holes)
        head = MultiScaleHead.from_probes({m: r.head for m, r in results.items()})
        return TrainResult(head, results[head.mpp].counts, {m: r.counts for m, r in results.items()})


def _proba(head: LinearHead, embeddings: np.ndarray, mpp: float) -> np.ndarray:
    """``head``'s positive-class probability; a head with one probe per level uses its probe for ``mpp``
    (or the nearest level's, see :meth:`MultiScaleHead.nearest`)."""
    probe = head.nearest(mpp) if isinstance(head, MultiScaleHead) else head
    return probe.positive_proba(embeddings)
