"""Head files: a :class:`~napari_virchow.analysis.heads.LinearHead` (or one probe per magnification)
saved as ``.safetensors`` (tensors + a JSON header) or ``.json``, and loaded back without executing code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from napari_virchow.analysis.heads import FORMAT1_MPP, HEAD_FORMAT, HEAD_VERSION, LinearHead, MultiScaleHead
from napari_virchow.errors import HeadError
from napari_virchow.io.files import atomic_write
from napari_virchow.store.key import canonical_mpp

__all__ = ["load_head", "save_head"]


def _arrays(head: LinearHead) -> dict[str, np.ndarray]:
    """``weight``/``bias`` of the head itself, plus ``weight@<mpp>``/``bias@<mpp>`` per level of a multi-level one."""
    out = {"weight": head.weights, "bias": head.bias}
    if isinstance(head, MultiScaleHead):
        for m, p in head.probes.items():
            out[f"weight@{m:g}"], out[f"bias@{m:g}"] = p.weights, p.bias
    return out


def save_head(head: LinearHead, path: str | os.PathLike[str]) -> Path:
    """Save ``head`` (one probe or one per magnification) as ``.safetensors`` (tensors + JSON header) or ``.json``."""
    from safetensors.numpy import save_file

    path = Path(path)
    meta = head.metadata()
    tensors = _arrays(head)
    if path.suffix == ".safetensors":
        atomic_write(
            path, lambda tmp: save_file(tensors, tmp, metadata={HEAD_FORMAT: json.dumps(meta)})
        )
    elif path.suffix == ".json":
        meta["arrays"] = {k: v.tolist() for k, v in tensors.items()}
        text = json.dumps(meta, indent=1)
        atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    else:
        raise HeadError(f"{path}: unknown head format; use a .safetensors or .json file name")
    return path


def _read(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="np") as f:
                meta = json.loads((f.metadata() or {})[HEAD_FORMAT])
                return meta, {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
        except (SafetensorError, OSError, KeyError, ValueError, TypeError) as exc:
            raise HeadError(
                f"{path}: not a napari-virchow head ({type(exc).__name__}: {exc}); "
                "fit a new head or pick the right file"
            ) from exc
    if path.suffix == ".json":
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
            if "arrays" in meta:
                return meta, {str(k): np.asarray(v) for k, v in dict(meta.pop("arrays")).items()}
            return meta, {"weight": np.asarray(meta.pop("weight")), "bias": np.asarray(meta.pop("bias"))}  # format 1
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise HeadError(
                f"{path}: not a napari-virchow head ({type(exc).__name__}: {exc}); "
                "fit a new head or pick the right file"
            ) from exc
    raise HeadError(f"{path}: unknown head format; expected a .safetensors or .json head file")


def _build(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> LinearHead:
    """The head of a file's metadata and arrays: a MultiScaleHead when it has ``levels``."""
    common: dict[str, Any] = {"classes": list(meta["classes"]), "encoder": str(meta["encoder"]),
              "positive_class": meta.get("positive_class")}  # fmt: skip
    levels = meta.get("levels")
    if not levels:  # one probe; format 1 files were all fitted at 0.5 µm/px
        return LinearHead(weights=arrays["weight"], bias=arrays["bias"], weights_id=meta.get("weights_id"),
                          metrics=dict(meta.get("metrics") or {}), mpp=float(meta.get("mpp", FORMAT1_MPP)),
                          **common)  # fmt: skip
    probes = {}
    for key, level in dict(levels).items():
        m = canonical_mpp(float(key))
        probes[m] = LinearHead(weights=arrays[f"weight@{m:g}"], bias=arrays[f"bias@{m:g}"],
                               weights_id=level.get("weights_id", meta.get("weights_id")),
                               metrics=dict(level.get("metrics") or {}), mpp=m, **common)  # fmt: skip
    return MultiScaleHead.from_probes(probes)


def load_head(path: str | os.PathLike[str], encoder: str | None = None) -> LinearHead:
    """Load a head (a :class:`MultiScaleHead` when the file has one probe per magnification);
    with ``encoder`` given, refuse one fitted on another encoder's embeddings."""
    path = Path(path)
    if not path.is_file():
        raise HeadError(f"{path}: head file not found")
    meta, arrays = _read(path)
    if not isinstance(meta, dict) or meta.get("format") != HEAD_FORMAT:
        raise HeadError(f"{path}: not a napari-virchow head (no '{HEAD_FORMAT}' format marker)")
    version = meta.get("version", 0)
    if not isinstance(version, (int, float)):
        raise HeadError(f"{path}: head format version {version!r} is not a number; fit a new head")
    if version > HEAD_VERSION:
        raise HeadError(
            f"{path}: head format version {meta['version']} is newer than this napari-virchow "
            f"understands ({HEAD_VERSION}); upgrade napari-virchow"
        )
    if encoder is not None and meta.get("encoder") != encoder:
        raise HeadError(
            f"{path}: this head was fitted on '{meta.get('encoder')}' embeddings but the current "
            f"encoder is '{encoder}'; switch the encoder to '{meta.get('encoder')}' or fit a new "
            f"head on '{encoder}' embeddings"
        )
    try:
        return _build(meta, arrays)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise HeadError(f"{path}: head file is incomplete ({type(exc).__name__}: {exc})") from exc
