"""``fit-slide-head`` (ABMIL on a labelled cohort) and ``predict`` (slide probabilities + attention maps).

Both embed what is missing through :func:`~napari_virchow.cli.common.run_slides` (resumable,
``--scheduler`` for dask.distributed) at the head's magnification, then read every slide's
tissue-tile embeddings from its store.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from napari_virchow.cli.common import (
    CONSOLE,
    CliError,
    config_from_args,
    load_encoder,
    output_names,
    positive_int,
    run_slides,
    show_progress,
)
from napari_virchow.cli.embed import _SLIDES_HELP, out_folder, write_file
from napari_virchow.cli.options import add_mpp_options
from napari_virchow.store.key import mag_name

if TYPE_CHECKING:
    from napari_virchow.analysis.mil import SlideHead
    from napari_virchow.session import SlideSession
    from napari_virchow.slide_prediction import SlideResult

__all__ = ["args_fit_slide_head", "args_predict", "cmd_fit_slide_head", "cmd_predict", "format_metric"]


def format_metric(metrics: dict[str, Any]) -> str:
    """``cross-validated AUC 0.97 (95% CI 0.91–1.00; 5 folds, 24 slides)`` from a slide head's metrics."""
    name = "AUC" if metrics.get("cv_metric") == "auc" else "balanced accuracy"
    level = round(100 * float(metrics.get("cv_ci_level", 0.95)))
    return (f"cross-validated {name} {metrics['cv_value']:.3f} ({level}% CI {metrics['cv_ci_low']:.3f}–"
            f"{metrics['cv_ci_high']:.3f}, bootstrap over slides; {metrics['cv_folds']} folds, "
            f"{metrics['n_slides']} slides)")  # fmt: skip


# --- fit-slide-head -----------------------------------------------------------------------------


def args_fit_slide_head(p: argparse.ArgumentParser) -> None:
    """Options of ``fit-slide-head``."""
    p.add_argument("cohort", metavar="COHORT.csv",
                   help="one row per slide: slide path (relative to the CSV), label, optional fold; "
                        "a header slide,label[,fold] is optional")  # fmt: skip
    p.add_argument("--out", required=True, metavar="HEAD", help="slide head file to write (.safetensors)")
    p.add_argument("--folds", type=positive_int, default=5, metavar="K",
                   help="stratified cross-validation folds when the CSV has no fold column (default 5)")  # fmt: skip
    p.add_argument("--epochs", type=positive_int, default=20, metavar="N", help="training epochs (default 20)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed of folds, training, bootstrap (default 0)")
    p.add_argument("--positive", metavar="CLASS", help="class whose AUC is reported (two classes; default: a "
                   "tumour-like name, else the second class)")  # fmt: skip
    add_mpp_options(p, several=False)


def cmd_fit_slide_head(args: argparse.Namespace) -> int:
    """``fit-slide-head``: embed the cohort, cross-validate and fit an ABMIL head, save it."""
    from napari_virchow.analysis.mil_io import save_slide_head
    from napari_virchow.analysis.mil_train import check_folds, fit_slide_head
    from napari_virchow.slide_cohort import StoreBags, read_cohort_csv
    from napari_virchow.slide_prediction import slide_bag

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise CliError(f"--out {out}: a slide head is a .safetensors file; use {out.with_suffix('.safetensors')}")
    if out.is_dir():
        raise CliError(f"--out {out} is a folder: give a file name ending in .safetensors")
    rows = read_cohort_csv(args.cohort)
    labels = [r.label for r in rows]
    if args.positive is not None and args.positive not in labels:
        raise CliError(f"--positive {args.positive!r} is not a label of {args.cohort} ({sorted(set(labels))})")
    folds = [r.fold for r in rows]
    fold_ids = folds if any(f is not None for f in folds) else None
    if fold_ids is not None and None in fold_ids:
        raise CliError(f"{args.cohort}: some rows have a fold and others not: give every slide a fold, or none")
    check_folds(labels, folds=args.folds, fold_ids=fold_ids, seed=args.seed)  # before minutes of embedding
    config = config_from_args(args)
    mpp = config.spec.mpp if args.mpp is None else args.mpp[0]
    bags, digests = StoreBags(), set()
    by_path: dict[str, tuple[str, np.ndarray]] = {}

    def work(session: SlideSession) -> None:
        idx, _ = slide_bag(session, mpp)  # every tissue tile, verified; NotEmbeddedError otherwise
        by_path[session.slide_path] = (str(session.store("r", mpp=mpp).path), idx)
        digests.add(session.weights_id)

    slides = [str(r.slide) for r in rows]
    status = run_slides(slides, config, work, scheduler=args.scheduler, progress=show_progress(args),
                        mpps=None if args.mpp is None else (mpp,))  # fmt: skip
    if status or len(by_path) != len(rows):
        raise CliError(f"{len(rows) - len(by_path)} of {len(rows)} slides of {args.cohort} failed (above): fix them "
                       "or remove their rows; no slide head was written")  # fmt: skip
    if len(digests) != 1:
        raise CliError(f"the slides were embedded with different weights {sorted(digests)}: use one --weights")
    for r in rows:
        bags.add(*by_path[str(r.slide)])
    bar = tqdm(total=0, desc="training", unit="epoch", file=sys.stderr, disable=None if show_progress(args) else True)

    def progress(stage: str, done: int, total: int) -> None:
        if done == 0:
            bar.reset(total=total)
            bar.set_description(stage)
        else:
            bar.update(1)

    try:
        head = fit_slide_head(bags, labels, encoder=config.encoder, weights_digest=digests.pop(), mpp=mpp,
                              tile_size=config.spec.input_size, folds=args.folds, fold_ids=fold_ids, seed=args.seed,
                              epochs=args.epochs, positive_class=args.positive, progress=progress)  # fmt: skip
    finally:
        bar.close()
    write_file(out, lambda path: save_slide_head(head, path))
    CONSOLE.out(format_metric(head.metrics))
    CONSOLE.out(f"classes: {', '.join(head.classes)}; at {mag_name(head.mpp)}; saved slide head to {out}")
    return 0


