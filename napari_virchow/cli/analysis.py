"""``fit-head`` and ``heatmap`` commands (``index`` and ``search``: :mod:`napari_virchow.cli.index_cmds`)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from napari_virchow.cli.common import (
    CONSOLE,
    CliError,
    check_writable,
    config_from_args,
    embed_missing,
    load_encoder,
    open_session,
    output_names,
    positive_int,
    probability,
    run_slides,
    show_progress,
)
from napari_virchow.cli.embed import _SLIDES_HELP, load_cli_head, out_folder, write_file
from napari_virchow.cli.options import add_mpp_options
from napari_virchow.errors import VirchowError

if TYPE_CHECKING:
    from napari_virchow.analysis.heads import LinearHead
    from napari_virchow.config import SessionConfig
    from napari_virchow.io.geojson import Annotation
    from napari_virchow.session import SlideSession

# --- fit-head -----------------------------------------------------------------------------------


def args_fit_head(p: argparse.ArgumentParser) -> None:
    """Options of ``fit-head``."""
    p.add_argument("slides", nargs="+", metavar="SLIDE", help=_SLIDES_HELP)
    p.add_argument("--annotations", nargs="+", required=True, metavar="GEOJSON",
                   help="QuPath GeoJSON per slide, same order: classified polygons label tiles")  # fmt: skip
    p.add_argument("--out", required=True, metavar="HEAD", help="head file to write: .safetensors or .json")
    p.add_argument("--min-overlap", type=probability, default=0.5, metavar="F",
                   help="fraction of a tile a class must cover to label it (default 0.5)")  # fmt: skip
    p.add_argument("--positive", metavar="CLASS", help="class whose probability the heatmap shows "
                   "(default: a tumour-like name, else the second class)")  # fmt: skip
    p.add_argument("--cv", type=positive_int, default=5, metavar="N", help="cross-validation folds (default 5)")


def cmd_fit_head(args: argparse.Namespace) -> int:
    """``fit-head``: fit a probe on the tiles under annotations, print its cross-validated AUC."""
    from napari_virchow.analysis.heads import fit_head, save_head
    from napari_virchow.io.geojson import read_annotations

    if len(args.annotations) != len(args.slides):
        raise CliError(f"{len(args.slides)} slides but {len(args.annotations)} --annotations files; "
                       "give one annotation file per slide, in the same order")  # fmt: skip
    out = Path(args.out)
    if out.suffix not in (".safetensors", ".json"):
        raise CliError(f"--out {out}: a head is saved as .safetensors or .json; use one of those suffixes")
    check_writable(out.parent, "folder of --out", "choose another --out path")
    config = config_from_args(args)
    drawn = [read_annotations(a) for a in args.annotations]  # all read before any embedding
    encoder = load_encoder(config)
    embeddings, labels = [], []
    for slide, regions in zip(args.slides, drawn, strict=True):
        try:
            emb, lab = _labelled_tiles(slide, regions, config, args)
        except VirchowError as exc:
            # The training set must be complete: a failing slide stops the command (exit 2).
            name = Path(slide).name
            raise CliError(str(exc) if name in str(exc) else f"{name}: {exc}") from exc
        embeddings.append(emb)
        labels.append(lab)
    y = np.concatenate(labels)
    if not len(y):
        raise CliError(f"no tile is covered to {args.min_overlap:.0%} by a classified annotation; draw larger "
                       "regions, set their class in QuPath, or lower --min-overlap")  # fmt: skip
    head = fit_head(np.concatenate(embeddings), y, encoder=config.encoder, weights_id=encoder.weights_id,
                    cv=args.cv, positive_class=args.positive)  # fmt: skip
    write_file(out, lambda p: save_head(head, p))
    counts = ", ".join(f"{c} {n}" for c, n in head.metrics["class_counts"].items())
    if head.cv_auc is not None:
        CONSOLE.out(f"cross-validated ({head.metrics['cv_folds']}-fold): ROC AUC {head.cv_auc:.3f}, "
                    f"accuracy {head.cv_accuracy:.3f} on {head.metrics['n_samples']} tiles ({counts})")  # fmt: skip
    else:
        CONSOLE.out(f"too few tiles per class to cross-validate ({counts})")
    CONSOLE.out(f"positive class: {head.positive_class}; saved head to {out}")
    return 0


def _labelled_tiles(slide: str, regions: list[Annotation], config: SessionConfig,
                    args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Embed the tiles under one slide's annotations; their embeddings and class names."""
    from napari_virchow.io.geojson import check_inside

    polygons, classes = [a.polygon for a in regions], [a.class_name for a in regions]
    kw = {"min_overlap": args.min_overlap, "holes": [a.holes for a in regions]}
    with open_session(slide, config) as session:
        check_inside(regions, session.slide.dimensions, session.slide.path.name)  # names the feature
        idx, _ = session.annotated_tiles(polygons, classes, **kw)
        n_new, _ = embed_missing(session, idx, progress=show_progress(args))
        _, emb, lab = session.labelled_embeddings(polygons, classes, **kw)
        CONSOLE.out(f"{session.slide.path.name}: {len(idx)} annotated tiles ({n_new} embedded now)")
    return emb, lab


