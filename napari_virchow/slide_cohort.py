"""A cohort of labelled slides for slide heads, without Qt: the CSV, and bags read from the stores.

``COHORT.csv`` has one row per slide: its path (relative paths resolve against the CSV's folder),
its label, and optionally its cross-validation fold. A header row names the columns (``slide`` or
``path``, ``label`` or ``class``, ``fold``); without one the columns are taken in that order.
:class:`StoreBags` gives each slide's tissue-tile embeddings, read (verified) from its store
when asked, so training holds one slide's tiles at a time.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import numpy as np

from napari_virchow.errors import VirchowError

__all__ = ["CohortError", "CohortRow", "StoreBags", "read_cohort_csv"]

_SLIDE = ("slide", "path", "slide_path", "file")
_LABEL = ("label", "class", "diagnosis")
_FOLD = ("fold", "split")


class CohortError(VirchowError, ValueError):
    """A cohort CSV is missing, malformed, or lists missing / duplicate slides or too few classes."""


@dataclass(frozen=True)
class CohortRow:
    """One slide of a cohort: absolute path, label, fold (None without a fold column)."""

    slide: Path
    label: str
    fold: str | None = None


def _columns(header: list[str]) -> tuple[int, int, int | None] | None:
    names = [h.strip().lower() for h in header]

    def find(options: tuple[str, ...]) -> int | None:
        return next((i for i, n in enumerate(names) if n in options), None)

    slide, label, fold = find(_SLIDE), find(_LABEL), find(_FOLD)
    if slide is None and label is None:
        return None  # no header
    if slide is None or label is None:
        raise CohortError(f"the header {header} names no {'slide' if slide is None else 'label'} column: "
                          "name the columns slide,label[,fold]")  # fmt: skip
    return slide, label, fold


def read_cohort_csv(path: str | Path, *, classes: Sequence[str] | None = None) -> list[CohortRow]:
    """The rows of ``path``; CohortError naming the file, rows and fix for missing files, duplicate slides,
    empty labels, one class only, or labels outside ``classes``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise CohortError(f"cannot read the cohort CSV {path} ({getattr(exc, 'strerror', None) or exc}): "
                          "give a CSV file with columns slide,label[,fold]") from exc  # fmt: skip
    rows = [r for r in csv.reader(text.splitlines()) if any(c.strip() for c in r)]
    if not rows:
        raise CohortError(f"{path} is empty: give one row per slide (slide,label[,fold])")
    cols = _columns(rows[0])
    body = rows[1:] if cols is not None else rows
    i_slide, i_label, i_fold = cols if cols is not None else (0, 1, 2 if len(rows[0]) > 2 else None)
    first = 2 if cols is not None else 1
    out: list[CohortRow] = []
    for n, cells in enumerate(body, start=first):
        if len(cells) <= max(i_slide, i_label):
            raise CohortError(f"{path} line {n}: {cells} has no {'label' if len(cells) > i_slide else 'slide'}: give "
                              "slide,label[,fold] on every row")  # fmt: skip
        label = cells[i_label].strip()
        if not label:
            raise CohortError(f"{path} line {n}: slide {cells[i_slide].strip()} has an empty label: label every slide")
        fold = cells[i_fold].strip() if i_fold is not None and i_fold < len(cells) and cells[i_fold].strip() else None
        slide = Path(cells[i_slide].strip()).expanduser()
        out.append(CohortRow((slide if slide.is_absolute() else path.parent / slide).resolve(), label, fold))
    if not out:
        raise CohortError(f"{path} has a header but no slides: give one row per slide")
    missing = [r.slide for r in out if not r.slide.is_file()]
    if missing:
        shown = ", ".join(str(p) for p in missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise CohortError(f"{path}: {len(missing)} slide file(s) not found: {shown} (relative paths resolve "
                          f"against {path.parent}); fix the paths or remove those rows")  # fmt: skip
    seen: dict[Path, int] = {}
    for n, r in enumerate(out, start=first):
        if r.slide in seen:
            raise CohortError(f"{path}: {r.slide.name} is listed twice (lines {seen[r.slide]} and {n}): list each "
                              "slide once")  # fmt: skip
        seen[r.slide] = n
    labels = sorted({r.label for r in out})
    if len(labels) < 2:
        raise CohortError(f"{path}: every slide is labelled '{labels[0]}': a slide head needs slides of at least "
                          "two classes")  # fmt: skip
    if classes is not None:
        unknown = sorted(set(labels) - {str(c) for c in classes})
        if unknown:
            raise CohortError(f"{path}: labels {unknown} are not among the head's classes {list(classes)}: fix the "
                              "labels or use a head trained on them")  # fmt: skip
    return out


class StoreBags(Sequence[np.ndarray]):
    """Per slide, the float32 embeddings of its tissue tiles, read from its store (checksummed) on each access."""

    def __init__(self) -> None:
        self._items: list[tuple[Path, np.ndarray]] = []

    def add(self, store_path: str | Path, indices: np.ndarray) -> None:
        """Append a slide: its store folder and the tile indices of its bag."""
        self._items.append((Path(store_path), np.asarray(indices, np.int64)))

    def __len__(self) -> int:
        return len(self._items)

    @overload
    def __getitem__(self, i: int) -> np.ndarray: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[np.ndarray]: ...

    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        from napari_virchow.store.embeddings import EmbeddingStore

        path, idx = self._items[i]
        store = EmbeddingStore.from_path(path, mode="r")
        try:
            return store.read(idx)
        finally:
            store.close()
