"""Provenance that travels with every export: what computed the numbers, from which slide.

The same flat dict goes onto the root of features HDF5 files, into heatmap TIFF descriptions and
into GeoJSON FeatureCollections (as the foreign member ``"napari_virchow"``), so a file found on
its own says which encoder and weights, µm/px, tiles, tissue settings, plugin version and slide
(content fingerprint) produced it.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from napari_virchow import __version__
from napari_virchow.slides.lattice import EDGES

if TYPE_CHECKING:
    from napari_virchow.session import SlideSession

__all__ = ["PROVENANCE_KEYS", "provenance", "weights_origin"]

#: keys every export carries (values may be None when unknown)
PROVENANCE_KEYS = (
    "encoder", "weights_id", "weights_source", "weights_repo", "weights_revision", "mpp", "mpp_source",
    "target_mpp", "tile_size", "tile_size_l0", "tissue_threshold", "min_tissue", "napari_virchow_version",
    "slide_name", "slide_fingerprint", "created", "edge_tiles",
)  # fmt: skip


def weights_origin(source: str | None) -> tuple[str | None, str | None]:
    """(hub repo, revision) of a weights source such as ``hf-cache:org/repo@abc123`` or ``hf-hub:org/repo``."""
    if not source:
        return None, None
    for prefix in ("hf-cache:", "hf-hub:"):
        if source.startswith(prefix):
            repo, _, rev = source[len(prefix):].partition("@")
            return repo or None, rev or None
    return None, None


def provenance(session: SlideSession) -> dict[str, Any]:
    """The provenance of ``session``'s numbers (see :data:`PROVENANCE_KEYS`).

    The weights' digest is the session's ``weights_id`` (a file digest, or ``random-seed<n>``);
    their source is known when the encoder is loaded in this process.
    """
    slide, grid = session.slide, session.grid
    source = session.encoder().weights_source if session.encoder_loaded else None
    repo, revision = weights_origin(source)
    return {
        "encoder": session.config.encoder,
        "weights_id": session.weights_id,
        "weights_source": source,
        "weights_repo": repo,
        "weights_revision": revision,
        "mpp": slide.mpp,
        "mpp_source": slide.mpp_source,
        "target_mpp": grid.mpp,
        "tile_size": grid.size,
        "tile_size_l0": grid.tile_size_l0,
        "tissue_threshold": grid.tissue_threshold,
        "min_tissue": grid.min_tissue,
        "napari_virchow_version": __version__,
        "slide_name": slide.path.name,
        "slide_fingerprint": slide.fingerprint,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        # tiles at the right/bottom edge reach past the slide, read padded with white (slides/lattice.py)
        "edge_tiles": EDGES,
    }
