"""``index`` and ``search`` commands: a cohort index built, grown, pruned, and searched from the index alone."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_virchow.cli.common import (
    CONSOLE,
    CliError,
    check_writable,
    config_from_args,
    embed_missing,
    load_encoder,
    open_session,
    positive_int,
    run_slides,
    show_progress,
)
from napari_virchow.cli.embed import _SLIDES_HELP, write_file
from napari_virchow.cli.options import add_mpp_options, finite_float
from napari_virchow.store.key import mag_name

if TYPE_CHECKING:
    from napari_virchow.analysis.index import IndexEntry, SlideIndex
    from napari_virchow.config import SessionConfig
    from napari_virchow.session import SlideSession

__all__ = ["args_index", "args_search", "cmd_index", "cmd_search"]


def args_index(p: argparse.ArgumentParser) -> None:
    """Flags of ``index``."""
    p.add_argument("slides", nargs="*", metavar="SLIDE", help=_SLIDES_HELP)
    p.add_argument("--out", required=True, metavar="INDEX",
                   help="a folder (gets INDEX.faiss/.json/.npz) or a NAME.faiss file")  # fmt: skip
    p.add_argument("--kind", choices=("auto", "flat", "hnsw", "ivf", "ivfpq"), default="auto",
                   help="auto: exact up to 20,000 tiles, IVF-PQ re-ranked from the stores beyond "
                   "(see analysis.index.AUTO_FLAT_MAX)")  # fmt: skip
    p.add_argument("--add", action="store_true",
                   help="add the slides to the existing index at --out without rebuilding it "
                   "(slides already indexed with the same content are skipped)")  # fmt: skip
    p.add_argument("--remove", nargs="+", default=[], metavar="SLIDE",
                   help="remove these slides' tiles from the index at --out (path or fingerprint)")  # fmt: skip
    p.add_argument("--rebuild-vectors", action="store_true",
                   help="rewrite the IVF-PQ re-rank file at --out from the embedding stores (a damaged or "
                   "lost file; also compacts the rows of removed slides)")  # fmt: skip
    add_mpp_options(p, several=False)  # one index per magnification: a 5× query searches a 5× index


def _one_mpp(args: argparse.Namespace, command: str) -> float | None:
    mpp = getattr(args, "mpp", None)
    if mpp is not None and len(mpp) != 1:
        raise CliError(f"{command} --mpp takes one magnification (an index holds one; build one per magnification, "
                       "e.g. --out cohort/x5.faiss --mpp 2)")  # fmt: skip
    return None if mpp is None else float(mpp[0])


def _gather(args: argparse.Namespace, config: SessionConfig,
            mpp: float | None = None) -> tuple[int, list[IndexEntry], set[str]]:  # fmt: skip
    """Embed the slides at ``mpp`` (cluster or here); per slide an entry reading its store lazily (one slide in RAM)."""
    from napari_virchow.analysis.index import IndexEntry
    from napari_virchow.analysis.index_ivfpq import StoreRows

    entries: list[IndexEntry] = []
    weights: set[str] = set()
    empty: list[str] = []

    def work(session: SlideSession) -> str | None:
        grid = session.grid_at(mpp)
        idx = grid.tissue_indices
        weights.add(session.weights_id)
        if len(idx):  # a slide without tissue has no store at all
            store = session.store("r", mpp=mpp)
            idx = idx[store.done[idx]]
        if not len(idx):
            empty.append(session.slide.path.name)
            return f"  {session.slide.path.name}: no tissue tile, left out of the index"
        rows: Any = StoreRows(store.path, idx)  # read lazily, one chunk of rows at a time
        entries.append(IndexEntry(session.slide_path, session.slide.fingerprint, rows, grid.coords[idx],
                                  grid.tile_size_l0, idx, str(store.path)))  # fmt: skip
        return None

    status = run_slides(args.slides, config, work, scheduler=args.scheduler, progress=show_progress(args),
                        mpps=None if mpp is None else (mpp,))  # fmt: skip
    if not entries:
        why = f"no tissue was found in {', '.join(empty)}" if empty else "no slide could be embedded"
        raise CliError(f"nothing to index: {why}; check the slides (or their µm/px) and run again")
    if len(weights) > 1:  # pragma: no cover - one run uses one set of weights
        raise CliError(f"slides were embedded with different weights {sorted(weights)}; rebuild with one")
    return status, entries, weights


def cmd_index(args: argparse.Namespace) -> int:
    """Build an index of the slides, or add slides to / remove slides from an existing one."""
    from napari_virchow.analysis.index import _files, add_slides, build_index, load_index, rebuild_vectors, remove_slide

    out = Path(args.out)
    mpp = _one_mpp(args, "index")
    check_writable(out.parent if out.suffix == ".faiss" else out, "index folder", "choose another --out")
    if not (args.add or args.remove or args.rebuild_vectors):
        if not args.slides:
            raise CliError("no slides given: name the slides to index (or --add/--remove for an existing --out)")
        config = config_from_args(args)
        status, entries, weights = _gather(args, config, mpp)
        spec = config.spec
        provenance = {"weights": config.weights, "mpp": spec.mpp if mpp is None else mpp, "tile_size": spec.input_size,
                      "mpp_override": config.mpp_override}  # fmt: skip
        client = _client(args.scheduler) if args.scheduler else None  # IVF-PQ: shards filled on the workers
        try:
            index = write_file(out, lambda p: build_index(entries, p, encoder=config.encoder,
                                                          weights_id=weights.pop(), kind=args.kind,
                                                          provenance=provenance, cache_root=config.cache_root,
                                                          client=client))  # fmt: skip
        finally:
            if client is not None:
                client.close()
        CONSOLE.out(f"indexed {index.describe()} -> {index.path}")
        return status
    if not _files(out)[1].exists():
        raise CliError(f"--out {out}: no index there to change; build it first (without --add/--remove)")
    name = _encoder_name(args)
    index = load_index(out, encoder=name, cache_root=getattr(args, "cache", None))
    if mpp is not None and index.mpp is not None and abs(mpp - index.mpp) > 1e-6 * index.mpp:
        raise CliError(f"--out {out}: the index holds tiles at {mag_name(index.mpp)}, not {mag_name(mpp)}: "
                       f"add slides at its magnification (--mpp {index.mpp:g}) or build another index "
                       f"for {mpp:g} µm/px")  # fmt: skip
    status = 0
    for slide in args.remove:
        n = remove_slide(index, slide)
        CONSOLE.out(f"removed {n} tiles of {Path(slide).name}")
    if args.slides:
        config = _config_of(args, index)
        status, entries, weights = _gather(args, config, index.mpp)
        if index.weights_id not in (None, *weights):
            raise CliError(f"{index.path}: index was built with weights {index.weights_id}, these slides were "
                           f"embedded with {weights.pop()}; add them with the same --weights")  # fmt: skip
        for skipped in add_slides(index, entries):
            CONSOLE.out(f"  {Path(skipped).name}: already indexed, unchanged")
    if args.rebuild_vectors:
        n = rebuild_vectors(index)
        CONSOLE.out(f"re-rank file rewritten from the stores: {n:,} rows")
    write_file(out, index.save)
    CONSOLE.out(f"index now {index.describe()} -> {index.path}")
    return status


def _client(address: str) -> Any:
    from distributed import Client

    from napari_virchow.cli.cluster import CONNECT_TIMEOUT_S

    try:
        return Client(address, timeout=CONNECT_TIMEOUT_S, set_as_default=False)
    except (OSError, TimeoutError, ValueError, TypeError) as exc:
        raise CliError(f"cannot reach the dask scheduler at {address!r} ({exc}); check the address "
                       "(tcp://HOST:8786) and that `dask scheduler` is running") from exc  # fmt: skip


def args_search(p: argparse.ArgumentParser) -> None:
    """Flags of ``search``."""
    p.add_argument("index", metavar="INDEX", help="index folder or .faiss file from `napari-virchow index`")
    p.add_argument("--slide", required=True, metavar="SLIDE",
                   help="slide holding the query tile(s): indexed or not (a tile of another slide)")  # fmt: skip
    p.add_argument("--x", type=finite_float, metavar="X", help="level-0 x of the query point")
    p.add_argument("--y", type=finite_float, metavar="Y", help="level-0 y of the query point")
    p.add_argument("--box", nargs=4, type=finite_float, metavar=("X0", "Y0", "X1", "Y1"),
                   help="query with the mean of the tissue tiles in this level-0 box instead of a point")  # fmt: skip
    p.add_argument("--root", metavar="DIR",
                   help="the folder a moved archive's slides (and cache) are in now (default: as indexed)")  # fmt: skip
    p.add_argument("-k", "--top-k", type=positive_int, default=10, metavar="K", help="hits to show (default 10)")
    p.add_argument("--other-slides", action="store_true", help="leave out hits on the query's own slide")
    p.add_argument("--min-distance", type=int, default=2, metavar="TILES",
                   help="hits on one slide at least this many tiles apart (default 2; 0: no suppression)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--mpp", type=finite_float, metavar="UM",
                   help="the query's magnification in µm/px (default: the index's); another than the index's is "
                   "refused, and a folder of indexes (one per magnification) is searched in the one at UM")  # fmt: skip
    p.add_argument("--nprobe", type=positive_int, metavar="N",
                   help="IVF lists probed per query (default: the index's manifest; more: better recall, slower)")
    p.add_argument("--rerank", type=positive_int, metavar="N",
                   help="IVF-PQ candidates re-ranked by exact cosine (default: the index's manifest)")


def _encoder_name(args: argparse.Namespace) -> str | None:
    from napari_virchow.models.specs import get_spec

    return get_spec(args.encoder).name if getattr(args, "encoder", None) else None


def _config_of(args: argparse.Namespace, index: SlideIndex) -> SessionConfig:
    """The index's encoder, weights, cache and µm/px override, unless flags say otherwise."""
    config = config_from_args(args, encoder=index.encoder)
    meta = index.meta
    return dataclasses.replace(
        config,
        weights=config.weights if getattr(args, "weights", None) else meta.get("weights"),
        cache_root=config.cache_root if getattr(args, "cache", None) else (index.cache_root or config.cache_root),
        mpp_override=config.mpp_override if getattr(args, "mpp_override", None) else meta.get("mpp_override"),
    )


