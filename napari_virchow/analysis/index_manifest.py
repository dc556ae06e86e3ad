"""Where an index's slides and embedding stores are now: relative paths, a new archive root, changed files.

Each slide is recorded with its absolute path at build time, its path relative to the index
folder (``rel_index``) and relative to the archive root (``rel_root``: the common folder of the
indexed slides); stores are recorded relative to the cache root. A moved archive is found again
from the index's own location, or from a new root given by the user.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from napari_virchow.store.key import mag_name

__all__ = ["changed_slides", "common_root", "index_for_mpp", "locate_cache", "locate_slide", "relative_fields"]


def common_root(paths: list[str]) -> str | None:
    """The deepest folder holding every path (None for none)."""
    if not paths:
        return None
    try:
        return os.path.commonpath([str(Path(p).parent) for p in paths])
    except ValueError:  # pragma: no cover - paths on different Windows drives
        return None


def _rel(path: str | Path, start: str | Path | None) -> str | None:
    if start is None:
        return None
    try:
        return Path(os.path.relpath(path, start)).as_posix()
    except ValueError:  # pragma: no cover - another Windows drive
        return None


def relative_fields(meta: dict[str, Any], index_dir: Path, cache_root: Path | None) -> None:
    """Record, in place, each slide's path relative to ``index_dir`` and to the archive root, and the cache's."""
    slides = meta["slides"]
    root = common_root([s["path"] for s in slides if not s.get("removed")])
    meta["slide_root"] = root
    for s in slides:
        s["built_path"] = s["path"]
        s["rel_index"] = _rel(s["path"], index_dir)
        s["rel_root"] = _rel(s["path"], root)
    if cache_root is not None:
        meta["cache_root"] = str(Path(cache_root).resolve())
        meta["cache_rel"] = _rel(meta["cache_root"], index_dir)


def locate_slide(s: dict[str, Any], index_dir: Path | None, root: Path | None) -> Path:
    """The slide's file now: under ``root`` (a moved archive), beside the index, else its build-time path."""
    tries: list[Path] = []
    if root is not None and s.get("rel_root"):
        tries.append(root / s["rel_root"])
    if index_dir is not None and s.get("rel_index"):
        tries.append(index_dir / s["rel_index"])
    tries.append(Path(s.get("built_path", s["path"])))
    for p in tries:
        if p.exists():
            return p.resolve()
    return tries[0] if root is not None and len(tries) > 1 else tries[-1]


def locate_cache(meta: dict[str, Any], index_dir: Path | None, root: Path | None,
                 cache_root: Path | None) -> Path | None:  # fmt: skip
    """The embedding cache of the index now: the one given, beside the index, under ``root``, or as built."""
    if cache_root is not None:
        return Path(cache_root)
    recorded = meta.get("cache_root")
    if not recorded:
        return None
    tries: list[Path] = []
    if index_dir is not None and meta.get("cache_rel"):
        tries.append(index_dir / meta["cache_rel"])
    slide_root = meta.get("slide_root")
    if root is not None and slide_root:
        rel = _rel(recorded, slide_root)
        if rel is not None and not rel.startswith(".."):
            tries.append(root / rel)
    tries.append(Path(recorded))
    for p in tries:
        if p.is_dir():
            return p.resolve()
    return Path(recorded)


def changed_slides(slides: list[dict[str, Any]]) -> list[str]:
    """Paths of present slide files whose content fingerprint differs from the indexed one (memoised: cheap)."""
    from napari_virchow.slides.fingerprint import fingerprint

    out = []
    for s in slides:
        if s.get("removed") or not Path(s["path"]).exists():
            continue
        try:
            now = fingerprint(s["path"])
        except OSError:
            now = None
        if now != s["fingerprint"]:
            out.append(s["path"])
    return out


def index_for_mpp(path: str | os.PathLike[str], mpp: float | None) -> Path:
    """The index to search for a query at ``mpp``: ``path`` itself, or, for a folder of several
    indexes (``NAME.faiss`` + ``NAME.json``, one per magnification), the one built at ``mpp``.

    Raises ValueError naming the magnifications there when none matches (or several do).
    """
    p = Path(path)
    if p.suffix == ".faiss" or (p / "INDEX.json").exists() or not p.is_dir():
        return p
    found: dict[Path, float | None] = {}
    for meta in sorted(p.glob("*.json")):
        try:
            doc = json.loads(meta.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and doc.get("format") == "napari-virchow-index" \
                and meta.with_suffix(".faiss").exists():
            found[meta.with_suffix(".faiss")] = None if doc.get("mpp") is None else float(doc["mpp"])
    if not found:
        return p  # load_index reports what is missing
    if mpp is None:
        if len(found) == 1:
            return next(iter(found))
        match = []
    else:
        match = [f for f, m in found.items() if m is not None and abs(m - mpp) <= 1e-6 * m]
    if len(match) == 1:
        return match[0]
    have = ", ".join(f"{f.name} at {mag_name(m)}" if m else f"{f.name} (µm/px not recorded)" for f, m in found.items())
    want = "give the query's magnification" if mpp is None else f"none is at {mag_name(mpp)}"
    raise ValueError(f"{p}: holds {len(found)} indexes ({have}); {want}. Pick the query at one of these "
                     f"magnifications, or build an index at it (`napari-virchow index --mpp UM --out {p}/NAME.faiss`)")
