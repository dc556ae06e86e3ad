"""``embed`` and ``export`` commands (HDF5 features for MIL, GeoJSON regions for QuPath)."""

from __future__ import annotations

import argparse
import errno
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_virchow.cli.common import (
    CliError,
    check_writable,
    config_from_args,
    embed_missing,
    output_names,
    point,
    positive_int,
    probability,
    run_slides,
    show_progress,
)
from napari_virchow.cli.options import add_mpp_options

if TYPE_CHECKING:
    from napari_virchow.analysis.heads import LinearHead
    from napari_virchow.config import SessionConfig
    from napari_virchow.session import SlideSession

_SLIDES_HELP = "whole-slide image files (SVS, NDPI, MRXS, SCN, tiled TIFF, ...)"
_OUT_FIX = "choose another --out DIR"


def out_folder(args: argparse.Namespace) -> Path:
    """``--out DIR``, created and proven writable."""
    return check_writable(args.out, "output folder", _OUT_FIX)


def write_file(path: Path, write: Any, *args: Any, **kwargs: Any) -> Any:
    """``write(path, ...)`` (an atomic writer), turning a file-system failure into one line naming the file."""
    try:
        return write(path, *args, **kwargs)
    except OSError as exc:
        why = "disk full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else (exc.strerror or str(exc))
        raise CliError(f"cannot write {path} ({why}; nothing was written); free space or {_OUT_FIX}") from exc


def load_cli_head(path: str, config: SessionConfig) -> LinearHead:
    """A head for ``config.encoder`` (a head of another encoder is refused with one line)."""
    from napari_virchow.analysis.head_files import load_head
    from napari_virchow.errors import HeadError

    head = load_head(path, encoder=config.encoder)
    dim = config.spec.dim
    if head.dim != dim:
        raise HeadError(f"{path}: head expects {head.dim}-d embeddings, {config.encoder} gives {dim}")
    return head


# --- embed --------------------------------------------------------------------------------------


def args_embed(p: argparse.ArgumentParser) -> None:
    """Options of ``embed``."""
    p.add_argument("slides", nargs="+", metavar="SLIDE", help=_SLIDES_HELP)
    add_mpp_options(p)


def cmd_embed(args: argparse.Namespace) -> int:
    """``embed``: embed every tissue tile of each slide into the cache."""
    config = config_from_args(args)
    return run_slides(args.slides, config, scheduler=args.scheduler, progress=show_progress(args), mpps=args.mpp)


# --- export -------------------------------------------------------------------------------------


def args_export(p: argparse.ArgumentParser) -> None:
    """Options of ``export``."""
    p.add_argument("slides", nargs="+", metavar="SLIDE", help=_SLIDES_HELP)
    p.add_argument("--out", required=True, metavar="DIR", help="folder for <slide>.h5 (or the .geojson files)")
    g = p.add_argument_group("GeoJSON for QuPath (instead of HDF5); any of --clusters/--query/--head")
    g.add_argument("--geojson", action="store_true", help="write QuPath GeoJSON annotations")
    g.add_argument("--clusters", type=positive_int, metavar="K", help="k-means regions -> <slide>.clusters.geojson")
    g.add_argument("--query", type=point, metavar="X,Y",
                   help="tiles similar to the tile at level-0 (X, Y) -> <slide>.similar.geojson")  # fmt: skip
    g.add_argument("-k", "--top-k", type=positive_int, default=20, metavar="K", help="similar tiles (default 20)")
    g.add_argument("--head", metavar="HEAD", help="head file: regions >= --threshold -> <slide>.heatmap.geojson")
    g.add_argument("--threshold", type=probability, default=0.5, metavar="T", help="for --head (default 0.5)")


def cmd_export(args: argparse.Namespace) -> int:
    """``export``: HDF5 features, or QuPath GeoJSON regions, per slide."""
    config = config_from_args(args)
    geojson = args.geojson or bool(args.clusters or args.query or args.head)
    if args.geojson and not (args.clusters or args.query or args.head):
        raise CliError("--geojson needs what to draw: --clusters K, --query X,Y and/or --head HEAD")
    head = load_cli_head(args.head, config) if args.head else None
    out = out_folder(args)
    output_names(args.slides, ".geojson" if geojson else ".h5")
    work = _GeoJsonWork(out, args, head) if geojson else _H5Work(out)
    return run_slides(args.slides, config, work, scheduler=args.scheduler, progress=show_progress(args))