def _query(args: argparse.Namespace, index: SlideIndex, config: SessionConfig) -> tuple[np.ndarray, dict[str, Any],
                                                                                         np.ndarray, str]:  # fmt: skip
    """(query embeddings, query description, query tiles' coords, slide path) from the index's cache."""
    if args.box is None and (args.x is None or args.y is None):
        raise CliError("no query: give --x X --y Y (a point) or --box X0 Y0 X1 Y1 on --slide")
    mpp = index.mpp  # the query is embedded at the index's magnification (checked by load_index_for)
    with open_session(args.slide, config, weights_id=index.weights_id) as session:
        box = None if args.box is None else tuple(args.box)
        x, y = (args.x, args.y) if box is None else ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
        tiles = session.query_indices(x, y, box, mpp=mpp)
        if len(session.missing(tiles, mpp=mpp)):  # not cached: embed, with the index's weights only
            encoder = load_encoder(config)
            if index.weights_id not in (None, encoder.weights_id):
                raise CliError(f"{index.path}: index was built with weights {index.weights_id}, these are "
                               f"{encoder.weights_id}; search with the weights it records or rebuild it")  # fmt: skip
            embed_missing(session, tiles, progress=show_progress(args), mpp=mpp)
        query = session.read(tiles, mpp=mpp)
        me = session.slide_path
        coords = session.grid_at(mpp).coords[tiles]
    x0, y0 = (int(v) for v in coords[0])
    desc = {"slide": me, "x": x0, "y": y0, "tile_index": int(tiles[0]), "n_tiles": len(tiles)}
    return query, desc, coords, me


