"""napari-virchow: viewport-driven Virchow / Virchow 2 inference on whole-slide images.

The package root stays free of Qt and napari imports so that the CLI and notebooks never load Qt.
"""

from __future__ import annotations

__version__ = "0.2.0.dev0"

from napari_virchow.errors import HeadError, SlideError, StoreError, VirchowError, WeightsError

__all__ = ["HeadError", "SlideError", "StoreError", "VirchowError", "WeightsError", "__version__"]
