"""Why a file is not a readable slide: up-front checks and one-sentence diagnoses with the fix."""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import openslide
import tifffile

from napari_virchow.errors import SlideError

if TYPE_CHECKING:
    from napari_virchow.slides.slide import Slide
    from napari_virchow.slides.tiff import TiffPyramid

__all__ = ["SLIDE_SUFFIXES", "check_complete", "check_file", "diagnose", "dicom_entry", "TifffileProblems",
           "warn_missing_mpp"]

SLIDE_SUFFIXES = (
    ".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".dcm",
)  # fmt: skip


def dicom_entry(path: Path) -> Path:
    """A folder of DICOM WSI files (.dcm) → its first .dcm file (OpenSlide reads the whole set from
    any one of them); any other path unchanged."""
    if path.is_dir():
        found = sorted(p for p in path.glob("*.dcm") if p.is_file())
        if found:
            return found[0]
    return path


class _ProblemLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        # drop tifffile's "<tifffile.TiffPages @8>" prefix: users need the problem, not the object
        self.messages.append(re.sub(r"<[^>]*>\s*", "", record.getMessage()))


class TifffileProblems:
    """Collect what tifffile logs (it logs, rather than raises, on broken IFD chains)."""

    def __enter__(self) -> list[str]:
        self._handler = _ProblemLog()
        self._logger = logging.getLogger("tifffile")
        self._logger.addHandler(self._handler)
        self._propagate, self._logger.propagate = self._logger.propagate, False
        return self._handler.messages

    def __exit__(self, *exc: object) -> None:
        self._logger.removeHandler(self._handler)
        self._logger.propagate = self._propagate


def diagnose(path: Path) -> str:
    """Why OpenSlide refused a vendor-format file, in one sentence with the fix."""
    name, suffix = path.name, path.suffix.lower()
    if suffix not in SLIDE_SUFFIXES:
        # a .png, .jpg, .czi ... OpenSlide did not recognise: not damaged, just not a slide format
        kind = f"a {suffix} file" if suffix else "a file without a suffix"
        return (
            f"{name} is {kind}, not a whole-slide format this plugin reads (supported: "
            f"{', '.join(SLIDE_SUFFIXES)}). Convert it to a pyramidal TIFF "
            "(e.g. `vips tiffsave IN OUT.tif --tile --pyramid --compression jpeg`)."
        )
    try:
        with TifffileProblems() as problems, tifffile.TiffFile(path) as tif:
            len(tif.pages)
    except (tifffile.TiffFileError, ValueError, OSError) as exc:
        if "not a TIFF" in str(exc) and suffix in (".svs", ".ndpi", ".scn", ".bif", ".svslide"):
            with open(path, "rb") as f:
                head = f.read(8)
            return (
                f"{name} is not a slide: a {suffix} file is a TIFF, but this one starts with "
                f"{head!r}. Check that you picked the right file."
            )
        problems = [str(exc)]
    detail = f" ({problems[0]})" if problems else ""
    return (
        f"OpenSlide cannot read {name}{detail}: the file is truncated, corrupt, or not a "
        f"{suffix} slide. Copy it again from the scanner, or convert it to a pyramidal TIFF."
    )


def check_file(path: Path) -> None:
    """Refuse what cannot be a slide before any library sees it, with a message that helps."""
    name = path.name or str(path)
    if not path.exists():
        raise SlideError(f"{path}: no such file. Check the path (and that the drive is mounted).")
    if path.is_dir() and ((path / ".zattrs").is_file() or (path / "zarr.json").is_file()):
        return  # an OME-Zarr folder (slides/ngff.py checks its metadata)
    if path.is_dir():
        raise SlideError(
            f"{name} is a folder, not a slide file. Open the slide file itself "
            "(for MIRAX, the .mrxs file that sits next to this folder)."
        )
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except PermissionError as exc:
        raise SlideError(
            f"{name}: permission denied reading the file. Ask for read access or copy it somewhere you own."
        ) from exc
    except OSError as exc:
        raise SlideError(f"{name}: cannot be read ({exc.strerror}).") from exc
    if not head:
        raise SlideError(f"{name} is empty (0 bytes): the copy is incomplete. Copy the slide again.")


def warn_missing_mpp(slide: Slide) -> None:
    """Warn (once per open) that analysis needs an µm/px override for this slide."""
    if slide.mpp is None:
        warnings.warn(
            f"{slide.path.name} has no µm/px in its metadata: it is shown at scale 1 (pixels), and "
            "analysis needs an override (µm/px field in the widget, or --mpp-override).",
            UserWarning,
            stacklevel=2,
        )


def check_complete(path: Path, tiff: TiffPyramid | None, osr: openslide.OpenSlide | None) -> None:
    """Fail at open, not mid-analysis, when the file is cut short."""
    name = path.name
    if tiff is not None:
        size = path.stat().st_size
        end = max(level.data_end() for level in tiff.levels)
        if end > size:
            raise SlideError(
                f"{name} is truncated: its tiles reach byte {end:,} but the file has "
                f"{size:,}. Copy the slide again (the transfer was incomplete)."
            )
        return
    assert osr is not None
    try:  # reading the last tile of the first and last level touches the far end of the data
        for level in (0, osr.level_count - 1):
            w, h = osr.level_dimensions[level]
            ds = osr.level_downsamples[level]
            x, y = max(w - 256, 0), max(h - 256, 0)
            osr.read_region((int(x * ds), int(y * ds)), level, (min(w, 256), min(h, 256)))
    except openslide.OpenSlideError as exc:
        raise SlideError(
            f"{name}: reading tiles failed ({exc}); the file is probably truncated or corrupt. "
            "Copy it again from the scanner."
        ) from exc