# --- predict ------------------------------------------------------------------------------------


def args_predict(p: argparse.ArgumentParser) -> None:
    """Options of ``predict``."""
    p.add_argument("paths", nargs="+", metavar="[HEAD] SLIDE",
                   help="the slide head file from `napari-virchow fit-slide-head` (unless given as --head), then "
                        f"the slides: {_SLIDES_HELP}")  # fmt: skip
    p.add_argument("--head", metavar="HEAD", help="the slide head file (as `heatmap --head` takes a tile head)")
    p.add_argument("--json", action="store_true", help="print one JSON object (the last line) instead of a table")
    p.add_argument("--out", metavar="DIR", help="write <slide>.attention.tif (pyramidal, aligned with the slide) "
                   "and <slide>.attention.geojson (top-attention regions) per slide")  # fmt: skip
    p.add_argument("--top", type=positive_int, default=20, metavar="K",
                   help="tiles in the top-attention GeoJSON region (default 20)")  # fmt: skip


def cmd_predict(args: argparse.Namespace) -> int:
    """``predict``: per-slide probabilities of a slide head, and its attention maps."""
    from napari_virchow.analysis.mil_io import load_slide_head
    from napari_virchow.slide_prediction import predict_slide

    if args.head is None:
        args.head, *args.slides = args.paths
    else:
        args.slides = list(args.paths)
    if not args.slides:
        raise CliError(f"no slide to predict: name the slides after the head ({args.head})")
    head = load_slide_head(args.head)
    config = config_from_args(args, encoder=head.encoder)
    spec = config.spec
    head.check_compatible(encoder=config.encoder, weights_digest=head.weights_digest, mpp=head.mpp,
                          tile_size=spec.input_size)  # another encoder: refused before any work  # fmt: skip
    if not args.scheduler:  # other weights: refused before any work (on a cluster, per slide)
        head.check_compatible(encoder=config.encoder, weights_digest=load_encoder(config).weights_id, mpp=head.mpp)
    out = out_folder(args) if args.out else None
    if out is not None:
        output_names(args.slides, ".attention.tif")
    results: list[dict[str, Any]] = []

    def work(session: SlideSession) -> str | None:
        result = predict_slide(session, head)
        row: dict[str, Any] = {"slide": session.slide_path, "label": result.prediction.label,
                               "probabilities": result.probabilities, "n_tiles": len(result.indices)}  # fmt: skip
        if out is not None:
            row.update(_write_attention(session, head, result, out, args))
        results.append(row)
        return None

    status = run_slides(args.slides, config, work, scheduler=args.scheduler, progress=show_progress(args),
                        mpps=(head.mpp,))  # fmt: skip
    if args.json:  # the last line of stdout
        print(json.dumps({"head": str(Path(args.head).resolve()), "classes": list(head.classes),
                          "mpp": head.mpp, "slides": results}))  # fmt: skip
    else:
        _table(results, head)
    return status


def _table(results: list[dict[str, Any]], head: SlideHead) -> None:
    header = ("slide", *head.classes, "predicted")
    table = [header] + [(Path(r["slide"]).name, *(f"{r['probabilities'][c]:.3f}" for c in head.classes), r["label"])
                        for r in results]  # fmt: skip
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        CONSOLE.out("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _write_attention(session: SlideSession, head: SlideHead, result: SlideResult, out: Path,
                     args: argparse.Namespace) -> dict[str, str]:  # fmt: skip
    from napari_virchow.io.export import write_heatmap_tiff
    from napari_virchow.io.geojson import safe_output_path, tiles_to_features, write_annotations
    from napari_virchow.io.provenance import provenance

    slide, stem, grid = session.slide, session.slide.path.stem, session.grid_at(head.mpp)
    prov = {**provenance(session), "target_mpp": head.mpp, "tile_size_l0": grid.tile_size_l0}
    meta = {**prov, "slide": session.slide_path, "slide_head": str(Path(args.head).resolve()),
            "classes": list(head.classes), "probabilities": result.probabilities,
            "values": "attention / max attention (1 = most attended tile)"}  # fmt: skip
    raster = result.raster(session)
    tif = safe_output_path(out, f"{stem}.attention.tif")
    write_file(tif, write_heatmap_tiff, raster.data, mpp_l0=slide.require_mpp(), tile_size_l0=raster.tile_size_l0,
               slide_dims=slide.dimensions, metadata=meta)  # fmt: skip
    top = result.top_tiles(args.top)
    feats = tiles_to_features(grid.coords[top], grid.tile_size_l0, np.ones(len(top), np.int64),
                              {1: "Attention"}, {1: (255, 127, 14)}, bounds=slide.dimensions)  # fmt: skip
    gj = safe_output_path(out, f"{stem}.attention.geojson")
    write_file(gj, write_annotations, feats, provenance={**prov, "slide_head": meta["slide_head"],
                                                         "probabilities": result.probabilities})  # fmt: skip
    if not args.json:
        CONSOLE.out(f"  wrote {tif} and {gj.name} (top {len(top)} attention tiles)")
    return {"attention_tiff": str(tif), "attention_geojson": str(gj)}
