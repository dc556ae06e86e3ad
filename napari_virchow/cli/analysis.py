"""``fit-head`` and ``heatmap`` commands (``index`` and ``search``: :mod:`napari_virchow.cli.index_cmds`)."""

from __future__ import annotations

import argparse
import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

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
from napari_virchow.store.key import canonical_mpp, mag_name

if TYPE_CHECKING:
    from napari_virchow.analysis.heads import LinearHead
    from napari_virchow.config import SessionConfig
    from napari_virchow.io.geojson import Annotation
    from napari_virchow.session import SlideSession

T = TypeVar("T")

# --- fit-head -----------------------------------------------------------------------------------


#: a trained magnification other than the encoder's own joins fit-head's default when every class
#: has at least this many annotated tiles there (all slides together): fewer make its AUC mean little
MIN_LEVEL_TILES = 10
#: tiles per class an explicitly asked magnification needs (a probe cannot be fitted on fewer)
MIN_FIT_TILES = 2

_FIT_MPP_HELP = (f"magnifications to fit a probe at, in µm/px, comma-separated (e.g. 0.5,2.0), each one of the "
                 f"encoder's trained ones; default: the encoder's own (0.5) plus every other trained one the slides "
                 f"give where each class has at least {MIN_LEVEL_TILES} annotated tiles")  # fmt: skip


def args_fit_head(p: argparse.ArgumentParser) -> None:
    """Options of ``fit-head``."""
    p.add_argument("slides", nargs="+", metavar="SLIDE", help=_SLIDES_HELP)
    p.add_argument("--annotations", nargs="+", required=True, metavar="GEOJSON",
                   help="QuPath GeoJSON (or ASAP XML) per slide, same order: classified polygons label tiles, "
                        "holes excepted")  # fmt: skip
    p.add_argument("--out", required=True, metavar="HEAD", help="head file to write: .safetensors or .json")
    p.add_argument("--min-overlap", type=probability, default=0.5, metavar="F",
                   help="fraction of a tile a class must cover to label it (default 0.5)")  # fmt: skip
    p.add_argument("--positive", metavar="CLASS", help="class whose probability the heatmap shows "
                   "(default: a tumour-like name, else the second class)")  # fmt: skip
    p.add_argument("--cv", type=positive_int, default=5, metavar="N", help="cross-validation folds (default 5)")
    add_mpp_options(p, help_text=_FIT_MPP_HELP)


def cmd_fit_head(args: argparse.Namespace) -> int:
    """``fit-head``: fit one probe per magnification on the tiles under annotations (one head file),
    print each one's cross-validated AUC."""
    from napari_virchow.analysis.head_files import save_head
    from napari_virchow.analysis.heads import MultiScaleHead
    from napari_virchow.io.geojson import read_annotations

    if len(args.annotations) != len(args.slides):
        raise CliError(f"{len(args.slides)} slides but {len(args.annotations)} --annotations files; "
                       "give one annotation file per slide, in the same order")  # fmt: skip
    out = Path(args.out)
    if out.suffix not in (".safetensors", ".json"):
        raise CliError(f"--out {out}: a head is saved as .safetensors or .json; use one of those suffixes")
    check_writable(out.parent, "folder of --out", "choose another --out path")
    config = config_from_args(args)
    asked = None if args.mpp is None else [canonical_mpp(m) for m in args.mpp]
    for m in asked or ():  # an untrained magnification without the opt-in: one line, before any work
        config.spec.check_mpp(m, allow_untrained=config.allow_untrained_mpp)
    drawn = [read_annotations(a) for a in args.annotations]  # all read before any embedding
    encoder = load_encoder(config)
    counts = _per_slide(args.slides, drawn, config, args, lambda s, r: _level_counts(s, r, args, asked))
    levels = _choose_levels(counts, canonical_mpp(config.spec.mpp), asked)
    per_slide = _per_slide(args.slides, drawn, config, args, lambda s, r: _labelled_tiles(s, r, args, levels))
    probes = {m: _fit_level(m, [got[m] for got in per_slide], config, encoder.weights_id, args) for m in levels}
    head = probes[levels[0]] if len(probes) == 1 else MultiScaleHead.from_probes(probes)
    write_file(out, lambda p: save_head(head, p))
    listed = ", ".join(f"{m:g}" for m in probes)
    where = "" if len(probes) == 1 else f" with one probe per magnification ({listed} µm/px)"
    CONSOLE.out(f"positive class: {head.positive_class}; saved head to {out}{where}")
    return 0