class _H5Work:
    """Write ``<stem>.h5``: embedded tissue tiles in TRIDENT's layout."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def __call__(self, session: SlideSession) -> str:
        from napari_virchow import __version__
        from napari_virchow.io.export import trident_coords_attrs, write_features_h5
        from napari_virchow.io.geojson import safe_output_path

        idx, emb = session.embedded(tissue_only=True)
        slide, grid, stem, dim = session.slide, session.grid, session.slide.path.stem, session.config.spec.dim
        attrs = trident_coords_attrs(
            stem, patch_size=grid.size, patch_size_level0=grid.tile_size_l0, level0_mpp=slide.require_mpp(),
            target_mpp=grid.mpp, level0_size=slide.dimensions, objective_power=slide.objective_power,
            savetodir=str(self.out),
        )  # fmt: skip
        from napari_virchow.io.provenance import provenance

        file_attrs = {
            **provenance(session), "encoder": session.config.encoder, "weights_id": session.weights_id, "dim": dim,
            "mpp": slide.mpp, "mpp_source": slide.mpp_source, "target_mpp": grid.mpp, "tile_size": grid.size,
            "slide_path": session.slide_path, "slide_fingerprint": slide.fingerprint,
            "coords_origin": "level-0 top-left (x, y)", "napari_virchow_version": __version__,
        }  # fmt: skip
        path = safe_output_path(self.out, f"{stem}.h5")
        write_file(path, write_features_h5, emb, grid.coords[idx], attrs=attrs, file_attrs=file_attrs)
        return f"  wrote {path} ({len(idx)} tiles × {dim})"


class _GeoJsonWork:
    """Write ``<stem>.clusters/similar/heatmap.geojson`` as asked."""

    def __init__(self, out: Path, args: argparse.Namespace, head: LinearHead | None) -> None:
        self.out, self.args, self.head = out, args, head

    def __call__(self, session: SlideSession) -> str:
        from napari_virchow.io.export import cluster_features, threshold_features

        g, stem, notes = session.grid, session.slide.path.stem, []
        if self.args.clusters:
            result = session.fit_clusters(self.args.clusters, tissue_only=True)
            idx = np.flatnonzero(result.labels)
            feats = cluster_features(result.labels[idx], g.coords[idx], g.tile_size_l0,
                                     bounds=session.slide.dimensions)
            notes.append(self._write(f"{stem}.clusters.geojson", feats, f"{len(feats)} cluster regions", session))
        if self.args.query:
            feats = query_features(session, self.args.query, k=self.args.top_k, progress=show_progress(self.args))
            notes.append(self._write(f"{stem}.similar.geojson", feats, f"query + {len(feats) - 1} similar tiles",
                                     session))
        if self.head is not None:
            t = self.args.threshold
            values = session.apply_head(self.head, tissue_only=True)
            idx = np.flatnonzero(~np.isnan(values))
            feats = threshold_features(values[idx], g.coords[idx], g.tile_size_l0, t,
                                       class_name=str(self.head.positive_class),
                                       bounds=session.slide.dimensions)  # fmt: skip
            notes.append(self._write(f"{stem}.heatmap.geojson", feats, f"{self.head.positive_class} >= {t:g}",
                                     session))
        return "\n".join(notes)

    def _write(self, name: str, features: list[dict[str, Any]], what: str, session: SlideSession) -> str:
        from napari_virchow.io.geojson import safe_output_path, write_annotations
        from napari_virchow.io.provenance import provenance

        path = safe_output_path(self.out, name)
        write_file(path, write_annotations, features, provenance=provenance(session))
        return f"  wrote {path} ({what})"


def query_features(session: SlideSession, xy: tuple[float, float], *, k: int,
                   progress: bool = True) -> list[dict[str, Any]]:  # fmt: skip
    """The query tile (class ``Query``) and its ``k`` most similar distinct tissue tiles (``Similar``)."""
    from napari_virchow.io.geojson import Annotation, annotation_to_feature, hits_to_features, tile_box

    query = session.query_indices(*xy)
    embed_missing(session, query, progress=progress)  # a background tile is embedded on demand
    session.set_query(query, tissue_only=True)
    hits = session.hits(k)
    x0, y0 = (int(v) for v in session.grid.coords[query[0]])
    t, bounds = session.grid.tile_size_l0, session.slide.dimensions
    feature = annotation_to_feature(Annotation(tile_box(x0, y0, t, bounds), "Query", (0, 200, 255), name="Query"))
    return [feature, *hits_to_features(hits, t, class_name="Similar", bounds=bounds)]
