"""Helpers of :mod:`napari_virchow.analysis.heads`: labels to class names, metadata to plain JSON."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["clean_labels", "json_safe"]


def json_safe(value: Any) -> Any:
    """Plain JSON types; NaN becomes None because JSON has no NaN."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [json_safe(v) for v in value]
    if isinstance(value, (np.integer, int)) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return None if not np.isfinite(value) else float(value)
    return value


def clean_labels(
    labels: np.ndarray | Sequence[Any], classes: Sequence[str] | None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Class name per labelled sample, the mask of labelled samples, and the class order.

    Integer labels index ``classes`` (negative = unlabelled); strings are names (``""``/None =
    unlabelled), so ``rasterize_annotations`` output can be passed straight through.
    """
    arr = np.asarray(labels)
    if arr.dtype.kind in "iu":
        keep = arr >= 0
        if classes is None:
            # Numeric order, not string order ("10" would sort before "2").
            return arr[keep].astype(str), keep, [str(v) for v in np.unique(arr[keep])]
        if keep.any() and int(arr[keep].max()) >= len(classes):
            raise ValueError(f"label {int(arr.max())} has no entry in classes {list(classes)}")
        order = [str(c) for c in classes]
        return np.asarray(order)[arr[keep]], keep, order
    names = np.asarray(["" if v is None else str(v) for v in arr.reshape(-1)])
    keep = names != ""
    order = [str(c) for c in classes] if classes is not None else sorted(set(names[keep].tolist()))
    return names[keep], keep, order
