"""``napari-virchow import-features FILE.h5 --slide SLIDE``: reuse features computed elsewhere."""

from __future__ import annotations

import argparse
from pathlib import Path

from napari_virchow.cli.common import CONSOLE, open_session
from napari_virchow.cli.options import CliError, config_from_args

__all__ = ["args_import_features", "cmd_import_features"]


def args_import_features(p: argparse.ArgumentParser) -> None:
    """Options: the features file and its slide."""
    p.add_argument("features", metavar="FILE.h5",
                   help="features HDF5 from `napari-virchow export` or TRIDENT (features + coords)")  # fmt: skip
    p.add_argument("--slide", required=True, metavar="SLIDE", help="the slide the features were computed from")


def cmd_import_features(args: argparse.Namespace) -> int:
    """Load the file's rows into the slide's embedding cache (rows already cached are kept)."""
    from napari_virchow.io.reuse import import_features

    path = Path(args.features)
    if not path.is_file():
        raise CliError(f"{path}: no such features file; give the .h5 written by `export` or TRIDENT")
    config = config_from_args(args)
    with open_session(args.slide, config) as session:
        report = import_features(session, path)
        CONSOLE.out(f"{session.slide.path.name}: imported {report.n_written} of {report.n_rows} tiles from "
                    f"{path.name} ({report.kind}); {report.n_kept} were already cached")  # fmt: skip
    return 0
