"""What a slide's overlays show, copied at one moment, and written as QuPath GeoJSON or a heatmap TIFF.

The viewer exports in a worker thread (tracing the regions of a whole slide's clusters takes
seconds), while the session may go on changing: :meth:`OverlaySnapshot.of` copies what the
export needs on the caller's thread, and :func:`write_overlays` / :func:`write_heatmap` then
touch only the snapshot.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_virchow.io.geojson import Color

if TYPE_CHECKING:
    from napari_virchow.analysis.similarity import Hit
    from napari_virchow.session import SlideSession

__all__ = ["HeatmapSnapshot", "OverlaySnapshot", "TileValues", "export_provenance", "write_heatmap", "write_overlays"]


def export_provenance(session: SlideSession) -> dict[str, Any]:
    """What the viewer's exports record: the session's provenance, its head and the overlay levels."""
    from napari_virchow.io.provenance import provenance

    meta = provenance(session)
    head = session.head
    if head is not None:
        meta.update(head_classes=list(head.classes), positive_class=head.positive_class,
                    head_weights_id=head.weights_id)  # fmt: skip
    meta["overlay_mpps"] = sorted(session.overlay_levels("probability")) or None
    return meta


@dataclass(frozen=True)
class TileValues:
    """Values on one tile lattice: ``values[i]`` over the tile at level-0 ``coords[i]``."""

    values: np.ndarray
    coords: np.ndarray
    tile_size_l0: int


@dataclass(frozen=True)
class OverlaySnapshot:
    """The heatmap, clusters and similar-region hits of one session, as arrays of their own.

    Each overlay keeps its own lattice: the heatmap is what the screen shows (each place from the
    finest magnification computed there), the clusters and the hits are those of the magnification
    they were made at (``cluster_mpp``, ``query_mpp``), which need not be the encoder's own.
    """

    bounds: tuple[int, int]
    heatmap: TileValues | None
    positive_class: str | None
    clusters: TileValues | None
    cluster_colors: Mapping[int, Color]
    hits: list[Hit]
    hit_tile_size_l0: int
    provenance: dict[str, Any]

    @classmethod
    def of(cls, session: SlideSession, *, n_hits: int, cluster_colors: Mapping[int, Color] | None = None
           ) -> OverlaySnapshot:  # fmt: skip
        """Copy what ``session`` shows now (``n_hits`` best hits of its query, if any)."""
        w, h = session.slide.dimensions
        heat = None
        raster = session.overlay_raster("probability") if session.head is not None else None
        if raster is not None:  # cells of the finest level's lattice, as drawn
            rows, cols = np.nonzero(np.isfinite(raster.data))
            t = int(round(raster.tile_size_l0))
            (x0, y0) = raster.origin_l0
            coords = np.stack([x0 + cols * t, y0 + rows * t], axis=1).astype(np.int64)
            heat = TileValues(raster.data[rows, cols].astype(np.float32), coords, t)
        clusters = None
        if session.cluster_labels is not None:
            g = session.grid_at(session.cluster_mpp)
            clusters = TileValues(session.cluster_labels.copy(), g.coords.copy(), int(g.tile_size_l0))
        hits = session.hits(n_hits) if session.similarity is not None else []
        return cls(
            bounds=(int(w), int(h)), heatmap=heat,
            positive_class=None if session.head is None else str(session.head.positive_class),
            clusters=clusters, cluster_colors=dict(cluster_colors or {}), hits=hits,
            hit_tile_size_l0=int(session.grid_at(session.query_mpp).tile_size_l0),
            provenance=export_provenance(session),
        )  # fmt: skip

    @property
    def empty(self) -> bool:
        """Nothing to export: no heatmap, no cluster, no hit."""
        return self.heatmap is None and self.clusters is None and not self.hits

    def features(self, threshold: float) -> list[dict[str, Any]]:
        """QuPath features: heatmap regions ≥ ``threshold``, one region per cluster, the hits."""
        from napari_virchow.io.export import threshold_features
        from napari_virchow.io.geojson import hits_to_features, tiles_to_features

        feats: list[dict[str, Any]] = []
        if self.heatmap is not None and len(self.heatmap.values):
            heat = self.heatmap
            feats += threshold_features(heat.values, heat.coords, heat.tile_size_l0, threshold,
                                        class_name=str(self.positive_class), bounds=self.bounds)  # fmt: skip
        if self.clusters is not None:
            c = self.clusters
            ids = sorted(int(i) for i in np.unique(c.values) if i > 0)
            colors = {i: self.cluster_colors[i] for i in ids if i in self.cluster_colors} or None
            feats += tiles_to_features(c.coords, c.tile_size_l0, c.values, {i: f"Cluster {i}" for i in ids},
                                       colors, bounds=self.bounds)  # fmt: skip
        if self.hits:
            feats += hits_to_features(self.hits, self.hit_tile_size_l0, bounds=self.bounds)
        return feats


def write_overlays(path: str | os.PathLike[str], snapshot: OverlaySnapshot, threshold: float) -> int:
    """Write ``snapshot``'s regions as QuPath GeoJSON (atomically); returns how many regions."""
    from napari_virchow.io.geojson import write_annotations

    feats = snapshot.features(threshold)
    write_annotations(path, feats, provenance=snapshot.provenance)
    return len(feats)


@dataclass(frozen=True)
class HeatmapSnapshot:
    """A session's probability raster (finest magnification computed at each place) and its geometry."""

    data: np.ndarray
    tile_size_l0: int
    mpp_l0: float
    slide_dims: tuple[int, int]
    provenance: dict[str, Any]

    @classmethod
    def of(cls, session: SlideSession) -> HeatmapSnapshot | None:
        """The heatmap ``session`` shows, or ``None`` before a head gave one."""
        raster = session.overlay_raster("probability") if session.head is not None else None
        if raster is None:
            return None
        slide = session.slide
        w, h = slide.dimensions
        return cls(np.array(raster.data, copy=True), int(raster.tile_size_l0), float(slide.require_mpp()),
                   (int(w), int(h)), export_provenance(session))  # fmt: skip

    @property
    def pixel_mpp(self) -> float:
        """µm per heatmap pixel."""
        return self.tile_size_l0 * self.mpp_l0


def write_heatmap(path: str | os.PathLike[str], snapshot: HeatmapSnapshot) -> None:
    """Write ``snapshot`` as a uint8 pyramidal TIFF aligned with the slide (atomically)."""
    from napari_virchow.io.export import write_heatmap_tiff

    write_heatmap_tiff(path, snapshot.data, mpp_l0=snapshot.mpp_l0, tile_size_l0=snapshot.tile_size_l0,
                       slide_dims=snapshot.slide_dims, metadata=snapshot.provenance)  # fmt: skip
