"""Command line: ``napari-virchow <command> ...`` (also ``python -m napari_virchow.cli.app``).

Each command is a pair of functions, ``_args_<name>(parser)`` adding its options and
``_cmd_<name>(args) -> int`` running it, listed once in ``_COMMANDS`` with the shared option
groups it takes (:mod:`.options`: ``--cache``/``-v`` everywhere; encoder, weights, device, dtype,
batch size and µm/px override where tiles are embedded; ``--scheduler`` for cohort commands),
which :func:`~napari_virchow.cli.options.config_from_args` maps onto one ``SessionConfig``.
Commands too long for this file live in :mod:`.embed` and :mod:`.analysis`. Heavy modules
(torch, timm) are imported inside the commands so ``--help`` stays instant.

Exit status: 0 ok; 1 some slides failed (one line each, the other slides finished); 2 bad input
or an expected error (one line ``napari-virchow: error: <message>``, never a traceback); 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

from napari_virchow import __version__
from napari_virchow.cli import analysis as _analysis
from napari_virchow.cli import embed as _embed
from napari_virchow.cli import import_features as _import
from napari_virchow.cli import index_cmds as _index_cmds
from napari_virchow.cli import slide_head as _slide_head
from napari_virchow.cli.common import CONSOLE, PROG, Parser, cohort_parent, common_parent, model_parent, one_line
from napari_virchow.errors import VirchowError

_args_embed, _cmd_embed = _embed.args_embed, _embed.cmd_embed
_args_export, _cmd_export = _embed.args_export, _embed.cmd_export
_args_fit_head, _cmd_fit_head = _analysis.args_fit_head, _analysis.cmd_fit_head
_args_heatmap, _cmd_heatmap = _analysis.args_heatmap, _analysis.cmd_heatmap
_args_index, _cmd_index = _index_cmds.args_index, _index_cmds.cmd_index
_args_search, _cmd_search = _index_cmds.args_search, _index_cmds.cmd_search


def _cache_root(args: argparse.Namespace) -> Path:
    from napari_virchow.store.cache import resolve_cache_root

    return resolve_cache_root(getattr(args, "cache", None))


# --- encoders ---------------------------------------------------------------------------------


def _args_encoders(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help="encoders to show (default: all registered), e.g. virchow2 timm:vit_small_patch16_224",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def _cmd_encoders(args: argparse.Namespace) -> int:
    from napari_virchow._torch import torch
    from napari_virchow.models import encoder as encoders
    from napari_virchow.models import weights as _weights
    from napari_virchow.models.precision import precision_phrase, weights_dtype

    device = encoders.resolve_device("auto")
    dtype = encoders.resolve_dtype("auto", device)
    rows = []
    for name in args.names or encoders.list_encoders():
        spec = encoders.get_spec(name)
        rows.append({**spec.summary(), "weights": encoders.weights_status(spec)})
    kept = weights_dtype(dtype, device) if dtype else None
    env = {
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch.") if dtype else "float32",
        # how the dtype is reached: weights cast once (CPUs with native bf16) or autocast per call
        "precision": precision_phrase(dtype, kept),
        "torch_threads": torch.get_num_threads(),
        "hf_cache": str(_weights.hf_cache_dir()),
        "hf_offline": _weights.hub_offline(),
    }
    if args.json:
        env["embedding_cache"] = str(_cache_root(args))
        print(json.dumps({"encoders": rows, "runtime": env}, indent=2))
        return 0
    header = ("name", "architecture", "dim", "mpp", "weights")
    table = [header] + [
        (r["name"], r["architecture"], str(r["dim"]), f"{r['mpp']:g}", r["weights"]["where"]) for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1])
    if not args.names:
        print("also: timm:<architecture> for any timm model (pooled features, 0.5 µm/px)")
    print(f"device: {env['device']}  precision: {env['precision']}  threads: {env['torch_threads']}")
    offline = "  (HF_HUB_OFFLINE)" if env["hf_offline"] else ""
    print(f"Hugging Face cache: {env['hf_cache']}{offline}")
    print(f"embedding cache: {_cache_root(args)}")
    return 0


# --- cache ------------------------------------------------------------------------------------

_CACHE_EPILOG = """\
The store root is --cache DIR, else $NAPARI_VIRCHOW_CACHE, else the user cache folder.
Size limit: $NAPARI_VIRCHOW_CACHE_MAX_GB (default 20 GB); when a new store would pass it, the
least recently used stores not open in any process are evicted.

  napari-virchow cache ls [--json]
  napari-virchow cache clear [--slide S] [--encoder E] [--mpp UM]   (no filter: every store)