def _per_slide(slides: list[str], drawn: list[list[Annotation]], config: SessionConfig, args: argparse.Namespace,
               work: Callable[[SlideSession, list[Annotation]], T]) -> list[T]:  # fmt: skip
    """``work(session, regions)`` per slide; a failing slide stops the command (the training set must be complete)."""
    from napari_virchow.io.geojson import check_inside

    results = []
    for slide, regions in zip(slides, drawn, strict=True):
        try:
            with open_session(slide, config) as session:
                check_inside(regions, session.slide.dimensions, session.slide.path.name)  # names the feature
                results.append(work(session, regions))
        except VirchowError as exc:
            name = Path(slide).name
            raise CliError(str(exc) if name in str(exc) else f"{name}: {exc}") from exc
    return results


def _regions(regions: list[Annotation], args: argparse.Namespace) -> tuple[list[np.ndarray], list[str | None], dict]:
    return ([a.polygon for a in regions], [a.class_name for a in regions],
            {"min_overlap": args.min_overlap, "holes": [a.holes for a in regions]})  # fmt: skip


def _level_counts(session: SlideSession, regions: list[Annotation], args: argparse.Namespace,
                  asked: list[float] | None) -> dict[float, Counter[str]]:  # fmt: skip
    """Annotated tiles per class at each candidate level of one slide (nothing embedded)."""
    polygons, classes, kw = _regions(regions, args)
    out = {}
    for m in asked or session.mpps:  # asked, or the trained levels this slide gives without upsampling
        _, labels = session.annotated_tiles(polygons, classes, mpp=m, **kw)
        out[m] = Counter(labels.tolist())
    return out


def _choose_levels(per_slide: list[dict[float, Counter[str]]], home: float, asked: list[float] | None) -> list[float]:
    """The magnifications to fit at (see :data:`MIN_LEVEL_TILES`), the encoder's own first; prints the choice."""
    total: dict[float, Counter[str]] = {}
    for counts in per_slide:
        for m, c in counts.items():
            total.setdefault(m, Counter()).update(c)
    if asked is not None:
        classes = set(total[asked[0]])
        for m in asked:
            c = total[m]
            if set(c) != classes or len(c) < 2 or min(c.values()) < MIN_FIT_TILES:
                have = ", ".join(f"{n} {k}" for n, k in sorted(c.items())) or "no tile"
                raise CliError(f"--mpp {m:g}: at {mag_name(m)} the annotations cover {have}; a probe needs at least "
                               f"{MIN_FIT_TILES} tiles of each class ({', '.join(sorted(classes))}) at every "
                               "magnification: draw larger regions or leave this magnification out")  # fmt: skip
        return list(dict.fromkeys(asked))
    classes = set(total.get(home, ()))
    levels, skipped = [home], []
    for m in sorted(total):
        if m == home:
            continue
        c = total[m]
        if classes and set(c) == classes and min(c.values()) >= MIN_LEVEL_TILES:
            levels.append(m)
        else:
            skipped.append(f"{mag_name(m)}: {', '.join(f'{n} {c[n]}' for n in sorted(classes)) or 'no tile'}")
    if len(levels) > 1 or skipped:
        note = f"; skipped {'; '.join(skipped)}" if skipped else ""
        CONSOLE.out(f"fitting at {', '.join(mag_name(m) for m in levels)}: the encoder's own magnification and "
                    f"every trained one where each class has at least {MIN_LEVEL_TILES} annotated tiles{note}")
    return levels


