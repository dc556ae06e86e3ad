"""Command line: ``napari-virchow <command> ...`` (also ``python -m napari_virchow.cli``).

Each command is a pair of functions, ``_args_<name>(parser)`` adding its options and
``_cmd_<name>(args) -> int`` running it, listed once in ``_COMMANDS``. Heavy modules (torch,
timm) are imported inside the commands so ``--help`` stays instant. A ``VirchowError`` from any
command prints one line, ``napari-virchow: error: <message>``, and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from . import __version__
from .errors import VirchowError

PROG = "napari-virchow"


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
    from . import _weights, encoders
    from ._torch import torch

    device = encoders.resolve_device("auto")
    dtype = encoders.resolve_dtype("auto", device)
    rows = []
    for name in args.names or encoders.list_encoders():
        spec = encoders.get_spec(name)
        rows.append({**spec.summary(), "weights": encoders.weights_status(spec)})
    env = {
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch.") if dtype else "float32",
        "torch_threads": torch.get_num_threads(),
        "hf_cache": str(_weights.hf_cache_dir()),
        "hf_offline": _weights.hub_offline(),
    }
    if args.json:
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
    autocast = f"{env['dtype']} autocast" if dtype else "float32"
    print(f"device: {env['device']}  precision: {autocast}  threads: {env['torch_threads']}")
    offline = "  (HF_HUB_OFFLINE)" if env["hf_offline"] else ""
    print(f"Hugging Face cache: {env['hf_cache']}{offline}")
    return 0


# --- registry: the one place commands are listed ----------------------------------------------

Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
_COMMANDS: dict[str, Command] = {
    "encoders": (
        "list encoders, where their weights are, and the device/precision that would be used",
        _args_encoders,
        _cmd_encoders,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered subcommand."""
    parser = argparse.ArgumentParser(prog=PROG, description="Virchow / Virchow 2 embeddings of whole-slide images.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_, add_args, run) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        add_args(p)
        p.set_defaults(_run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 usage or expected error, 130 interrupted)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors: argparse has printed already
        return exc.code if isinstance(exc.code, int) else 2
    run: Callable[[argparse.Namespace], int] = args._run
    try:
        return run(args)
    except VirchowError as exc:
        # Expected failures (bad file, no weights...): the message names the fix, no traceback.
        message = " ".join(str(exc).split())  # one line, whatever the message holds
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
