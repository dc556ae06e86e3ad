"""Command line: ``napari-virchow <command> ...`` (also ``python -m napari_virchow.cli``)."""

from napari_virchow.cli.app import main

__all__ = ["main"]
