"""Encoders loaded once per process, shared by every session (viewer, CLI, dask worker, notebook).

Loading Virchow 2 takes seconds and 2.5 GB: a dask worker running many slide tasks, a CLI run
over a cohort and a viewer with several slides open all reuse one loaded encoder per (encoder,
weights, device, precision). A weights file that changes on disk (size or mtime) is loaded again.
The cache holds at most :data:`MAX_ENCODERS`; the least recently used is dropped beyond that.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from napari_virchow.models.encoder import Encoder

__all__ = ["MAX_ENCODERS", "clear_encoders", "get_encoder", "loaded_encoders"]

#: encoders kept loaded at once (switching between two encoders in the viewer keeps both)
MAX_ENCODERS = 2

_Key = tuple[str, "str | None", "tuple[int, int] | None", str, str, bool]
_ENCODERS: OrderedDict[_Key, Encoder] = OrderedDict()
_LOCK = threading.Lock()


def _key(encoder: str, weights: str | None, device: str, dtype: str, compile: bool) -> _Key:
    stamp = None
    if weights and os.path.isfile(weights):
        st = os.stat(weights)
        stamp = (st.st_size, st.st_mtime_ns)
    return (encoder, weights, stamp, device, dtype, compile)


def get_encoder(encoder: str, *, weights: str | None = None, device: str = "auto", dtype: str = "auto",
                compile: bool = False) -> Encoder:  # fmt: skip
    """The loaded encoder for these settings, loaded on first use (slow: call it off the UI thread).

    ``compile``: the forward pass through ``torch.compile`` (its first batch compiles, ~30 s for
    Virchow 2 on a 2-core CPU, one graph for every batch size; see :func:`~napari_virchow.models.encoder.load_encoder`).
    """
    key = _key(encoder, weights, device, dtype, compile)
    with _LOCK:  # held while loading: concurrent tasks wait instead of loading twice
        if key not in _ENCODERS:
            from napari_virchow.models.encoder import load_encoder

            _ENCODERS[key] = load_encoder(encoder, weights=weights, device=device, dtype=dtype, compile=compile)
            while len(_ENCODERS) > MAX_ENCODERS:
                _ENCODERS.popitem(last=False)
        _ENCODERS.move_to_end(key)
        return _ENCODERS[key]


def loaded_encoders() -> int:
    """Encoders this process holds (e.g. ``client.run(loaded_encoders)`` on dask workers)."""
    with _LOCK:
        return len(_ENCODERS)


def clear_encoders() -> None:
    """Drop every cached encoder (their memory is freed once no session holds them)."""
    with _LOCK:
        _ENCODERS.clear()
