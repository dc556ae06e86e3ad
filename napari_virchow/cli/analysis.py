"""``fit-head``, ``heatmap``, ``index`` and ``search`` commands."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_virchow.cli.common import (
    CONSOLE,
    CliError,
    RunOptions,
    SlideJob,
    check_cache,
    check_writable,
    get_encoder,
    output_names,
    positive_int,
    probability,
    run_slides,
)
from napari_virchow.cli.embed import _SLIDES_HELP, load_cli_head, out_folder, write_file
from napari_virchow.errors import VirchowError

if TYPE_CHECKING:
    from napari_virchow.analysis.heads import LinearHead
    from napari_virchow.store.embeddings import EmbeddingStore

# --- fit-head -----------------------------------------------------------------------------------


def args_fit_head(p: argparse.ArgumentParser) -> None:
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
    from napari_virchow.analysis.heads import fit_head, save_head
    from napari_virchow.analysis.rasters import rasterize_annotations
    from napari_virchow.io.geojson import read_annotations

    if len(args.annotations) != len(args.slides):
        raise CliError(f"{len(args.slides)} slides but {len(args.annotations)} --annotations files; "
                       "give one annotation file per slide, in the same order")  # fmt: skip
    out = Path(args.out)
    if out.suffix not in (".safetensors", ".json"):
        raise CliError(f"--out {out}: a head is saved as .safetensors or .json; use one of those suffixes")
    check_writable(out.parent, "folder of --out", "choose another --out path")
    opts = RunOptions.from_args(args)
    check_cache(opts)
    drawn = [read_annotations(a) for a in args.annotations]  # all read before any embedding
    encoder = get_encoder(opts)
    embeddings, labels = [], []
    for slide, regions in zip(args.slides, drawn, strict=True):
        try:
            with SlideJob(slide, opts) as job, job.open_store(encoder.weights_id) as store:
                g = job.grid
                lab, names = rasterize_annotations(
                    [a.polygon for a in regions], [a.class_name for a in regions], g.coords, g.tile_size_l0,
                    min_overlap=args.min_overlap, holes=[a.holes for a in regions],
                )  # fmt: skip
                idx = np.flatnonzero(lab >= 0)
                n_new, _ = job.embed(store, idx)
                embeddings.append(store.read(idx))
                labels.append(np.asarray(names, dtype=object)[lab[idx]].astype(str) if len(idx) else np.zeros(0, str))
                CONSOLE.out(f"{job.name}: {len(idx)} annotated tiles ({n_new} embedded now)")
        except VirchowError as exc:
            # The training set must be complete: a failing slide stops the command (exit 2).
            name = Path(slide).name
            raise CliError(str(exc) if name in str(exc) else f"{name}: {exc}") from exc
    y = np.concatenate(labels)
    if not len(y):
        raise CliError(f"no tile is covered to {args.min_overlap:.0%} by a classified annotation; draw larger "
                       "regions, set their class in QuPath, or lower --min-overlap")  # fmt: skip
    head = fit_head(np.concatenate(embeddings), y, encoder=opts.encoder, weights_id=encoder.weights_id,
                    cv=args.cv, positive_class=args.positive)  # fmt: skip
    write_file(out, lambda p: save_head(head, p))
    m = head.metrics
    counts = ", ".join(f"{c} {n}" for c, n in m["class_counts"].items())
    if "cv_roc_auc" in m:
        CONSOLE.out(f"cross-validated ({m['cv_folds']}-fold): ROC AUC {m['cv_roc_auc']:.3f}, "
                    f"accuracy {m['cv_accuracy']:.3f} on {m['n_samples']} tiles ({counts})")  # fmt: skip
    else:
        CONSOLE.out(f"too few tiles per class to cross-validate ({counts})")
    CONSOLE.out(f"positive class: {head.positive_class}; saved head to {out}")
    return 0


# --- heatmap ------------------------------------------------------------------------------------


def args_heatmap(p: argparse.ArgumentParser) -> None:
    p.add_argument("slides", nargs="+", metavar="SLIDE", help=_SLIDES_HELP)
    p.add_argument("--head", required=True, metavar="HEAD", help="head file from `napari-virchow fit-head`")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for <slide>.heatmap.tif and .geojson")
    p.add_argument("--threshold", type=probability, default=0.5, metavar="T",
                   help="GeoJSON regions where the probability is at least T (default 0.5)")  # fmt: skip
    p.add_argument("--smooth", type=positive_int, default=1, metavar="N",
                   help="N × N heatmap pixels per tile, bilinear between tile centres (default 1: none)")  # fmt: skip
    p.add_argument("--tiff-dtype", choices=("uint8", "float32"), default="uint8",
                   help="uint8: round(p·255), 0 = no value, opens as a slide; float32: NaN = no value")  # fmt: skip


def cmd_heatmap(args: argparse.Namespace) -> int:
    opts = RunOptions.from_args(args)
    check_cache(opts)
    head = load_cli_head(args.head, opts)  # another encoder's head: refused before any work
    out = out_folder(args)
    output_names(args.slides, ".heatmap.tif")

    def work(job: SlideJob, store: EmbeddingStore) -> str:
        return _write_heatmap(job, store, head, out, args)

    return run_slides(args.slides, opts, work, scheduler=args.scheduler)


def _write_heatmap(job: SlideJob, store: EmbeddingStore, head: LinearHead, out: Path, args: argparse.Namespace) -> str:
    from napari_virchow.analysis.rasters import tile_raster, upsample
    from napari_virchow.io.export import threshold_features, write_heatmap_tiff
    from napari_virchow.io.geojson import safe_output_path, write_annotations

    if head.weights_id and head.weights_id != store.key.weights_id:
        CONSOLE.warn(f"{args.head} was fitted on embeddings of weights {head.weights_id}, these are "
                     f"{store.key.weights_id}: its probabilities may be meaningless")  # fmt: skip
    idx, emb = job.embedded_tissue(store)
    g, slide = job.grid, job.slide
    values = np.full(len(g), np.nan, np.float32)
    values[idx] = head.positive_proba(emb)
    raster = tile_raster(values, g.coords, g.tile_size_l0, slide.dimensions, mpp=slide.require_mpp())
    if args.smooth > 1:
        raster = upsample(raster, args.smooth, "bilinear")
    meta = {
        "slide": str(job.path.resolve()),
        "encoder": job.spec.name,
        "weights_id": store.key.weights_id,
        "head": str(Path(args.head).resolve()),
        "classes": head.classes,
        "positive_class": head.positive_class,
    }
    tif = safe_output_path(out, f"{job.path.stem}.heatmap.tif")
    write_file(tif, write_heatmap_tiff, raster.data, mpp_l0=slide.require_mpp(), tile_size_l0=raster.tile_size_l0,
               slide_dims=slide.dimensions, dtype=args.tiff_dtype, metadata=meta)  # fmt: skip
    feats = threshold_features(values[idx], g.coords[idx], g.tile_size_l0, args.threshold,
                               class_name=str(head.positive_class))  # fmt: skip
    gj = safe_output_path(out, f"{job.path.stem}.heatmap.geojson")
    write_file(gj, write_annotations, feats)
    w, h = slide.dimensions
    cols, rows = (math.ceil(side / raster.tile_size_l0 - 1e-9) for side in (w, h))  # as written (cropped)
    above = int(np.sum(values[idx] >= args.threshold))
    return (f"  wrote {tif} ({cols}×{rows} px, {raster.tile_size_l0 * slide.require_mpp():.4g} µm/px) and "
            f"{gj.name} ({above} tiles >= {args.threshold:g})")  # fmt: skip


# --- index and search ---------------------------------------------------------------------------


def args_index(p: argparse.ArgumentParser) -> None:
    p.add_argument("slides", nargs="+", metavar="SLIDE", help=_SLIDES_HELP)
    p.add_argument("--out", required=True, metavar="INDEX",
                   help="a folder (gets INDEX.faiss/.json/.npz) or a NAME.faiss file")  # fmt: skip
    p.add_argument("--kind", choices=("auto", "flat", "hnsw", "ivf"), default="auto",
                   help="auto: exact up to 25,000 tiles, HNSW beyond")  # fmt: skip


def cmd_index(args: argparse.Namespace) -> int:
    from napari_virchow.analysis.index import IndexEntry, build_index

    opts = RunOptions.from_args(args)
    out = Path(args.out)
    check_writable(out.parent if out.suffix == ".faiss" else out, "index folder", "choose another --out")
    entries: list[IndexEntry] = []
    weights: set[str] = set()

    def work(job: SlideJob, store: EmbeddingStore) -> None:
        idx, emb = job.embedded_tissue(store)
        # float16 as stored: half the memory while the cohort is gathered; faiss gets float32 per chunk
        entries.append(IndexEntry(str(job.path.resolve()), job.slide.fingerprint, emb.astype(np.float16),
                                  job.grid.coords[idx], job.grid.tile_size_l0, idx))  # fmt: skip
        weights.add(store.key.weights_id)

    status = run_slides(args.slides, opts, work, scheduler=args.scheduler)
    if not entries:
        raise CliError("no slide could be embedded; nothing to index")
    if len(weights) > 1:  # pragma: no cover - one run uses one set of weights
        raise CliError(f"slides were embedded with different weights {sorted(weights)}; rebuild with one")
    weights_id = weights.pop()
    index = write_file(out, lambda p: build_index(entries, p, encoder=opts.encoder, weights_id=weights_id,
                                                  kind=args.kind))  # fmt: skip
    CONSOLE.out(f"indexed {len(index)} tiles of {len(entries)} slides ({index.kind}) -> {index.path}")
    return status


def args_search(p: argparse.ArgumentParser) -> None:
    p.add_argument("index", metavar="INDEX", help="index folder or .faiss file from `napari-virchow index`")
    p.add_argument("--slide", required=True, metavar="SLIDE", help="slide holding the query tile")
    p.add_argument("--x", required=True, type=float, metavar="X", help="level-0 x of the query point")
    p.add_argument("--y", required=True, type=float, metavar="Y", help="level-0 y of the query point")
    p.add_argument("-k", "--top-k", type=positive_int, default=10, metavar="K", help="hits to show (default 10)")
    p.add_argument("--other-slides", action="store_true", help="leave out hits on the query's own slide")
    p.add_argument("--min-distance", type=int, default=2, metavar="TILES",
                   help="hits on one slide at least this many tiles apart (default 2; 0: no suppression)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def cmd_search(args: argparse.Namespace) -> int:
    from napari_virchow.analysis.index import load_index
    from napari_virchow.models.specs import get_spec

    name = get_spec(args.encoder).name if args.encoder else None
    index = load_index(args.index, encoder=name)  # another encoder's index: refused here
    opts = RunOptions.from_args(args, encoder=index.encoder)
    check_cache(opts)
    moved = index.check_slides()
    if moved:
        CONSOLE.warn(moved)
    encoder = get_encoder(opts)
    built_with = index.meta.get("weights_id")
    if built_with not in (None, encoder.weights_id):
        raise CliError(f"{index.path}: index was built with weights {built_with}, these are {encoder.weights_id}; "
                       "search with the same --weights or rebuild the index")  # fmt: skip
    with SlideJob(args.slide, opts) as job, job.open_store(encoder.weights_id) as store:
        i = job.grid.index_at(args.x, args.y)
        if i is None:
            w, h = job.slide.dimensions
            raise CliError(f"({args.x:g}, {args.y:g}) is outside {job.name} ({w}×{h} px) or its tile grid")
        job.embed(store, np.array([i]))  # the query tile, if it is not cached yet
        query = store.read(np.array([i]))[0]
        me = str(job.path.resolve())
        x0, y0 = (int(v) for v in job.grid.coords[i])
    # One extra: the query tile itself is in the index when its slide is, and is dropped.
    hits = index.search(query, args.top_k + 1, exclude_slide=me if args.other_slides else None,
                        min_distance_tiles=max(args.min_distance, 0))  # fmt: skip
    hits = [h for h in hits if not (h.slide == me and (h.x, h.y) == (x0, y0))][: args.top_k]
    rows = [{"rank": r, "slide": h.slide, "x": h.x, "y": h.y, "score": round(h.score, 6), "exists": h.exists}
            for r, h in enumerate(hits, start=1)]  # fmt: skip
    if args.json:
        doc: dict[str, Any] = {"index": str(index.path), "encoder": index.encoder,
                               "query": {"slide": me, "x": x0, "y": y0, "tile_index": int(i)},
                               "missing_slides": index.missing_slides(), "hits": rows}  # fmt: skip
        print(json.dumps(doc, indent=1))
        return 0
    print(f"query: {job.name} tile at ({x0}, {y0}); {len(rows)} hits from {len(index)} indexed tiles")
    print(f"{'rank':>4}  {'score':>7}  {'x':>7}  {'y':>7}  slide")
    for r in rows:
        gone = "  (missing)" if not r["exists"] else ""
        print(f"{r['rank']:>4}  {r['score']:>7.4f}  {r['x']:>7}  {r['y']:>7}  {r['slide']}{gone}")
    return 0
