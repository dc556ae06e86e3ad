"""napari sample data: the real CMU-1 H&E small region (Aperio SVS and a 3-level pyramid)."""

from __future__ import annotations

from pathlib import Path

from napari_virchow._reader import LayerData, prefer_this_reader, read_slides

__all__ = ["cmu_small_region_pyramid", "cmu_small_region_svs", "sample_path"]


def sample_path(name: str) -> Path:
    """Path of a file in ``sample_data/`` (inside the wheel, or at the repository root)."""
    here = Path(__file__).resolve().parent
    for folder in (here / "sample_data", here.parent / "sample_data"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"sample file {name!r} is missing from this installation")


def cmu_small_region_pyramid() -> list[LayerData]:
    """CMU-1 small region as a pyramidal tiled-JPEG TIFF (3 levels, 0.499 µm/px, 20×)."""
    prefer_this_reader()  # the plugin is in use: File ▸ Open stops asking which reader for slides
    return read_slides(sample_path("cmu_small_region_pyramid.tif"))


def cmu_small_region_svs() -> list[LayerData]:
    """CMU-1 small region as the original single-level Aperio SVS (coarser levels made lazily)."""
    prefer_this_reader()
    return read_slides(sample_path("cmu_small_region.svs"))