# --- heatmap ------------------------------------------------------------------------------------


def args_heatmap(p: argparse.ArgumentParser) -> None:
    """Options of ``heatmap``."""
    p.add_argument("slides", nargs="+", metavar="SLIDE", help=_SLIDES_HELP)
    p.add_argument("--head", required=True, metavar="HEAD", help="head file from `napari-virchow fit-head`")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for <slide>.heatmap.tif and .geojson")
    p.add_argument("--threshold", type=probability, default=0.5, metavar="T",
                   help="GeoJSON regions where the probability is at least T (default 0.5)")  # fmt: skip
    p.add_argument("--smooth", type=positive_int, default=1, metavar="N",
                   help="N × N heatmap pixels per tile, bilinear between tile centres (default 1: none)")  # fmt: skip
    p.add_argument("--tiff-dtype", choices=("uint8", "float32"), default="uint8",
                   help="uint8: round(p·255), 0 = no value, opens as a slide; float32: NaN = no value")  # fmt: skip
    add_mpp_options(p, several=False)


def cmd_heatmap(args: argparse.Namespace) -> int:
    """``heatmap``: probability TIFF (and GeoJSON) of a head per slide."""
    config = config_from_args(args)
    head = load_cli_head(args.head, config)  # another encoder's head: refused before any work
    out = out_folder(args)
    output_names(args.slides, ".heatmap.tif")

    if args.mpp is not None and len(args.mpp) != 1:
        raise CliError("heatmap --mpp takes one magnification (e.g. --mpp 2.0 for a whole-slide 5× heatmap)")
    mpp = None if args.mpp is None else args.mpp[0]

    def work(session: SlideSession) -> str:
        return _write_heatmap(session, head, out, args, mpp)

    return run_slides(args.slides, config, work, scheduler=args.scheduler, progress=show_progress(args),
                      mpps=None if mpp is None else (mpp,))  # fmt: skip


def _write_heatmap(session: SlideSession, head: LinearHead, out: Path, args: argparse.Namespace,
                   mpp: float | None = None) -> str:  # fmt: skip
    from napari_virchow.io.export import threshold_features, write_heatmap_tiff
    from napari_virchow.io.geojson import safe_output_path, write_annotations

    if head.weights_id and head.weights_id != session.weights_id:
        CONSOLE.warn(f"{args.head} was fitted on embeddings of weights {head.weights_id}, these are "
                     f"{session.weights_id}: its probabilities may be meaningless")  # fmt: skip
    values = session.apply_head(head, tissue_only=True, mpp=mpp)
    raster = session.raster(values, smooth=args.smooth, mpp=mpp)
    g, slide, stem = session.grid_at(mpp), session.slide, session.slide.path.stem
    idx = np.flatnonzero(~np.isnan(values))
    from napari_virchow.io.provenance import provenance

    meta = {
        **provenance(session),
        "slide": session.slide_path,
        "encoder": session.config.encoder,
        "weights_id": session.weights_id,
        "head": str(Path(args.head).resolve()),
        "classes": head.classes,
        "positive_class": head.positive_class,
        "mpp": session._mpp(mpp),
    }
    tif = safe_output_path(out, f"{stem}.heatmap.tif")
    write_file(tif, write_heatmap_tiff, raster.data, mpp_l0=slide.require_mpp(), tile_size_l0=raster.tile_size_l0,
               slide_dims=slide.dimensions, dtype=args.tiff_dtype, metadata=meta)  # fmt: skip
    feats = threshold_features(values[idx], g.coords[idx], g.tile_size_l0, args.threshold,
                               class_name=str(head.positive_class))  # fmt: skip
    gj = safe_output_path(out, f"{stem}.heatmap.geojson")
    write_file(gj, write_annotations, feats, provenance=provenance(session))
    w, h = slide.dimensions
    cols, rows = (math.ceil(side / raster.tile_size_l0 - 1e-9) for side in (w, h))  # as written (cropped)
    above = int(np.sum(values[idx] >= args.threshold))
    return (f"  wrote {tif} ({cols}×{rows} px, {raster.tile_size_l0 * slide.require_mpp():.4g} µm/px) and "
            f"{gj.name} ({above} tiles >= {args.threshold:g})")  # fmt: skip
