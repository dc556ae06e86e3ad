"""The package's own exceptions: one class per kind of failure, each message names the file and the fix."""

from __future__ import annotations

__all__ = ["HeadError", "SlideError", "StoreError", "VirchowError", "WeightsError"]


class VirchowError(Exception):
    """Base class of every error napari-virchow raises on purpose (bad input, missing files, ...)."""


class SlideError(VirchowError):
    """A slide file cannot be opened or read, or lacks what analysis needs (e.g. µm/px)."""


class WeightsError(VirchowError):
    """Encoder weights cannot be found, fetched, or do not fit the requested architecture."""


class StoreError(VirchowError):
    """An embedding store is corrupt, read-only, or belongs to another slide / encoder / version."""


class HeadError(VirchowError):
    """A classification head file is invalid or was made for another encoder."""
