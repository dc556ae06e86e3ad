"""Slide-head files: ``.safetensors`` tensors + one JSON header (encoder, weights digest, µm/px,
tile size, classes, sizes, training metrics, plugin version). No pickle: loading runs no code.

Written atomically (:func:`napari_virchow.io.files.atomic_write`); a file that is not a slide
head, is damaged, or holds NaN / infinite weights is refused with one HeadError.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from napari_virchow.analysis.mil import SlideHead, metrics_json
from napari_virchow.errors import HeadError
from napari_virchow.io.files import atomic_write

__all__ = ["load_slide_head", "save_slide_head"]

_FORMAT = "napari-virchow-slide-head"
_VERSION = 1
_TILE_FORMAT = "napari-virchow-head"  # the tile probes of analysis/heads.py


def slide_head_metadata(head: SlideHead) -> dict[str, Any]:
    """Everything but the arrays, JSON-serialisable (the file's header)."""
    from napari_virchow import __version__

    return {"format": _FORMAT, "version": _VERSION, "encoder": head.encoder, "weights_digest": head.weights_digest,
            "mpp": head.mpp, "tile_size": head.tile_size, "classes": list(head.classes),
            "positive_class": head.positive_class, "config": dict(head.config), "metrics": metrics_json(head.metrics),
            "napari_virchow_version": __version__}  # fmt: skip


def save_slide_head(head: SlideHead, path: str | os.PathLike[str]) -> Path:
    """Write ``head`` to ``path`` (``.safetensors``) atomically; refuses non-finite weights."""
    from safetensors.numpy import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise HeadError(f"{path}: a slide head is saved as .safetensors; name the file {path.stem}.safetensors")
    bad = [k for k, v in head.state.items() if not np.all(np.isfinite(v))]
    if bad:
        raise HeadError(f"slide head weights {bad} hold NaN or infinite values: not saved; fit the head again")
    meta = json.dumps(slide_head_metadata(head))
    tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in head.state.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={_FORMAT: meta}))
    return path


def load_slide_head(path: str | os.PathLike[str]) -> SlideHead:
    """Read a slide head written by :func:`save_slide_head` (HeadError naming the file otherwise)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise HeadError(f"{path}: slide head file not found; give the file fit-slide-head wrote")
    try:
        with safe_open(str(path), framework="np") as f:
            header = f.metadata() or {}
            if _FORMAT not in header:
                kind = "a tile head (probe), load it as a head" if _TILE_FORMAT in header else "not a slide head"
                raise HeadError(f"{path}: {kind}; give a file written by napari-virchow fit-slide-head")
            meta = json.loads(header[_FORMAT])
            arrays = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
    except HeadError:
        raise
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        raise HeadError(f"{path}: not a napari-virchow slide head ({type(exc).__name__}: {exc}); give a file "
                        "written by napari-virchow fit-slide-head") from exc  # fmt: skip
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        raise HeadError(f"{path}: not a napari-virchow slide head (no '{_FORMAT}' marker)")
    version = meta.get("version")
    if not isinstance(version, int) or version > _VERSION:
        raise HeadError(f"{path}: slide head format version {version!r} is not one this napari-virchow reads "
                        f"({_VERSION}); upgrade napari-virchow")  # fmt: skip
    try:
        return SlideHead(encoder=str(meta["encoder"]), weights_digest=str(meta["weights_digest"]),
                         mpp=float(meta["mpp"]), tile_size=int(meta["tile_size"]), classes=tuple(meta["classes"]),
                         state=arrays, config=dict(meta["config"]), metrics=dict(meta.get("metrics") or {}),
                         positive_class=meta.get("positive_class"))  # fmt: skip
    except HeadError as exc:
        raise HeadError(f"{path}: {exc}") from exc
    except (KeyError, TypeError, ValueError) as exc:
        raise HeadError(f"{path}: slide head file is incomplete ({type(exc).__name__}: {exc}); fit it again") from exc