"""


def _args_cache(p: argparse.ArgumentParser) -> None:
    p.epilog, p.formatter_class = _CACHE_EPILOG, argparse.RawDescriptionHelpFormatter
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True, parser_class=Parser)
    # --cache on the actions only: a default on both levels would let the inner one win
    ls = sub.add_parser("ls", parents=[common_parent()], help="list stores: slide, encoder, tiles done / total, size",
                        epilog=_CACHE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    clear = sub.add_parser("clear", parents=[common_parent()], help="remove stores (all, or those matching)",
                           epilog=_CACHE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    clear.add_argument("--slide", metavar="S", help="slide path, file name, stem or fingerprint")
    clear.add_argument("--encoder", metavar="E", help="encoder name")
    clear.add_argument("--mpp", metavar="UM", type=float, help="only the stores at this µm/px (e.g. 2 for 5×)")


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover


def _cmd_cache(args: argparse.Namespace) -> int:
    from napari_virchow.store.cache import ENV_MAX_GB, cache_max_bytes, clear, list_stores
    from napari_virchow.store.key import mag_name

    root = _cache_root(args)
    if args.action == "clear":
        removed = clear(root, slide=args.slide, encoder=args.encoder, mpp=args.mpp)
        for path in removed:
            print(f"removed {path}")
        if not removed:
            print(f"nothing to remove in {root}")
        return 0
    stores = list_stores(root)
    try:
        limit: float | None = cache_max_bytes()
    except VirchowError as exc:  # a bad limit setting must not hide the listing
        CONSOLE.warn(exc)
        limit = None
    total = sum(s.size_bytes for s in stores)
    if args.json:
        rows = [{"path": str(s.path), "slide": s.slide_path, "slide_fingerprint": s.slide_fingerprint,
                 "encoder": s.encoder, "weights_id": s.weights_id, "mpp": s.mpp, "tile_size": s.tile_size,
                 "n_done": s.n_done, "n_tiles": s.n_tiles, "size_bytes": s.size_bytes,
                 "last_used": datetime.fromtimestamp(s.last_used).isoformat(timespec="seconds"), "error": s.error,
                 "old_lattice": s.old_lattice}
                for s in stores]  # fmt: skip
        print(json.dumps({"root": str(root), "size_bytes": total, "limit_bytes": limit, "stores": rows}, indent=1))
        return 0
    cap = f"of {_size(limit)} (${ENV_MAX_GB})" if limit is not None else "(limit setting invalid)"
    print(f"{root}: {len(stores)} store{'' if len(stores) == 1 else 's'}, {_size(total)} {cap}")
    table = [("slide", "encoder", "magnification", "tiles", "size", "last used")]
    stores = sorted(stores, key=lambda s: (Path(s.slide_path or s.path).name, s.encoder or "", s.mpp or 0.0))
    for s in stores:
        slide = Path(s.slide_path).name if s.slide_path else s.path.name
        tiles = f"{s.n_done}/{s.n_tiles}" if s.error is None else f"damaged: {one_line(s.error)[:60]}"
        tiles += " (old lattice (0.2), superseded: clear it)" if s.old_lattice else ""
        when = datetime.fromtimestamp(s.last_used).strftime("%Y-%m-%d %H:%M")
        mag = mag_name(s.mpp) if s.mpp else "?"
        table.append((slide, s.encoder or "?", mag, tiles, _size(s.size_bytes), when))
    if len(table) > 1:
        widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
        for r in table:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


# --- registry: the one place commands are listed ----------------------------------------------


class Command(NamedTuple):
    """A subcommand: help line, option adder, runner, and the shared option groups it takes."""

    help: str
    add_args: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    parents: tuple[str, ...] = ("common",)


def _args_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", metavar="PATH", help="Virchow 2 weights file (default: the Hugging Face cache, "
                   "else a small random-weights ViT, said loudly)")  # fmt: skip
    p.add_argument("--no-block", action="store_true",
                   help="wait until the three overlays are drawn, print a JSON summary as the last line, exit")


def _cmd_demo(args: argparse.Namespace) -> int:
    import os

    from napari_virchow._qt.demo import run_demo

    if args.cache:  # the widget's stores follow the same variable the CLI sets
        os.environ["NAPARI_VIRCHOW_CACHE"] = str(args.cache)
    return run_demo(weights=args.weights, block=not args.no_block)


_COMMANDS: dict[str, Command] = {
    "demo": Command("open napari with the real sample slide and draw heatmap, clusters and similar regions",
                    _args_demo, _cmd_demo, ("common",)),
    "encoders": Command("list encoders, where their weights are, and the device/precision that would be used",
                        _args_encoders, _cmd_encoders),
    "embed": Command("embed every tissue tile of each slide into the cache (resumable)",
                     _args_embed, _cmd_embed, ("common", "model", "cohort")),
    "export": Command("write HDF5 features + coords per slide (TRIDENT layout), or QuPath GeoJSON regions",
                      _args_export, _cmd_export, ("common", "model", "cohort")),
    "fit-head": Command("fit a logistic probe on tiles under QuPath annotations; prints cross-validated AUC",
                        _args_fit_head, _cmd_fit_head, ("common", "model")),
    "heatmap": Command("probability heatmap of a head as a pyramidal TIFF aligned with the slide, plus GeoJSON",
                       _args_heatmap, _cmd_heatmap, ("common", "model", "cohort")),
    "index": Command("build a cross-slide similarity index (faiss) over the cached embeddings of many slides",
                     _args_index, _cmd_index, ("common", "model", "cohort")),
    "search": Command("find the tiles most similar to one tile across an index",
                      _args_search, _cmd_search, ("common", "model")),
    "import-features": Command("load features computed elsewhere (our HDF5 export or TRIDENT's) into the cache",
                               _import.args_import_features, _import.cmd_import_features, ("common", "model")),
    "fit-slide-head": Command("train an attention MIL slide head on a labelled cohort CSV; prints cross-validated "
                              "AUC with its CI", _slide_head.args_fit_slide_head, _slide_head.cmd_fit_slide_head,
                              ("common", "model", "cohort")),
    "predict": Command("slide-level probabilities of a slide head per slide, and its attention maps (TIFF + GeoJSON)",
                       _slide_head.args_predict, _slide_head.cmd_predict, ("common", "model", "cohort")),
    "cache": Command("list or clear cached embedding stores", _args_cache, _cmd_cache, ()),
}  # fmt: skip

_PARENTS: dict[str, Callable[[], Parser]] = {
    "common": common_parent, "model": model_parent, "cohort": cohort_parent,
}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered subcommand."""
    parser = Parser(prog=PROG, description="Virchow / Virchow 2 embeddings of whole-slide images.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    parents = {name: make() for name, make in _PARENTS.items()}  # built once, shared by commands
    for name, cmd in _COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help, parents=[parents[n] for n in cmd.parents])
        cmd.add_args(p)
        p.set_defaults(_run=cmd.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 some slides failed, 2 bad input, 130 interrupted)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors: argparse has printed already
        return exc.code if isinstance(exc.code, int) else 2
    run: Callable[[argparse.Namespace], int] = args._run
    verbose = bool(getattr(args, "verbose", False))
    with CONSOLE.session(verbose=verbose):
        try:
            return run(args)
        except VirchowError as exc:
            # Expected failures (bad file, no weights...): the message names the fix, no traceback.
            CONSOLE.error(exc)
            return 2
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted", file=sys.stderr)
            return 130
        except Exception as exc:  # noqa: BLE001 - a bug, not bad input: still one line unless asked for details
            if verbose:
                traceback.print_exc()
            CONSOLE.error(f"unexpected {type(exc).__name__}: {exc} (run with -v for the traceback, and please "
                          "report it)")  # fmt: skip
            return 1


if __name__ == "__main__":
    raise SystemExit(main())