def cmd_search(args: argparse.Namespace) -> int:
    """The regions of indexed slides most similar to a point or box of a slide (needs only the index)."""
    from napari_virchow.analysis.index import load_index_for

    index = load_index_for(args.index, args.mpp, encoder=_encoder_name(args), root=args.root,
                           cache_root=getattr(args, "cache", None),
                           mmap=True)  # another encoder's index: refused here; IVF lists paged in, not loaded
    try:
        config = _config_of(args, index)
        moved = index.check_slides()
        if moved:
            CONSOLE.warn(moved)
        query, desc, coords, me = _query(args, index, config)
        own = {(int(a), int(b)) for a, b in coords}
        # Extra hits: the query tiles themselves are in the index when their slide is, and are dropped.
        hits = index.search(query, args.top_k + len(own), exclude_slide=me if args.other_slides else None,
                            min_distance_tiles=max(args.min_distance, 0), nprobe=args.nprobe, rerank=args.rerank,
                            query_mpp=index.mpp)  # fmt: skip
        damage = index.damage_report()
        if damage:
            CONSOLE.warn(damage)
    finally:
        index.close()
    hits = [h for h in hits if not (h.slide == me and (h.x, h.y) in own)][: args.top_k]
    rows = [{"rank": r, "slide": h.slide, "x": h.x, "y": h.y, "tile_size_l0": h.tile_size_l0,
             "score": round(h.score, 6), "exists": h.exists} for r, h in enumerate(hits, start=1)]  # fmt: skip
    if args.json:
        doc: dict[str, Any] = {"index": str(index.path), "encoder": index.encoder, "kind": index.kind,
                               "n_indexed": len(index), "query": desc, "missing_slides": index.missing_slides(),
                               "changed_slides": index.changed_slides(), "hits": rows}  # fmt: skip
        print(json.dumps(doc, indent=1))
        return 0
    what = f"{desc['n_tiles']} tiles in a box" if desc["n_tiles"] > 1 else "tile"
    print(f"query: {Path(me).name} {what} at ({desc['x']}, {desc['y']}); {len(rows)} hits from {index.describe()}")
    print(f"{'rank':>4}  {'score':>7}  {'x':>7}  {'y':>7}  slide")
    for r in rows:
        gone = "  (missing)" if not r["exists"] else ""
        print(f"{r['rank']:>4}  {r['score']:>7.4f}  {r['x']:>7}  {r['y']:>7}  {r['slide']}{gone}")
    return 0