def _labelled_tiles(session: SlideSession, regions: list[Annotation], args: argparse.Namespace,
                    levels: list[float]) -> dict[float, tuple[np.ndarray, np.ndarray]]:  # fmt: skip
    """Embed the tiles under one slide's annotations at each level; their embeddings and class names per level."""
    polygons, classes, kw = _regions(regions, args)
    out = {}
    for m in levels:
        idx, _ = session.annotated_tiles(polygons, classes, mpp=m, **kw)
        n_new, _ = embed_missing(session, idx, progress=show_progress(args), mpp=m)
        _, emb, lab = session.labelled_embeddings(polygons, classes, mpp=m, **kw)
        where = "" if levels == [session.default_mpp] else f" at {mag_name(m)}"
        CONSOLE.out(f"{session.slide.path.name}: {len(idx)} annotated tiles ({n_new} embedded now){where}")
        out[m] = (emb, lab)
    return out


def _fit_level(m: float, parts: list[tuple[np.ndarray, np.ndarray]], config: SessionConfig, weights_id: str,
               args: argparse.Namespace) -> LinearHead:  # fmt: skip
    """The probe of level ``m`` on every slide's labelled tiles there; prints its cross-validated figures."""
    from napari_virchow.analysis.heads import fit_head

    y = np.concatenate([lab for _, lab in parts])
    if not len(y):
        raise CliError(f"no tile is covered to {args.min_overlap:.0%} by a classified annotation; draw larger "
                       "regions, set their class in QuPath, or lower --min-overlap")  # fmt: skip
    head = fit_head(np.concatenate([emb for emb, _ in parts]), y, encoder=config.encoder, weights_id=weights_id,
                    cv=args.cv, positive_class=args.positive, mpp=m)  # fmt: skip
    counts = ", ".join(f"{c} {n}" for c, n in head.metrics["class_counts"].items())
    at = f"at {mag_name(m)}: "
    if head.cv_auc is not None:
        CONSOLE.out(f"{at}cross-validated ({head.metrics['cv_folds']}-fold): ROC AUC {head.cv_auc:.3f}, "
                    f"accuracy {head.cv_accuracy:.3f} on {head.metrics['n_samples']} tiles ({counts})")  # fmt: skip
    else:
        CONSOLE.out(f"{at}too few tiles per class to cross-validate ({counts})")
    return head


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
    _say_probe(head, args.head, canonical_mpp(config.spec.mpp if mpp is None else mpp))

    def work(session: SlideSession) -> str:
        return _write_heatmap(session, head, out, args, mpp)

    return run_slides(args.slides, config, work, scheduler=args.scheduler, progress=show_progress(args),
                      mpps=None if mpp is None else (mpp,))  # fmt: skip


def _say_probe(head: LinearHead, path: str, m: float) -> None:
    """Warn when the head has no probe fitted at ``m`` (its nearest magnification's is used)."""
    from napari_virchow.analysis.heads import MultiScaleHead

    fitted = head.mpps if isinstance(head, MultiScaleHead) else (canonical_mpp(head.mpp),)
    if m not in fitted:
        use = head.nearest(m).mpp if isinstance(head, MultiScaleHead) else head.mpp
        CONSOLE.warn(f"{path} has no probe fitted at {m:g} µm/px (it has {', '.join(f'{x:g}' for x in fitted)}): "
                     f"using its {use:g} µm/px probe; `fit-head --mpp {m:g}` fits one at this magnification")


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
                               class_name=str(head.positive_class), bounds=slide.dimensions)  # fmt: skip
    gj = safe_output_path(out, f"{stem}.heatmap.geojson")
    write_file(gj, write_annotations, feats, provenance=provenance(session))
    w, h = slide.dimensions
    cols, rows = (math.ceil(side / raster.tile_size_l0 - 1e-9) for side in (w, h))  # as written (cropped)
    above = int(np.sum(values[idx] >= args.threshold))
    return (f"  wrote {tif} ({cols}×{rows} px, {raster.tile_size_l0 * slide.require_mpp():.4g} µm/px) and "
            f"{gj.name} ({above} tiles >= {args.threshold:g})")  # fmt: skip
